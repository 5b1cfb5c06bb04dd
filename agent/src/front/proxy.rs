//! The PROXY protocol v2 header (haproxy's proxy-protocol.txt, section 2.2) the front sends
//! its worker first, so the app learns the client's address (`proxy_protocol = "v2"`).

use std::net::SocketAddr;

const SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// Version 2, command PROXY.
const V2_PROXY: u8 = 0x21;
/// AF_INET / AF_INET6, SOCK_STREAM.
const TCP4: u8 = 0x11;
const TCP6: u8 = 0x21;

/// The header for a connection from `client` to `local` (the front's TLS address). Mixed
/// families (an IPv4 client on a dual-stack socket) are sent as IPv6, mapped.
pub fn v2_header(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let mut h = SIGNATURE.to_vec();
    h.push(V2_PROXY);
    match (client, local) {
        (SocketAddr::V4(c), SocketAddr::V4(l)) => {
            h.push(TCP4);
            h.extend_from_slice(&12u16.to_be_bytes());
            h.extend_from_slice(&c.ip().octets());
            h.extend_from_slice(&l.ip().octets());
            h.extend_from_slice(&c.port().to_be_bytes());
            h.extend_from_slice(&l.port().to_be_bytes());
        }
        (c, l) => {
            let v6 = |a: SocketAddr| match a {
                SocketAddr::V4(a) => a.ip().to_ipv6_mapped().octets(),
                SocketAddr::V6(a) => a.ip().octets(),
            };
            h.push(TCP6);
            h.extend_from_slice(&36u16.to_be_bytes());
            h.extend_from_slice(&v6(c));
            h.extend_from_slice(&v6(l));
            h.extend_from_slice(&c.port().to_be_bytes());
            h.extend_from_slice(&l.port().to_be_bytes());
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_header_is_28_bytes_with_the_addresses_in_order() {
        let h = v2_header(
            "192.0.2.1:51000".parse().unwrap(),
            "198.51.100.2:443".parse().unwrap(),
        );
        assert_eq!(h.len(), 16 + 12);
        assert_eq!(&h[..12], SIGNATURE);
        assert_eq!(h[12], 0x21);
        assert_eq!(h[13], 0x11);
        assert_eq!(&h[14..16], &[0, 12]);
        assert_eq!(&h[16..20], &[192, 0, 2, 1]);
        assert_eq!(&h[20..24], &[198, 51, 100, 2]);
        assert_eq!(&h[24..26], &51000u16.to_be_bytes());
        assert_eq!(&h[26..28], &443u16.to_be_bytes());
    }

    #[test]
    fn ipv6_and_mixed_families_use_the_ipv6_form() {
        let h = v2_header(
            "[2001:db8::1]:1234".parse().unwrap(),
            "[::1]:443".parse().unwrap(),
        );
        assert_eq!(h.len(), 16 + 36);
        assert_eq!(h[13], 0x21);
        let h = v2_header("192.0.2.1:1".parse().unwrap(), "[::]:443".parse().unwrap());
        assert_eq!(h[13], 0x21);
        assert_eq!(&h[16..28], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
    }
}
