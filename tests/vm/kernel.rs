//! The VM kernel itself: cgroup2 with the controllers corral uses, and kTLS on a loopback
//! connection.

use super::fixture::in_vm;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

#[test]
#[ignore = "VM tier: run by cargo xtask vm-test"]
fn cgroup2_is_mounted_with_memory_pids_and_cpu() {
    in_vm();
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("read /proc/self/mounts");
    let cgroup2 = mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.get(1) == Some(&"/sys/fs/cgroup") && f.get(2) == Some(&"cgroup2")
    });
    assert!(cgroup2, "no cgroup2 at /sys/fs/cgroup:\n{mounts}");
    let controllers = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
        .expect("read cgroup.controllers");
    println!("cgroup.controllers: {}", controllers.trim());
    let have: BTreeSet<&str> = controllers.split_whitespace().collect();
    for c in ["memory", "pids", "cpu"] {
        assert!(
            have.contains(c),
            "controller {c} missing from cgroup.controllers: {controllers}"
        );
    }
}

/// `struct tls12_crypto_info_aes_gcm_128` of <linux/tls.h>.
#[repr(C)]
struct Tls12AesGcm128 {
    version: u16,
    cipher_type: u16,
    iv: [u8; 8],
    key: [u8; 16],
    salt: [u8; 4],
    rec_seq: [u8; 8],
}

const TCP_ULP: libc::c_int = 31;
const TLS_TX: libc::c_int = 1;
const TLS_1_2_VERSION: u16 = 0x0303;
const TLS_CIPHER_AES_GCM_128: u16 = 51;

fn setsockopt<T>(fd: i32, level: libc::c_int, name: libc::c_int, value: &T, len: usize) -> i32 {
    // SAFETY: `value` points to at least `len` readable bytes for the duration of the call.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast(),
            len as libc::socklen_t,
        )
    }
}

#[test]
#[ignore = "VM tier: run by cargo xtask vm-test"]
fn kernel_tls_encrypts_a_loopback_connection() {
    in_vm();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let (mut server, _) = listener.accept().expect("accept");
    let fd = client.as_raw_fd();

    let ulp = setsockopt(fd, libc::IPPROTO_TCP, TCP_ULP, b"tls", 3);
    assert_eq!(
        ulp,
        0,
        "setsockopt(TCP_ULP, \"tls\"): {} (is tls.ko loaded?)",
        std::io::Error::last_os_error()
    );

    let info = Tls12AesGcm128 {
        version: TLS_1_2_VERSION,
        cipher_type: TLS_CIPHER_AES_GCM_128,
        iv: [1; 8],
        key: [2; 16],
        salt: [3; 4],
        rec_seq: [0; 8],
    };
    let tx = setsockopt(
        fd,
        libc::SOL_TLS,
        TLS_TX,
        &info,
        std::mem::size_of::<Tls12AesGcm128>(),
    );
    assert_eq!(
        tx,
        0,
        "setsockopt(SOL_TLS, TLS_TX, AES-GCM-128): {}",
        std::io::Error::last_os_error()
    );

    // The kernel now writes TLS records: header (application data, TLS 1.2, length), the
    // 8-byte explicit nonce, the ciphertext and the 16-byte tag.
    let plain = b"hello, kernel TLS";
    (&client).write_all(plain).expect("write");
    let want = 5 + 8 + plain.len() + 16;
    let mut record = vec![0u8; want];
    server
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    server.read_exact(&mut record).expect("read the TLS record");
    assert_eq!(record[0], 23, "not an application-data record: {record:?}");
    assert_eq!(&record[1..3], &[3, 3], "not TLS 1.2: {record:?}");
    assert_eq!(
        usize::from(u16::from_be_bytes([record[3], record[4]])),
        want - 5
    );
    assert!(
        !record.windows(plain.len()).any(|w| w == plain),
        "the record carries the plaintext"
    );
    println!(
        "kTLS: {} plaintext bytes went out as a {want}-byte AES-GCM record",
        plain.len()
    );
}
