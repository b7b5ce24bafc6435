//! Who is asking, by address: the client of a request as the per-client limits see it.
//!
//! By default that is the TCP peer. Behind a load balancer the peer is the balancer, so a
//! deployment names the header its balancer sets ([`ClientIpHeader`], `LANDSLIDE_CLIENT_IP_HEADER`)
//! and the client is read from it. Only the right-most entry is believed: it is the one our own
//! balancer appended (HAProxy's `option forwardfor` adds a header line of its own, after any the
//! client sent; an ALB appends to the client's list), while every entry left of it is whatever the
//! client chose to send. A header that is missing or unparsable never fails the request: the peer
//! address stands in, and the fallback is counted (`landslide_client_ip_fallback_total`).
//!
//! The same [`Client`] keys the per-client limits (`rate_limit.rs`, `slots.rs`) of ingest and
//! tally, and salts the voter id of a cookie-less request with an `Idempotency-Key` (ingest's
//! `voter.rs`), so a key chosen by one client never names another client's voter.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};

use axum::http::{HeaderMap, HeaderName};

/// The header that a trusted proxy in front of ingest and tally sets to the client's address, such as
/// `X-Forwarded-For` (its right-most entry is used) or `X-Real-IP`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIpHeader(HeaderName);

impl ClientIpHeader {
    /// A header name, as HTTP allows it (case does not matter).
    pub fn parse(name: &str) -> anyhow::Result<Self> {
        HeaderName::try_from(name.trim())
            .map(Self)
            .map_err(|_| anyhow::anyhow!("{name:?} is not an HTTP header name"))
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

/// The client of one request: an IPv4 address, or the /64 prefix of an IPv6 one.
///
/// A /64 is what a network hands one subscriber (3GPP gives each phone's data session a /64 of
/// its own; RFC 6177 advises at least that for a home), and a host picks addresses inside it at
/// will (privacy addresses rotate), so one client per /128 would let a single phone be thousands
/// of clients, and a voter's retry from a rotated address a different voter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Client(IpAddr);

impl Client {
    pub fn of(ip: IpAddr) -> Self {
        // `::ffff:192.0.2.1` (a dual-stack listener's view of an IPv4 peer) is that IPv4 client.
        match ip.to_canonical() {
            IpAddr::V4(v4) => Self(IpAddr::V4(v4)),
            IpAddr::V6(v6) => {
                let prefix = v6.to_bits() & !u128::from(u64::MAX);
                Self(IpAddr::V6(Ipv6Addr::from_bits(prefix)))
            }
        }
    }

    /// A stable encoding of the client for a keyed hash: the family, then the address bytes.
    pub fn to_bytes(self) -> Vec<u8> {
        match self.0 {
            IpAddr::V4(v4) => [&[4u8][..], &v4.octets()].concat(),
            IpAddr::V6(v6) => [&[6u8][..], &v6.octets()[..8]].concat(),
        }
    }
}

/// Why the configured header did not name the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    Missing,
    Unparsable,
}

impl Fallback {
    fn reason(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Unparsable => "unparsable",
        }
    }
}

/// The client of a request that came from `peer`: from `header` when one is configured and
/// names an address, else the peer.
pub fn resolve(header: Option<&ClientIpHeader>, headers: &HeaderMap, peer: SocketAddr) -> Client {
    let Some(header) = header else {
        return Client::of(peer.ip());
    };
    match from_header(headers, &header.0) {
        Ok(ip) => Client::of(ip),
        Err(fallback) => {
            metrics::counter!("landslide_client_ip_fallback_total", "reason" => fallback.reason())
                .increment(1);
            // Once at warn, since a header that never arrives is a configuration error (the
            // balancer does not set it, or the role is reached around it); then at debug, as one
            // line per request would cost more than the request. The counter keeps the score.
            static WARNED: AtomicBool = AtomicBool::new(false);
            if WARNED.swap(true, Ordering::Relaxed) {
                tracing::debug!(
                    header = header.as_str(),
                    reason = fallback.reason(),
                    "client address header unusable; using the peer address"
                );
            } else {
                tracing::warn!(
                    header = header.as_str(),
                    reason = fallback.reason(),
                    "client address header unusable; using the peer address (counted in \
                     landslide_client_ip_fallback_total, logged once)"
                );
            }
            Client::of(peer.ip())
        }
    }
}

/// The right-most address of the last `name` header line.
fn from_header(headers: &HeaderMap, name: &HeaderName) -> Result<IpAddr, Fallback> {
    let line = headers
        .get_all(name)
        .iter()
        .next_back()
        .ok_or(Fallback::Missing)?;
    let line = line.to_str().map_err(|_| Fallback::Unparsable)?;
    let entry = line.rsplit(',').next().unwrap_or_default().trim();
    parse_address(entry).ok_or(Fallback::Unparsable)
}

/// `192.0.2.1`, `2001:db8::1`, and the same with a port (`192.0.2.1:443`, `[2001:db8::1]:443`)
/// or in brackets (`[2001:db8::1]`), as some proxies write them.
fn parse_address(entry: &str) -> Option<IpAddr> {
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            let inner = entry.strip_prefix('[')?.strip_suffix(']')?;
            inner.parse::<Ipv6Addr>().ok().map(IpAddr::V6)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> SocketAddr {
        "198.51.100.7:40000".parse().unwrap()
    }

    fn xff() -> ClientIpHeader {
        ClientIpHeader::parse("X-Forwarded-For").unwrap()
    }

    fn headers(lines: &[(&str, &[u8])]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in lines {
            map.append(
                HeaderName::try_from(*name).unwrap(),
                axum::http::HeaderValue::from_bytes(value).unwrap(),
            );
        }
        map
    }

    fn client(ip: &str) -> Client {
        Client::of(ip.parse().unwrap())
    }

    #[test]
    fn without_a_configured_header_the_peer_is_the_client_whatever_the_request_says() {
        let spoofed = headers(&[("x-forwarded-for", b"203.0.113.9")]);
        assert_eq!(resolve(None, &spoofed, peer()), client("198.51.100.7"));
    }

    #[test]
    fn the_right_most_entry_is_the_one_our_balancer_appended() {
        let h = headers(&[("x-forwarded-for", b"10.0.0.1, 203.0.113.5,203.0.113.9")]);
        assert_eq!(resolve(Some(&xff()), &h, peer()), client("203.0.113.9"));
    }

    #[test]
    fn the_last_header_line_wins_as_haproxy_adds_a_line_of_its_own() {
        let h = headers(&[
            ("x-forwarded-for", b"6.6.6.6"),
            ("X-Forwarded-For", b"203.0.113.9"),
        ]);
        assert_eq!(resolve(Some(&xff()), &h, peer()), client("203.0.113.9"));
    }

    #[test]
    fn addresses_with_ports_and_brackets_are_read() {
        for (entry, ip) in [
            ("203.0.113.9:5555", "203.0.113.9"),
            ("[2001:db8::1]:443", "2001:db8::1"),
            ("[2001:db8::1]", "2001:db8::1"),
            (" 2001:db8::1 ", "2001:db8::1"),
        ] {
            let h = headers(&[("x-forwarded-for", entry.as_bytes())]);
            assert_eq!(resolve(Some(&xff()), &h, peer()), client(ip), "{entry}");
        }
    }

    #[test]
    fn a_missing_or_unparsable_header_falls_back_to_the_peer() {
        let cases: [&[(&str, &[u8])]; 6] = [
            &[],
            &[("x-real-ip", b"203.0.113.9")],
            &[("x-forwarded-for", b"")],
            &[("x-forwarded-for", b"203.0.113.9, unknown")],
            &[("x-forwarded-for", b"203.0.113.9,")],
            &[("x-forwarded-for", b"\xff\xfe")],
        ];
        for lines in cases {
            let h = headers(lines);
            assert_eq!(
                resolve(Some(&xff()), &h, peer()),
                client("198.51.100.7"),
                "{lines:?}"
            );
        }
    }

    #[test]
    fn another_configured_header_is_read_the_same_way() {
        let real = ClientIpHeader::parse("x-real-ip").unwrap();
        let h = headers(&[
            ("X-Real-IP", b"203.0.113.9"),
            ("x-forwarded-for", b"6.6.6.6"),
        ]);
        assert_eq!(resolve(Some(&real), &h, peer()), client("203.0.113.9"));
        assert!(ClientIpHeader::parse("not a header").is_err());
    }

    #[test]
    fn an_ipv6_client_is_its_slash_64_and_a_mapped_ipv4_is_the_ipv4() {
        assert_eq!(
            client("2001:db8:1:2:aaaa::1"),
            client("2001:db8:1:2:bbbb::9")
        );
        assert_ne!(client("2001:db8:1:2::1"), client("2001:db8:1:3::1"));
        assert_eq!(client("::ffff:192.0.2.1"), client("192.0.2.1"));
        assert_ne!(
            client("192.0.2.1").to_bytes(),
            client("192.0.2.2").to_bytes()
        );
        assert_ne!(client("0.0.0.0").to_bytes(), client("::").to_bytes());
    }
}
