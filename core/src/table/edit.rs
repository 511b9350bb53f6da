//! Incremental edits of a token table, for the control plane.
//!
//! The control plane keeps the table it pushed last and turns each batch of
//! changes into the next one in a single pass: the old entries and names are
//! copied in order with the few inserted ones spliced in and the removed ones
//! skipped, and only the name offsets of the entries whose names moved are
//! adjusted. A write among a million tokens costs that copy, not a sort, a
//! re-validation and a re-encoding of every token. The result is byte for
//! byte what [`super::write_table`] builds from scratch (the encoding is
//! canonical), which the tests check.
//!
//! Every entry that goes in is validated on the way in (name, uniqueness of
//! name and digest), so the edited table holds what the filter's own
//! validation accepts; debug builds re-run that validation after every edit.

use super::{
    push_entry, push_record, record_len, write_table, Digest, Duplicate, Entry, Overlay, TokenTable, CONDITIONS, ENTRY,
};
use crate::compact::Stamp;
use crate::conditions::Encoded;
use crate::error::ConfigError;
use crate::name::TokenName;
use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;

/// The largest table a debug build validates whole after each edit.
#[cfg(debug_assertions)]
const CHECKED_ENTRIES: usize = 20_000;

/// Entries copied at a time (64 KiB), so that a block's name offsets are
/// adjusted while it is still in cache.
const BLOCK: usize = 1260;

/// A token's entries: its current secret and, during a rotation's overlap,
/// its previous one (same name and role).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenEntries<'a> {
    pub current: Entry<'a>,
    pub previous: Option<Entry<'a>>,
}

impl<'a> TokenEntries<'a> {
    fn each(&self) -> impl Iterator<Item = &Entry<'a>> {
        std::iter::once(&self.current).chain(self.previous.as_ref())
    }
}

/// The final state of one token after a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change<'a> {
    /// The token of this name is this one (created, or replaced: a new
    /// secret, an overlap, or any other field).
    Put(TokenEntries<'a>),
    /// No token of this name any more.
    Remove(&'a str),
}

impl<'a> Change<'a> {
    /// The token's name.
    pub fn name(&self) -> &'a str {
        match self {
            Change::Put(token) => token.current.name,
            Change::Remove(name) => name,
        }
    }
}

/// What an edit did, in table entries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EditStats {
    pub inserted: usize,
    pub removed: usize,
}

/// A token's digests in the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Slot {
    current: Digest,
    previous: Option<Digest>,
}

/// What staging a batch of changes did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Staged {
    /// A token's entries changed (a new secret, role, expiry; created or
    /// removed): the content is not what it was.
    pub changed: bool,
    /// A token that existed changed or went: something it admitted (a
    /// secret, a role, the token) may no longer be admitted.
    pub revokes: bool,
}

/// A table and the index needed to edit it: every token's digests by name,
/// and the changes staged since the table was last written.
///
/// Writing the table costs a copy of it (86 MB at a million tokens), so a
/// writer that must answer quickly stages its changes instead: they go into
/// an [`Overlay`], the structure the filter looks up the delta channel's
/// changes in, and the table is written once for many of them, while more
/// are staged ([`LiveTable::prepare`], [`Flush::run`], [`LiveTable::commit`]).
#[derive(Debug)]
pub struct LiveTable {
    /// Shared with a write of the table in progress.
    base: Arc<Base>,
    staged: Overlay,
    /// Tokens, the staged changes included.
    tokens: usize,
}

/// The table as last written and its index.
#[derive(Clone, Debug)]
struct Base {
    table: TokenTable,
    index: BTreeMap<Box<str>, Slot>,
}

/// A write of the table with the changes staged when it was prepared: the
/// copy of the table, run without the live table (which stages on).
#[derive(Debug)]
pub struct Flush {
    base: Arc<Base>,
    staged: Overlay,
    header: Vec<u8>,
    at: Stamp,
}

/// A table written by [`Flush::run`], for [`LiveTable::commit`].
#[derive(Debug)]
pub struct Written {
    /// `None`: nothing changed, header included.
    table: Option<TokenTable>,
    staged: Overlay,
    at: Stamp,
    stats: EditStats,
}

fn edit_error(problem: impl Into<String>) -> ConfigError {
    ConfigError::new("tokens", problem)
}

fn duplicate_error(entries: &[Entry<'_>], dup: Duplicate) -> ConfigError {
    let name = |i: usize| entries.get(i).map_or("?", |e| e.name);
    match dup {
        Duplicate::Name { dup, .. } => edit_error(format!("{}: two tokens have this name", name(dup))),
        Duplicate::Digest { dup, .. } => edit_error(format!("{}: another token has the same secret digest", name(dup))),
        Duplicate::Orphan { index } => edit_error(format!(
            "{}: a previous secret without a token, or with other conditions than its token's",
            name(index)
        )),
    }
}

/// A name (and its token's conditions) to splice into the pool.
struct NameInsert<'a> {
    name: &'a str,
    conditions: Option<Encoded<'a>>,
    /// Before the old name at this offset of the old pool.
    pool_pos: usize,
    /// Its offset in the new pool.
    offset: u32,
}

/// An entry to splice in.
struct EntryInsert<'a> {
    entry: Entry<'a>,
    /// Before the old entry at this index.
    entry_pos: usize,
    /// Its name: an index into the name inserts.
    name: usize,
}

/// What a write of the table changes, in the old table's terms.
#[derive(Default)]
struct Plan<'a> {
    /// Indexes of the old entries that go, ascending.
    removed_entries: Vec<usize>,
    /// Old names that go (byte ranges of the old pool), in pool order.
    removed_names: Vec<std::ops::Range<usize>>,
    /// Names that come, in name order.
    names: Vec<NameInsert<'a>>,
    /// Entries that come.
    inserts: Vec<EntryInsert<'a>>,
}

fn bad_pool() -> ConfigError {
    edit_error("the table's name offsets are inconsistent")
}

impl LiveTable {
    /// A table of `entries` in a new buffer that starts with `header` (the
    /// compact encoding's header and settings).
    pub fn build(header: &[u8], entries: &[Entry<'_>]) -> Result<Self, ConfigError> {
        for entry in entries {
            TokenName::parse(entry.name).map_err(|e| edit_error(format!("{}: {e}", entry.name)))?;
        }
        let mut buf = Vec::with_capacity(header.len() + 8 + entries.len() * (ENTRY + 48));
        buf.extend_from_slice(header);
        write_table(entries, &mut buf).map_err(|dup| duplicate_error(entries, dup))?;
        let table = TokenTable::framed(Arc::new(buf), header.len())?;
        let mut index: BTreeMap<Box<str>, Slot> = BTreeMap::new();
        for e in entries.iter().filter(|e| !e.previous) {
            index.insert(
                Box::from(e.name),
                Slot {
                    current: e.digest,
                    previous: None,
                },
            );
        }
        for e in entries.iter().filter(|e| e.previous) {
            if let Some(slot) = index.get_mut(e.name) {
                slot.previous = Some(e.digest);
            }
        }
        let tokens = index.len();
        let base = Base { table, index };
        base.check()?;
        Ok(Self {
            base: Arc::new(base),
            staged: Overlay::default(),
            tokens,
        })
    }

    /// The table as last written: without the staged changes.
    pub fn table(&self) -> &TokenTable {
        &self.base.table
    }

    /// The changes staged since the table was written, to be looked up
    /// before it ([`Overlay::get`]).
    pub fn staged(&self) -> &Overlay {
        &self.staged
    }

    /// Tokens, the staged changes included (a token in its overlap has two
    /// entries).
    pub fn len(&self) -> usize {
        self.tokens
    }

    pub fn is_empty(&self) -> bool {
        self.tokens == 0
    }

    /// The digest of the current secret of the token with this name, the
    /// staged changes included.
    pub fn digest_of(&self, name: &str) -> Option<Digest> {
        self.token(name).map(|t| t.current.digest)
    }

    /// The token of this name as it stands, the staged changes included.
    pub fn token(&self, name: &str) -> Option<TokenEntries<'_>> {
        if let Some(staged) = self.staged.token(name) {
            return staged;
        }
        let slot = self.base.index.get(name)?;
        let entry = |digest: Digest| {
            self.base.table.get(&digest).map(|t| Entry {
                name: t.name(),
                role: t.role(),
                digest,
                expire: t.expire(),
                previous: t.is_previous(),
                disabled: t.is_disabled(),
                conditions: t.conditions(),
            })
        };
        Some(TokenEntries {
            current: entry(slot.current)?,
            previous: slot.previous.and_then(entry),
        })
    }

    /// Stages `changes` (a later change to a name wins over an earlier one),
    /// made at `at`, without writing the table: each is validated as
    /// [`LiveTable::apply`] would, and a change that leaves a token as it
    /// stands is dropped. On error nothing changes.
    pub fn stage(&mut self, at: Stamp, changes: &[Change<'_>]) -> Result<Staged, ConfigError> {
        let mut last: BTreeMap<&str, &Change<'_>> = BTreeMap::new();
        for change in changes {
            last.insert(change.name(), change);
        }
        let mut effective: Vec<Change<'_>> = Vec::with_capacity(last.len());
        let mut staged = Staged::default();
        let mut tokens = self.tokens;
        for (name, change) in &last {
            let now = self.token(name);
            match change {
                Change::Put(token) => {
                    check_put(name, token)?;
                    if now.as_ref() == Some(token) {
                        continue;
                    }
                    if now.is_none() {
                        tokens += 1;
                    }
                }
                Change::Remove(_) => {
                    if now.is_none() {
                        continue;
                    }
                    tokens = tokens.saturating_sub(1);
                }
            }
            staged.revokes |= now.is_some();
            effective.push(**change);
        }
        // A secret's digest belongs to one token: among the changes, and
        // against the tokens they leave in place.
        let mut digests: Vec<(&Digest, &str)> = effective
            .iter()
            .filter_map(|c| match c {
                Change::Put(t) => Some(t),
                Change::Remove(_) => None,
            })
            .flat_map(|t| t.each().map(|e| (&e.digest, e.name)))
            .collect();
        digests.sort_unstable();
        for pair in digests.windows(2) {
            if let [(a, _), (b, name)] = pair {
                if a == b {
                    return Err(edit_error(format!("{name}: another token has the same secret digest")));
                }
            }
        }
        for (digest, name) in &digests {
            if let Some(owner) = self.staged.get(&self.base.table, digest) {
                if owner.name() != *name && !last.contains_key(owner.name()) {
                    return Err(edit_error(format!("{name}: another token has the same secret digest")));
                }
            }
        }
        staged.changed = !effective.is_empty();
        self.staged.apply(at, &effective);
        self.tokens = tokens;
        Ok(staged)
    }

    /// A write of the table with the changes staged so far, the last of
    /// them made at `at`, after `header` (which stamps it).
    pub fn prepare(&self, header: &[u8], at: Stamp) -> Flush {
        Flush {
            base: Arc::clone(&self.base),
            staged: self.staged.clone(),
            header: header.to_vec(),
            at,
        }
    }

    /// Takes in a table written from this one: the changes it holds are no
    /// longer staged, those staged since stay. On error (a debug build's
    /// whole validation failed) the live table is unusable: build it anew.
    pub fn commit(&mut self, written: Written) -> Result<EditStats, ConfigError> {
        let Written {
            table,
            staged,
            at,
            stats,
        } = written;
        // Unique once the write is done (it held the other reference).
        let base = Arc::make_mut(&mut self.base);
        base.commit(table, &staged.changes())?;
        self.staged.rebase(at, &mut Vec::new());
        Ok(stats)
    }
}

impl Flush {
    /// Writes the table into `buf` (cleared first: pass the buffer of a
    /// table nobody uses any more, so that its memory is reused rather than
    /// faulted in anew).
    pub fn run(self, buf: Vec<u8>) -> Result<Written, ConfigError> {
        let (table, stats) = self.base.write(&self.header, &self.staged.changes(), buf)?;
        Ok(Written {
            table,
            staged: self.staged,
            at: self.at,
            stats,
        })
    }
}

impl Base {
    /// Validation of the whole table, in debug builds (every end-to-end test
    /// runs it after every edit, up to [`CHECKED_ENTRIES`] entries: beyond
    /// them the check would cost a debug control plane more than the edit);
    /// release builds trust the per-entry checks.
    fn check(&self) -> Result<(), ConfigError> {
        #[cfg(debug_assertions)]
        if self.table.len() <= CHECKED_ENTRIES {
            self.table.validate()?;
            let entries = self
                .index
                .values()
                .map(|s| 1 + usize::from(s.previous.is_some()))
                .sum::<usize>();
            if entries != self.table.len() {
                return Err(edit_error("the name index does not match the table"));
            }
        }
        Ok(())
    }

    /// The old entry index of `digest`, which must be in the table.
    fn entry_of(&self, digest: &Digest) -> Result<usize, ConfigError> {
        self.table
            .position(digest)
            .map_err(|_| edit_error("the name index does not match the table"))
    }

    /// The pool bytes of an entry's name, and its conditions if it has any.
    fn name_range(&self, entry: usize) -> Result<std::ops::Range<usize>, ConfigError> {
        let bad = || edit_error("the table's name offsets are inconsistent");
        let entry = self.table.entry(entry).ok_or_else(bad)?;
        let offset = super::u32_at(entry, 44)
            .and_then(|o| usize::try_from(o).ok())
            .ok_or_else(bad)?;
        let pool = self.table.pool();
        let mut end = offset + 1 + usize::from(*pool.get(offset).ok_or_else(bad)?);
        if entry.get(49).is_some_and(|f| f & CONDITIONS != 0) {
            let len = pool
                .get(end..end + 2)
                .and_then(|b| b.try_into().ok())
                .map(u16::from_le_bytes)
                .ok_or_else(bad)?;
            end += 2 + usize::from(len);
        }
        Ok(offset..end)
    }

    /// Whether the table already holds exactly these entries for the token.
    fn holds(&self, slot: Slot, token: &TokenEntries<'_>) -> bool {
        let same = |digest: Digest, entry: &Entry<'_>| {
            digest == entry.digest
                && self.table.get(&digest).is_some_and(|t| {
                    t.role() == entry.role
                        && t.expire() == entry.expire
                        && t.is_disabled() == entry.disabled
                        && t.conditions() == entry.conditions
                })
        };
        same(slot.current, &token.current)
            && match (slot.previous, &token.previous) {
                (None, None) => true,
                (Some(d), Some(e)) => same(d, e),
                _ => false,
            }
    }

    /// The table with `changes` (a later change to a name wins over an
    /// earlier one), written into `buf` after `header`; `None` when nothing
    /// changes, the header included.
    fn write(
        &self,
        header: &[u8],
        changes: &[Change<'_>],
        mut buf: Vec<u8>,
    ) -> Result<(Option<TokenTable>, EditStats), ConfigError> {
        let mut plan = self.plan(changes)?;
        self.check_digests(&plan)?;
        let stats = EditStats {
            inserted: plan.inserts.len(),
            removed: plan.removed_entries.len(),
        };
        // Nothing to write, unless the header changed (a flush stamps the
        // table with the version its staged changes brought it to).
        let same_header = self.table.buffer().get(..self.table.start()) == Some(header);
        if plan.inserts.is_empty() && plan.removed_entries.is_empty() && same_header {
            return Ok((None, stats));
        }
        let pool_len = self.place_names(&mut plan)?;
        let count = self.table.len() + plan.inserts.len() - plan.removed_entries.len();
        buf.clear();
        buf.reserve(header.len() + 8 + count * ENTRY + pool_len);
        buf.extend_from_slice(header);
        buf.extend_from_slice(
            &u32::try_from(count)
                .map_err(|_| edit_error("too many tokens"))?
                .to_le_bytes(),
        );
        self.copy_entries(&mut buf, &mut plan)?;
        buf.extend_from_slice(
            &u32::try_from(pool_len)
                .map_err(|_| edit_error("names too long"))?
                .to_le_bytes(),
        );
        self.copy_pool(&mut buf, &plan)?;
        Ok((Some(TokenTable::framed(Arc::new(buf), header.len())?), stats))
    }

    /// What goes and what comes: each changed token's old entries and name,
    /// and its new ones with where they land among the old (a change that
    /// leaves a token as it stands is no change).
    fn plan<'c>(&self, changes: &'c [Change<'c>]) -> Result<Plan<'c>, ConfigError> {
        let mut last: BTreeMap<&str, &Change<'_>> = BTreeMap::new();
        for change in changes {
            last.insert(change.name(), change);
        }
        let mut plan = Plan::default();
        for (name, change) in last {
            let slot = self.index.get(name).copied();
            if let (Some(slot), Change::Put(token)) = (slot, change) {
                if self.holds(slot, token) {
                    continue;
                }
            }
            if let Some(slot) = slot {
                let current = self.entry_of(&slot.current)?;
                plan.removed_names.push(self.name_range(current)?);
                plan.removed_entries.push(current);
                if let Some(previous) = slot.previous {
                    plan.removed_entries.push(self.entry_of(&previous)?);
                }
            }
            let Change::Put(token) = change else {
                continue;
            };
            check_put(name, token)?;
            // Before the first old name that sorts after it (the old name of
            // the same token, if any, is removed anyway).
            let successor = self
                .index
                .range::<str, _>((Bound::Excluded(name), Bound::Unbounded))
                .next()
                .map(|(_, s)| s.current);
            let pool_pos = match successor {
                Some(digest) => self.name_range(self.entry_of(&digest)?)?.start,
                None => self.table.pool().len(),
            };
            plan.names.push(NameInsert {
                name,
                conditions: token.current.conditions,
                pool_pos,
                offset: 0,
            });
            for entry in token.each() {
                let entry_pos = match self.table.position(&entry.digest) {
                    Err(pos) | Ok(pos) => pos,
                };
                plan.inserts.push(EntryInsert {
                    entry: *entry,
                    entry_pos,
                    name: plan.names.len() - 1,
                });
            }
        }
        plan.removed_entries.sort_unstable();
        plan.removed_names.sort_by_key(|r| r.start);
        Ok(plan)
    }

    /// A digest may be in the table once: an inserted one neither twice nor
    /// already there, unless its old entry goes.
    fn check_digests(&self, plan: &Plan<'_>) -> Result<(), ConfigError> {
        let mut digests: Vec<&Digest> = plan.inserts.iter().map(|i| &i.entry.digest).collect();
        digests.sort_unstable();
        for pair in digests.windows(2) {
            if let [a, b] = pair {
                if a == b {
                    let name = plan
                        .inserts
                        .iter()
                        .find(|i| &i.entry.digest == *b)
                        .map_or("?", |i| i.entry.name);
                    return Err(edit_error(format!("{name}: another token has the same secret digest")));
                }
            }
        }
        for insert in &plan.inserts {
            if let Ok(old) = self.table.position(&insert.entry.digest) {
                if plan.removed_entries.binary_search(&old).is_err() {
                    return Err(edit_error(format!(
                        "{}: another token has the same secret digest",
                        insert.entry.name
                    )));
                }
            }
        }
        Ok(())
    }

    /// Where each inserted name lands in the new pool: after the old names
    /// before its position (less the removed ones among them) and the
    /// inserted names before it (`names` is in name order). The new pool's
    /// length.
    fn place_names(&self, plan: &mut Plan<'_>) -> Result<usize, ConfigError> {
        let mut inserted_before = 0usize;
        let mut removed_before = 0usize;
        let mut next_removal = plan.removed_names.iter().peekable();
        for insert in &mut plan.names {
            while let Some(r) = next_removal.next_if(|r| r.start < insert.pool_pos) {
                removed_before += r.len();
            }
            let offset = (insert.pool_pos + inserted_before)
                .checked_sub(removed_before)
                .ok_or_else(bad_pool)?;
            insert.offset = u32::try_from(offset).map_err(|_| edit_error("names too long"))?;
            inserted_before += record_len(insert.name, insert.conditions);
        }
        (self.table.pool().len() + inserted_before)
            .checked_sub(plan.removed_names.iter().map(|r| r.len()).sum())
            .ok_or_else(bad_pool)
    }

    /// The new entries: old runs copied in cache-sized blocks, each block's
    /// name offsets shifted while it is still in cache, the inserted ones
    /// spliced in, the removed ones skipped.
    fn copy_entries(&self, buf: &mut Vec<u8>, plan: &mut Plan<'_>) -> Result<(), ConfigError> {
        let shift = Shift::new(&plan.names, &plan.removed_names);
        plan.inserts
            .sort_by(|a, b| a.entry_pos.cmp(&b.entry_pos).then(a.entry.digest.cmp(&b.entry.digest)));
        let old_entries = self
            .table
            .entries_bytes()
            .ok_or_else(|| edit_error("the compact table is truncated"))?;
        let names = &plan.names;
        let name_offset = |insert: &EntryInsert<'_>| names.get(insert.name).map_or(0, |n| n.offset);
        let mut next_insert = plan.inserts.iter().peekable();
        let mut next_removed = plan.removed_entries.iter().copied().peekable();
        let mut i = 0usize;
        let n = self.table.len();
        while i < n {
            while let Some(insert) = next_insert.next_if(|ins| ins.entry_pos <= i) {
                push_entry(buf, &insert.entry, name_offset(insert));
            }
            if next_removed.next_if_eq(&i).is_some() {
                i += 1;
                continue;
            }
            let stop = [
                next_insert.peek().map_or(n, |ins| ins.entry_pos),
                next_removed.peek().copied().unwrap_or(n),
                i + BLOCK,
            ]
            .into_iter()
            .min()
            .unwrap_or(n)
            .clamp(i + 1, n);
            let run = old_entries
                .get(i * ENTRY..stop * ENTRY)
                .ok_or_else(|| edit_error("the compact table is truncated"))?;
            let at = buf.len();
            buf.extend_from_slice(run);
            if !shift.is_zero() {
                if let Some(copied) = buf.get_mut(at..) {
                    for entry in copied.chunks_exact_mut(ENTRY) {
                        if let Some(field) = entry.get_mut(44..48) {
                            let mut offset = [0u8; 4];
                            offset.copy_from_slice(field);
                            field.copy_from_slice(&shift.apply(u32::from_le_bytes(offset)).to_le_bytes());
                        }
                    }
                }
            }
            i = stop;
        }
        for insert in next_insert {
            push_entry(buf, &insert.entry, name_offset(insert));
        }
        Ok(())
    }

    /// The new pool: old names copied in runs, the inserted ones spliced
    /// in, the removed ones skipped.
    fn copy_pool(&self, buf: &mut Vec<u8>, plan: &Plan<'_>) -> Result<(), ConfigError> {
        let old_pool = self.table.pool();
        let mut cursor = 0usize;
        let mut next_removal = plan.removed_names.iter().peekable();
        for insert in &plan.names {
            while let Some(r) = next_removal.next_if(|r| r.start < insert.pool_pos) {
                buf.extend_from_slice(old_pool.get(cursor..r.start).ok_or_else(bad_pool)?);
                cursor = r.end;
            }
            buf.extend_from_slice(old_pool.get(cursor..insert.pool_pos).ok_or_else(bad_pool)?);
            cursor = insert.pool_pos;
            push_record(buf, insert.name, insert.conditions);
        }
        for r in next_removal {
            buf.extend_from_slice(old_pool.get(cursor..r.start).ok_or_else(bad_pool)?);
            cursor = r.end;
        }
        buf.extend_from_slice(old_pool.get(cursor..).ok_or_else(bad_pool)?);
        Ok(())
    }

    /// Takes in `table`, written from this one with `changes`.
    fn commit(&mut self, table: Option<TokenTable>, changes: &[Change<'_>]) -> Result<(), ConfigError> {
        for change in changes {
            match change {
                Change::Put(token) => {
                    self.index.insert(
                        Box::from(token.current.name),
                        Slot {
                            current: token.current.digest,
                            previous: token.previous.map(|p| p.digest),
                        },
                    );
                }
                Change::Remove(name) => {
                    self.index.remove(*name);
                }
            }
        }
        if let Some(table) = table {
            self.table = table;
        }
        self.check()
    }
}

/// A token as it goes in: a valid name, a previous secret of its own (and
/// disabled and conditioned with it: a token's every secret is refused
/// when it is disabled, and bound by its conditions).
fn check_put(name: &str, token: &TokenEntries<'_>) -> Result<(), ConfigError> {
    TokenName::parse(name).map_err(|e| edit_error(format!("{name}: {e}")))?;
    if token.previous.is_some_and(|p| {
        p.name != name
            || !p.previous
            || p.disabled != token.current.disabled
            || p.conditions != token.current.conditions
    }) || token.current.previous
        || token.current.name != name
    {
        return Err(edit_error(format!("{name}: inconsistent previous secret")));
    }
    Ok(())
}

/// How far each surviving old name moved: a step function of its old offset,
/// as sorted breakpoints (old offset from which a shift applies) with the
/// cumulative shift from there on.
struct Shift {
    steps: Vec<(u32, i64)>,
}

impl Shift {
    fn new(names: &[NameInsert<'_>], removals: &[std::ops::Range<usize>]) -> Self {
        // An inserted name moves every old name at or after its position; a
        // removed one every old name after it (none starts inside it).
        let mut deltas: Vec<(usize, i64)> = names
            .iter()
            .map(|i| (i.pool_pos, record_len(i.name, i.conditions) as i64))
            .chain(removals.iter().map(|r| (r.end, -(r.len() as i64))))
            .collect();
        deltas.sort_by_key(|d| d.0);
        let mut steps: Vec<(u32, i64)> = Vec::new();
        let mut total = 0i64;
        for (at, delta) in deltas {
            total += delta;
            let at = u32::try_from(at).unwrap_or(u32::MAX);
            match steps.last_mut() {
                Some(last) if last.0 == at => last.1 = total,
                _ => steps.push((at, total)),
            }
        }
        // Drop steps that change nothing (a secret replaced under the same name).
        let mut previous = 0i64;
        steps.retain(|&(_, total)| {
            let keep = total != previous;
            previous = total;
            keep
        });
        Self { steps }
    }

    fn is_zero(&self) -> bool {
        self.steps.is_empty()
    }

    fn apply(&self, offset: u32) -> u32 {
        let idx = self.steps.partition_point(|&(at, _)| at <= offset);
        let delta = idx.checked_sub(1).and_then(|i| self.steps.get(i)).map_or(0, |s| s.1);
        u32::try_from(i64::from(offset) + delta).unwrap_or(u32::MAX)
    }
}
