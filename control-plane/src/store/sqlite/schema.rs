//! The schema: created in a new file, migrated from every earlier version
//! (its number in `PRAGMA user_version`), refused when a newer apitokens
//! wrote it; and the connection's settings (WAL, `synchronous = FULL`, a
//! busy timeout).

use super::meta::{lineage_of, meta, new_lineage, set_meta};
use crate::store::{Cause, Epoch, Result, StoreError};
use apitokens_core::compact::Lineage;
use apitokens_core::Timestamp;
use rusqlite::{params, Connection, Transaction, TransactionBehavior};
use std::time::Duration;

const SCHEMA_VERSION: i64 = 12;

/// Version 4 (later versions add to it, below): integer times (comparable in SQL, exact to the
/// nanosecond), `retired`, the change log and the store's lineage (2);
/// the previous secret of a rotation's overlap, who created a token, its last
/// use, and the audit trail (3); the store's epoch (`meta`), and no digest
/// shared between two previous secrets (4).
const SCHEMA: &str = "
CREATE TABLE tokens (
    name           TEXT PRIMARY KEY NOT NULL,
    namespace      TEXT NOT NULL,
    role           TEXT NOT NULL CHECK (role IN ('viewer', 'editor', 'owner')),
    secret_sha256  TEXT NOT NULL UNIQUE CHECK (length(secret_sha256) = 64),
    create_seconds INTEGER NOT NULL,
    create_nanos   INTEGER NOT NULL,
    expire_seconds INTEGER,
    expire_nanos   INTEGER,
    update_seconds INTEGER NOT NULL,
    retired        INTEGER NOT NULL DEFAULT 0 CHECK (retired IN (0, 1)),
    created_by     TEXT,
    previous_sha256        TEXT CHECK (previous_sha256 IS NULL OR length(previous_sha256) = 64),
    previous_until_seconds INTEGER,
    previous_until_nanos   INTEGER,
    CHECK ((expire_seconds IS NULL) = (expire_nanos IS NULL)),
    CHECK ((previous_sha256 IS NULL) = (previous_until_seconds IS NULL)),
    CHECK ((previous_until_seconds IS NULL) = (previous_until_nanos IS NULL))
);
CREATE INDEX tokens_by_namespace ON tokens (namespace, name);
CREATE TABLE changes (
    revision INTEGER NOT NULL,
    name     TEXT NOT NULL
);
CREATE INDEX changes_by_revision ON changes (revision);
CREATE TABLE meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value INTEGER NOT NULL
);
";

/// What version 3 added to version 2 (also part of a new database).
const SCHEMA_3: &str = "
CREATE INDEX tokens_by_expiry ON tokens (expire_seconds, expire_nanos) WHERE retired = 0 AND expire_seconds IS NOT NULL;
CREATE INDEX tokens_by_overlap ON tokens (previous_until_seconds, previous_until_nanos) WHERE previous_sha256 IS NOT NULL;
CREATE TABLE usage (
    name             TEXT PRIMARY KEY NOT NULL,
    last_use_seconds INTEGER NOT NULL
);
CREATE TABLE events (
    seq                    INTEGER PRIMARY KEY AUTOINCREMENT,
    time_seconds           INTEGER NOT NULL,
    time_nanos             INTEGER NOT NULL,
    namespace              TEXT NOT NULL,
    action                 TEXT NOT NULL,
    token                  TEXT,
    actor                  TEXT NOT NULL,
    role                   TEXT,
    expire_seconds         INTEGER,
    expire_nanos           INTEGER,
    previous_until_seconds INTEGER,
    previous_until_nanos   INTEGER,
    client_address         TEXT,
    count                  INTEGER
);
CREATE INDEX events_by_namespace ON events (namespace, seq);
";

/// What version 4 added: no two previous secrets share a digest (the
/// `UNIQUE` on `secret_sha256` covers current secrets; a current and a
/// previous one are checked by `checks::SHARED_DIGEST`). The epoch is set in
/// `meta` by `init`.
const SCHEMA_4: &str = "
CREATE UNIQUE INDEX tokens_previous_unique ON tokens (previous_sha256) WHERE previous_sha256 IS NOT NULL;
";

/// What version 5 added: which credential acted and the connection's peer,
/// for each audit event, and the index audit retention deletes by.
const SCHEMA_5: &str = "
ALTER TABLE events ADD COLUMN peer_address TEXT;
ALTER TABLE events ADD COLUMN credential TEXT;
CREATE INDEX events_by_time ON events (time_seconds);
";

/// What version 6 added: a token may be disabled (suspended by an owner,
/// refused by every Envoy, kept). Every existing token is enabled.
const SCHEMA_6: &str = "
ALTER TABLE tokens ADD COLUMN disabled INTEGER NOT NULL DEFAULT 0 CHECK (disabled IN (0, 1));
";

/// What version 7 added: the webhooks' cursors and leases (the audit
/// trail is their outbox), and the expiry warnings already given.
const SCHEMA_7: &str = "
CREATE TABLE outbox (
    endpoint       TEXT PRIMARY KEY NOT NULL,
    cursor         INTEGER NOT NULL,
    holder         TEXT,
    lease_until_ms INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE expiry_warnings (
    name           TEXT NOT NULL,
    expire_seconds INTEGER NOT NULL,
    lead_seconds   INTEGER NOT NULL,
    PRIMARY KEY (name, expire_seconds, lead_seconds)
);
";

/// What version 8 added: the evidence for least privilege, when a token's
/// admitted requests last did each kind of access and last did what a
/// role may not, and when a use last came without saying (`Evidence`).
/// Unknown for uses before it.
const SCHEMA_8: &str = "
ALTER TABLE usage ADD COLUMN read_seconds INTEGER;
ALTER TABLE usage ADD COLUMN write_seconds INTEGER;
ALTER TABLE usage ADD COLUMN tokens_seconds INTEGER;
ALTER TABLE usage ADD COLUMN past_viewer_seconds INTEGER;
ALTER TABLE usage ADD COLUMN past_editor_seconds INTEGER;
ALTER TABLE usage ADD COLUMN past_owner_seconds INTEGER;
ALTER TABLE usage ADD COLUMN unreported_seconds INTEGER;
";

/// What version 9 added: a token's conditions (a not-before time, client
/// address ranges), in the filter's encoding (`apitokens_core::conditions`).
/// Existing tokens have none.
const SCHEMA_9: &str = "
ALTER TABLE tokens ADD COLUMN conditions BLOB;
";

/// Version 10: the last client addresses a token was seen from
/// (`row::merge_addresses`).
const SCHEMA_10: &str = "
ALTER TABLE usage ADD COLUMN addresses TEXT;
";

/// Version 11: each namespace's own inactivity policy, and the policy an
/// audit event set.
const SCHEMA_11: &str = "
CREATE TABLE inactivity_policies (
    namespace TEXT PRIMARY KEY NOT NULL,
    policy    TEXT NOT NULL
);
ALTER TABLE events ADD COLUMN policy TEXT;
";

/// Version 12: the conditions an audit event set (a create's, an update's).
const SCHEMA_12: &str = "
ALTER TABLE events ADD COLUMN conditions TEXT;
";

/// Version 2 to 3, on an existing database.
const MIGRATE_2_TO_3: &str = "
ALTER TABLE tokens ADD COLUMN created_by TEXT;
ALTER TABLE tokens ADD COLUMN previous_sha256 TEXT;
ALTER TABLE tokens ADD COLUMN previous_until_seconds INTEGER;
ALTER TABLE tokens ADD COLUMN previous_until_nanos INTEGER;
DROP INDEX IF EXISTS tokens_by_expiry;
";

pub(super) fn configure(conn: &Connection) -> Result<()> {
    conn.busy_timeout(Duration::from_secs(10))?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
    if mode != "wal" {
        return Err(Cause::NoWal(mode).into());
    }
    Ok(conn.pragma_update(None, "synchronous", "FULL")?)
}

/// Creates or migrates the schema; returns the store's lineage.
pub(super) fn init(conn: &mut Connection) -> Result<Lineage> {
    configure(conn)?;
    // Immediate: two processes opening a new file must not both create it.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    match version {
        0 => {
            tx.execute_batch(SCHEMA)?;
            tx.execute_batch(SCHEMA_3)?;
            tx.execute_batch(SCHEMA_4)?;
            set_meta(&tx, "revision", 0)?;
            set_meta(&tx, "changes_from", 0)?;
            new_lineage(&tx)?;
        }
        1 => {
            migrate_from_v1(&tx)?;
            tx.execute_batch(SCHEMA_4)?;
        }
        2 => {
            tx.execute_batch(MIGRATE_2_TO_3)?;
            tx.execute_batch(SCHEMA_3)?;
            tx.execute_batch(SCHEMA_4)?;
        }
        3 => tx.execute_batch(SCHEMA_4)?,
        4..=11 | SCHEMA_VERSION => {}
        other => {
            return Err(Cause::NewerSchema {
                found: other,
                known: SCHEMA_VERSION,
            }
            .into())
        }
    }
    // (A new database gets them too, in this order: its columns are in the
    // order of an old one migrated.)
    if version < 5 {
        tx.execute_batch(SCHEMA_5)?;
    }
    if version < 6 {
        tx.execute_batch(SCHEMA_6)?;
    }
    if version < 7 {
        tx.execute_batch(SCHEMA_7)?;
    }
    if version < 8 {
        tx.execute_batch(SCHEMA_8)?;
    }
    if version < 9 {
        tx.execute_batch(SCHEMA_9)?;
    }
    if version < 10 {
        tx.execute_batch(SCHEMA_10)?;
    }
    if version < 11 {
        tx.execute_batch(SCHEMA_11)?;
    }
    if version < 12 {
        tx.execute_batch(SCHEMA_12)?;
    }
    if version < 4 {
        // The history starts now (an older database's Envoys carry versions
        // without an epoch, which count as epoch 0: this one is later).
        set_meta(&tx, "epoch", Epoch::after(Epoch(0)).to_i64())?;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    let lineage = lineage_of(&tx)?;
    tx.commit()?;
    Ok(lineage)
}

/// Version 1 kept times as RFC 3339 text and no change log. Every row is
/// converted; one that cannot be is named and stops the migration.
fn migrate_from_v1(tx: &Transaction<'_>) -> Result<()> {
    let rows: Vec<(String, String, String, String, String, Option<String>)> = {
        let mut stmt =
            tx.prepare("SELECT name, namespace, role, secret_sha256, create_time, expire_time FROM tokens")?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows
    };
    let revision = meta(tx, "revision")?.max(meta(tx, "config_version").unwrap_or(0));
    tx.execute_batch("DROP TABLE tokens; DROP TABLE meta;")?;
    tx.execute_batch(SCHEMA)?;
    tx.execute_batch(SCHEMA_3)?;
    for (name, namespace, role, digest, create, expire) in rows {
        let corrupt = |problem: &str| StoreError::Corrupt {
            name: name.clone(),
            problem: problem.to_owned(),
        };
        let create = Timestamp::parse_rfc3339(&create).map_err(|_| corrupt("create_time is not RFC 3339"))?;
        let expire = expire
            .as_deref()
            .map(Timestamp::parse_rfc3339)
            .transpose()
            .map_err(|_| corrupt("expire_time is not RFC 3339"))?;
        tx.execute(
            "INSERT INTO tokens (name, namespace, role, secret_sha256, create_seconds, create_nanos,
                                 expire_seconds, expire_nanos, update_seconds)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?5)",
            params![
                name,
                namespace,
                role,
                digest,
                create.unix_seconds(),
                create.subsec_nanos(),
                expire.map(|t| t.unix_seconds()),
                expire.map(|t| t.subsec_nanos()),
            ],
        )?;
    }
    set_meta(tx, "revision", revision)?;
    // Nothing before the migration is in the change log.
    set_meta(tx, "changes_from", revision)?;
    new_lineage(tx)
}

#[cfg(test)]
mod tests {
    use super::super::SqliteStore;
    use super::*;
    use crate::store::contract::{new_digest, test_event};
    use crate::store::{Changes, Revision, Store, TokenRecord};
    use crate::testutil::TempDir;
    use apitokens_core::table::Digest;
    use apitokens_core::Role;

    /// The version 1 schema as the previous release wrote it.
    const V1: &str = "
        CREATE TABLE tokens (name TEXT PRIMARY KEY NOT NULL, namespace TEXT NOT NULL, role TEXT NOT NULL,
            secret_sha256 TEXT NOT NULL UNIQUE, create_time TEXT NOT NULL, expire_time TEXT, update_time TEXT NOT NULL);
        CREATE TABLE meta (key TEXT PRIMARY KEY NOT NULL, value INTEGER NOT NULL);
        INSERT INTO meta VALUES ('revision', 7), ('config_version', 12);
        PRAGMA user_version = 1;";
    const V1_TOKEN: &str = "INSERT INTO tokens VALUES ('namespaces/a/apitokens/t', 'a', 'editor', ?1,
        '2026-01-01T00:00:00Z', '2030-01-01T00:00:00.25Z', '2026-01-01T00:00:00Z')";

    /// A file an older release wrote (`schema`, then the token `row`, its
    /// digest `?1`), opened by this one; the token as read.
    async fn opened_after(schema: &str, row: &str) -> (TempDir, SqliteStore, TokenRecord) {
        let dir = TempDir::new("store-old");
        let path = dir.path().join("t.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(schema).unwrap();
        conn.execute(row, [&"ab".repeat(32)]).unwrap();
        drop(conn);
        let store = SqliteStore::open(&path).unwrap();
        let t = store.get("namespaces/a/apitokens/t").await.unwrap().unwrap();
        (dir, store, t)
    }

    /// Version 2 as the previous release created it.
    const V2: &str = "CREATE TABLE tokens (name TEXT PRIMARY KEY NOT NULL, namespace TEXT NOT NULL, role TEXT NOT NULL,
                 secret_sha256 TEXT NOT NULL UNIQUE, create_seconds INTEGER NOT NULL, create_nanos INTEGER NOT NULL,
                 expire_seconds INTEGER, expire_nanos INTEGER, update_seconds INTEGER NOT NULL,
                 retired INTEGER NOT NULL DEFAULT 0);
             CREATE INDEX tokens_by_expiry ON tokens (expire_seconds, expire_nanos) WHERE retired = 0 AND expire_seconds IS NOT NULL;
             CREATE TABLE changes (revision INTEGER NOT NULL, name TEXT NOT NULL);
             CREATE TABLE meta (key TEXT PRIMARY KEY NOT NULL, value INTEGER NOT NULL);
             INSERT INTO meta VALUES ('revision', 5), ('changes_from', 0), ('lineage_hi', 1), ('lineage_lo', 2);
             PRAGMA user_version = 2;";
    const V2_TOKEN: &str =
        "INSERT INTO tokens VALUES ('namespaces/a/apitokens/t', 'a', 'owner', ?1, 7, 0, NULL, NULL, 7, 0)";

    #[tokio::test]
    async fn version_2_databases_are_migrated() {
        let (_dir, store, t) = opened_after(V2, V2_TOKEN).await;
        assert_eq!(
            (t.role, t.created_by, t.previous, t.last_use, t.disabled),
            (Role::Owner, None, None, None, false)
        );
        assert_eq!(store.revision().await.unwrap(), Revision(5));
        store
            .replace_digest(
                new_digest(&t.name, Digest([3; 32]), Some(Timestamp::from_unix(99, 0))),
                test_event(),
            )
            .await
            .unwrap();
        assert_eq!(
            store.events("a", None, 5).await.unwrap().len(),
            0,
            "the test event names another namespace"
        );
    }

    /// The database at `path` is at this version.
    fn assert_current(path: &std::path::Path) {
        let version: i64 = Connection::open(path)
            .unwrap()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
    }

    /// Undoes version 12, for a database as an older release left it.
    const DROP_EVENT_CONDITIONS: &str = "ALTER TABLE events DROP COLUMN conditions;";

    /// Undoes version 11, for a database as an older release left it.
    const DROP_POLICIES: &str = "DROP TABLE inactivity_policies; ALTER TABLE events DROP COLUMN policy;";

    /// Undoes version 10, for a database as an older release left it.
    const DROP_ADDRESSES: &str = "ALTER TABLE usage DROP COLUMN addresses;";

    /// Version 9 as issue 22's conditions left it: no last addresses. A
    /// use recorded before keeps its time; addresses are kept from then on.
    #[tokio::test]
    async fn version_9_databases_get_the_addresses_column_empty() {
        use crate::store::Use;
        use apitokens_core::access::Access;
        let dir = TempDir::new("store-v9");
        let path = dir.path().join("t.db");
        let name = "namespaces/a/apitokens/t";
        let record = crate::store::contract::record(name, Role::Owner, 1);
        let used = |s, addresses: Vec<std::net::IpAddr>| Use {
            name: name.to_owned(),
            digest: record.digest,
            time: Timestamp::from_unix(s, 0),
            access: Access::USED,
            addresses,
        };
        {
            let store = SqliteStore::open(&path).unwrap();
            store.insert(vec![record.clone()], None, vec![]).await.unwrap();
            store.record_usage(vec![used(100, Vec::new())]).await.unwrap();
        }
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(&format!(
            "{DROP_EVENT_CONDITIONS} {DROP_POLICIES} {DROP_ADDRESSES} PRAGMA user_version = 9;"
        ))
        .unwrap();
        drop(conn);
        let store = SqliteStore::open(&path).unwrap();
        let got = store.get(name).await.unwrap().unwrap();
        assert_eq!(
            (got.last_use, got.last_addresses),
            (Some(Timestamp::from_unix(100, 0)), vec![])
        );
        let here: std::net::IpAddr = "10.0.0.1".parse().unwrap();
        store.record_usage(vec![used(160, vec![here])]).await.unwrap();
        assert_eq!(
            store.get(name).await.unwrap().unwrap().last_addresses,
            [(here, Timestamp::from_unix(160, 0))]
        );
        assert_current(&path);
    }

    /// Undoes version 9, for a database as an older release left it.
    const DROP_CONDITIONS: &str = "ALTER TABLE tokens DROP COLUMN conditions;";

    /// Version 8 as issue 19 left it: no conditions. Its tokens have none,
    /// and a token with some can be written at once.
    #[tokio::test]
    async fn version_8_databases_get_the_conditions_column_empty() {
        use apitokens_core::conditions::{Cidr, Conditions, Packed};
        let dir = TempDir::new("store-v8");
        let path = dir.path().join("t.db");
        let name = "namespaces/a/apitokens/t";
        {
            let store = SqliteStore::open(&path).unwrap();
            let record = crate::store::contract::record(name, Role::Owner, 1);
            store.insert(vec![record], None, vec![]).await.unwrap();
        }
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(&format!(
            "{DROP_EVENT_CONDITIONS} {DROP_POLICIES} {DROP_ADDRESSES} {DROP_CONDITIONS} PRAGMA user_version = 8;"
        ))
        .unwrap();
        drop(conn);
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.get(name).await.unwrap().unwrap().conditions, None);
        let mut bound = crate::store::contract::record("namespaces/a/apitokens/bound", Role::Viewer, 2);
        bound.conditions = Some(Packed::new(&Conditions {
            allow: vec![Cidr::parse("10.0.0.0/8").unwrap()],
            ..Conditions::default()
        }));
        store.insert(vec![bound.clone()], None, vec![]).await.unwrap();
        assert_eq!(
            store.get(&bound.name).await.unwrap().unwrap().conditions,
            bound.conditions
        );
        assert_current(&path);
    }

    /// Undoes version 8, for a database as an older release left it.
    const DROP_EVIDENCE: &str = "ALTER TABLE usage DROP COLUMN read_seconds;
        ALTER TABLE usage DROP COLUMN write_seconds; ALTER TABLE usage DROP COLUMN tokens_seconds;
        ALTER TABLE usage DROP COLUMN past_viewer_seconds; ALTER TABLE usage DROP COLUMN past_editor_seconds;
        ALTER TABLE usage DROP COLUMN past_owner_seconds; ALTER TABLE usage DROP COLUMN unreported_seconds;";

    /// Version 7 as issue 19's webhooks left it: no evidence columns. A
    /// use recorded before the migration keeps its time, with no evidence.
    #[tokio::test]
    async fn version_7_databases_get_the_evidence_columns_empty() {
        use crate::store::Use;
        use apitokens_core::access::Access;
        let dir = TempDir::new("store-v7");
        let path = dir.path().join("t.db");
        let name = "namespaces/a/apitokens/t";
        let record = crate::store::contract::record(name, Role::Owner, 1);
        {
            let store = SqliteStore::open(&path).unwrap();
            store.insert(vec![record.clone()], None, vec![]).await.unwrap();
            let time = Timestamp::from_unix(1_800_000_000, 0);
            let used = Use {
                addresses: Vec::new(),
                name: name.to_owned(),
                digest: record.digest,
                time,
                access: Access::USED,
            };
            store.record_usage(vec![used]).await.unwrap();
        }
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(&format!(
            "{DROP_EVENT_CONDITIONS} {DROP_POLICIES} {DROP_ADDRESSES} {DROP_CONDITIONS} {DROP_EVIDENCE} PRAGMA user_version = 7;"
        ))
        .unwrap();
        drop(conn);
        let store = SqliteStore::open(&path).unwrap();
        let t = store.get(name).await.unwrap().unwrap();
        assert_eq!(t.last_use, Some(Timestamp::from_unix(1_800_000_000, 0)));
        assert_eq!(t.evidence, Default::default());
        assert_current(&path);
    }

    #[tokio::test]
    async fn version_6_databases_get_the_outbox_starting_after_their_newest_event() {
        let dir = TempDir::new("store-v6");
        let path = dir.path().join("t.db");
        {
            let store = SqliteStore::open(&path).unwrap();
            store
                .insert(
                    vec![crate::store::contract::record(
                        "namespaces/a/apitokens/t",
                        Role::Owner,
                        1,
                    )],
                    None,
                    vec![test_event()],
                )
                .await
                .unwrap();
        }
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(&format!(
            "DROP TABLE outbox; DROP TABLE expiry_warnings; {DROP_EVENT_CONDITIONS} {DROP_POLICIES} {DROP_ADDRESSES} {DROP_CONDITIONS} {DROP_EVIDENCE} PRAGMA user_version = 6;"
        ))
        .unwrap();
        drop(conn);
        let store = SqliteStore::open(&path).unwrap();
        let cursor = store.claim_outbox("audit", "me", 0, 1).await.unwrap().unwrap();
        assert!(cursor > 0 && store.events_after(cursor, 10).await.unwrap().is_empty());
        assert_current(&path);
    }

    #[tokio::test]
    async fn version_5_databases_are_migrated_with_every_token_enabled() {
        let dir = TempDir::new("store-v5");
        let path = dir.path().join("t.db");
        let name = "namespaces/a/apitokens/t";
        {
            let store = SqliteStore::open(&path).unwrap();
            store
                .insert(vec![crate::store::contract::record(name, Role::Owner, 1)], None, vec![])
                .await
                .unwrap();
        }
        // Version 5 as the previous release left it: no `disabled` column
        // (nor what versions 7 and 8 added).
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(&format!(
            "ALTER TABLE tokens DROP COLUMN disabled; DROP TABLE outbox; DROP TABLE expiry_warnings;
             {DROP_EVENT_CONDITIONS} {DROP_POLICIES} {DROP_ADDRESSES} {DROP_CONDITIONS} {DROP_EVIDENCE} PRAGMA user_version = 5;"
        ))
        .unwrap();
        drop(conn);
        let store = SqliteStore::open(&path).unwrap();
        let t = store.get(name).await.unwrap().unwrap();
        assert!(!t.disabled);
        assert_current(&path);
        let set = store.set_disabled(name, true, test_event()).await.unwrap().unwrap();
        assert!(set.changed && set.token.disabled);
        // Opening it again migrates nothing twice.
        drop(store);
        assert!(
            SqliteStore::open(&path)
                .unwrap()
                .get(name)
                .await
                .unwrap()
                .unwrap()
                .disabled
        );
    }

    #[tokio::test]
    async fn version_1_databases_are_migrated() {
        let (_dir, store, t) = opened_after(V1, V1_TOKEN).await;
        assert_eq!(
            t.expire_time,
            Some(Timestamp::parse_rfc3339("2030-01-01T00:00:00.25Z").unwrap())
        );
        assert_eq!(t.digest, Digest([0xab; 32]));
        // Versions keep increasing past the old configuration versions, and
        // the change log starts at the migration.
        let r = store.revision().await.unwrap();
        assert_eq!(r, Revision(12));
        assert_eq!(store.changes_since(Revision(7)).await.unwrap(), Changes::TooOld);
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = TempDir::new("store-schema");
        let path = dir.path().join("t.db");
        drop(SqliteStore::open(&path).unwrap());
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        let err = SqliteStore::open(&path).err().unwrap();
        assert!(err.to_string().contains("schema version 99"));
    }
}
