//! The PROXY protocol version 2 header (haproxy's proxy-protocol.txt, section 2.2): sent first on a connection to
//! an instance whose port mapping asks for it, so the instance learns the client's address.

use std::net::{IpAddr, SocketAddr};

/// The 12-byte signature every v2 header starts with.
pub const SIGNATURE: [u8; 12] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A];

/// The v2 header for a proxied TCP connection from `source` to `destination` (the edge's public address).
/// Mixed families are sent as IPv6, an IPv4 address mapped into it.
pub fn header_v2(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let mut h = Vec::with_capacity(16 + 36);
    h.extend_from_slice(&SIGNATURE);
    // Version 2, command PROXY.
    h.push(0x21);
    match (source.ip(), destination.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            // AF_INET, STREAM.
            h.push(0x11);
            h.extend_from_slice(&12u16.to_be_bytes());
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
        }
        (s, d) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            // AF_INET6, STREAM.
            h.push(0x21);
            h.extend_from_slice(&36u16.to_be_bytes());
            h.extend_from_slice(&v6(s).octets());
            h.extend_from_slice(&v6(d).octets());
        }
    }
    h.extend_from_slice(&source.port().to_be_bytes());
    h.extend_from_slice(&destination.port().to_be_bytes());
    h
}

/// Parses a v2 header at the start of `buf`: the source and destination and the header's length.
/// The instance side of the protocol; the edge's tests and the built-in `hello` image use it.
pub fn parse_v2(buf: &[u8]) -> Option<(SocketAddr, SocketAddr, usize)> {
    if buf.len() < 16 || buf[..12] != SIGNATURE || buf[12] != 0x21 {
        return None;
    }
    let len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    let body = buf.get(16..16 + len)?;
    let (s, d, rest): (IpAddr, IpAddr, &[u8]) = match buf[13] {
        0x11 if len >= 12 => {
            let ip = |b: &[u8]| IpAddr::from(<[u8; 4]>::try_from(b).ok().unwrap_or_default());
            (ip(&body[0..4]), ip(&body[4..8]), &body[8..12])
        }
        0x21 if len >= 36 => {
            let ip = |b: &[u8]| IpAddr::from(<[u8; 16]>::try_from(b).ok().unwrap_or_default());
            (ip(&body[0..16]), ip(&body[16..32]), &body[32..36])
        }
        _ => return None,
    };
    let sp = u16::from_be_bytes([rest[0], rest[1]]);
    let dp = u16::from_be_bytes([rest[2], rest[3]]);
    Some((SocketAddr::new(s, sp), SocketAddr::new(d, dp), 16 + len))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn ipv4_header_matches_the_specification_bytes() {
        let h = header_v2("192.0.2.1:56324".parse().unwrap(), "198.51.100.7:443".parse().unwrap());
        let mut want = SIGNATURE.to_vec();
        want.extend_from_slice(&[0x21, 0x11, 0x00, 0x0C, 192, 0, 2, 1, 198, 51, 100, 7, 0xDC, 0x04, 0x01, 0xBB]);
        assert_eq!(h, want);
    }

    #[test]
    fn mixed_families_are_sent_as_ipv6() {
        let h = header_v2("192.0.2.1:1".parse().unwrap(), "[2001:db8::1]:443".parse().unwrap());
        assert_eq!(h[13], 0x21);
        let (s, d, n) = parse_v2(&h).unwrap();
        assert_eq!(s, "[::ffff:192.0.2.1]:1".parse().unwrap());
        assert_eq!(d, "[2001:db8::1]:443".parse().unwrap());
        assert_eq!(n, 52);
    }

    proptest! {
        #[test]
        fn headers_round_trip(s in any::<SocketAddr>(), d in any::<SocketAddr>(), tail in proptest::collection::vec(any::<u8>(), 0..8)) {
            let mut h = header_v2(s, d);
            let n = h.len();
            h.extend_from_slice(&tail);
            let (ps, pd, pn) = parse_v2(&h).unwrap();
            prop_assert_eq!(pn, n);
            // The header carries addresses and ports only (no IPv6 flow or scope).
            let same = |a: SocketAddr, b: SocketAddr| a.port() == b.port() && match (a.ip(), b.ip()) {
                (IpAddr::V4(v4), IpAddr::V6(v6)) => v4.to_ipv6_mapped() == v6,
                (x, y) => x == y,
            };
            prop_assert!(same(s, ps) && same(d, pd));
        }

        #[test]
        fn parsing_garbage_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse_v2(&buf);
        }
    }
}
