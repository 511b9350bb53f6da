//! The proxy-wasm header map encoding, read in place: a u32 pair count, then
//! each key's and value's length, then each key and value followed by a NUL
//! (all integers u32 little endian). The filter reads every request header
//! with one host call in this form; looking a name up is a scan of a few
//! hundred bytes inside the VM, far cheaper than a host call per header.

use apitokens_core::gate::{HeaderValue, RequestHeaders};

/// A header map as the host returned it.
pub struct Pairs {
    buf: Vec<u8>,
}

fn u32_at(buf: &[u8], at: usize) -> Option<usize> {
    let bytes = buf.get(at..at.checked_add(4)?)?;
    usize::try_from(u32::from_le_bytes(bytes.try_into().ok()?)).ok()
}

impl Pairs {
    pub fn new(buf: Vec<u8>) -> Self {
        Self { buf }
    }

    /// Every (name, value), in order; stops at the first inconsistency.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        let count = u32_at(&self.buf, 0).unwrap_or(0);
        let data_start = count.saturating_mul(8).saturating_add(4);
        (0..count).scan(data_start, move |at, i| {
            let lens = 4 + i * 8;
            let (k, v) = (u32_at(&self.buf, lens)?, u32_at(&self.buf, lens + 4)?);
            let key = self.buf.get(*at..at.checked_add(k)?)?;
            let value_start = at.checked_add(k)?.checked_add(1)?;
            let value = self.buf.get(value_start..value_start.checked_add(v)?)?;
            *at = value_start.checked_add(v)?.checked_add(1)?;
            Some((key, value))
        })
    }
}

impl RequestHeaders for Pairs {
    fn get(&self, name: &str) -> HeaderValue<'_> {
        let mut values = self.iter().filter(|(k, _)| *k == name.as_bytes()).map(|(_, v)| v);
        match (values.next(), values.next()) {
            (None, _) => HeaderValue::Absent,
            (Some(value), None) => HeaderValue::One(value),
            (Some(_), Some(_)) => HeaderValue::Repeated,
        }
    }
}

/// Encodes pairs (for local replies, and tests).
pub fn serialize(headers: &[(&str, &[u8])]) -> Vec<u8> {
    let size = 4 + headers.iter().map(|(k, v)| 8 + k.len() + v.len() + 2).sum::<usize>();
    let mut out = Vec::with_capacity(size);
    let len32 = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes();
    out.extend_from_slice(&len32(headers.len()));
    for (k, v) in headers {
        out.extend_from_slice(&len32(k.len()));
        out.extend_from_slice(&len32(v.len()));
    }
    for (k, v) in headers {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn finds_one_absent_and_repeated_headers() {
        let pairs = Pairs::new(serialize(&[
            (":method", b"GET"),
            (":path", b"/a?b"),
            ("authorization", b"Bearer \xff\xfe"),
            ("x-a", b"1"),
            ("x-a", b""),
            ("empty", b""),
        ]));
        assert_eq!(pairs.get(":method"), HeaderValue::One(b"GET"));
        assert_eq!(pairs.get(":path"), HeaderValue::One(b"/a?b"));
        assert_eq!(pairs.get("authorization"), HeaderValue::One(b"Bearer \xff\xfe"));
        assert_eq!(pairs.get("x-a"), HeaderValue::Repeated);
        assert_eq!(pairs.get("empty"), HeaderValue::One(b""));
        assert_eq!(pairs.get("x-b"), HeaderValue::Absent);
        assert_eq!(pairs.iter().count(), 6);
    }

    #[test]
    fn malformed_buffers_yield_what_is_consistent_and_never_panic() {
        assert_eq!(Pairs::new(Vec::new()).get("a"), HeaderValue::Absent);
        let good = serialize(&[("a", b"1"), ("b", b"2")]);
        for len in 0..good.len() {
            let pairs = Pairs::new(good[..len].to_vec());
            assert!(pairs.iter().count() <= 2);
            let _ = pairs.get("b");
        }
        let mut huge_count = good.clone();
        huge_count[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Pairs::new(huge_count).iter().count() <= 2);
        let mut huge_len = good;
        huge_len[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(Pairs::new(huge_len).get("a"), HeaderValue::Absent);
    }
}
