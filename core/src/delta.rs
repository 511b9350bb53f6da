//! The delta channel: table changes from the control plane to every filter
//! VM, next to the ECDS snapshot.
//!
//! ECDS delivers whole filter configurations (every token, to every VM, on
//! every write). The delta channel carries only what changed: each VM opens
//! its own gRPC stream to the control plane, through the cluster it reports
//! usage to (the xDS cluster and its mutual TLS), says which table it
//! enforces, and is sent the final state of every token written since. It
//! applies them over its snapshot (a [`crate::table::Overlay`]) and says the
//! table it enforces again: that is its acknowledgement.
//!
//! ```text
//! service apitokens.v1.Delta { rpc Subscribe(stream DeltaRequest) returns (stream DeltaResponse); }
//!
//! message DeltaRequest {          // first: a subscription; then: an ACK
//!   bytes lineage = 1;            // the store the VM's table came from (16 bytes)
//!   string node = 2;              // the Envoy's node id
//!   string vm = 3;                // this VM's id, random per VM
//!   bytes at = 4;                 // the stamp of the table the VM enforces (16 bytes)
//!   uint32 vms = 5;               // this Envoy's VMs that opened a stream, as the VM counts them
//! }
//! message DeltaResponse {
//!   bytes from = 1;               // applies to a table at or after this stamp
//!   bytes to = 2;                 // the table's stamp after it; empty: more follows
//!   bytes changes = 3;            // change records, below
//!   bool snapshot_needed = 4;     // no history reaches the VM's table: wait for ECDS
//!   bool revokes = 5;             // the step changes or removes a token that existed before it
//! }
//! ```
//!
//! A change record is a token's final state, so applying one twice, or
//! applying a response to a table already past `from`, gives the same table:
//!
//! ```text
//! u8 kind: 0 removed, 1 put, 2 put with a previous secret (a rotation's overlap),
//!         3 and 4: as 1 and 2, the token disabled (both its secrets refused)
//! u8 name length, the name (`namespaces/{ns}/apitokens/{token}`)
//! kind >= 1:  digest[32], i64 expire seconds, u32 expire nanos (u32::MAX: never), u8 role
//! kind 2, 4:  digest[32], i64 expire seconds, u32 expire nanos of the previous secret
//! kinds 17 to 20: as 1 to 4, then the token's conditions: u16 length, the
//!         encoded conditions (`crate::conditions`)
//! ```
//!
//! The disabled token has kinds of its own rather than a flag byte: a record
//! of kind 1 or 2 reads as it always did, and a filter that does not know
//! kinds 3 and 4 refuses the whole response (and waits for a snapshot, whose
//! table it refuses too: Envoy NACKs it) instead of admitting a disabled
//! token. Conditions set a bit of the kind for the same reason: a filter
//! that does not know them refuses the record rather than admit a token
//! without them.
//!
//! Digests only, never a secret. Everything a VM receives is validated as
//! strictly as a snapshot before any of it is applied; a response that fails
//! leaves the table as it was.

use crate::compact::Stamp;
use crate::conditions::Encoded;
use crate::error::ConfigError;
use crate::name::is_token_name;
use crate::table::{push_digest_and_expiry, role_code, role_of, Change, Digest, Entry, TokenEntries};
use crate::timestamp::Timestamp;

pub const SERVICE: &str = "apitokens.v1.Delta";
pub const METHOD: &str = "Subscribe";
/// The largest response the control plane sends (a catch-up is split into
/// several); a VM refuses larger ones.
pub const MAX_RESPONSE_BYTES: usize = 1 << 20;

const REMOVED: u8 = 0;
const PUT: u8 = 1;
const PUT_WITH_PREVIOUS: u8 = 2;
const PUT_DISABLED: u8 = 3;
const PUT_DISABLED_WITH_PREVIOUS: u8 = 4;
/// Or-ed into a put's kind: the record ends with the token's conditions.
const WITH_CONDITIONS: u8 = 0x10;
const NEVER: u32 = u32::MAX;

fn error(problem: impl Into<String>) -> ConfigError {
    ConfigError::new("delta", problem)
}

/// Appends `change`'s record to `out` (the control plane's side).
pub fn encode_change(out: &mut Vec<u8>, change: &Change<'_>) {
    let (kind, name, entries) = match change {
        Change::Remove(name) => (REMOVED, *name, None),
        Change::Put(t) => {
            let kind = match (t.current.disabled, t.previous.is_some()) {
                (false, false) => PUT,
                (false, true) => PUT_WITH_PREVIOUS,
                (true, false) => PUT_DISABLED,
                (true, true) => PUT_DISABLED_WITH_PREVIOUS,
            };
            let conditions = if t.current.conditions.is_some() {
                WITH_CONDITIONS
            } else {
                0
            };
            (kind | conditions, t.current.name, Some(t))
        }
    };
    out.push(kind);
    out.push(u8::try_from(name.len()).unwrap_or(0));
    out.extend_from_slice(name.as_bytes());
    if let Some(t) = entries {
        push_digest_and_expiry(out, &t.current);
        out.push(role_code(t.current.role));
        if let Some(previous) = &t.previous {
            push_digest_and_expiry(out, previous);
        }
        if let Some(c) = t.current.conditions {
            out.extend_from_slice(&u16::try_from(c.bytes().len()).unwrap_or(u16::MAX).to_le_bytes());
            out.extend_from_slice(c.bytes());
        }
    }
}

/// A reader over a record buffer.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ConfigError> {
        let bytes = self.bytes;
        let head = bytes.get(..n).ok_or_else(|| error("a change record is truncated"))?;
        self.bytes = bytes.get(n..).unwrap_or_default();
        Ok(head)
    }

    fn byte(&mut self) -> Result<u8, ConfigError> {
        self.take(1)?
            .first()
            .copied()
            .ok_or_else(|| error("a change record is truncated"))
    }

    fn digest(&mut self) -> Result<Digest, ConfigError> {
        let bytes: [u8; 32] = self
            .take(32)?
            .try_into()
            .map_err(|_| error("a change record is truncated"))?;
        Ok(Digest(bytes))
    }

    fn expire(&mut self) -> Result<Option<Timestamp>, ConfigError> {
        let secs = i64::from_le_bytes(self.take(8)?.try_into().map_err(|_| error("truncated"))?);
        let nanos = u32::from_le_bytes(self.take(4)?.try_into().map_err(|_| error("truncated"))?);
        match nanos {
            NEVER => Ok(None),
            n if n < 1_000_000_000 => Ok(Some(Timestamp::from_unix(secs, n))),
            _ => Err(error("an expiry's nanoseconds are out of range")),
        }
    }
}

/// Every change record of `bytes`, validated (names, roles, expiries; no
/// name twice, a previous secret never equal to the current one); nothing
/// if any is invalid. The errors never quote a digest.
pub fn decode_changes(bytes: &[u8]) -> Result<Vec<Change<'_>>, ConfigError> {
    let mut reader = Reader { bytes };
    let mut changes = Vec::new();
    while !reader.bytes.is_empty() {
        let kind = reader.byte()?;
        let len = usize::from(reader.byte()?);
        let name = reader.take(len)?;
        if !is_token_name(name) {
            return Err(error(format!("change {}: not a token name", changes.len())));
        }
        let name = std::str::from_utf8(name).map_err(|_| error("a name is not UTF-8"))?;
        let (kind, with_conditions) = match kind & !WITH_CONDITIONS {
            REMOVED => (kind, false),
            base => (base, kind & WITH_CONDITIONS != 0),
        };
        let change = match kind {
            REMOVED => Change::Remove(name),
            PUT | PUT_WITH_PREVIOUS | PUT_DISABLED | PUT_DISABLED_WITH_PREVIOUS => {
                let disabled = matches!(kind, PUT_DISABLED | PUT_DISABLED_WITH_PREVIOUS);
                let digest = reader.digest()?;
                let expire = reader.expire()?;
                let role = role_of(reader.byte()?).ok_or_else(|| error(format!("{name}: unknown role")))?;
                let current = Entry {
                    name,
                    role,
                    digest,
                    expire,
                    previous: false,
                    disabled,
                    conditions: None,
                };
                let previous = if matches!(kind, PUT_WITH_PREVIOUS | PUT_DISABLED_WITH_PREVIOUS) {
                    let digest = reader.digest()?;
                    let expire = reader.expire()?;
                    if digest == current.digest {
                        return Err(error(format!("{name}: the previous secret is the current one")));
                    }
                    Some(Entry {
                        digest,
                        expire,
                        previous: true,
                        ..current
                    })
                } else {
                    None
                };
                let conditions = if with_conditions {
                    let len = u16::from_le_bytes(reader.take(2)?.try_into().map_err(|_| error("truncated"))?);
                    let bytes = reader.take(usize::from(len))?;
                    Some(Encoded::new(bytes).map_err(|e| error(format!("{name}: conditions: {e}")))?)
                } else {
                    None
                };
                Change::Put(TokenEntries {
                    current: Entry { conditions, ..current },
                    previous: previous.map(|p| Entry { conditions, ..p }),
                })
            }
            _ => return Err(error(format!("{name}: unknown change kind"))),
        };
        changes.push(change);
    }
    let mut names: Vec<&str> = changes.iter().map(Change::name).collect();
    names.sort_unstable();
    if names.windows(2).any(|w| matches!(w, [a, b] if a == b)) {
        return Err(error("a token changes twice in one response"));
    }
    Ok(changes)
}

// The two messages, in protobuf's wire format (written by hand: the filter
// has no protobuf library; the control plane decodes them with prost).

fn varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn bytes_field(out: &mut Vec<u8>, number: u8, bytes: &[u8]) {
    out.push(number << 3 | 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// A `DeltaRequest`: the VM enforces the table `at` of `lineage`, and its
/// Envoy has `vms` VMs on the channel.
pub fn request(lineage: &[u8], node: &[u8], vm: &[u8], at: Stamp, vms: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(72 + node.len() + vm.len());
    bytes_field(&mut out, 1, lineage);
    bytes_field(&mut out, 2, node);
    bytes_field(&mut out, 3, vm);
    bytes_field(&mut out, 4, &at.to_bytes());
    out.push(5 << 3);
    varint(&mut out, u64::from(vms));
    out
}

/// A `DeltaResponse` as a VM reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Response<'a> {
    pub from: Stamp,
    /// `None`: more of the same catch-up follows.
    pub to: Option<Stamp>,
    pub changes: &'a [u8],
    pub snapshot_needed: bool,
    pub revokes: bool,
}

fn read_varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut n = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = bytes.split_first()?;
        *bytes = rest;
        n |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(n);
        }
    }
    None
}

/// Reads a `DeltaResponse` (unknown fields skipped, as protobuf does).
pub fn parse_response(mut bytes: &[u8]) -> Result<Response<'_>, ConfigError> {
    let malformed = || error("the response is not a DeltaResponse");
    let (mut from, mut to, mut changes, mut snapshot_needed, mut revokes) = (None, None, &[][..], false, false);
    while !bytes.is_empty() {
        let key = read_varint(&mut bytes).ok_or_else(malformed)?;
        match key & 7 {
            0 => {
                let value = read_varint(&mut bytes).ok_or_else(malformed)?;
                match key >> 3 {
                    4 => snapshot_needed = value != 0,
                    5 => revokes = value != 0,
                    _ => {}
                }
            }
            2 => {
                let len = usize::try_from(read_varint(&mut bytes).ok_or_else(malformed)?).map_err(|_| malformed())?;
                let value = bytes.get(..len).ok_or_else(malformed)?;
                bytes = bytes.get(len..).unwrap_or_default();
                match key >> 3 {
                    1 => from = Some(Stamp::from_bytes(value).ok_or_else(malformed)?),
                    2 if !value.is_empty() => to = Some(Stamp::from_bytes(value).ok_or_else(malformed)?),
                    3 => changes = value,
                    _ => {}
                }
            }
            1 => bytes = bytes.get(8..).ok_or_else(malformed)?,
            5 => bytes = bytes.get(4..).ok_or_else(malformed)?,
            _ => return Err(malformed()),
        }
    }
    let from = from.unwrap_or_default();
    if to.is_some_and(|to| to < from) {
        return Err(error("the response goes backwards"));
    }
    Ok(Response {
        from,
        to,
        changes,
        snapshot_needed,
        revokes,
    })
}

/// A `DeltaResponse` (the control plane's side, for its tests and tools;
/// the server itself uses prost).
pub fn response(from: Stamp, to: Option<Stamp>, changes: &[u8], snapshot_needed: bool, revokes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(changes.len() + 48);
    bytes_field(&mut out, 1, &from.to_bytes());
    match to {
        Some(to) => bytes_field(&mut out, 2, &to.to_bytes()),
        None => bytes_field(&mut out, 2, &[]),
    }
    bytes_field(&mut out, 3, changes);
    if snapshot_needed {
        out.push(4 << 3);
        out.push(1);
    }
    if revokes {
        out.push(5 << 3);
        out.push(1);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conditions::{Cidr, Conditions};
    use crate::role::Role;

    fn put<'a>(name: &'a str, secret: &[u8], previous: Option<&[u8]>) -> Change<'a> {
        put_as(name, secret, previous, false)
    }

    fn put_as<'a>(name: &'a str, secret: &[u8], previous: Option<&[u8]>, disabled: bool) -> Change<'a> {
        let current = Entry {
            name,
            role: Role::Editor,
            digest: Digest::of(secret),
            expire: None,
            previous: false,
            disabled,
            conditions: None,
        };
        let previous = previous.map(|p| Entry {
            digest: Digest::of(p),
            expire: Some(Timestamp::from_unix(5, 7)),
            previous: true,
            ..current
        });
        Change::Put(TokenEntries { current, previous })
    }

    #[test]
    fn conditions_travel_with_both_entries_and_are_validated() {
        let conditions = Conditions {
            not_before: Some(Timestamp::from_unix(1_900_000_000, 0)),
            rate_limit: Some(crate::ratelimit::RateLimit {
                requests: 5,
                per: crate::ratelimit::Per::Second,
                burst: 1,
            }),
            allow: vec![Cidr::parse("10.0.0.0/8").unwrap()],
            except: vec![Cidr::parse("2001:db8::/32").unwrap()],
        }
        .encode();
        let with = |change: Change<'static>, bytes: &'static [u8]| match change {
            Change::Put(t) => {
                let conditions = Some(Encoded::new(bytes).unwrap());
                Change::Put(TokenEntries {
                    current: Entry {
                        conditions,
                        ..t.current
                    },
                    previous: t.previous.map(|p| Entry { conditions, ..p }),
                })
            }
            remove => remove,
        };
        let bytes: &'static [u8] = Box::leak(conditions.into_boxed_slice());
        let changes = [
            with(put("namespaces/a/apitokens/x", b"one", Some(b"old")), bytes),
            with(put_as("namespaces/a/apitokens/y", b"two", None, true), bytes),
            put("namespaces/a/apitokens/z", b"three", None),
        ];
        let mut encoded = Vec::new();
        for c in &changes {
            encode_change(&mut encoded, c);
        }
        assert_eq!(encoded[0], PUT_WITH_PREVIOUS | WITH_CONDITIONS);
        assert_eq!(decode_changes(&encoded).unwrap(), changes);
        // Conditions that do not validate refuse the whole response: an
        // unknown condition is never read as absent.
        let mut one = Vec::new();
        encode_change(&mut one, &changes[1]);
        let last = one.len() - bytes.len();
        let mut bad = one.clone();
        bad[last] = 9;
        assert!(decode_changes(&bad).is_err());
        // Without the kind's bit, the conditions are trailing garbage.
        let mut bad = one.clone();
        bad[0] = PUT_DISABLED;
        assert!(decode_changes(&bad).is_err());
    }

    #[test]
    fn records_round_trip() {
        let changes = [
            put("namespaces/a/apitokens/x", b"one", None),
            Change::Remove("namespaces/a/apitokens/y"),
            put("namespaces/b/apitokens/z", b"two", Some(b"old")),
            put_as("namespaces/b/apitokens/d1", b"three", None, true),
            put_as("namespaces/b/apitokens/d2", b"four", Some(b"older"), true),
        ];
        let mut bytes = Vec::new();
        for c in &changes {
            encode_change(&mut bytes, c);
        }
        assert_eq!(decode_changes(&bytes).unwrap(), changes);
        let disabled = |c: &Change<'_>| match c {
            Change::Put(t) => (t.current.disabled, t.previous.map(|p| p.disabled)),
            Change::Remove(_) => (false, None),
        };
        let decoded = decode_changes(&bytes).unwrap();
        assert_eq!(
            decoded.iter().map(disabled).collect::<Vec<_>>(),
            [
                (false, None),
                (false, None),
                (false, Some(false)),
                (true, None),
                (true, Some(true))
            ]
        );
    }

    #[test]
    fn a_disabled_token_has_kinds_of_its_own_and_unknown_kinds_are_refused() {
        let mut one = Vec::new();
        encode_change(&mut one, &put_as("namespaces/a/apitokens/x", b"one", None, true));
        assert_eq!(one[0], PUT_DISABLED);
        let mut two = Vec::new();
        encode_change(
            &mut two,
            &put_as("namespaces/a/apitokens/x", b"one", Some(b"old"), true),
        );
        assert_eq!(two[0], PUT_DISABLED_WITH_PREVIOUS);
        // Only the kind tells a disabled token from an enabled one: the
        // same record with kind 1 or 2 is the enabled token.
        let mut enabled = Vec::new();
        encode_change(&mut enabled, &put("namespaces/a/apitokens/x", b"one", None));
        assert_eq!(enabled[1..], one[1..]);
        for kind in 5..=u8::MAX {
            let mut bad = one.clone();
            bad[0] = kind;
            assert!(decode_changes(&bad).is_err(), "kind {kind}");
        }
    }

    #[test]
    fn anything_invalid_refuses_the_whole_response() {
        let mut good = Vec::new();
        encode_change(&mut good, &put("namespaces/a/apitokens/x", b"one", None));
        // Truncated anywhere.
        for n in 1..good.len() {
            assert!(decode_changes(&good[..n]).is_err(), "{n}");
        }
        // An unknown role.
        let mut bad = good.clone();
        *bad.last_mut().unwrap() = 9;
        assert!(decode_changes(&bad).is_err());
        // Out-of-range nanoseconds.
        let mut bad = good.clone();
        let at = 2 + "namespaces/a/apitokens/x".len() + 32 + 8;
        bad[at..at + 4].copy_from_slice(&1_000_000_000u32.to_le_bytes());
        assert!(decode_changes(&bad).is_err());
        // Not a token name.
        let mut bad = Vec::new();
        encode_change(&mut bad, &Change::Remove("namespaces/A/apitokens/x"));
        assert!(decode_changes(&bad).is_err());
        // A name twice.
        let twice = [good.clone(), good.clone()].concat();
        assert!(decode_changes(&twice).is_err());
        // An error never quotes a digest.
        let e = decode_changes(&good[..good.len() - 3]).unwrap_err().to_string();
        assert!(!e.contains(&Digest::of(b"one").to_hex()[..8]), "{e}");
    }

    #[test]
    fn messages_round_trip() {
        let from = Stamp {
            epoch: 1,
            generation: 7,
        };
        let to = Stamp {
            epoch: 1,
            generation: 9,
        };
        let bytes = response(from, Some(to), b"xyz", false, true);
        assert_eq!(
            parse_response(&bytes).unwrap(),
            Response {
                from,
                to: Some(to),
                changes: b"xyz",
                snapshot_needed: false,
                revokes: true
            }
        );
        let bytes = response(from, None, b"", true, false);
        let more = parse_response(&bytes).unwrap();
        assert_eq!((more.to, more.snapshot_needed), (None, true));
        assert!(parse_response(&response(to, Some(from), b"", false, false)).is_err());
        let cut = response(from, Some(to), b"xyz", false, true);
        assert!(parse_response(&cut[..cut.len() - 1]).is_err());
    }
}
