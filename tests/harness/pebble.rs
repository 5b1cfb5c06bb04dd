//! A real ACME CA on loopback for tests/acme.rs: Debian's pebble (2.6, with ARI) and
//! pebble-challtestsrv, which `cargo xtask test` (or `cargo xtask acme-tools`) unpacks under
//! target/acme/pebble. challtestsrv's DNS answers every name with 127.0.0.1; pebble validates
//! on the ports it is given (the front's TLS port, its redirect_http port). The guards stop
//! both processes even when a test fails.

use crate::run_ok;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{free_port, loopback, wait_for, ChildGuard};

fn pebble_bin(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/acme/pebble/usr/bin")
        .join(name);
    assert!(
        p.is_file(),
        "{} is missing: `cargo xtask test` fetches it (or `cargo xtask acme-tools` alone)",
        p.display()
    );
    p
}

/// A running pebble and its DNS.
pub struct Pebble {
    pub dir: PathBuf,
    pub directory: String,
    pub management: SocketAddr,
    pub log: PathBuf,
    _ca: ChildGuard,
    _dns: ChildGuard,
}

/// pebble's HTTPS certificate (self-signed, for 127.0.0.1): the `directory_ca` of the config.
pub fn pebble_tls_cert(dir: &Path) {
    let san = ["IP:127.0.0.1".to_string(), "DNS:localhost".to_string()];
    crate::tls::openssl_cert(dir, "pebble", "pebble", &san);
}

pub fn wait_listening(addr: SocketAddr, what: &str) {
    wait_for(Duration::from_secs(30), what, || {
        TcpStream::connect(addr).ok().map(|_| ())
    });
}

impl Pebble {
    /// pebble validating on `tls_port` and `http_port`, issuing certificates valid for
    /// `validity` seconds.
    pub fn start(dir: &Path, tls_port: u16, http_port: u16, validity: u64) -> Pebble {
        pebble_tls_cert(dir);
        let (dns, dns_mgmt, listen, mgmt) = (free_port(), free_port(), free_port(), free_port());
        let dns_log = std::fs::File::create(dir.join("challtestsrv.log")).expect("log");
        let dns_guard = ChildGuard::new(
            Command::new(pebble_bin("pebble-challtestsrv"))
                .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
                .args(["-dns01", &format!("127.0.0.1:{dns}")])
                .args(["-management", &format!("127.0.0.1:{dns_mgmt}")])
                .args(["-http01", "", "-https01", "", "-tlsalpn01", "", "-doh", ""])
                .stdout(dns_log.try_clone().expect("log"))
                .stderr(dns_log)
                .spawn()
                .expect("pebble-challtestsrv"),
        );
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{listen}"),
                "managementListenAddress": format!("127.0.0.1:{mgmt}"),
                "certificate": dir.join("pebble.crt"),
                "privateKey": dir.join("pebble.key"),
                "httpPort": http_port,
                "tlsPort": tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
                "certificateValidityPeriod": validity,
            }
        });
        let cfg = dir.join("pebble.json");
        std::fs::write(&cfg, config.to_string()).expect("pebble.json");
        let log = dir.join("pebble.log");
        let out = std::fs::File::create(&log).expect("log");
        let mut cmd = Command::new(pebble_bin("pebble"));
        cmd.arg("-config")
            .arg(&cfg)
            .args(["-dnsserver", &format!("127.0.0.1:{dns}")])
            .env("PEBBLE_VA_NOSLEEP", "1")
            // No nonce rejections: their retries are the client's business, not these tests'.
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdout(out.try_clone().expect("log"))
            .stderr(out);
        let ca_guard = ChildGuard::new(cmd.spawn().expect("pebble"));
        wait_listening(loopback(listen), "pebble's ACME listener");
        wait_listening(loopback(mgmt), "pebble's management listener");
        wait_listening(loopback(dns_mgmt), "challtestsrv");
        Pebble {
            dir: dir.to_path_buf(),
            directory: format!("https://127.0.0.1:{listen}/dir"),
            management: loopback(mgmt),
            log,
            _ca: ca_guard,
            _dns: dns_guard,
        }
    }

    /// The root pebble issues under (it makes a new one at each start), as PEM in the test
    /// directory.
    pub fn issuing_root(&self) -> PathBuf {
        let out = run_ok(
            Command::new("curl")
                .args(["-sS", "--fail", "--cacert"])
                .arg(self.dir.join("pebble.crt"))
                .arg(format!(
                    "https://127.0.0.1:{}/roots/0",
                    self.management.port()
                )),
            "curl",
        );
        let path = self.dir.join("issuing-root.pem");
        std::fs::write(&path, &out.stdout).expect("write root");
        path
    }

    /// Certificates pebble has issued so far (its log says so for each).
    pub fn issued(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .matches("Issued certificate serial")
            .count()
    }
}
