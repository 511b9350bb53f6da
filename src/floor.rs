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
//!
//! - the *VMs*: the ids of this Envoy's VMs that opened a delta stream. A VM
//!   says how many there are with every request, so that the control plane
//!   can tell an Envoy whose every VM is on the channel from one with a VM
//!   whose stream is refused or broken (which must keep getting snapshots).

use crate::abi;
use apitokens_core::compact::Stamp;
use std::fmt::Write as _;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Snapshot,
    Position,
    Vms,
}

fn key(kind: Kind, lineage: &[u8]) -> String {
    let mut key = String::with_capacity(20 + 2 * lineage.len());
    key.push_str(match kind {
        Kind::Snapshot => "apitokens.floor.",
        Kind::Position => "apitokens.at.",
        Kind::Vms => "apitokens.vms.",
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

/// Adds `vm` (an id of fixed length) to this Envoy's VMs of `lineage`;
/// returns how many there are (0 if shared data failed).
pub fn register_vm(lineage: &[u8], vm: &[u8]) -> u32 {
    let key = key(Kind::Vms, lineage);
    let count = |list: &[u8]| u32::try_from(list.len() / vm.len().max(1)).unwrap_or(u32::MAX);
    for _ in 0..8 {
        let (mut list, cas) = match abi::shared_data(&key) {
            Ok(Some((value, cas))) => (value, cas),
            Ok(None) => (Vec::new(), 0),
            Err(_) => return 0,
        };
        if list.chunks(vm.len().max(1)).any(|id| id == vm) {
            return count(&list);
        }
        list.extend_from_slice(vm);
        if abi::set_shared_data(&key, &list, cas).is_ok() {
            return count(&list);
        }
    }
    0
}
