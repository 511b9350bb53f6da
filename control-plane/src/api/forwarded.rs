//! The client's address for the audit trail. `X-Forwarded-For` is text any
//! client can send: it counts only when the connection comes from a proxy
//! the operator named (`--trusted-proxy CIDR`, such as the loopback Envoy in
//! `make run`). Then the entries are read from the right, skipping trusted
//! proxies, and the first other address is the client (each proxy appends
//! the address it saw, so only those entries are facts). The connection's
//! own peer is recorded beside it, always.

use axum::http::HeaderMap;
use std::net::IpAddr;

/// An address range: `10.0.0.0/8`, `::1/128`, or one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    bits: u8,
}

/// Why a `--trusted-proxy` cannot be read.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("expected an IPv4 or IPv6 address or range, such as 127.0.0.1/32 or ::1")]
    Address,
    #[error("the prefix length must be a number from 0 to {max}")]
    PrefixLength { max: u8 },
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Self, CidrError> {
        let (addr, bits) = match text.split_once('/') {
            Some((a, b)) => (a, Some(b)),
            None => (text, None),
        };
        let net: IpAddr = addr.parse().map_err(|_| CidrError::Address)?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            None => max,
            Some(b) => b
                .parse::<u8>()
                .ok()
                .filter(|b| *b <= max)
                .ok_or(CidrError::PrefixLength { max })?,
        };
        Ok(Self { net, bits })
    }

    pub fn contains(&self, addr: IpAddr) -> bool {
        let addr = canonical(addr);
        match (self.net, addr) {
            (IpAddr::V4(net), IpAddr::V4(a)) => prefix_eq(&net.octets(), &a.octets(), self.bits),
            (IpAddr::V6(net), IpAddr::V6(a)) => prefix_eq(&net.octets(), &a.octets(), self.bits),
            _ => false,
        }
    }
}

/// An IPv4 address mapped into IPv6 (a dual-stack listener's peer) is the
/// IPv4 address.
fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let bits = usize::from(bits);
    let (whole, rest) = (bits / 8, bits % 8);
    if a.get(..whole) != b.get(..whole) {
        return false;
    }
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    match (a.get(whole), b.get(whole)) {
        (Some(x), Some(y)) => x & mask == y & mask,
        _ => false,
    }
}

/// The proxies whose `X-Forwarded-For` entries are believed.
#[derive(Clone, Debug, Default)]
pub struct TrustedProxies(pub Vec<Cidr>);

impl TrustedProxies {
    fn trusts(&self, addr: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(addr))
    }

    /// The client's address: the connection's `peer` unless it is a
    /// trusted proxy, in which case the right-most `X-Forwarded-For` entry
    /// that is not itself a trusted proxy (or the left-most entry when all
    /// are).
    pub fn client_address(&self, peer: Option<IpAddr>, headers: &HeaderMap) -> Option<String> {
        self.client_ip(peer, headers).map(|ip| ip.to_string())
    }

    /// [`Self::client_address`] as an address.
    pub fn client_ip(&self, peer: Option<IpAddr>, headers: &HeaderMap) -> Option<IpAddr> {
        let peer = peer.map(canonical)?;
        if !self.trusts(peer) {
            return Some(peer);
        }
        let entries: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .collect();
        let mut client = peer;
        // An entry that is not an address ends what can be believed.
        for addr in entries.into_iter().rev().map_while(|a| a.parse::<IpAddr>().ok()) {
            client = canonical(addr);
            if !self.trusts(client) {
                break;
            }
        }
        Some(client)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn xff(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_str(value).unwrap());
        h
    }

    fn trusted(ranges: &[&str]) -> TrustedProxies {
        TrustedProxies(ranges.iter().map(|r| Cidr::parse(r).unwrap()).collect())
    }

    #[test]
    fn ranges() {
        let c = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(c.contains("10.1.255.3".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.0.9".parse().unwrap()));
        assert!(Cidr::parse("::1").unwrap().contains("::1".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains("192.0.2.1".parse().unwrap()));
        assert!(Cidr::parse("fd00::/7").unwrap().contains("fdff::1".parse().unwrap()));
        for bad in ["", "10.0.0.0/33", "::/129", "10.0.0/8", "host", "10.0.0.0/x"] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_header_from_an_untrusted_peer_is_ignored() {
        let peer = Some("127.0.0.1".parse().unwrap());
        let none = TrustedProxies::default();
        assert_eq!(none.client_address(peer, &xff("203.0.113.9")).unwrap(), "127.0.0.1");
        let other = trusted(&["10.0.0.0/8"]);
        assert_eq!(other.client_address(peer, &xff("203.0.113.9")).unwrap(), "127.0.0.1");
    }

    #[test]
    fn a_trusted_proxy_names_the_client() {
        let peer = Some("127.0.0.1".parse().unwrap());
        let lo = trusted(&["127.0.0.0/8", "10.0.0.0/8"]);
        // The client's own entry (spoofed) is left of what the proxies appended.
        let h = xff("198.51.100.1, 203.0.113.9, 10.0.0.5");
        assert_eq!(lo.client_address(peer, &h).unwrap(), "203.0.113.9");
        assert_eq!(lo.client_address(peer, &HeaderMap::new()).unwrap(), "127.0.0.1");
        // Text that is not an address: nothing from it on is believed.
        assert_eq!(
            lo.client_address(peer, &xff("evil text, 10.0.0.5")).unwrap(),
            "10.0.0.5"
        );
        assert_eq!(lo.client_address(peer, &xff("evil text")).unwrap(), "127.0.0.1");
    }
}
