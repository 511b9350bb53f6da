//! Which tokens were used, for their last use: marked per table entry on the
//! request path (a bit), reported on a timer to the control plane.
//!
//! A report is a gRPC unary call from the filter, `apitokens.v1.Usage/Report`,
//! to the cluster the configuration names (`usageReport.cluster`: the one
//! Envoy reaches the control plane's xDS server by, so reports travel the
//! xDS side's trust, never the public listener). Its message:
//!
//! ```text
//! message UsageReport {
//!   bytes lineage = 1;  // the store the table came from (compact header)
//!   bytes digests = 2;  // SHA-256 digests of used secrets, 32 bytes each
//! }
//! ```
//!
//! and the answer is an empty message. Digests, not names: the table has
//! them at hand, and they identify the secret (current or previous) that was
//! used.

use crate::table::{Digest, TokenTable};
use std::collections::BTreeSet;

pub const SERVICE: &str = "apitokens.v1.Usage";
pub const METHOD: &str = "Report";
/// Digests per report (16 KiB of them, 512 KiB): a report stays well under
/// any message limit.
pub const MAX_DIGESTS_PER_REPORT: usize = 16 * 1024;

/// One bit per table entry: set when the entry's secret authenticated a
/// request. Marking is a shift and an or.
#[derive(Clone, Debug, Default)]
pub struct Marks {
    bits: Vec<u64>,
    any: bool,
}

impl Marks {
    /// Marks for a table of `entries` entries.
    pub fn new(entries: usize) -> Self {
        Self {
            bits: vec![0; entries / 64 + 1],
            any: false,
        }
    }

    pub fn mark(&mut self, index: usize) {
        if let Some(word) = self.bits.get_mut(index / 64) {
            *word |= 1 << (index % 64);
            self.any = true;
        }
    }

    pub fn is_empty(&self) -> bool {
        !self.any
    }

    /// The digests of the marked entries of `table`, the marks cleared.
    pub fn drain(&mut self, table: &TokenTable, into: &mut Vec<Digest>) {
        if !self.any {
            return;
        }
        for (w, word) in self.bits.iter_mut().enumerate() {
            let mut rest = std::mem::take(word);
            while rest != 0 {
                let bit = rest.trailing_zeros() as usize;
                rest &= rest - 1;
                if let Some(digest) = table.digest_at(w * 64 + bit) {
                    into.push(digest);
                }
            }
        }
        self.any = false;
    }
}

/// Digests waiting to be reported (for one destination), each once: while
/// the control plane is down, the marks drained on every tick name the same
/// tokens again, and a list would grow by them every interval. A set holds
/// at most the digests of the tables it came from; `limit` bounds it
/// further (digests beyond it are dropped: a last use reported late is
/// worth less than memory that never shrinks).
#[derive(Clone, Debug)]
pub struct Pending {
    digests: BTreeSet<Digest>,
    limit: usize,
}

impl Pending {
    pub fn new(limit: usize) -> Self {
        Self {
            digests: BTreeSet::new(),
            limit,
        }
    }

    /// Adds `digests`; returns how many were dropped for the limit.
    pub fn add(&mut self, digests: impl IntoIterator<Item = Digest>) -> usize {
        let mut dropped = 0;
        for digest in digests {
            if self.digests.len() < self.limit || self.digests.contains(&digest) {
                self.digests.insert(digest);
            } else {
                dropped += 1;
            }
        }
        dropped
    }

    pub fn len(&self) -> usize {
        self.digests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// Everything pending, emptied.
    pub fn take(&mut self) -> Vec<Digest> {
        std::mem::take(&mut self.digests).into_iter().collect()
    }
}

fn field(out: &mut Vec<u8>, number: u8, bytes: &[u8]) {
    // Length-delimited field `number`, its length as a varint.
    out.push(number << 3 | 2);
    let mut len = bytes.len();
    while len >= 0x80 {
        out.push((len as u8 & 0x7f) | 0x80);
        len >>= 7;
    }
    out.push(len as u8);
    out.extend_from_slice(bytes);
}

/// The `UsageReport` message.
pub fn report(lineage: &[u8], digests: &[Digest]) -> Vec<u8> {
    let mut all = Vec::with_capacity(digests.len() * 32);
    for d in digests {
        all.extend_from_slice(&d.0);
    }
    let mut out = Vec::with_capacity(all.len() + lineage.len() + 16);
    field(&mut out, 1, lineage);
    field(&mut out, 2, &all);
    out
}

/// An `envoy.config.core.v3.GrpcService` naming `cluster` (`envoy_grpc`),
/// as the gRPC call's upstream.
pub fn grpc_service(cluster: &str) -> Vec<u8> {
    let mut envoy_grpc = Vec::with_capacity(cluster.len() + 4);
    field(&mut envoy_grpc, 1, cluster.as_bytes());
    let mut out = Vec::with_capacity(envoy_grpc.len() + 4);
    field(&mut out, 1, &envoy_grpc);
    out
}
