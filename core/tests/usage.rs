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

#[test]
fn a_token_is_asked_where_from_once_per_interval() {
    use apitokens_core::usage::{Marks, MAX_SEEN_PER_REPORT};
    let mut marks = Marks::new(200);
    // The first request of an entry in the interval says so; the next ones
    // (whatever they did) do not, until the marks are drained.
    assert!(marks.mark(130, Access::USED));
    assert!(!marks.mark(130, Access::USED));
    assert!(!marks.mark(130, Access::admitted(Kind::Write, RoleSet::ALL)));
    assert!(marks.mark(131, Access::USED), "another entry, its own first");
    let table = apitokens_core::table::TokenTable::from_specs(&[]).unwrap();
    marks.drain(&table, &mut Vec::new());
    assert!(marks.mark(130, Access::USED), "a new interval");
    // Pending addresses: the latest per digest, at most MAX_SEEN_PER_REPORT
    // digests, taken with the report.
    let mut pending = Pending::new(1 << 20);
    let ip = |s: &str| -> std::net::IpAddr { s.parse().unwrap() };
    pending.add_seen([(Digest([1; 32]), ip("10.0.0.1")), (Digest([1; 32]), ip("10.0.0.2"))]);
    pending.add_seen((0..2 * MAX_SEEN_PER_REPORT).map(|i| {
        let mut d = [0; 32];
        d[..8].copy_from_slice(&(i as u64 + 2).to_be_bytes());
        (Digest(d), ip("192.0.2.1"))
    }));
    assert!(!pending.is_empty());
    let seen = pending.take_seen();
    assert_eq!(seen.len(), MAX_SEEN_PER_REPORT);
    assert!(seen.contains(&(Digest([1; 32]), ip("10.0.0.2"))));
    assert!(pending.is_empty());
}
