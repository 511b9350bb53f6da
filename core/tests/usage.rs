//! The filter's pending usage reports: a control plane that is down for
//! many report intervals costs at most one entry per token.
#![cfg(test)] // helpers are test code too, for clippy.toml's allow-*-in-tests

use apitokens_core::access::{Access, Kind};
use apitokens_core::role::RoleSet;
use apitokens_core::table::Digest;
use apitokens_core::usage::Pending;

#[test]
fn the_same_tokens_marked_every_interval_are_pending_once() {
    let used: Vec<(Digest, Access)> = (0u8..100).map(|i| (Digest([i; 32]), Access::USED)).collect();
    let mut pending = Pending::new(1 << 20);
    // An hour of 10-second intervals with the control plane down: every
    // interval drains the same marks, and the failed report comes back.
    for _ in 0..360 {
        pending.add(used.iter().copied());
        let failed = pending.take();
        pending.add(failed);
    }
    assert_eq!(pending.len(), 100);
    // In digest order (the map's).
    let sent = pending.take();
    assert_eq!(sent, used);
    assert!(pending.is_empty());
}

#[test]
fn beyond_the_limit_new_digests_are_dropped() {
    let mut pending = Pending::new(3);
    assert_eq!(pending.add((0u8..5).map(|i| (Digest([i; 32]), Access::USED))), 2);
    assert_eq!(pending.len(), 3);
    // Digests already pending are not "new".
    assert_eq!(pending.add([(Digest([0; 32]), Access::USED)]), 0);
    assert_eq!(pending.len(), 3);
}

#[test]
fn what_a_token_did_across_intervals_adds_up() {
    let digest = Digest([1; 32]);
    let read = Access::admitted(Kind::Read, RoleSet::ALL);
    let write = Access::admitted(Kind::Write, RoleSet::NONE.with(apitokens_core::Role::Editor));
    let mut pending = Pending::new(8);
    pending.add([(digest, read)]);
    // A report that failed comes back, and the next interval wrote.
    let failed = pending.take();
    pending.add(failed);
    pending.add([(digest, write)]);
    assert_eq!(pending.take(), [(digest, read.union(write))]);
}
