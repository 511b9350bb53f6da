//! The changes a filter VM received over the delta channel since its
//! snapshot, looked up before the snapshot's table.
//!
//! Changes come as each token's final state, by name. The snapshot's table
//! is indexed by digest only, so a change does not edit it: the overlay
//! holds the changed tokens' new entries (by digest) and their names, and a
//! table entry whose name the overlay holds is stale (its token was since
//! regenerated or deleted). A lookup is then: the overlay's digests, else the
//! table, unless the entry's name was changed. An empty overlay (the usual
//! state right after a snapshot) costs one comparison.
//!
//! Each name remembers the stamp of the response that set it, so that a
//! newer snapshot drops what it already holds ([`Overlay::rebase`]) and an
//! older one keeps what it lacks.

use super::{Digest, Token, TokenTable};
use crate::access::Access;
use crate::compact::Stamp;
use crate::conditions::Encoded;
use crate::role::Role;
use crate::table::{Change, Entry, TokenEntries};
use crate::timestamp::Timestamp;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU8, Ordering};

/// Digests are SHA-256 outputs: their first 8 bytes are as good a hash as
/// any, and an attacker who picks secrets cannot pick where a digest lands.
#[derive(Default)]
struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        if let Some(head) = bytes.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
            self.0 = u64::from_le_bytes(head);
        } else {
            for b in bytes {
                self.0 = (self.0 << 8 | u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            }
        }
    }
}

/// Names come from the control plane (inserted) and from the table
/// (looked up): FNV-1a, no random seed to ask the host for.
#[derive(Default)]
struct NameHasher(u64);

impl Hasher for NameHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 { 0xcbf2_9ce4_8422_2325 } else { self.0 };
        for b in bytes {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = h;
    }
}

/// An entry the overlay adds.
#[derive(Debug)]
struct Slot {
    digest: Digest,
    name: Box<str>,
    role: Role,
    expire: Option<Timestamp>,
    previous: bool,
    disabled: bool,
    /// The token's encoded conditions (already validated).
    conditions: Option<Box<[u8]>>,
    /// What its requests did since the last usage report
    /// ([`Access::bits`], 0 when unused). (An atomic so that the control
    /// plane can share an overlay between threads; on wasm32 without
    /// threads it is a plain byte.)
    used: AtomicU8,
}

impl Clone for Slot {
    fn clone(&self) -> Self {
        Self {
            digest: self.digest,
            name: self.name.clone(),
            role: self.role,
            expire: self.expire,
            previous: self.previous,
            disabled: self.disabled,
            conditions: self.conditions.clone(),
            used: AtomicU8::new(self.used.load(Ordering::Relaxed)),
        }
    }
}

impl Slot {
    fn entry(&self) -> Entry<'_> {
        Entry {
            name: &self.name,
            role: self.role,
            digest: self.digest,
            expire: self.expire,
            previous: self.previous,
            disabled: self.disabled,
            conditions: self.conditions(),
        }
    }

    fn conditions(&self) -> Option<Encoded<'_>> {
        self.conditions.as_deref().map(Encoded::trusted)
    }
}

/// A changed token: when, and its entries (none: deleted).
#[derive(Clone, Copy, Debug)]
struct Named {
    at: Stamp,
    current: Option<u32>,
    previous: Option<u32>,
}

#[derive(Clone, Debug, Default)]
pub struct Overlay {
    names: HashMap<Box<str>, Named, BuildHasherDefault<NameHasher>>,
    digests: HashMap<Digest, u32, BuildHasherDefault<DigestHasher>>,
    /// Entries by position (a position is part of a [`Token`]'s index);
    /// replaced ones stay until the next rebase, without a digest.
    slots: Vec<Slot>,
}

impl Overlay {
    /// Changed tokens held.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Applies one response's changes, made at `at`.
    pub fn apply(&mut self, at: Stamp, changes: &[Change<'_>]) {
        for change in changes {
            let name = change.name();
            if let Some(old) = self.names.get(name) {
                for slot in [old.current, old.previous].into_iter().flatten() {
                    if let Some(s) = self.slots.get(slot as usize) {
                        if self.digests.get(&s.digest) == Some(&slot) {
                            self.digests.remove(&s.digest);
                        }
                    }
                }
            }
            let (current, previous) = match change {
                Change::Remove(_) => (None, None),
                Change::Put(t) => (Some(self.push(&t.current)), t.previous.as_ref().map(|p| self.push(p))),
            };
            self.names.insert(Box::from(name), Named { at, current, previous });
        }
    }

    fn push(&mut self, entry: &Entry<'_>) -> u32 {
        let at = u32::try_from(self.slots.len()).unwrap_or(u32::MAX);
        self.slots.push(Slot {
            digest: entry.digest,
            name: Box::from(entry.name),
            role: entry.role,
            expire: entry.expire,
            previous: entry.previous,
            disabled: entry.disabled,
            conditions: entry.conditions.map(|c| Box::from(c.bytes())),
            used: AtomicU8::new(0),
        });
        self.digests.insert(entry.digest, at);
        at
    }

    /// A snapshot at `snapshot` replaced the table: drops the changes it
    /// holds (made at or before it), keeps the later ones. The digests of
    /// used entries that go are handed to `used` first.
    pub fn rebase(&mut self, snapshot: Stamp, used: &mut Vec<(Digest, Access)>) {
        self.drain_used(used);
        let kept: Vec<(Box<str>, Named)> = self.names.drain().filter(|(_, n)| n.at > snapshot).collect();
        let mut slots = std::mem::take(&mut self.slots);
        self.digests.clear();
        let take = |slot: Option<u32>, this: &mut Self| {
            let s = slot.and_then(|i| slots.get(i as usize))?;
            Some(this.push(&s.entry()))
        };
        for (name, named) in kept {
            let current = take(named.current, self);
            let previous = take(named.previous, self);
            self.names.insert(
                name,
                Named {
                    at: named.at,
                    current,
                    previous,
                },
            );
        }
        slots.clear();
    }

    /// What the overlay holds for the token of this name: `None` when
    /// nothing (the table's entries stand), `Some(None)` when it was removed.
    pub fn token(&self, name: &str) -> Option<Option<TokenEntries<'_>>> {
        self.names.get(name).map(|named| self.entries(named))
    }

    /// Every token the overlay holds, as its final state (in no order).
    pub fn changes(&self) -> Vec<Change<'_>> {
        self.names
            .iter()
            .map(|(name, named)| match self.entries(named) {
                Some(token) => Change::Put(token),
                None => Change::Remove(name),
            })
            .collect()
    }

    /// A changed token's entries (`None`: removed).
    fn entries(&self, named: &Named) -> Option<TokenEntries<'_>> {
        let entry = |slot: Option<u32>| slot.and_then(|i| self.slots.get(i as usize)).map(Slot::entry);
        entry(named.current).map(|current| TokenEntries {
            current,
            previous: entry(named.previous),
        })
    }

    /// The token whose secret has this digest: the overlay's entries, then
    /// `table`'s unless the overlay changed that token since.
    pub fn get<'t>(&'t self, table: &'t TokenTable, digest: &Digest) -> Option<Token<'t>> {
        if self.names.is_empty() {
            return table.get(digest);
        }
        if let Some(&at) = self.digests.get(digest) {
            let slot = self.slots.get(at as usize)?;
            return Some(Token {
                name: &slot.name,
                role: slot.role,
                expire: slot.expire,
                previous: slot.previous,
                disabled: slot.disabled,
                conditions: slot.conditions(),
                index: u32::try_from(table.len()).ok()?.checked_add(at)?,
            });
        }
        let token = table.get(digest)?;
        if self.names.contains_key(token.name()) {
            return None;
        }
        Some(token)
    }

    /// Marks a token the overlay returned (`index` is its [`Token::index`]
    /// against `table`) as used, for `access`: whether it was not marked
    /// yet since the last drain (its first request in the interval), and
    /// its digest. Other indexes are the table's: `None`.
    pub fn mark(&self, table: &TokenTable, index: usize, access: Access) -> Option<(bool, Digest)> {
        let slot = index.checked_sub(table.len()).and_then(|i| self.slots.get(i))?;
        let before = slot.used.fetch_or(access.union(Access::USED).bits(), Ordering::Relaxed);
        Some((before == 0, slot.digest))
    }

    /// The digests of the entries used since the last call, with what they
    /// did.
    pub fn drain_used(&self, into: &mut Vec<(Digest, Access)>) {
        for slot in &self.slots {
            let access = Access::from_bits(slot.used.swap(0, Ordering::Relaxed));
            if access.is_used() {
                into.push((slot.digest, access));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::{write_table, TokenEntries};

    const A: &str = "namespaces/a/apitokens/one";
    const B: &str = "namespaces/a/apitokens/two";

    fn stamp(g: u64) -> Stamp {
        Stamp {
            epoch: 1,
            generation: g,
        }
    }

    fn entry<'a>(name: &'a str, secret: &[u8], previous: bool) -> Entry<'a> {
        Entry {
            name,
            role: Role::Viewer,
            digest: Digest::of(secret),
            expire: None,
            previous,
            disabled: false,
            conditions: None,
        }
    }

    fn put<'a>(name: &'a str, secret: &[u8], old: Option<&[u8]>) -> Change<'a> {
        Change::Put(TokenEntries {
            current: entry(name, secret, false),
            previous: old.map(|o| entry(name, o, true)),
        })
    }

    fn table(entries: &[Entry<'_>]) -> TokenTable {
        let mut buf = Vec::new();
        write_table(entries, &mut buf).unwrap();
        TokenTable::from_buffer(buf, 0).unwrap()
    }

    fn who<'t>(o: &'t Overlay, t: &'t TokenTable, secret: &[u8]) -> Option<&'t str> {
        o.get(t, &Digest::of(secret)).map(|t| t.name())
    }

    #[test]
    fn a_change_supersedes_the_tables_entries_of_that_token() {
        let t = table(&[entry(A, b"a1", false), entry(B, b"b1", false)]);
        let mut o = Overlay::default();
        assert_eq!(who(&o, &t, b"a1"), Some(A));
        // Regenerated with an overlap, then created, then deleted.
        o.apply(stamp(2), &[put(A, b"a2", Some(b"a1"))]);
        assert_eq!(who(&o, &t, b"a2"), Some(A));
        assert!(o.get(&t, &Digest::of(b"a1")).unwrap().is_previous());
        o.apply(stamp(3), &[put(A, b"a3", None), Change::Remove(B)]);
        assert_eq!(who(&o, &t, b"a1"), None);
        assert_eq!(who(&o, &t, b"a2"), None);
        assert_eq!(who(&o, &t, b"a3"), Some(A));
        assert_eq!(who(&o, &t, b"b1"), None);
        // The same response twice: the same state.
        o.apply(stamp(3), &[put(A, b"a3", None), Change::Remove(B)]);
        assert_eq!((who(&o, &t, b"a3"), who(&o, &t, b"b1")), (Some(A), None));
    }

    #[test]
    fn a_disabled_token_is_found_disabled_until_enabled() {
        let t = table(&[entry(A, b"a1", false)]);
        let mut o = Overlay::default();
        let disabled = |secret: &[u8], old: Option<&[u8]>| match put(A, secret, old) {
            Change::Put(mut t) => {
                t.current.disabled = true;
                if let Some(p) = t.previous.as_mut() {
                    p.disabled = true;
                }
                Change::Put(t)
            }
            other => other,
        };
        o.apply(stamp(2), &[disabled(b"a1", None)]);
        assert!(o.get(&t, &Digest::of(b"a1")).unwrap().is_disabled());
        // Regenerated while disabled, with an overlap: both secrets disabled.
        o.apply(stamp(3), &[disabled(b"a2", Some(b"a1"))]);
        for secret in [&b"a1"[..], b"a2"] {
            assert!(o.get(&t, &Digest::of(secret)).unwrap().is_disabled());
        }
        // A newer snapshot without it keeps the flag the overlay holds.
        o.rebase(stamp(2), &mut Vec::new());
        assert!(o.get(&t, &Digest::of(b"a2")).unwrap().is_disabled());
        assert!(o.token(A).unwrap().unwrap().current.disabled);
        // Enabled: the same secrets, admitted.
        o.apply(stamp(4), &[put(A, b"a2", Some(b"a1"))]);
        for secret in [&b"a1"[..], b"a2"] {
            assert!(!o.get(&t, &Digest::of(secret)).unwrap().is_disabled());
        }
    }

    #[test]
    fn a_snapshot_drops_what_it_holds_and_keeps_what_it_lacks() {
        let t = table(&[entry(A, b"a1", false)]);
        let mut o = Overlay::default();
        o.apply(stamp(2), &[Change::Remove(A)]);
        o.apply(stamp(3), &[put(B, b"b1", None)]);
        let used = o.get(&t, &Digest::of(b"b1")).unwrap();
        assert_eq!(o.mark(&t, used.index(), Access::USED), Some((true, Digest::of(b"b1"))));
        assert_eq!(o.mark(&t, used.index(), Access::USED), Some((false, Digest::of(b"b1"))));
        // A snapshot at 2 (without A): B is still only in the overlay.
        let t2 = table(&[]);
        let mut reported = Vec::new();
        o.rebase(stamp(2), &mut reported);
        assert_eq!(reported, [(Digest::of(b"b1"), Access::USED)]);
        assert_eq!(o.len(), 1);
        assert_eq!(who(&o, &t2, b"b1"), Some(B));
        // A snapshot at 3 holds B: the overlay is empty.
        let t3 = table(&[entry(B, b"b1", false)]);
        o.rebase(stamp(3), &mut reported);
        assert!(o.is_empty());
        assert_eq!(who(&o, &t3, b"b1"), Some(B));
        assert_eq!(o.mark(&t3, 0, Access::USED), None);
    }
}
