//! The store's contract, one test per rule, run against every backend:
//! SQLite always, PostgreSQL when the tests have a server (`make unit` starts
//! one; see `postgres::tests`). A backend's own tests (files, schema versions,
//! damaged rows) stay in its module.
use super::changes::CHANGES_PER_WRITE;
use super::{
    Action, AuditEvent, Changes, Credential, Epoch, NewDigest, Position, PreviousSecret, Revision, StateSet, Store,
    StoreError, TokenRecord, Use,
};
use apitokens_core::access::Access;
use apitokens_core::table::Digest;
use apitokens_core::{Role, Timestamp};

pub(crate) fn record(name: &str, role: Role, digest_byte: u8) -> TokenRecord {
    TokenRecord {
        last_addresses: Vec::new(),
        update_time: Timestamp::from_unix(1_700_000_000, 0),
        conditions: None,
        name: name.to_owned(),
        role,
        digest: Digest([digest_byte; 32]),
        create_time: Timestamp::from_unix(1_700_000_000, 0),
        expire_time: None,
        retired: false,
        created_by: None,
        previous: None,
        last_use: None,
        evidence: Default::default(),
        disabled: false,
    }
}

/// Inserts one token (no quota, no event); the revision.
pub(crate) async fn put(store: &dyn Store, name: &str, role: Role, digest_byte: u8) -> Revision {
    store
        .insert(vec![record(name, role, digest_byte)], None, vec![])
        .await
        .unwrap()
}

pub(crate) fn new_digest(name: &str, digest: Digest, previous_until: Option<Timestamp>) -> NewDigest {
    NewDigest {
        name: name.to_owned(),
        digest,
        previous_until,
    }
}

/// Regenerates an existing token's secret; the token after.
async fn regenerate(store: &dyn Store, name: &str, digest: Digest, until: Option<Timestamp>) -> TokenRecord {
    let new = new_digest(name, digest, until);
    store.replace_digest(new, test_event()).await.unwrap().unwrap().0
}

pub(crate) fn test_event() -> AuditEvent {
    AuditEvent {
        conditions: None,
        policy: None,
        time: Timestamp::from_unix(1_700_000_000, 0),
        namespace: "default".into(),
        action: Action::Regenerate,
        token: None,
        actor: "test".into(),
        role: None,
        expire_time: None,
        previous_until: None,
        client_address: None,
        peer_address: None,
        credential: None,
        count: None,
    }
}

fn event(action: Action, token: &str) -> AuditEvent {
    AuditEvent {
        action,
        token: Some(token.into()),
        actor: "namespaces/default/apitokens/admin".into(),
        client_address: Some("192.0.2.7".into()),
        peer_address: Some("127.0.0.1".into()),
        credential: Some(Credential::Current),
        ..test_event()
    }
}

/// The revision a change set brings the store to, and what changed.
fn since(changes: Changes) -> (Revision, Vec<(String, Option<TokenRecord>)>) {
    match changes {
        Changes::Since { head, changed } => (head.at.revision, changed),
        Changes::TooOld => panic!("the change log should reach back"),
    }
}

pub(crate) async fn insert_get_list_delete(store: &dyn Store) {
    let a = record("namespaces/default/apitokens/a", Role::Owner, 1);
    let mut b = record("namespaces/default/apitokens/b", Role::Viewer, 2);
    b.expire_time = Some(Timestamp::from_unix(1_900_000_000, 500_000_000));
    let c = record("namespaces/other/apitokens/a", Role::Editor, 3);
    for r in [&b, &a, &c] {
        store.insert(vec![r.clone()], None, vec![]).await.unwrap();
    }
    assert_eq!(store.get(&a.name).await.unwrap(), Some(a.clone()));
    assert_eq!(store.get(&b.name).await.unwrap(), Some(b.clone()));
    assert_eq!(store.get("namespaces/default/apitokens/zzz").await.unwrap(), None);
    assert_eq!(store.list("default").await.unwrap(), vec![a.clone(), b.clone()]);
    assert_eq!(store.list("other").await.unwrap(), vec![c.clone()]);
    assert_eq!(store.list("nobody").await.unwrap(), vec![]);
    assert!(store.delete(&a.name, test_event()).await.unwrap().is_some());
    assert!(store.delete(&a.name, test_event()).await.unwrap().is_none());
    assert_eq!(store.load().await.unwrap().1, vec![b, c]);
}

pub(crate) async fn duplicates_and_quota_are_refused_and_change_nothing(store: &dyn Store) {
    let a = record("namespaces/default/apitokens/a", Role::Owner, 1);
    store.insert(vec![a.clone()], None, vec![]).await.unwrap();
    let rev = store.revision().await.unwrap();
    let same_name = record("namespaces/default/apitokens/a", Role::Viewer, 2);
    assert!(matches!(
        store.insert(vec![same_name], None, vec![]).await,
        Err(StoreError::NameTaken(name)) if name == "namespaces/default/apitokens/a"
    ));
    let same_digest = record("namespaces/default/apitokens/b", Role::Viewer, 1);
    assert!(matches!(
        store.insert(vec![same_digest], None, vec![]).await,
        Err(StoreError::DigestTaken)
    ));
    let two = vec![
        record("namespaces/default/apitokens/b", Role::Viewer, 2),
        record("namespaces/default/apitokens/c", Role::Viewer, 3),
    ];
    assert!(matches!(
        store.insert(two.clone(), Some(2), vec![]).await,
        Err(StoreError::QuotaExceeded { namespace, limit: 2 }) if namespace == "default"
    ));
    assert_eq!(store.revision().await.unwrap(), rev);
    assert_eq!(store.load().await.unwrap().1, vec![a]);
    store.insert(two, Some(3), vec![]).await.unwrap();
}

pub(crate) async fn insert_is_all_or_nothing(store: &dyn Store) {
    let batch = vec![
        record("namespaces/default/apitokens/a", Role::Owner, 1),
        record("namespaces/default/apitokens/b", Role::Owner, 2),
        record("namespaces/default/apitokens/a", Role::Owner, 3),
    ];
    assert!(matches!(
        store.insert(batch, None, vec![]).await,
        Err(StoreError::NameTaken(_))
    ));
    assert!(store.load().await.unwrap().1.is_empty());
    assert_eq!(store.revision().await.unwrap(), Revision(0));
}

pub(crate) async fn replace_digest_keeps_name_role_and_times(store: &dyn Store) {
    let a = record("namespaces/default/apitokens/a", Role::Editor, 1);
    store.insert(vec![a.clone()], None, vec![]).await.unwrap();
    let rev = store.revision().await.unwrap();
    let fresh = Digest([0xab; 32]);
    let (updated, rev2) = store
        .replace_digest(new_digest(&a.name, fresh, None), test_event())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(updated.digest, fresh);
    assert_eq!((updated.role, updated.create_time), (a.role, a.create_time));
    assert!(rev2 > rev);
    assert_eq!(
        store
            .replace_digest(
                new_digest("namespaces/default/apitokens/none", fresh, None),
                test_event()
            )
            .await
            .unwrap(),
        None
    );
    let b = record("namespaces/default/apitokens/b", Role::Editor, 2);
    store.insert(vec![b.clone()], None, vec![]).await.unwrap();
    assert!(matches!(
        store
            .replace_digest(new_digest(&b.name, fresh, None), test_event())
            .await,
        Err(StoreError::DigestTaken)
    ));
}

pub(crate) async fn changes_since_a_revision(store: &dyn Store) {
    let r0 = store.revision().await.unwrap();
    let a = record("namespaces/default/apitokens/a", Role::Owner, 1);
    let b = record("namespaces/default/apitokens/b", Role::Owner, 2);
    let r1 = store.insert(vec![a.clone(), b.clone()], None, vec![]).await.unwrap();
    assert_eq!(r1, Revision(r0.0 + 1));
    let r2 = store.delete(&a.name, test_event()).await.unwrap().unwrap();
    let (b2, r3) = store
        .replace_digest(new_digest(&b.name, Digest([9; 32]), None), test_event())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        since(store.changes_since(r0).await.unwrap()),
        (r3, vec![(a.name.clone(), None), (b.name.clone(), Some(b2.clone()))])
    );
    assert_eq!(
        since(store.changes_since(r2).await.unwrap()),
        (r3, vec![(b.name.clone(), Some(b2))])
    );
    assert_eq!(since(store.changes_since(r3).await.unwrap()), (r3, vec![]));
    // A revision from the future (a restored backup): nothing, and where
    // the store is (the publisher sees it went back).
    assert_eq!(
        since(store.changes_since(Revision(r3.0 + 5)).await.unwrap()),
        (r3, vec![])
    );
}

pub(crate) async fn bulk_writes_restart_the_change_log(store: &dyn Store) {
    let many: Vec<TokenRecord> = (0..=CHANGES_PER_WRITE)
        .map(|i| TokenRecord {
            digest: Digest::of(&i.to_le_bytes()),
            ..record(&format!("namespaces/bulk/apitokens/t{i}"), Role::Viewer, 0)
        })
        .collect();
    let r = store.insert(many, None, vec![]).await.unwrap();
    assert_eq!(store.changes_since(Revision(0)).await.unwrap(), Changes::TooOld);
    assert_eq!(since(store.changes_since(r).await.unwrap()), (r, vec![]));
}

pub(crate) async fn expired_tokens_retire_once(store: &dyn Store) {
    let mut soon = record("namespaces/default/apitokens/soon", Role::Owner, 1);
    soon.expire_time = Some(Timestamp::from_unix(1000, 500));
    let mut later = record("namespaces/default/apitokens/later", Role::Owner, 2);
    later.expire_time = Some(Timestamp::from_unix(2000, 0));
    let never = record("namespaces/default/apitokens/never", Role::Owner, 3);
    let r0 = store
        .insert(vec![soon.clone(), later.clone(), never.clone()], None, vec![])
        .await
        .unwrap();
    assert_eq!(store.next_expiry().await.unwrap(), soon.expire_time);
    assert_eq!(
        store.retire_expired(Timestamp::from_unix(1000, 499)).await.unwrap(),
        None
    );
    let r1 = store
        .retire_expired(Timestamp::from_unix(1000, 500))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(store.retire_expired(Timestamp::from_unix(1500, 0)).await.unwrap(), None);
    assert_eq!(store.next_expiry().await.unwrap(), later.expire_time);
    let loaded: Vec<String> = store.load().await.unwrap().1.into_iter().map(|r| r.name).collect();
    assert_eq!(loaded, [later.name.clone(), never.name.clone()]);
    // Still listed, as retired; and the change is in the log.
    assert!(store.get(&soon.name).await.unwrap().unwrap().retired);
    let (revision, changed) = since(store.changes_since(r0).await.unwrap());
    assert_eq!(revision, r1);
    assert!(changed[0].1.as_ref().unwrap().retired);
}

pub(crate) async fn a_regeneration_with_an_overlap_keeps_one_previous_secret(store: &dyn Store) {
    let mut a = record("namespaces/default/apitokens/a", Role::Editor, 1);
    a.expire_time = Some(Timestamp::from_unix(3000, 0));
    store.insert(vec![a.clone()], None, vec![]).await.unwrap();
    let until = Timestamp::from_unix(2000, 0);
    let r = regenerate(store, &a.name, Digest([2; 32]), Some(until)).await;
    assert_eq!(r.digest, Digest([2; 32]));
    assert_eq!(
        r.previous,
        Some(PreviousSecret {
            digest: Digest([1; 32]),
            until
        })
    );
    assert_eq!(store.next_expiry().await.unwrap(), Some(until));
    // A second regeneration during the overlap ends the first one.
    let later = Timestamp::from_unix(2500, 0);
    let r = regenerate(store, &a.name, Digest([3; 32]), Some(later)).await;
    assert_eq!(
        r.previous,
        Some(PreviousSecret {
            digest: Digest([2; 32]),
            until: later
        })
    );
    // The overlap ends by itself (a store write, so replicas agree).
    let rev = store.revision().await.unwrap();
    assert!(store
        .retire_expired(Timestamp::from_unix(2499, 0))
        .await
        .unwrap()
        .is_none());
    let ended = store.retire_expired(later).await.unwrap().unwrap();
    assert!(ended > rev);
    let r = store.get(&a.name).await.unwrap().unwrap();
    assert_eq!((r.previous, r.retired), (None, false));
    // Without an overlap the old secret is gone at once.
    store
        .replace_digest(new_digest(&a.name, Digest([4; 32]), Some(later)), test_event())
        .await
        .unwrap();
    let r = regenerate(store, &a.name, Digest([5; 32]), None).await;
    assert_eq!(r.previous, None);
}

pub(crate) async fn the_audit_trail_is_written_with_the_change_and_read_newest_first(store: &dyn Store) {
    let mut a = record("namespaces/default/apitokens/a", Role::Editor, 1);
    a.created_by = Some("namespaces/default/apitokens/admin".into());
    let created = AuditEvent {
        role: Some(Role::Editor),
        ..event(Action::Create, &a.name)
    };
    store
        .insert(vec![a.clone()], None, vec![created.clone()])
        .await
        .unwrap();
    let regenerated = AuditEvent {
        previous_until: Some(Timestamp::from_unix(1_800_000_000, 0)),
        credential: Some(Credential::Previous),
        ..event(Action::Regenerate, &a.name)
    };
    store
        .replace_digest(
            new_digest(&a.name, Digest([2; 32]), regenerated.previous_until),
            regenerated.clone(),
        )
        .await
        .unwrap();
    let deleted = event(Action::Delete, &a.name);
    store.delete(&a.name, deleted.clone()).await.unwrap();
    // A refused write records nothing.
    store.delete(&a.name, deleted.clone()).await.unwrap();
    let other = AuditEvent {
        namespace: "other".into(),
        ..event(Action::Create, "namespaces/other/apitokens/x")
    };
    store
        .insert(
            vec![record("namespaces/other/apitokens/x", Role::Owner, 9)],
            None,
            vec![other],
        )
        .await
        .unwrap();
    let all = store.events("default", None, 10).await.unwrap();
    let events: Vec<&AuditEvent> = all.iter().map(|(_, e)| e).collect();
    assert_eq!(events, [&deleted, &regenerated, &created]);
    // Pages: two, then the rest from the last sequence number.
    let first = store.events("default", None, 2).await.unwrap();
    assert_eq!(first.len(), 2);
    let rest = store.events("default", Some(first[1].0), 2).await.unwrap();
    assert_eq!(rest.iter().map(|(_, e)| e).collect::<Vec<_>>(), [&created]);
}

pub(crate) async fn conditions_change_only_from_what_was_read(store: &dyn Store) {
    use apitokens_core::conditions::{Cidr, Conditions, Packed};
    let packed = |range: &str| {
        Some(Packed::new(&Conditions {
            allow: vec![Cidr::parse(range).unwrap()],
            ..Conditions::default()
        }))
    };
    let a = record("namespaces/default/apitokens/a", Role::Editor, 1);
    store.insert(vec![a.clone()], None, vec![]).await.unwrap();
    let rev = store.revision().await.unwrap();
    let update = || AuditEvent {
        action: Action::Update,
        ..test_event()
    };
    // From none to some: written, a revision, an event.
    let set = store
        .set_conditions(&a.name, a.create_time, None, packed("10.0.0.0/8"), update())
        .await
        .unwrap()
        .unwrap();
    assert!(set.changed && set.revision > rev);
    assert_eq!(set.token.conditions, packed("10.0.0.0/8"));
    // Read as none, but some came first: nothing written, the record says so.
    let stale = store
        .set_conditions(&a.name, a.create_time, None, packed("192.168.0.0/16"), update())
        .await
        .unwrap()
        .unwrap();
    assert!(!stale.changed);
    assert_eq!(stale.token.conditions, packed("10.0.0.0/8"));
    assert_eq!(store.revision().await.unwrap(), set.revision);
    // The same again: nothing written either.
    let same = store
        .set_conditions(
            &a.name,
            a.create_time,
            packed("10.0.0.0/8"),
            packed("10.0.0.0/8"),
            update(),
        )
        .await
        .unwrap()
        .unwrap();
    assert!(!same.changed);
    // Another token of the same name (created at another time) than the
    // one read: nothing written.
    let other = store
        .set_conditions(
            &a.name,
            Timestamp::from_unix(a.create_time.unix_seconds() + 1, 0),
            packed("10.0.0.0/8"),
            None,
            update(),
        )
        .await
        .unwrap()
        .unwrap();
    assert!(!other.changed && other.token.conditions.is_some());
    // No activity: the update time stays.
    assert_eq!(
        other.token.update_time,
        store.get(&a.name).await.unwrap().unwrap().update_time
    );
    // Removed; a token gone is None.
    let none = store
        .set_conditions(&a.name, a.create_time, packed("10.0.0.0/8"), None, update())
        .await
        .unwrap()
        .unwrap();
    assert!(none.changed && none.token.conditions.is_none());
    assert!(store
        .set_conditions("namespaces/default/apitokens/gone", a.create_time, None, None, update())
        .await
        .unwrap()
        .is_none());
    let namespace = test_event().namespace;
    let events = store.events(&namespace, None, 10).await.unwrap();
    assert_eq!(events.iter().filter(|(_, e)| e.action == Action::Update).count(), 2);
}

pub(crate) async fn inactivity_policies_are_set_removed_and_audited_once(store: &dyn Store) {
    let event = |policy: &str| AuditEvent {
        action: Action::Inactivity,
        token: None,
        policy: Some(policy.to_owned()),
        ..test_event()
    };
    assert!(store.inactivity_policies().await.unwrap().is_empty());
    assert!(store
        .set_inactivity_policy("b", Some("30d:disable"), event("30d:disable"))
        .await
        .unwrap());
    assert!(store
        .set_inactivity_policy("a", Some("90d:delete"), event("90d:delete"))
        .await
        .unwrap());
    // The same again: nothing written, no event.
    assert!(!store
        .set_inactivity_policy("b", Some("30d:disable"), event("30d:disable"))
        .await
        .unwrap());
    assert!(store
        .set_inactivity_policy("b", Some("7d:disable"), event("7d:disable"))
        .await
        .unwrap());
    assert_eq!(
        store.inactivity_policies().await.unwrap(),
        [
            ("a".to_owned(), "90d:delete".to_owned()),
            ("b".to_owned(), "7d:disable".to_owned())
        ]
    );
    assert!(store.set_inactivity_policy("a", None, event("off")).await.unwrap());
    assert!(!store.set_inactivity_policy("a", None, event("off")).await.unwrap());
    assert_eq!(store.inactivity_policies().await.unwrap().len(), 1);
    // Each change is an event of the namespace the test event names, with
    // its policy, newest first.
    let namespace = test_event().namespace;
    let events = store.events(&namespace, None, 10).await.unwrap();
    let policies: Vec<_> = events.iter().map(|(_, e)| e.policy.clone().unwrap()).collect();
    assert_eq!(policies, ["off", "7d:disable", "90d:delete", "30d:disable"]);
    assert!(events.iter().all(|(_, e)| e.action == Action::Inactivity));
}

pub(crate) async fn the_last_addresses_are_five_distinct_the_latest_first(store: &dyn Store) {
    let a = record("namespaces/default/apitokens/a", Role::Editor, 1);
    let b = record("namespaces/default/apitokens/b", Role::Viewer, 2);
    store.insert(vec![a.clone(), b.clone()], None, vec![]).await.unwrap();
    let t = |s| Timestamp::from_unix(s, 0);
    let ip = |s: &str| -> std::net::IpAddr { s.parse().unwrap() };
    let seen = |r: &TokenRecord, s, addresses: &[&str]| Use {
        addresses: addresses.iter().map(|a| ip(a)).collect(),
        name: r.name.clone(),
        digest: r.digest,
        time: t(s),
        access: Access::USED,
    };
    // Two tokens in one batch (PostgreSQL merges a batch at once).
    store
        .record_usage(vec![
            seen(&a, 100, &["10.0.0.1", "10.0.0.2"]),
            seen(&b, 100, &["2001:db8::1"]),
        ])
        .await
        .unwrap();
    store
        .record_usage(vec![seen(&a, 160, &["10.0.0.3", "10.0.0.1", "10.0.0.4", "10.0.0.5"])])
        .await
        .unwrap();
    // A report that arrives late changes no time for the better.
    store.record_usage(vec![seen(&a, 40, &["10.0.0.5"])]).await.unwrap();
    let got = store.get(&a.name).await.unwrap().unwrap().last_addresses;
    let want: Vec<_> = ["10.0.0.1", "10.0.0.3", "10.0.0.4", "10.0.0.5"]
        .iter()
        .map(|a| (ip(a), t(160)))
        .chain([(ip("10.0.0.2"), t(100))])
        .collect();
    assert_eq!(got, want);
    assert_eq!(
        store.list("default").await.unwrap()[1].last_addresses,
        [(ip("2001:db8::1"), t(100))]
    );
    // A sixth pushes out the oldest.
    store.record_usage(vec![seen(&a, 220, &["10.0.0.6"])]).await.unwrap();
    let got = store.get(&a.name).await.unwrap().unwrap().last_addresses;
    assert_eq!(got.len(), 5);
    assert_eq!(got[0], (ip("10.0.0.6"), t(220)));
    assert!(!got.iter().any(|(a, _)| *a == ip("10.0.0.2")), "{got:?}");
    // A use by a secret that is not the token's (the name was reused
    // meanwhile) merges nothing.
    let mut stranger = seen(&a, 300, &["192.0.2.9"]);
    stranger.digest = Digest([9; 32]);
    store.record_usage(vec![stranger]).await.unwrap();
    let got = store.get(&a.name).await.unwrap().unwrap().last_addresses;
    assert!(!got.iter().any(|(x, _)| *x == ip("192.0.2.9")), "{got:?}");
    // A deleted token's go with it.
    store.delete(&a.name, test_event()).await.unwrap();
    store
        .insert(vec![record(&a.name, Role::Editor, 3)], None, vec![])
        .await
        .unwrap();
    assert!(store.get(&a.name).await.unwrap().unwrap().last_addresses.is_empty());
}

pub(crate) async fn last_use_is_the_latest_recorded_and_goes_with_the_token(store: &dyn Store) {
    let a = record("namespaces/default/apitokens/a", Role::Editor, 1);
    store.insert(vec![a.clone()], None, vec![]).await.unwrap();
    let rev = store.revision().await.unwrap();
    let t = |s| Timestamp::from_unix(s, 0);
    let used = |r: &TokenRecord, s| Use {
        addresses: Vec::new(),
        name: r.name.clone(),
        digest: r.digest,
        time: t(s),
        access: Access::USED,
    };
    let gone = record("namespaces/default/apitokens/gone", Role::Viewer, 9);
    store.record_usage(vec![used(&a, 100), used(&gone, 100)]).await.unwrap();
    store.record_usage(vec![used(&a, 50)]).await.unwrap();
    assert_eq!(store.get(&a.name).await.unwrap().unwrap().last_use, Some(t(100)));
    assert_eq!(store.list("default").await.unwrap()[0].last_use, Some(t(100)));
    assert_eq!(
        store.revision().await.unwrap(),
        rev,
        "a use is not a configuration change"
    );
    store.delete(&a.name, test_event()).await.unwrap();
    // The same name again, with another secret.
    let again = record(&a.name, Role::Editor, 2);
    store.insert(vec![again.clone()], None, vec![]).await.unwrap();
    assert_eq!(
        store.get(&a.name).await.unwrap().unwrap().last_use,
        None,
        "a new token, a new history"
    );
    // A use of the deleted token's secret, written late, stays with it.
    store.record_usage(vec![used(&a, 200)]).await.unwrap();
    assert_eq!(store.get(&a.name).await.unwrap().unwrap().last_use, None);
    store.record_usage(vec![used(&again, 300)]).await.unwrap();
    assert_eq!(store.get(&a.name).await.unwrap().unwrap().last_use, Some(t(300)));
}

pub(crate) async fn the_evidence_keeps_each_facts_latest_time(store: &dyn Store) {
    use apitokens_core::access::Kind;
    use apitokens_core::role::RoleSet;
    let a = record("namespaces/default/apitokens/a", Role::Owner, 1);
    store.insert(vec![a.clone()], None, vec![]).await.unwrap();
    let t = |s| Timestamp::from_unix(s, 0);
    let read = Access::admitted(Kind::Read, RoleSet::ALL);
    let write = Access::admitted(Kind::Write, RoleSet::NONE.with(Role::Editor).with(Role::Owner));
    let used = |s, access| Use {
        addresses: Vec::new(),
        name: a.name.clone(),
        digest: a.digest,
        time: t(s),
        access,
    };
    // A batch may name a token twice; batches may come late.
    store
        .record_usage(vec![used(100, read), used(120, write)])
        .await
        .unwrap();
    store.record_usage(vec![used(300, read)]).await.unwrap();
    store.record_usage(vec![used(50, write)]).await.unwrap();
    // A refused request: a use, no evidence.
    store.record_usage(vec![used(400, Access::USED)]).await.unwrap();
    let got = store.get(&a.name).await.unwrap().unwrap();
    assert_eq!(got.last_use, Some(t(400)));
    assert_eq!(got.evidence.kinds, [Some(t(300)), Some(t(120)), None]);
    assert_eq!(got.evidence.refused_by, [Some(t(120)), None, None]);
    assert_eq!(got.evidence.unreported, None);
    // A use from a filter that reports no access: unknown what it did.
    store.record_usage(vec![used(500, Access::UNREPORTED)]).await.unwrap();
    let got = store.get(&a.name).await.unwrap().unwrap();
    assert_eq!((got.last_use, got.evidence.unreported), (Some(t(500)), Some(t(500))));
    assert_eq!(got.evidence.kinds, [Some(t(300)), Some(t(120)), None]);
    assert_eq!(store.list("default").await.unwrap()[0].evidence, got.evidence);
    // It goes with the token.
    store.delete(&a.name, test_event()).await.unwrap();
    store.insert(vec![a.clone()], None, vec![]).await.unwrap();
    assert_eq!(store.get(&a.name).await.unwrap().unwrap().evidence, Default::default());
}

pub(crate) async fn a_disabled_token_keeps_everything_and_is_enabled_again(store: &dyn Store) {
    let mut a = record("namespaces/default/apitokens/a", Role::Editor, 1);
    a.expire_time = Some(Timestamp::from_unix(4_000_000_000, 0));
    a.created_by = Some("namespaces/default/apitokens/admin".into());
    store.insert(vec![a.clone()], None, vec![]).await.unwrap();
    // In an overlap, and used: what a disable must keep.
    let until = Timestamp::from_unix(3_000_000_000, 0);
    let rotated = regenerate(store, &a.name, Digest([2; 32]), Some(until)).await;
    let used = Use {
        addresses: Vec::new(),
        name: a.name.clone(),
        digest: Digest([2; 32]),
        time: Timestamp::from_unix(1_800_000_000, 0),
        access: Access::USED,
    };
    store.record_usage(vec![used]).await.unwrap();
    let before = store.get(&a.name).await.unwrap().unwrap();
    assert!(!before.disabled);
    assert_eq!(before.last_use, Some(Timestamp::from_unix(1_800_000_000, 0)));
    let r0 = store.revision().await.unwrap();

    let disabled = event(Action::Disable, &a.name);
    let set = store
        .set_disabled(&a.name, true, disabled.clone())
        .await
        .unwrap()
        .unwrap();
    assert!(set.changed);
    assert!(set.revision > r0);
    assert_eq!(store.revision().await.unwrap(), set.revision);
    // Everything kept but the state: name, role, both digests, expiry,
    // creator, last use.
    assert_eq!(
        set.token,
        TokenRecord {
            disabled: true,
            ..before.clone()
        }
    );
    assert_eq!(set.token.previous, rotated.previous);
    assert_eq!(store.get(&a.name).await.unwrap().unwrap(), set.token);
    assert!(store.list("default").await.unwrap()[0].disabled);
    // Still in what every Envoy gets (refused there), and in the change log.
    let (_, loaded) = store.load().await.unwrap();
    assert!(loaded.iter().any(|r| r.name == a.name && r.disabled));
    assert_eq!(
        since(store.changes_since(r0).await.unwrap()),
        (set.revision, vec![(a.name.clone(), Some(set.token.clone()))])
    );

    // Again: nothing written, the state as it stands.
    let again = store
        .set_disabled(&a.name, true, disabled.clone())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        again,
        StateSet {
            changed: false,
            ..set.clone()
        }
    );
    assert_eq!(store.revision().await.unwrap(), set.revision);

    let enabled = event(Action::Enable, &a.name);
    let on = store
        .set_disabled(&a.name, false, enabled.clone())
        .await
        .unwrap()
        .unwrap();
    assert!(on.changed && on.revision > set.revision);
    assert_eq!(on.token, before, "enabled: as it was, the same secrets");
    let on_again = store
        .set_disabled(&a.name, false, enabled.clone())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((on_again.changed, on_again.revision), (false, on.revision));

    // One event per change, none for the repeats.
    let events: Vec<AuditEvent> = store
        .events("default", None, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, e)| e)
        .collect();
    let actions: Vec<Action> = events.iter().map(|e| e.action).collect();
    assert_eq!(actions, [Action::Enable, Action::Disable, Action::Regenerate]);
    assert_eq!(events[..2], [enabled, disabled]);

    // No such token: nothing.
    let none = "namespaces/default/apitokens/none";
    assert_eq!(store.set_disabled(none, true, test_event()).await.unwrap(), None);
    assert_eq!(store.revision().await.unwrap(), on.revision);

    // A token inserted disabled (an import of a rendered configuration)
    // reads back disabled; a regeneration keeps the state.
    let b = TokenRecord {
        disabled: true,
        ..record("namespaces/default/apitokens/b", Role::Viewer, 7)
    };
    store.insert(vec![b.clone()], None, vec![]).await.unwrap();
    assert_eq!(store.get(&b.name).await.unwrap(), Some(b.clone()));
    assert!(regenerate(store, &b.name, Digest([8; 32]), None).await.disabled);
}

/// One `#[tokio::test]` per contract test above, each on a fresh store from
/// `$make` (an async expression giving `Option<(store, guard)>`; `None` skips:
/// no server to test against).
pub(crate) async fn a_store_behind_the_gateways_refuses_writes_until_a_new_epoch(store: &dyn Store) {
    let a = record("namespaces/default/apitokens/a", Role::Owner, 1);
    store.insert(vec![a.clone()], None, vec![]).await.unwrap();
    let before = store.head().await.unwrap();
    assert!(
        before.at.epoch > Epoch(1_700_000_000_000),
        "an epoch is a time in milliseconds"
    );
    assert_eq!(before.behind, None);
    // Nothing newer than the store was seen: nothing to record.
    assert_eq!(store.mark_behind(before.at).await.unwrap(), before);
    // An Envoy enforced version +5 (a restored backup: the store lost it).
    let seen = Position::new(before.at.epoch, Revision(before.at.revision.0 + 5));
    let head = store.mark_behind(seen).await.unwrap();
    assert_eq!((head.at, head.behind), (before.at, Some(seen)));
    // An older sighting does not lower it.
    assert_eq!(
        store
            .mark_behind(Position::new(before.at.epoch, Revision(before.at.revision.0 + 2)))
            .await
            .unwrap(),
        head
    );
    let behind = |e: StoreError| matches!(e, StoreError::Behind { at, seen: s } if at == before.at && s == seen);
    let b = record("namespaces/default/apitokens/b", Role::Owner, 2);
    assert!(behind(store.insert(vec![b.clone()], None, vec![]).await.unwrap_err()));
    assert!(behind(store.delete(&a.name, test_event()).await.unwrap_err()));
    let regeneration = store.replace_digest(new_digest(&a.name, Digest([7; 32]), None), test_event());
    assert!(behind(regeneration.await.unwrap_err()));
    // A disable too, and an enable of an enabled token (which would write
    // nothing: refused all the same, as every write).
    assert!(behind(
        store.set_disabled(&a.name, true, test_event()).await.unwrap_err()
    ));
    assert!(behind(
        store.set_disabled(&a.name, false, test_event()).await.unwrap_err()
    ));
    assert!(matches!(
        store.retire_expired(Timestamp::from_unix(2_000_000_000, 0)).await,
        Ok(None) | Err(StoreError::Behind { .. })
    ));
    assert_eq!(store.head().await.unwrap(), head, "nothing was written");
    assert_eq!(store.get(&a.name).await.unwrap().unwrap().digest, a.digest);
    // The operator accepts the store as it is: a later epoch, a revision
    // past everything seen, everyone reloads, writes go through.
    let after = store.new_epoch().await.unwrap();
    assert!(after.at.epoch > before.at.epoch);
    assert!(after.at.revision > seen.revision);
    assert!(after.at > seen);
    assert_eq!(after.behind, None);
    assert_eq!(store.changes_since(before.at.revision).await.unwrap(), Changes::TooOld);
    assert_eq!(
        since(store.changes_since(after.at.revision).await.unwrap()),
        (after.at.revision, vec![])
    );
    let r = store.insert(vec![b], None, vec![]).await.unwrap();
    assert_eq!(r, Revision(after.at.revision.0 + 1));
    assert_eq!(store.head().await.unwrap().at.epoch, after.at.epoch);
    let (loaded, records) = store.load().await.unwrap();
    assert_eq!((loaded.at.revision, records.len()), (r, 2));
}

pub(crate) async fn a_digest_belongs_to_one_token_current_or_previous(store: &dyn Store) {
    let a = record("namespaces/default/apitokens/a", Role::Owner, 1);
    let b = record("namespaces/default/apitokens/b", Role::Owner, 2);
    store.insert(vec![a.clone(), b.clone()], None, vec![]).await.unwrap();
    // a rotates with an overlap: digest 1 is its previous secret, 9 its current.
    store
        .replace_digest(
            new_digest(&a.name, Digest([9; 32]), Some(Timestamp::from_unix(4_000_000_000, 0))),
            test_event(),
        )
        .await
        .unwrap()
        .unwrap();
    let rev = store.revision().await.unwrap();
    // A new token whose secret is a's previous one (an import, say).
    let c = record("namespaces/default/apitokens/c", Role::Viewer, 1);
    assert!(matches!(
        store.insert(vec![c], None, vec![]).await,
        Err(StoreError::DigestTaken)
    ));
    // ... or whose previous secret is a's current or previous one.
    for taken in [9u8, 1] {
        let d = TokenRecord {
            previous: Some(PreviousSecret {
                digest: Digest([taken; 32]),
                until: Timestamp::from_unix(4_000_000_000, 0),
            }),
            ..record("namespaces/default/apitokens/d", Role::Viewer, 5)
        };
        assert!(matches!(
            store.insert(vec![d], None, vec![]).await,
            Err(StoreError::DigestTaken)
        ));
    }
    // b regenerated onto a's previous secret.
    assert!(matches!(
        store
            .replace_digest(new_digest(&b.name, Digest([1; 32]), None), test_event())
            .await,
        Err(StoreError::DigestTaken)
    ));
    assert_eq!(store.revision().await.unwrap(), rev, "nothing was written");
    // Once a's overlap ends, digest 1 is free.
    regenerate(store, &a.name, Digest([10; 32]), None).await;
    put(store, "namespaces/default/apitokens/c", Role::Viewer, 1).await;
}

pub(crate) async fn old_audit_events_are_pruned_oldest_first(store: &dyn Store) {
    let at = |seconds: i64, token: &str| AuditEvent {
        time: Timestamp::from_unix(seconds, 0),
        ..event(Action::Create, token)
    };
    let mut n: u8 = 0;
    for (seconds, id) in [(1_000, "a"), (2_000, "b"), (3_000, "c"), (4_000, "d")] {
        n += 1;
        let name = format!("namespaces/default/apitokens/{id}");
        store
            .insert(vec![record(&name, Role::Viewer, n)], None, vec![at(seconds, &name)])
            .await
            .unwrap();
    }
    let left =
        |events: Vec<(u64, AuditEvent)>| -> Vec<String> { events.into_iter().filter_map(|(_, e)| e.token).collect() };
    // Older than 3000, one at a time: the oldest goes first.
    let cutoff = Timestamp::from_unix(3_000, 0);
    assert_eq!(store.prune_events(cutoff, 1).await.unwrap(), 1);
    let events = store.events("default", None, 10).await.unwrap();
    assert_eq!(left(events).len(), 3);
    assert_eq!(store.prune_events(cutoff, 100).await.unwrap(), 1);
    assert_eq!(store.prune_events(cutoff, 100).await.unwrap(), 0);
    let events = store.events("default", None, 10).await.unwrap();
    assert_eq!(
        left(events),
        ["namespaces/default/apitokens/d", "namespaces/default/apitokens/c"]
    );
    // Events go, tokens stay.
    assert!(store.get("namespaces/default/apitokens/a").await.unwrap().is_some());
}

/// After a backend's own test wrote a row `bad` whose create time cannot
/// be read (nanoseconds out of range): every read that meets it fails,
/// naming it, instead of skipping it.
pub(crate) async fn a_bad_row_is_named(store: &dyn Store, bad: &str) {
    let err = store.load().await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt { name, problem } if name == bad && problem == "bad create time"),
        "{err}"
    );
    assert!(store.list("default").await.is_err());
}

pub(crate) async fn the_outbox_is_read_in_order_from_a_leased_cursor(store: &dyn Store) {
    // Events before the endpoint's first claim are not its.
    let a = record("namespaces/default/apitokens/a", Role::Editor, 1);
    store
        .insert(vec![a.clone()], None, vec![event(Action::Create, &a.name)])
        .await
        .unwrap();
    let start = store.claim_outbox("audit", "r1", 1_000, 11_000).await.unwrap().unwrap();
    assert!(store.events_after(start, 10).await.unwrap().is_empty());
    // Later events, every namespace, oldest first.
    let b = record("namespaces/other/apitokens/b", Role::Viewer, 2);
    let b_created = AuditEvent {
        namespace: "other".into(),
        ..event(Action::Create, &b.name)
    };
    store
        .insert(vec![b.clone()], None, vec![b_created.clone()])
        .await
        .unwrap();
    let deleted = event(Action::Delete, &a.name);
    store.delete(&a.name, deleted.clone()).await.unwrap();
    let after = store.events_after(start, 10).await.unwrap();
    assert_eq!(after.iter().map(|(_, e)| e).collect::<Vec<_>>(), [&b_created, &deleted]);
    assert!(after[0].0 > start && after[1].0 > after[0].0);
    assert_eq!(store.events_after(start, 1).await.unwrap().len(), 1);
    // The lease: another holder waits until it runs out, the holder renews.
    assert_eq!(store.claim_outbox("audit", "r2", 5_000, 15_000).await.unwrap(), None);
    assert!(!store.advance_outbox("audit", "r2", after[0].0).await.unwrap());
    assert_eq!(
        store.claim_outbox("audit", "r1", 5_000, 15_000).await.unwrap(),
        Some(start)
    );
    assert!(store.advance_outbox("audit", "r1", after[0].0).await.unwrap());
    // Never back.
    assert!(store.advance_outbox("audit", "r1", start).await.unwrap());
    assert_eq!(
        store.claim_outbox("audit", "r1", 6_000, 16_000).await.unwrap(),
        Some(after[0].0)
    );
    // Run out: r2 takes it from the cursor r1 left, and r1 can no longer move it.
    assert_eq!(
        store.claim_outbox("audit", "r2", 16_000, 26_000).await.unwrap(),
        Some(after[0].0)
    );
    assert!(!store.advance_outbox("audit", "r1", after[1].0).await.unwrap());
    assert_eq!(store.claim_outbox("audit", "r1", 17_000, 27_000).await.unwrap(), None);
    // Another endpoint has its own cursor, from the newest event.
    assert_eq!(
        store.claim_outbox("siem", "r1", 17_000, 27_000).await.unwrap(),
        Some(after[1].0)
    );
}

fn scan(
    now: Timestamp,
    lead: std::time::Duration,
    shorter: Option<std::time::Duration>,
    actor: &'static str,
    limit: u32,
) -> super::ExpiryScan {
    super::ExpiryScan {
        now,
        lead,
        shorter,
        actor,
        limit,
    }
}

pub(crate) async fn expiry_warnings_are_given_once_per_lead_time(store: &dyn Store) {
    let day = std::time::Duration::from_secs(86_400);
    let now = Timestamp::from_unix(1_800_000_000, 500);
    let at = |seconds: i64| Some(Timestamp::from_unix(1_800_000_000 + seconds, 0));
    let mut tokens = Vec::new();
    for (i, (id, expire)) in [
        ("in-an-hour", at(3600)),
        ("in-three-days", at(3 * 86_400)),
        ("in-a-month", at(30 * 86_400)),
        ("never", None),
        ("past", at(-10)),
        // Exactly one day ahead, to the nanosecond: the last instant of
        // the 1-day window, so not in the 7-day one; 400 ns later, the
        // first of the 7-day window only.
        ("at-the-day", Some(Timestamp::from_unix(1_800_000_000 + 86_400, 500))),
        ("after-the-day", Some(Timestamp::from_unix(1_800_000_000 + 86_400, 900))),
    ]
    .into_iter()
    .enumerate()
    {
        let mut t = record(
            &format!("namespaces/default/apitokens/{id}"),
            Role::Viewer,
            10 + i as u8,
        );
        t.expire_time = expire;
        tokens.push(t);
    }
    store.insert(tokens, None, vec![]).await.unwrap();
    let names =
        |events: &[AuditEvent]| -> Vec<String> { events.iter().map(|e| e.token.clone().unwrap_or_default()).collect() };
    // 7 days, but not within the 1-day lead (those get that warning).
    let week = store
        .warn_expiring(scan(now, day * 7, Some(day), "apitokens serve", 100))
        .await
        .unwrap();
    assert_eq!(
        names(&week),
        [
            "namespaces/default/apitokens/after-the-day",
            "namespaces/default/apitokens/in-three-days"
        ]
    );
    let e = &week[1];
    assert_eq!(
        (e.action, e.actor.as_str(), e.namespace.as_str()),
        (Action::Expiring, "apitokens serve", "default")
    );
    assert_eq!(
        (e.expire_time, e.role, e.time),
        (at(3 * 86_400), Some(Role::Viewer), now)
    );
    let one = store
        .warn_expiring(scan(now, day, None, "apitokens serve", 100))
        .await
        .unwrap();
    assert_eq!(
        names(&one),
        [
            "namespaces/default/apitokens/in-an-hour",
            "namespaces/default/apitokens/at-the-day"
        ]
    );
    // Once: again now, or later, nothing new; recorded in the audit trail.
    assert!(store
        .warn_expiring(scan(now, day * 7, Some(day), "x", 100))
        .await
        .unwrap()
        .is_empty());
    assert!(store
        .warn_expiring(scan(now, day, None, "x", 100))
        .await
        .unwrap()
        .is_empty());
    let trail = store.events("default", None, 10).await.unwrap();
    assert_eq!(trail.iter().filter(|(_, e)| e.action == Action::Expiring).count(), 4);
    // Three days on, the token due in three days gets its 1-day warning.
    let later = Timestamp::from_unix(1_800_000_000 + 2 * 86_400 + 60, 0);
    let one = store.warn_expiring(scan(later, day, None, "x", 100)).await.unwrap();
    assert_eq!(names(&one), ["namespaces/default/apitokens/in-three-days"]);
    // At most `limit` at a time, soonest first.
    let mut many = Vec::new();
    for i in 0..3u8 {
        let mut t = record(&format!("namespaces/default/apitokens/batch-{i}"), Role::Viewer, 40 + i);
        t.expire_time = at(7200 + i64::from(i));
        many.push(t);
    }
    store.insert(many, None, vec![]).await.unwrap();
    let first = store.warn_expiring(scan(now, day, None, "x", 2)).await.unwrap();
    assert_eq!(
        names(&first),
        [
            "namespaces/default/apitokens/batch-0",
            "namespaces/default/apitokens/batch-1"
        ]
    );
    let rest = store.warn_expiring(scan(now, day, None, "x", 2)).await.unwrap();
    assert_eq!(names(&rest), ["namespaces/default/apitokens/batch-2"]);
}

pub(crate) async fn conditions_are_kept_through_every_write(store: &dyn Store) {
    use apitokens_core::conditions::{Cidr, Conditions, Packed};
    let conditions = Packed::new(&Conditions {
        not_before: Some(Timestamp::from_unix(1_900_000_000, 5)),
        rate_limit: Some(apitokens_core::ratelimit::RateLimit {
            requests: 100,
            per: apitokens_core::ratelimit::Per::Minute,
            burst: 10,
        }),
        allow: vec![
            Cidr::parse("10.0.0.0/8").unwrap(),
            Cidr::parse("2001:db8::/32").unwrap(),
        ],
        except: vec![Cidr::parse("10.1.0.0/16").unwrap()],
    });
    let mut a = record("namespaces/default/apitokens/a", Role::Editor, 1);
    a.conditions = Some(conditions.clone());
    // One row alone, and among many (PostgreSQL inserts a batch at once).
    let b = record("namespaces/default/apitokens/b", Role::Viewer, 2);
    store.insert(vec![a.clone(), b.clone()], None, vec![]).await.unwrap();
    let got = store.get(&a.name).await.unwrap().unwrap();
    assert_eq!(got.conditions, Some(conditions.clone()));
    assert_eq!(store.get(&b.name).await.unwrap().unwrap().conditions, None);
    // A regeneration and a disable keep them; so do the loads the pushes
    // read.
    regenerate(store, &a.name, Digest([3; 32]), None).await;
    store.set_disabled(&a.name, true, test_event()).await.unwrap();
    let (_, all) = store.load().await.unwrap();
    let loaded = all.iter().find(|r| r.name == a.name).unwrap();
    assert_eq!(loaded.conditions, Some(conditions.clone()));
    let listed = store.list("default").await.unwrap();
    assert_eq!(
        listed.iter().find(|r| r.name == a.name).unwrap().conditions,
        Some(conditions)
    );
}

macro_rules! store_contract_tests {
    ($make:expr) => {
        store_contract_tests!(@each $make,
            a_store_behind_the_gateways_refuses_writes_until_a_new_epoch,
            a_digest_belongs_to_one_token_current_or_previous,
            insert_get_list_delete,
            duplicates_and_quota_are_refused_and_change_nothing,
            insert_is_all_or_nothing,
            replace_digest_keeps_name_role_and_times,
            changes_since_a_revision,
            bulk_writes_restart_the_change_log,
            expired_tokens_retire_once,
            a_regeneration_with_an_overlap_keeps_one_previous_secret,
            the_audit_trail_is_written_with_the_change_and_read_newest_first,
            old_audit_events_are_pruned_oldest_first,
            last_use_is_the_latest_recorded_and_goes_with_the_token,
            the_evidence_keeps_each_facts_latest_time,
            a_disabled_token_keeps_everything_and_is_enabled_again,
            conditions_are_kept_through_every_write,
            the_last_addresses_are_five_distinct_the_latest_first,
            inactivity_policies_are_set_removed_and_audited_once,
            conditions_change_only_from_what_was_read,
            the_outbox_is_read_in_order_from_a_leased_cursor,
            expiry_warnings_are_given_once_per_lead_time);
    };
    (@each $make:expr, $($name:ident),*) => {
        $(
            #[tokio::test]
            async fn $name() {
                let Some((store, _guard)) = $make.await else { return };
                $crate::store::contract::$name(&*store).await;
            }
        )*
    };
}
pub(crate) use store_contract_tests;
