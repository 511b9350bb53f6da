//! What the VMs of one Envoy share about a lineage's tables, in proxy-wasm
//! shared data (one store per Envoy process and vm_id, every worker's VM
//! and Envoy's validation VM included).
//!
//! - the *snapshot floor*: the newest ECDS snapshot any VM applied. A fresh
//!   VM (Envoy's validation VM) refuses an older one, so Envoy NACKs a
//!   control plane serving an older copy of the store (see `filter`).
//! - the *position*: the newest table any VM enforces, snapshot or delta. A
//!   VM whose delta stream is not live refuses requests while it is behind
//!   it (`Denial::CatchingUp`): a token revoked since could pass.
//!
//! Both only rise (compare-and-swap against the other VMs).

use crate::abi;
use apitokens_core::compact::Stamp;
use std::fmt::Write as _;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Snapshot,
    Position,
}

fn key(kind: Kind, lineage: &[u8]) -> String {
    let mut key = String::with_capacity(20 + 2 * lineage.len());
    key.push_str(match kind {
        Kind::Snapshot => "apitokens.floor.",
        Kind::Position => "apitokens.at.",
    });
    for b in lineage {
        let _ = write!(key, "{b:02x}");
    }
    key
}

/// The value for `lineage` (the plugin name and the store's lineage).
pub fn get(kind: Kind, lineage: &[u8]) -> Option<Stamp> {
    let (value, _) = abi::shared_data(&key(kind, lineage)).ok()??;
    Stamp::from_bytes(&value)
}

/// Raises the value to `stamp` (never lowers it).
pub fn raise(kind: Kind, lineage: &[u8], stamp: Stamp) {
    let key = key(kind, lineage);
    for _ in 0..8 {
        let (current, cas) = match abi::shared_data(&key) {
            Ok(Some((value, cas))) => (Stamp::from_bytes(&value), cas),
            Ok(None) => (None, 0),
            Err(_) => return,
        };
        if current.is_some_and(|c| c >= stamp) || abi::set_shared_data(&key, &stamp.to_bytes(), cas).is_ok() {
            return;
        }
    }
}
