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
//!   bytes access = 3;   // one `Access` byte per digest, in the same order
//!   repeated SeenFrom seen = 4;
//! }
//! // The client address of a secret's first request in the interval, at
//! // one filter VM (reading the address is a host call of its own, so it
//! // is read once per token per interval, not per request).
//! message SeenFrom {
//!   bytes digest = 1;   // 32 bytes
//!   bytes address = 2;  // 4 (IPv4) or 16 (IPv6) bytes
//! }
//! ```
//!
//! and the answer is an empty message. Digests, not names: the table has
//! them at hand, and they identify the secret (current or previous) that was
//! used. (Filters before field 3 send none: a control plane reads their
//! uses as authenticated, with no evidence of what they did.)

use crate::access::Access;
use crate::table::{Digest, TokenTable};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// A used secret's digest and what its requests did.
pub type Use = (Digest, Access);

/// A used secret's digest and the client address of its first request in
/// a report interval.
pub type Seen = (Digest, IpAddr);

/// Addresses per report: beyond them, the tokens' first requests in an
/// interval are not asked where they came from (a report stays small, and
/// a VM asks Envoy for at most this many addresses per interval).
pub const MAX_SEEN_PER_REPORT: usize = 1024;

pub const SERVICE: &str = "apitokens.v1.Usage";
pub const METHOD: &str = "Report";
/// Digests per report (16 KiB of them, 512 KiB): a report stays well under
/// any message limit.
pub const MAX_DIGESTS_PER_REPORT: usize = 16 * 1024;

/// One bit per table entry, set when the entry's secret authenticated a
/// request, and one [`Access`] byte per entry, or-ed with what each
/// request did. Marking is a shift and two ors; the bits let a drain skip
/// 64 unused entries at a time.
#[derive(Clone, Debug, Default)]
pub struct Marks {
    bits: Vec<u64>,
    access: Vec<u8>,
    any: bool,
}

impl Marks {
    /// Marks for a table of `entries` entries.
    pub fn new(entries: usize) -> Self {
        Self {
            bits: vec![0; entries / 64 + 1],
            access: vec![0; entries],
            any: false,
        }
    }

    /// Marks entry `index` used for `access`; whether it was not marked
    /// yet since the last drain (its first request in the interval).
    pub fn mark(&mut self, index: usize, access: Access) -> bool {
        let mut first = false;
        if let Some(word) = self.bits.get_mut(index / 64) {
            let bit = 1 << (index % 64);
            first = *word & bit == 0;
            *word |= bit;
            self.any = true;
        }
        if let Some(byte) = self.access.get_mut(index) {
            *byte |= access.bits();
        }
        first
    }

    pub fn is_empty(&self) -> bool {
        !self.any
    }

    /// The digests of the marked entries of `table` with what they did, the
    /// marks cleared.
    pub fn drain(&mut self, table: &TokenTable, into: &mut Vec<Use>) {
        if !self.any {
            return;
        }
        for (w, word) in self.bits.iter_mut().enumerate() {
            let mut rest = std::mem::take(word);
            while rest != 0 {
                let index = w * 64 + rest.trailing_zeros() as usize;
                rest &= rest - 1;
                let access = self.access.get_mut(index).map_or(0, std::mem::take);
                if let Some(digest) = table.digest_at(index) {
                    into.push((digest, Access::from_bits(access).union(Access::USED)));
                }
            }
        }
        self.any = false;
    }
}

/// Uses waiting to be reported (for one destination), each digest once,
/// with everything its marks said or-ed together: while the control plane
/// is down, the marks drained on every tick name the same tokens again, and
/// a list would grow by them every interval. A map holds at most the
/// digests of the tables it came from; `limit` bounds it further (digests
/// beyond it are dropped: a last use reported late is worth less than
/// memory that never shrinks).
#[derive(Clone, Debug)]
pub struct Pending {
    digests: BTreeMap<Digest, Access>,
    limit: usize,
    /// Where each digest was last seen from, at most
    /// [`MAX_SEEN_PER_REPORT`] (the latest address of each).
    seen: BTreeMap<Digest, IpAddr>,
}

impl Pending {
    pub fn new(limit: usize) -> Self {
        Self {
            digests: BTreeMap::new(),
            limit,
            seen: BTreeMap::new(),
        }
    }

    /// Adds where digests were seen from (a later address of a digest
    /// replaces the earlier); beyond [`MAX_SEEN_PER_REPORT`] digests,
    /// dropped.
    pub fn add_seen(&mut self, seen: impl IntoIterator<Item = Seen>) {
        for (digest, address) in seen {
            if self.seen.len() < MAX_SEEN_PER_REPORT || self.seen.contains_key(&digest) {
                self.seen.insert(digest, address);
            }
        }
    }

    /// Every address pending, emptied.
    pub fn take_seen(&mut self) -> Vec<Seen> {
        std::mem::take(&mut self.seen).into_iter().collect()
    }

    /// Adds `uses`; returns how many were dropped for the limit.
    pub fn add(&mut self, uses: impl IntoIterator<Item = Use>) -> usize {
        let mut dropped = 0;
        for (digest, access) in uses {
            if let Some(pending) = self.digests.get_mut(&digest) {
                *pending = pending.union(access);
            } else if self.digests.len() < self.limit {
                self.digests.insert(digest, access);
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
        self.digests.is_empty() && self.seen.is_empty()
    }

    /// Everything pending, emptied.
    pub fn take(&mut self) -> Vec<Use> {
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
pub fn report(lineage: &[u8], uses: &[Use], seen: &[Seen]) -> Vec<u8> {
    let mut digests = Vec::with_capacity(uses.len() * 32);
    let mut access = Vec::with_capacity(uses.len());
    for (d, a) in uses {
        digests.extend_from_slice(&d.0);
        access.push(a.bits());
    }
    let mut out = Vec::with_capacity(digests.len() + access.len() + lineage.len() + 24);
    field(&mut out, 1, lineage);
    field(&mut out, 2, &digests);
    field(&mut out, 3, &access);
    let mut from = Vec::with_capacity(56);
    for (digest, address) in seen {
        from.clear();
        field(&mut from, 1, &digest.0);
        match address.to_canonical() {
            IpAddr::V4(a) => field(&mut from, 2, &a.octets()),
            IpAddr::V6(a) => field(&mut from, 2, &a.octets()),
        }
        field(&mut out, 4, &from);
    }
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
