//! The proxy-wasm header map encoding, read in place: a u32 pair count, then
//! each key's and value's length, then each key and value followed by a NUL
//! (all integers u32 little endian). The filter reads every request header
//! with one host call in this form; looking a name up is a scan of a few
//! hundred bytes inside the VM, far cheaper than a host call per header.

use apitokens_core::gate::{HeaderValue, RequestHeaders};

/// A header map as the host returned it, indexed once: the filter looks up
/// about ten names per request.
pub struct Pairs {
    buf: Vec<u8>,
    /// (key start, key end, value start, value end) of each pair.
    index: Vec<(usize, usize, usize, usize)>,
}

fn u32_at(buf: &[u8], at: usize) -> Option<usize> {
    let bytes = buf.get(at..at.checked_add(4)?)?;
    usize::try_from(u32::from_le_bytes(bytes.try_into().ok()?)).ok()
}

impl Pairs {
    /// Indexes `buf`; a malformed buffer keeps the pairs before the first
    /// inconsistency.
    pub fn new(buf: Vec<u8>) -> Self {
        let count = u32_at(&buf, 0).unwrap_or(0);
        let mut at = count.saturating_mul(8).saturating_add(4);
        let mut index = Vec::with_capacity(count.min(64));
        for i in 0..count {
            let lens = 4 + i * 8;
            let Some((k, v)) = u32_at(&buf, lens).zip(u32_at(&buf, lens + 4)) else {
                break;
            };
            let key_end = at.saturating_add(k);
            let value = key_end.saturating_add(1);
            let value_end = value.saturating_add(v);
            if value_end >= buf.len() {
                break;
            }
            index.push((at, key_end, value, value_end));
            at = value_end + 1;
        }
        Self { buf, index }
    }

    /// Every (name, value), in order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        self.index
            .iter()
            .filter_map(|&(k, ke, v, ve)| Some((self.buf.get(k..ke)?, self.buf.get(v..ve)?)))
    }
}

impl RequestHeaders for Pairs {
    fn get(&self, name: &str) -> HeaderValue<'_> {
        let name = name.as_bytes();
        let mut values = self
            .index
            .iter()
            .filter(|&&(k, ke, _, _)| ke - k == name.len() && self.buf.get(k..ke) == Some(name))
            .filter_map(|&(_, _, v, ve)| self.buf.get(v..ve));
        match (values.next(), values.next()) {
            (None, _) => HeaderValue::Absent,
            (Some(value), None) => HeaderValue::One(value),
            (Some(_), Some(_)) => HeaderValue::Repeated,
        }
    }

    fn any(&self, names: &[&str]) -> bool {
        self.index.iter().any(|&(k, ke, _, _)| {
            names
                .iter()
                .any(|name| ke - k == name.len() && self.buf.get(k..ke) == Some(name.as_bytes()))
        })
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
        assert!(pairs.any(&["x-b", "empty"]) && pairs.any(&["x-a"]) && !pairs.any(&["x-b", "x-c"]));
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
