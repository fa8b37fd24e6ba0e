//! The PROXY protocol, version 2 (HAProxy's `proxy-protocol.txt`, section 2.2): a binary
//! header a proxy worker writes to the backend before the client's first byte, so the
//! backend learns the client's address (and the address it connected to) that the TCP
//! connection from the proxy hides.

use std::net::SocketAddr;

/// The 12 bytes every v2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Version 2 and the PROXY command: the addresses that follow are the connection's.
const PROXY: u8 = 0x21;
/// Version 2 and the LOCAL command: no address (a client of a Unix listener).
const LOCAL: u8 = 0x20;
/// TCP over IPv4 and over IPv6.
const TCP4: u8 = 0x11;
const TCP6: u8 = 0x21;

/// The v2 header for a connection from `client` to `local` (the address it reached);
/// without both as IP addresses of one family, a LOCAL header (the backend uses the
/// connection's own addresses).
pub fn header(client: Option<SocketAddr>, local: Option<SocketAddr>) -> Vec<u8> {
    let mut out = SIGNATURE.to_vec();
    match (client, local) {
        (Some(SocketAddr::V4(src)), Some(SocketAddr::V4(dst))) => {
            out.extend_from_slice(&[PROXY, TCP4]);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&src.ip().octets());
            out.extend_from_slice(&dst.ip().octets());
            out.extend_from_slice(&src.port().to_be_bytes());
            out.extend_from_slice(&dst.port().to_be_bytes());
        }
        (Some(SocketAddr::V6(src)), Some(SocketAddr::V6(dst))) => {
            out.extend_from_slice(&[PROXY, TCP6]);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&src.ip().octets());
            out.extend_from_slice(&dst.ip().octets());
            out.extend_from_slice(&src.port().to_be_bytes());
            out.extend_from_slice(&dst.port().to_be_bytes());
        }
        _ => {
            out.extend_from_slice(&[LOCAL, 0x00]);
            out.extend_from_slice(&0u16.to_be_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv4_connection_is_written_as_the_spec_shows() {
        let client = "192.0.2.1:56324".parse().ok();
        let local = "198.51.100.7:443".parse().ok();
        let bytes = header(client, local);
        let mut expected = SIGNATURE.to_vec();
        expected.extend_from_slice(&[0x21, 0x11, 0, 12]);
        expected.extend_from_slice(&[192, 0, 2, 1, 198, 51, 100, 7]);
        expected.extend_from_slice(&[0xdc, 0x04, 0x01, 0xbb]);
        assert_eq!(bytes, expected);
    }

    #[test]
    fn ipv6_carries_36_bytes_of_addresses() {
        let bytes = header("[::1]:1000".parse().ok(), "[2001:db8::1]:80".parse().ok());
        assert_eq!(&bytes[12..16], &[0x21, 0x21, 0, 36]);
        assert_eq!(bytes.len(), 16 + 36);
        assert_eq!(&bytes[16 + 32..], &[0x03, 0xe8, 0x00, 0x50]);
    }

    #[test]
    fn without_ip_addresses_the_header_is_local() {
        let bytes = header(None, None);
        assert_eq!(&bytes[12..], &[0x20, 0x00, 0, 0]);
        let mixed = header("127.0.0.1:1".parse().ok(), "[::1]:2".parse().ok());
        assert_eq!(&mixed[12..], &[0x20, 0x00, 0, 0]);
    }
}
