//! The recent history of the published table, as the delta channel sends
//! it to filter VMs (`apitokens_core::delta`): one [`Element`] per catch-up
//! of the publisher, carrying the final state of every token that catch-up
//! applied, encoded once as change records and shared by every VM stream.
//!
//! The elements chain: each starts where the previous one ended, so a VM
//! whose table is at any position the history covers is sent exactly the
//! elements after it, in order. A catch-up that changed nothing a filter
//! sees still makes an (empty) element, or the chain would break. Anything
//! that is not one more step of the same chain (a reload, a new epoch, a
//! step that does not start at the head) starts the history over at the new
//! head: older VMs are then served from the store's change log, or told to
//! wait for a snapshot. The history is bounded (elements and bytes); the
//! oldest go first, and the store's change log covers them.
//!
//! Records are split into chunks at record boundaries, each small enough to
//! travel in one response a VM accepts (`MAX_RESPONSE_BYTES`).

use crate::store::{Position, TokenRecord};
use apitokens_core::delta::{encode_change, MAX_RESPONSE_BYTES};
use apitokens_core::table::Change;
use bytes::Bytes;
use std::collections::VecDeque;
use std::sync::Arc;

/// The most change records in one response: the response's limit less room
/// for its other fields (two stamps, a flag, the field headers).
pub const MAX_CHUNK_BYTES: usize = MAX_RESPONSE_BYTES - 256;
/// The most elements kept.
const MAX_ELEMENTS: usize = 4096;
/// The most bytes of records kept.
const MAX_BYTES: usize = 64 << 20;

/// The changes that take a table from `from` to `to`: each changed token's
/// final state at `to`, in chunks of at most [`MAX_CHUNK_BYTES`].
#[derive(Debug, PartialEq, Eq)]
pub struct Element {
    pub from: Position,
    pub to: Position,
    pub chunks: Vec<Bytes>,
    /// It changes or removes a token that existed at `from` (a VM that lacks
    /// it could admit what its siblings refuse); `false`: creations only.
    pub revokes: bool,
}

impl Element {
    pub fn bytes(&self) -> usize {
        self.chunks.iter().map(Bytes::len).sum()
    }
}

/// Where a VM's table stands against the history.
#[derive(Debug, PartialEq, Eq)]
pub enum Reach {
    /// At the head: nothing to send.
    Live,
    /// Inside the history: these elements follow it, in order.
    Elements(Vec<Arc<Element>>),
    /// Before the history, but no content changed since (its table is the
    /// head's, under an older stamp): an empty step to the head.
    Unchanged { head: Position },
    /// Before the history, in its epoch: the store's change log may reach it.
    Before,
    /// After the head: this process has not published it yet.
    Ahead,
    /// Another (older) epoch: only a snapshot helps.
    Gone,
}

#[derive(Debug)]
pub struct History {
    /// Where the oldest element starts (the head when there is none).
    start: Position,
    head: Position,
    /// The position at which the content last changed, at or before the
    /// head (the published snapshot's version).
    version: Position,
    elements: VecDeque<Arc<Element>>,
    bytes: usize,
}

impl History {
    /// An empty history at `head`, whose content last changed at `version`.
    pub fn new(head: Position, version: Position) -> Self {
        Self {
            start: head,
            head,
            version,
            elements: VecDeque::new(),
            bytes: 0,
        }
    }

    pub fn head(&self) -> Position {
        self.head
    }

    pub fn start(&self) -> Position {
        self.start
    }

    pub fn len(&self) -> usize {
        self.elements.len()
    }

    pub fn is_empty(&self) -> bool {
        self.elements.is_empty()
    }

    /// Starts over at `head` (a reload, a new epoch).
    pub fn reset(&mut self, head: Position, version: Position) {
        *self = Self::new(head, version);
    }

    /// One more step. A step that does not start at the head (or goes
    /// back, or crosses an epoch) starts the history over at its end:
    /// whether it was chained.
    pub fn push(&mut self, element: Element, version: Position) -> bool {
        if element.from != self.head || element.to <= element.from || element.to.epoch != element.from.epoch {
            self.reset(element.to.max(self.head), version);
            return false;
        }
        self.head = element.to;
        self.version = version;
        self.bytes += element.bytes();
        self.elements.push_back(Arc::new(element));
        while self.elements.len() > MAX_ELEMENTS || self.bytes > MAX_BYTES {
            let Some(oldest) = self.elements.pop_front() else { break };
            self.bytes = self.bytes.saturating_sub(oldest.bytes());
            self.start = oldest.to;
        }
        true
    }

    /// What a VM whose table is at `at` needs.
    pub fn since(&self, at: Position) -> Reach {
        if at > self.head {
            return Reach::Ahead;
        }
        if at.epoch != self.head.epoch {
            return Reach::Gone;
        }
        if at == self.head {
            return Reach::Live;
        }
        if at >= self.start {
            // Elements end in increasing order: those after `at`.
            let first = self.elements.partition_point(|e| e.to <= at);
            return Reach::Elements(self.elements.iter().skip(first).cloned().collect());
        }
        if at >= self.version {
            return Reach::Unchanged { head: self.head };
        }
        Reach::Before
    }
}

/// Change records in chunks of at most [`MAX_CHUNK_BYTES`], split between
/// records (one record is a few hundred bytes at most).
pub fn encode<'a>(changes: impl IntoIterator<Item = Change<'a>>) -> Vec<Bytes> {
    let mut chunks = Vec::new();
    let mut chunk = Vec::new();
    let mut record = Vec::with_capacity(512);
    for change in changes {
        record.clear();
        encode_change(&mut record, &change);
        if !chunk.is_empty() && chunk.len() + record.len() > MAX_CHUNK_BYTES {
            chunks.push(Bytes::from(std::mem::take(&mut chunk)));
        }
        chunk.extend_from_slice(&record);
    }
    if !chunk.is_empty() {
        chunks.push(Bytes::from(chunk));
    }
    chunks
}

/// The change a stored token makes to the filter's table: its entries, or
/// its removal (deleted, or retired).
pub fn change<'a>(name: &'a str, record: Option<&'a TokenRecord>) -> Change<'a> {
    match record {
        Some(r) if !r.retired => Change::Put(r.entries()),
        _ => Change::Remove(name),
    }
}

/// [`encode`] of the store's changed tokens.
pub fn encode_records(changed: &[(String, Option<TokenRecord>)]) -> Vec<Bytes> {
    encode(changed.iter().map(|(name, record)| change(name, record.as_ref())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::contract::record;
    use crate::store::{Epoch, Revision};
    use apitokens_core::delta::decode_changes;
    use apitokens_core::Role;

    fn at(n: u64) -> Position {
        Position::new(Epoch(1), Revision(n))
    }

    fn step(from: u64, to: u64, names: &[&str]) -> Element {
        let records: Vec<_> = names
            .iter()
            .map(|n| (n.to_string(), Some(record(n, Role::Viewer, 1))))
            .collect();
        Element {
            from: at(from),
            to: at(to),
            chunks: encode_records(&records),
            revokes: true,
        }
    }

    fn ends(reach: &Reach) -> Vec<(u64, u64)> {
        match reach {
            Reach::Elements(e) => e.iter().map(|e| (e.from.revision.0, e.to.revision.0)).collect(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_vm_anywhere_in_the_history_gets_exactly_the_later_steps() {
        let mut h = History::new(at(10), at(10));
        assert_eq!(h.since(at(10)), Reach::Live);
        assert!(h.push(step(10, 12, &["namespaces/a/apitokens/x"]), at(12)));
        assert!(h.push(step(12, 13, &[]), at(12)), "an empty step keeps the chain");
        assert!(h.push(step(13, 17, &["namespaces/a/apitokens/y"]), at(17)));
        assert_eq!(ends(&h.since(at(10))), [(10, 12), (12, 13), (13, 17)]);
        assert_eq!(ends(&h.since(at(11))), [(10, 12), (12, 13), (13, 17)]);
        assert_eq!(ends(&h.since(at(12))), [(12, 13), (13, 17)]);
        assert_eq!(ends(&h.since(at(15))), [(13, 17)]);
        assert_eq!(h.since(at(17)), Reach::Live);
        assert_eq!(h.since(at(18)), Reach::Ahead);
        assert_eq!(h.since(at(9)), Reach::Before);
        assert_eq!(h.since(Position::new(Epoch(0), Revision(50))), Reach::Gone);
        assert_eq!(h.since(Position::new(Epoch(2), Revision(1))), Reach::Ahead);
    }

    #[test]
    fn anything_but_the_next_step_starts_over() {
        let mut h = History::new(at(10), at(10));
        assert!(h.push(step(10, 12, &[]), at(12)));
        // A step from elsewhere (the table was reloaded meanwhile).
        assert!(!h.push(step(11, 14, &[]), at(14)));
        assert!(h.is_empty());
        assert_eq!((h.start(), h.head()), (at(14), at(14)));
        assert_eq!(h.since(at(12)), Reach::Before);
        // Content unchanged since: the VM's table is the head's.
        h.reset(at(20), at(15));
        assert_eq!(h.since(at(16)), Reach::Unchanged { head: at(20) });
        assert_eq!(h.since(at(14)), Reach::Before);
    }

    #[test]
    fn the_oldest_steps_go_first() {
        let mut h = History::new(at(0), at(0));
        for n in 0..(MAX_ELEMENTS as u64 + 10) {
            // Content last changed at 5.
            assert!(h.push(step(n, n + 1, &[]), at(n.min(5))));
        }
        assert_eq!(h.len(), MAX_ELEMENTS);
        assert_eq!(h.start(), at(10));
        assert_eq!(h.since(at(9)), Reach::Unchanged { head: h.head() });
        assert_eq!(h.since(at(4)), Reach::Before);
        assert_eq!(ends(&h.since(at(10))).len(), MAX_ELEMENTS);
    }

    #[test]
    fn chunks_split_at_record_boundaries() {
        let names: Vec<String> = (0..15_000)
            .map(|i| format!("namespaces/ns-{i:05}/apitokens/token-{i}"))
            .collect();
        let records: Vec<_> = names
            .iter()
            .map(|n| (n.clone(), Some(record(n, Role::Editor, 7))))
            .collect();
        let chunks = encode_records(&records);
        assert!(chunks.len() > 1, "{} chunks", chunks.len());
        let mut decoded = 0;
        for chunk in &chunks {
            assert!(chunk.len() <= MAX_CHUNK_BYTES);
            decoded += decode_changes(chunk).unwrap().len();
        }
        assert_eq!(decoded, names.len());
        assert!(encode_records(&[]).is_empty());
    }
}
