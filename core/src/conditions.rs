//! Conditions on a token beyond its role: from when it may be used (a
//! not-before time), how much (a request rate, [`crate::ratelimit`]) and
//! from where (client address ranges it is allowed from, and ranges
//! excepted from those). The filter enforces them without calling anyone,
//! like Cloudflare's API-token conditions, Vault's `token_bound_cidrs` and
//! Unkey's per-key limits.
//!
//! A token's conditions travel as one canonical byte string (in the token
//! table after the token's name, in a delta record after its entries), so
//! that the filter checks them in place, and only for the tokens that have
//! them: a token without conditions pays one flag test.
//!
//! ```text
//! records, in this order, each a tag byte and its fields:
//!   1  not before: i64 seconds, u32 nanoseconds (at most one, first)
//!   6  rate limit: u32 requests, u8 period in seconds (1 or 60),
//!      u32 burst (at most one, after the not-before time)
//!   2  allowed IPv4 range: u8 prefix length, 4 bytes     } in the order
//!   3  allowed IPv6 range: u8 prefix length, 16 bytes    } given
//!   4  excepted IPv4 range, 5 excepted IPv6 range: as 2 and 3
//! ```
//!
//! A tag this version does not know makes the whole table invalid (never
//! read as absent: an unknown condition could be one that refuses).

use crate::error::ConfigError;
use crate::ratelimit::{self, RateLimit};
use crate::spec::{ClientAddressesSpec, RateLimitSpec};
use crate::timestamp::Timestamp;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// At most this many ranges in each list: conditions are checked on every
/// request of the token, and a list is an owner's statement, not a database.
pub const MAX_RANGES: usize = 32;

const NOT_BEFORE: u8 = 1;
const ALLOW_V4: u8 = 2;
const ALLOW_V6: u8 = 3;
const EXCEPT_V4: u8 = 4;
const EXCEPT_V6: u8 = 5;
const RATE_LIMIT: u8 = 6;

/// A client address range: an address and a prefix length, its host bits
/// zero (`10.0.0.0/8`, `2001:db8::/32`; a bare address is one host).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// Why a string is not a range. Carries no part of the input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CidrError {
    Syntax,
    Prefix,
    HostBits,
    /// An IPv4-mapped IPv6 range (`::ffff:10.0.0.0/104`): a client with a
    /// mapped address counts as its IPv4 address, so the range is written
    /// in IPv4.
    Mapped,
}

impl fmt::Display for CidrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Syntax => "must be an IP address or a CIDR range such as 10.0.0.0/8 or 2001:db8::/32",
            Self::Prefix => "the prefix length must be at most 32 for IPv4 and 128 for IPv6",
            Self::HostBits => "has bits set past its prefix length: write the range's first address",
            Self::Mapped => "is an IPv4-mapped IPv6 range: write it as an IPv4 range (mapped clients count as IPv4)",
        })
    }
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Self, CidrError> {
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| CidrError::Syntax)?;
        let width = width(addr);
        let prefix = match prefix {
            // Digits only: no sign, no spaces, no leading zeros past one.
            Some(p) if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) => {
                return Err(CidrError::Syntax)
            }
            Some(p) if p.len() > 1 && p.starts_with('0') => return Err(CidrError::Syntax),
            Some(p) => p.parse::<u8>().map_err(|_| CidrError::Prefix)?,
            None => width,
        };
        Self::new(addr, prefix)
    }

    fn new(addr: IpAddr, prefix: u8) -> Result<Self, CidrError> {
        if prefix > width(addr) {
            return Err(CidrError::Prefix);
        }
        if masked(addr, prefix) != addr {
            return Err(CidrError::HostBits);
        }
        // Inside ::ffff:0:0/96 it could only ever hold mapped addresses,
        // which are matched as IPv4: it would hold nothing.
        if let IpAddr::V6(a) = addr {
            if prefix >= 96 && a.to_ipv4_mapped().is_some() {
                return Err(CidrError::Mapped);
            }
        }
        Ok(Self { addr, prefix })
    }

    /// Whether `ip` is in the range. IPv4 ranges hold IPv4 addresses only,
    /// IPv6 ranges IPv6 ones (an IPv4-mapped IPv6 address counts as its
    /// IPv4 address, even for `::/0`).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.addr.is_ipv4() && masked(ip, self.prefix) == self.addr
    }
}

impl Cidr {
    /// Whether every address of this range is in `outer`.
    pub fn within(&self, outer: &Cidr) -> bool {
        self.addr.is_ipv4() == outer.addr.is_ipv4() && self.prefix >= outer.prefix && outer.contains(self.addr)
    }

    /// Whether the two ranges share an address.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.within(other) || other.within(self)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn width(addr: IpAddr) -> u8 {
    if addr.is_ipv4() {
        32
    } else {
        128
    }
}

fn masked(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
        }
    }
}

/// A token's conditions, as written (the configuration, the control plane).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Conditions {
    /// The token is refused before this instant.
    pub not_before: Option<Timestamp>,
    /// At most this request rate at each gateway.
    pub rate_limit: Option<RateLimit>,
    /// When not empty, the token is refused from any address outside these.
    pub allow: Vec<Cidr>,
    /// The token is refused from these addresses, even inside `allow`.
    pub except: Vec<Cidr>,
}

impl Conditions {
    pub fn is_empty(&self) -> bool {
        self.not_before.is_none() && self.rate_limit.is_none() && self.allow.is_empty() && self.except.is_empty()
    }

    /// A token's conditions as written (`notBeforeTime`, `clientAddresses`,
    /// `rateLimit`: the plugin configuration, the control plane's API),
    /// validated, with
    /// the token's `expire` time; `None` without any. Errors name the field
    /// (`field("clientAddresses.allow[2]")`), never the value.
    pub fn from_spec(
        not_before: Option<&str>,
        expire: Option<Timestamp>,
        addresses: Option<&ClientAddressesSpec>,
        rate_limit: Option<&RateLimitSpec>,
        field: impl Fn(&str) -> String,
    ) -> Result<Option<Self>, ConfigError> {
        let not_before = not_before
            .map(Timestamp::parse_rfc3339)
            .transpose()
            .map_err(|e| ConfigError::new(field("notBeforeTime"), e.to_string()))?;
        if let (Some(nb), Some(exp)) = (not_before, expire) {
            if nb >= exp {
                return Err(ConfigError::new(
                    field("notBeforeTime"),
                    "must be before the token's expiry (its expireTime, or the latest it may have)",
                ));
            }
        }
        let mut conditions = Self {
            not_before,
            rate_limit: rate_limit.map(|spec| RateLimit::from_spec(spec, &field)).transpose()?,
            ..Self::default()
        };
        if let Some(addresses) = addresses {
            // A list given empty, or no list, would read as "from anywhere":
            // refused rather than guessed (a template that renders nothing).
            if addresses.allow.is_none() && addresses.except.is_none() {
                return Err(ConfigError::new(
                    field("clientAddresses"),
                    "give allow, except, or both (leave clientAddresses out for any address)",
                ));
            }
            for (list, name, into) in [
                (&addresses.allow, "allow", &mut conditions.allow),
                (&addresses.except, "except", &mut conditions.except),
            ] {
                let Some(list) = list else { continue };
                if list.is_empty() {
                    return Err(ConfigError::new(
                        field(&format!("clientAddresses.{name}")),
                        "must not be empty (leave it out instead)",
                    ));
                }
                if list.len() > MAX_RANGES {
                    return Err(ConfigError::new(
                        field(&format!("clientAddresses.{name}")),
                        format!("at most {MAX_RANGES} ranges"),
                    ));
                }
                for (i, text) in list.iter().enumerate() {
                    let cidr = Cidr::parse(text)
                        .map_err(|e| ConfigError::new(field(&format!("clientAddresses.{name}[{i}]")), e.to_string()))?;
                    into.push(cidr);
                }
            }
        }
        Ok((!conditions.is_empty()).then_some(conditions))
    }

    /// Whether the address conditions bind the token at all.
    pub fn limits_addresses(&self) -> bool {
        !self.allow.is_empty() || !self.except.is_empty()
    }

    /// Whether every client address these conditions admit, `outer`'s
    /// admit too (sufficient, not necessary: ranges are compared whole).
    /// A token made by one bound to addresses must be bound within them.
    pub fn addresses_within(&self, outer: &Conditions) -> bool {
        let allowed = outer.allow.is_empty()
            || (!self.allow.is_empty() && self.allow.iter().all(|a| outer.allow.iter().any(|o| a.within(o))));
        // Each range `outer` excepts is excepted here too, or lies outside
        // every range allowed here.
        let excepted = outer.except.iter().all(|e| {
            self.except.iter().any(|x| e.within(x))
                || (!self.allow.is_empty() && !self.allow.iter().any(|a| a.overlaps(e)))
        });
        allowed && excepted
    }

    /// The address ranges as written (`clientAddresses`), if any.
    pub fn addresses_spec(&self) -> Option<ClientAddressesSpec> {
        let texts = |list: &[Cidr]| (!list.is_empty()).then(|| list.iter().map(Cidr::to_string).collect());
        (!self.allow.is_empty() || !self.except.is_empty()).then(|| ClientAddressesSpec {
            allow: texts(&self.allow),
            except: texts(&self.except),
        })
    }

    /// The canonical encoding (see the module's documentation).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(13 + 18 * (self.allow.len() + self.except.len()));
        if let Some(t) = self.not_before {
            out.push(NOT_BEFORE);
            out.extend_from_slice(&t.unix_seconds().to_le_bytes());
            out.extend_from_slice(&t.subsec_nanos().to_le_bytes());
        }
        if let Some(limit) = self.rate_limit {
            out.push(RATE_LIMIT);
            limit.encode(&mut out);
        }
        for (list, v4, v6) in [(&self.allow, ALLOW_V4, ALLOW_V6), (&self.except, EXCEPT_V4, EXCEPT_V6)] {
            for cidr in list {
                match cidr.addr {
                    IpAddr::V4(a) => {
                        out.extend_from_slice(&[v4, cidr.prefix]);
                        out.extend_from_slice(&a.octets());
                    }
                    IpAddr::V6(a) => {
                        out.extend_from_slice(&[v6, cidr.prefix]);
                        out.extend_from_slice(&a.octets());
                    }
                }
            }
        }
        out
    }

    /// Reads an encoding back, validating it as strictly as written
    /// conditions are: known tags in order, at most [`MAX_RANGES`] per
    /// list, ranges with their host bits zero, a not-before time in range,
    /// a rate limit in range, and at least one condition.
    pub fn decode(bytes: &[u8]) -> Result<Self, &'static str> {
        let mut out = Self::default();
        let mut rest = bytes;
        // 0 before anything; then 1 not before, 2 rate limit, 3 allowed,
        // 4 excepted.
        let mut last = 0u8;
        while let Some((&tag, fields)) = rest.split_first() {
            let kind = match tag {
                NOT_BEFORE => 1,
                RATE_LIMIT => 2,
                ALLOW_V4 | ALLOW_V6 => 3,
                EXCEPT_V4 | EXCEPT_V6 => 4,
                _ => return Err("an unknown condition"),
            };
            if kind < last || (kind <= 2 && kind == last) {
                return Err("the conditions are out of order");
            }
            last = kind;
            rest = match tag {
                NOT_BEFORE => {
                    let secs = fields.get(..8).and_then(|b| b.try_into().ok()).map(i64::from_le_bytes);
                    let nanos = fields
                        .get(8..12)
                        .and_then(|b| b.try_into().ok())
                        .map(u32::from_le_bytes);
                    let (Some(secs), Some(nanos)) = (secs, nanos) else {
                        return Err("the conditions are truncated");
                    };
                    let t = Timestamp::from_unix(secs, nanos);
                    if nanos >= 1_000_000_000 || !t.in_range() {
                        return Err("notBeforeTime out of range");
                    }
                    out.not_before = Some(t);
                    fields.get(12..).unwrap_or_default()
                }
                RATE_LIMIT => {
                    let encoded = fields
                        .get(..ratelimit::ENCODED_LEN)
                        .ok_or("the conditions are truncated")?;
                    out.rate_limit = Some(RateLimit::decode(encoded).ok_or("rateLimit out of range")?);
                    fields.get(ratelimit::ENCODED_LEN..).unwrap_or_default()
                }
                ALLOW_V4 | ALLOW_V6 | EXCEPT_V4 | EXCEPT_V6 => {
                    let v4 = matches!(tag, ALLOW_V4 | EXCEPT_V4);
                    let len = if v4 { 4 } else { 16 };
                    let (Some(&prefix), Some(octets)) = (fields.first(), fields.get(1..1 + len)) else {
                        return Err("the conditions are truncated");
                    };
                    let addr = if v4 {
                        IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(octets).map_err(|_| "truncated")?))
                    } else {
                        IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(octets).map_err(|_| "truncated")?))
                    };
                    let cidr = Cidr::new(addr, prefix).map_err(|_| "an address range is not canonical")?;
                    let list = if matches!(tag, ALLOW_V4 | ALLOW_V6) {
                        &mut out.allow
                    } else {
                        &mut out.except
                    };
                    if list.len() == MAX_RANGES {
                        return Err("too many address ranges");
                    }
                    list.push(cidr);
                    fields.get(1 + len..).unwrap_or_default()
                }
                _ => return Err("an unknown condition"),
            };
        }
        if out.is_empty() {
            return Err("no condition");
        }
        Ok(out)
    }
}

/// A token's conditions, encoded and validated, owned: what the control
/// plane keeps with a token (and stores as these bytes).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Packed(Box<[u8]>);

impl Packed {
    pub fn new(conditions: &Conditions) -> Self {
        Self(conditions.encode().into_boxed_slice())
    }

    /// Bytes as stored, validated as a table's are.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, &'static str> {
        Conditions::decode(&bytes)?;
        Ok(Self(bytes.into_boxed_slice()))
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn view(&self) -> Encoded<'_> {
        Encoded(&self.0)
    }

    /// The conditions (the bytes were validated when packed).
    pub fn conditions(&self) -> Conditions {
        Conditions::decode(&self.0).unwrap_or_default()
    }
}

/// A token's conditions as the table holds them: the canonical encoding,
/// validated when the table was. Checked in place, without allocating.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Encoded<'a>(&'a [u8]);

impl<'a> Encoded<'a> {
    /// Bytes already validated ([`Conditions::decode`]).
    pub(crate) const fn trusted(bytes: &'a [u8]) -> Self {
        Self(bytes)
    }

    /// Validates `bytes` as an encoding.
    pub fn new(bytes: &'a [u8]) -> Result<Self, &'static str> {
        Conditions::decode(bytes)?;
        Ok(Self(bytes))
    }

    pub fn bytes(&self) -> &'a [u8] {
        self.0
    }

    /// The conditions, read back (validated when the table was).
    pub fn conditions(&self) -> Result<Conditions, &'static str> {
        Conditions::decode(self.0)
    }

    /// The not-before time, if any (always the first record).
    pub fn not_before(&self) -> Option<Timestamp> {
        match self.0 {
            [NOT_BEFORE, fields @ ..] => {
                let secs = i64::from_le_bytes(fields.get(..8)?.try_into().ok()?);
                let nanos = u32::from_le_bytes(fields.get(8..12)?.try_into().ok()?);
                Some(Timestamp::from_unix(secs, nanos))
            }
            _ => None,
        }
    }

    /// The rate limit, if any (after the not-before time).
    pub fn rate_limit(&self) -> Option<RateLimit> {
        match self.after_not_before() {
            [RATE_LIMIT, fields @ ..] => RateLimit::decode(fields.get(..ratelimit::ENCODED_LEN)?),
            _ => None,
        }
    }

    fn after_not_before(&self) -> &'a [u8] {
        match self.0 {
            [NOT_BEFORE, ..] => self.0.get(13..).unwrap_or_default(),
            _ => self.0,
        }
    }

    /// The address ranges, after the not-before time and the rate limit.
    fn ranges(&self) -> &'a [u8] {
        match self.after_not_before() {
            [RATE_LIMIT, ..] => self
                .after_not_before()
                .get(1 + ratelimit::ENCODED_LEN..)
                .unwrap_or_default(),
            rest => rest,
        }
    }

    /// Whether the token is bound to client addresses.
    pub fn limits_addresses(&self) -> bool {
        !self.ranges().is_empty()
    }

    /// Whether a request from `ip` passes the address conditions: inside
    /// an allowed range (when any is given) and inside no excepted one.
    pub fn admits(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        let (v4, bits) = match ip {
            IpAddr::V4(a) => (true, u128::from(u32::from(a))),
            IpAddr::V6(a) => (false, u128::from(a)),
        };
        let mut rest = self.ranges();
        let (mut allow_given, mut allowed) = (false, false);
        while let Some((&tag, fields)) = rest.split_first() {
            let family_v4 = matches!(tag, ALLOW_V4 | EXCEPT_V4);
            let len = if family_v4 { 4 } else { 16 };
            let (Some(&prefix), Some(octets)) = (fields.first(), fields.get(1..1 + len)) else {
                return false;
            };
            rest = fields.get(1 + len..).unwrap_or_default();
            let allow = matches!(tag, ALLOW_V4 | ALLOW_V6);
            allow_given |= allow;
            if family_v4 != v4 {
                continue;
            }
            let net = octets.iter().fold(0u128, |n, b| n << 8 | u128::from(*b));
            let width = if v4 { 32 } else { 128 };
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0) >> (128 - width);
            let inside = bits & mask == net;
            if inside && !allow {
                return false;
            }
            allowed |= inside && allow;
        }
        allowed || !allow_given
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(text: &str) -> Cidr {
        Cidr::parse(text).unwrap()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn ranges_parse_strictly() {
        assert_eq!(cidr("10.0.0.0/8").to_string(), "10.0.0.0/8");
        assert_eq!(cidr("192.0.2.7").to_string(), "192.0.2.7/32");
        assert_eq!(cidr("2001:db8::/32").to_string(), "2001:db8::/32");
        assert_eq!(cidr("::1").to_string(), "::1/128");
        assert_eq!(cidr("0.0.0.0/0").to_string(), "0.0.0.0/0");
        for (text, error) in [
            ("10.0.0.1/8", CidrError::HostBits),
            ("10.0.0.0/33", CidrError::Prefix),
            ("2001:db8::/129", CidrError::Prefix),
            ("10.0.0.0/", CidrError::Syntax),
            ("10.0.0.0/08", CidrError::Syntax),
            ("10.0.0.0/+8", CidrError::Syntax),
            ("10.0.0/8", CidrError::Syntax),
            ("localhost", CidrError::Syntax),
            ("::ffff:10.0.0.0/104", CidrError::Mapped),
            ("::ffff:10.0.0.1", CidrError::Mapped),
            (" 10.0.0.0/8", CidrError::Syntax),
            ("", CidrError::Syntax),
        ] {
            assert_eq!(Cidr::parse(text), Err(error), "{text}");
        }
    }

    #[test]
    fn addresses_are_allowed_inside_and_refused_outside_and_excepted() {
        let conditions = Conditions {
            not_before: None,
            rate_limit: None,
            allow: vec![cidr("10.0.0.0/8"), cidr("2001:db8::/32")],
            except: vec![cidr("10.1.0.0/16"), cidr("2001:db8:bad::/48")],
        };
        let bytes = conditions.encode();
        let encoded = Encoded::new(&bytes).unwrap();
        assert!(encoded.limits_addresses() && encoded.not_before().is_none());
        for (addr, admitted) in [
            ("10.2.3.4", true),
            ("10.1.3.4", false),
            ("11.0.0.1", false),
            ("::ffff:10.2.3.4", true),
            ("::ffff:10.1.3.4", false),
            ("2001:db8:1::1", true),
            ("2001:db8:bad::1", false),
            ("2001:db9::1", false),
            ("::1", false),
        ] {
            assert_eq!(encoded.admits(ip(addr)), admitted, "{addr}");
            let by_list = conditions.allow.iter().any(|c| c.contains(ip(addr)))
                && !conditions.except.iter().any(|c| c.contains(ip(addr)));
            assert_eq!(by_list, admitted, "{addr}");
        }
        // Excepted ranges only: everywhere else.
        let bytes = Conditions {
            except: vec![cidr("192.0.2.0/24")],
            ..Conditions::default()
        }
        .encode();
        let encoded = Encoded::new(&bytes).unwrap();
        assert!(!encoded.admits(ip("192.0.2.9")));
        assert!(encoded.admits(ip("198.51.100.1")) && encoded.admits(ip("::1")));
        // Everything, in either family.
        let bytes = Conditions {
            allow: vec![cidr("0.0.0.0/0"), cidr("::/0")],
            ..Conditions::default()
        }
        .encode();
        let encoded = Encoded::new(&bytes).unwrap();
        assert!(encoded.admits(ip("203.0.113.1")) && encoded.admits(ip("2001:db8::1")));
    }

    #[test]
    fn a_bound_maker_bounds_what_it_makes() {
        let outer = Conditions {
            allow: vec![cidr("10.0.0.0/8")],
            except: vec![cidr("10.1.0.0/16")],
            ..Conditions::default()
        };
        let with = |allow: &[&str], except: &[&str]| Conditions {
            allow: allow.iter().map(|c| cidr(c)).collect(),
            except: except.iter().map(|c| cidr(c)).collect(),
            ..Conditions::default()
        };
        assert!(
            with(&["10.2.0.0/16"], &[]).addresses_within(&outer),
            "outside the excepted range"
        );
        assert!(with(&["10.0.0.0/8"], &["10.1.0.0/16"]).addresses_within(&outer));
        assert!(
            with(&["10.0.0.0/8"], &["10.0.0.0/12"]).addresses_within(&outer),
            "excepted more widely"
        );
        assert!(
            !with(&["10.0.0.0/8"], &[]).addresses_within(&outer),
            "the excepted range comes back"
        );
        assert!(!with(&[], &["10.1.0.0/16"]).addresses_within(&outer), "anywhere else");
        assert!(!with(&["192.0.2.0/24"], &[]).addresses_within(&outer));
        assert!(!with(&["::/0"], &[]).addresses_within(&outer), "another family");
        // An unbound maker bounds nothing.
        assert!(with(&[], &[]).addresses_within(&Conditions::default()));
    }

    #[test]
    fn the_encoding_round_trips_and_refuses_what_it_does_not_know() {
        let limit = RateLimit {
            requests: 600,
            per: crate::ratelimit::Per::Minute,
            burst: 20,
        };
        let conditions = Conditions {
            not_before: Some(Timestamp::from_unix(1_800_000_000, 5)),
            rate_limit: Some(limit),
            allow: vec![cidr("2001:db8::/32"), cidr("10.0.0.0/8")],
            except: vec![cidr("10.1.0.0/16")],
        };
        let bytes = conditions.encode();
        assert_eq!(Conditions::decode(&bytes), Ok(conditions.clone()));
        let encoded = Encoded::new(&bytes).unwrap();
        assert_eq!(encoded.not_before(), conditions.not_before);
        assert_eq!(encoded.rate_limit(), Some(limit));
        // The ranges are read past the rate limit, with or without the
        // not-before time before it.
        assert!(encoded.admits(ip("10.2.0.1")) && !encoded.admits(ip("10.1.0.1")));
        let no_time = Conditions {
            not_before: None,
            ..conditions.clone()
        }
        .encode();
        let encoded = Encoded::new(&no_time).unwrap();
        assert_eq!((encoded.not_before(), encoded.rate_limit()), (None, Some(limit)));
        assert!(encoded.admits(ip("10.2.0.1")) && !encoded.admits(ip("192.0.2.1")));
        // A rate limit alone binds no address.
        let alone = Conditions {
            rate_limit: Some(limit),
            ..Conditions::default()
        }
        .encode();
        assert!(!Encoded::new(&alone).unwrap().limits_addresses());
        // Twice, or after the ranges: refused.
        assert!(Conditions::decode(&[alone.clone(), alone.clone()].concat()).is_err());
        let ranges = Conditions {
            allow: vec![cidr("10.0.0.0/8")],
            ..Conditions::default()
        }
        .encode();
        assert!(Conditions::decode(&[ranges, alone].concat()).is_err());
        assert!(Conditions::decode(&[]).is_err(), "no condition");
        assert!(Conditions::decode(&[9]).is_err(), "an unknown tag");
        assert!(Conditions::decode(&bytes[..bytes.len() - 1]).is_err(), "truncated");
        // An excepted range before an allowed one, or a second not-before.
        let mut swapped = Conditions {
            except: vec![cidr("10.1.0.0/16")],
            ..Conditions::default()
        }
        .encode();
        swapped.extend(
            Conditions {
                allow: vec![cidr("10.0.0.0/8")],
                ..Conditions::default()
            }
            .encode(),
        );
        assert!(Conditions::decode(&swapped).is_err());
        let once = Conditions {
            not_before: Some(Timestamp::from_unix(0, 0)),
            ..Conditions::default()
        }
        .encode();
        assert!(Conditions::decode(&[once.clone(), once].concat()).is_err());
        // Host bits set, a prefix too long.
        assert!(Conditions::decode(&[ALLOW_V4, 8, 10, 0, 0, 1]).is_err());
        assert!(Conditions::decode(&[ALLOW_V4, 33, 10, 0, 0, 0]).is_err());
        let many = Conditions {
            allow: vec![cidr("10.0.0.0/8"); MAX_RANGES + 1],
            ..Conditions::default()
        };
        assert!(Conditions::decode(&many.encode()).is_err());
    }
}
