//! Durable token storage behind the [`Store`] interface. The embedded default
//! is SQLite in a file ([`SqliteStore`]); a shared SQL server can implement
//! the same trait to serve several control-plane replicas.
//!
//! Only SHA-256 digests of secrets are stored, never secrets.

use apitokens_core::name::TokenName;
use apitokens_core::role::Role;
use apitokens_core::table::Digest;
use apitokens_core::timestamp::Timestamp;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use std::fmt;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// One token as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRecord {
    /// `namespaces/{namespace}/apitokens/{token}`, already validated.
    pub name: String,
    pub role: Role,
    /// 64 lower-case hex characters.
    pub secret_sha256: String,
    pub create_time: Timestamp,
    pub expire_time: Option<Timestamp>,
}

impl TokenRecord {
    /// Checks the invariants the rest of the program relies on.
    pub fn validate(&self) -> Result<(), String> {
        TokenName::parse(&self.name).map_err(|e| format!("name: {e}"))?;
        Digest::from_hex(&self.secret_sha256)
            .ok_or_else(|| "secretSha256: must be 64 lower-case hex characters".to_owned())?;
        Ok(())
    }

    pub fn namespace(&self) -> &str {
        TokenName::parse(&self.name).map_or("", |n| n.namespace)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreError {
    /// A token with this name exists.
    NameTaken,
    /// A token with this digest exists (another secret collided, or an import
    /// carries the same secret twice).
    DigestTaken,
    /// The database could not be used; the message never contains a secret.
    Backend(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NameTaken => f.write_str("an API token with this name already exists"),
            Self::DigestTaken => f.write_str("an API token with this secret digest already exists"),
            Self::Backend(msg) => write!(f, "store error: {msg}"),
        }
    }
}

impl std::error::Error for StoreError {}

/// The storage interface. Every method that changes something is durable when
/// it returns `Ok` and bumps the store's revision in the same transaction.
pub trait Store: Send + Sync {
    /// Inserts all records or none.
    fn insert_many(&self, records: &[TokenRecord]) -> Result<(), StoreError>;
    fn insert(&self, record: &TokenRecord) -> Result<(), StoreError> {
        self.insert_many(std::slice::from_ref(record))
    }
    fn get(&self, name: &str) -> Result<Option<TokenRecord>, StoreError>;
    /// The namespace's tokens, ordered by name.
    fn list(&self, namespace: &str) -> Result<Vec<TokenRecord>, StoreError>;
    /// Replaces the digest of an existing token; `None` if there is none.
    fn replace_secret(&self, name: &str, secret_sha256: &str) -> Result<Option<TokenRecord>, StoreError>;
    /// False if there was no such token.
    fn delete(&self, name: &str) -> Result<bool, StoreError>;
    /// Every token (ordered by name) and the revision they were read at, in
    /// one consistent read.
    fn all(&self) -> Result<(u64, Vec<TokenRecord>), StoreError>;
    /// A number that changes with every write (by any process).
    fn revision(&self) -> Result<u64, StoreError>;
    /// Allocates the next configuration version: strictly increasing across
    /// restarts (and across replicas sharing the store).
    fn next_config_version(&self) -> Result<u64, StoreError>;
}

const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE tokens (
    name          TEXT PRIMARY KEY NOT NULL,
    namespace     TEXT NOT NULL,
    role          TEXT NOT NULL CHECK (role IN ('viewer', 'editor', 'owner')),
    secret_sha256 TEXT NOT NULL UNIQUE CHECK (length(secret_sha256) = 64),
    create_time   TEXT NOT NULL,
    expire_time   TEXT,
    update_time   TEXT NOT NULL
);
CREATE INDEX tokens_by_namespace ON tokens (namespace, name);
CREATE TABLE meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value INTEGER NOT NULL
);
INSERT INTO meta (key, value) VALUES ('revision', 0), ('config_version', 0);
";

/// SQLite in one file: WAL journal with `synchronous = FULL`, so a committed
/// write survives a crash or power loss, and other processes (`apitokens
/// bootstrap` next to a running server) can read and write concurrently.
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

fn backend(e: rusqlite::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl SqliteStore {
    /// Opens (creating if needed) the database file.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let existed = path.exists();
        let conn = Connection::open(path)
            .map_err(|e| StoreError::Backend(format!("cannot open database {}: {e}", path.display())))?;
        if !existed {
            restrict_permissions(path);
        }
        Self::init(conn)
    }

    /// Opens an existing database file; fails if it does not exist.
    pub fn open_existing(path: &Path) -> Result<Self, StoreError> {
        if !path.exists() {
            return Err(StoreError::Backend(format!(
                "no database at {} (run `apitokens serve` or `apitokens bootstrap` first, or pass --db)",
                path.display()
            )));
        }
        Self::open(path)
    }

    /// A private in-memory database, for tests.
    pub fn in_memory() -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory().map_err(backend)?)
    }

    fn init(mut conn: Connection) -> Result<Self, StoreError> {
        conn.busy_timeout(Duration::from_secs(10)).map_err(backend)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
            .map_err(backend)?;
        if mode != "wal" && mode != "memory" {
            return Err(StoreError::Backend(format!(
                "the database does not support WAL (journal_mode is {mode})"
            )));
        }
        conn.pragma_update(None, "synchronous", "FULL").map_err(backend)?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend)?;
        let version: i64 = tx
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .map_err(backend)?;
        match version {
            0 => {
                tx.execute_batch(SCHEMA).map_err(backend)?;
                tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                    .map_err(backend)?;
            }
            SCHEMA_VERSION => {}
            other => {
                return Err(StoreError::Backend(format!(
                    "the database has schema version {other}; this apitokens understands {SCHEMA_VERSION}"
                )))
            }
        }
        tx.commit().map_err(backend)?;
        Ok(Self { conn: Mutex::new(conn) })
    }

    fn conn(&self) -> Result<MutexGuard<'_, Connection>, StoreError> {
        self.conn
            .lock()
            .map_err(|_| StoreError::Backend("store lock poisoned".to_owned()))
    }
}

#[cfg(unix)]
fn restrict_permissions(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    // Digests are not secrets, but the store is nobody else's business.
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
}

#[cfg(not(unix))]
fn restrict_permissions(_path: &Path) {}

fn bump_revision(tx: &rusqlite::Transaction<'_>) -> Result<(), StoreError> {
    tx.execute("UPDATE meta SET value = value + 1 WHERE key = 'revision'", [])
        .map_err(backend)?;
    Ok(())
}

const COLUMNS: &str = "name, role, secret_sha256, create_time, expire_time";

fn read_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Result<TokenRecord, String>> {
    let name: String = row.get(0)?;
    let role: String = row.get(1)?;
    let digest: String = row.get(2)?;
    let create: String = row.get(3)?;
    let expire: Option<String> = row.get(4)?;
    Ok(decode(name, &role, digest, &create, expire.as_deref()))
}

fn decode(
    name: String,
    role: &str,
    secret_sha256: String,
    create: &str,
    expire: Option<&str>,
) -> Result<TokenRecord, String> {
    let bad = |what: &str| format!("row {name}: bad {what}");
    let record = TokenRecord {
        role: Role::parse(role).ok_or_else(|| bad("role"))?,
        create_time: Timestamp::parse_rfc3339(create).map_err(|_| bad("create_time"))?,
        expire_time: expire
            .map(Timestamp::parse_rfc3339)
            .transpose()
            .map_err(|_| bad("expire_time"))?,
        secret_sha256,
        name: name.clone(),
    };
    record.validate().map_err(|e| format!("row {name}: {e}"))?;
    Ok(record)
}

/// Rows that do not decode (written by something else) are skipped with a log
/// line rather than blocking every other token.
fn collect(rows: Vec<Result<TokenRecord, String>>) -> Vec<TokenRecord> {
    rows.into_iter()
        .filter_map(|r| r.map_err(|e| log::error!("skipping a stored token: {e}")).ok())
        .collect()
}

fn map_insert_error(e: rusqlite::Error) -> StoreError {
    if let rusqlite::Error::SqliteFailure(err, Some(msg)) = &e {
        if err.code == rusqlite::ErrorCode::ConstraintViolation {
            if msg.contains("tokens.name") {
                return StoreError::NameTaken;
            }
            if msg.contains("tokens.secret_sha256") {
                return StoreError::DigestTaken;
            }
        }
    }
    backend(e)
}

impl Store for SqliteStore {
    fn insert_many(&self, records: &[TokenRecord]) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend)?;
        {
            let mut stmt = tx
                .prepare(
                    "INSERT INTO tokens (name, namespace, role, secret_sha256, create_time, expire_time, update_time)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?5)",
                )
                .map_err(backend)?;
            for r in records {
                r.validate().map_err(StoreError::Backend)?;
                stmt.execute(params![
                    r.name,
                    r.namespace(),
                    r.role.as_str(),
                    r.secret_sha256,
                    r.create_time.to_rfc3339(),
                    r.expire_time.map(|t| t.to_rfc3339()),
                ])
                .map_err(map_insert_error)?;
            }
        }
        bump_revision(&tx)?;
        tx.commit().map_err(backend)
    }

    fn get(&self, name: &str) -> Result<Option<TokenRecord>, StoreError> {
        let conn = self.conn()?;
        let row = conn
            .query_row(
                &format!("SELECT {COLUMNS} FROM tokens WHERE name = ?1"),
                [name],
                read_row,
            )
            .optional()
            .map_err(backend)?;
        Ok(row.and_then(|r| r.map_err(|e| log::error!("{e}")).ok()))
    }

    fn list(&self, namespace: &str) -> Result<Vec<TokenRecord>, StoreError> {
        let conn = self.conn()?;
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {COLUMNS} FROM tokens WHERE namespace = ?1 ORDER BY name"
            ))
            .map_err(backend)?;
        let rows = stmt
            .query_map([namespace], read_row)
            .map_err(backend)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(backend)?;
        Ok(collect(rows))
    }

    fn replace_secret(&self, name: &str, secret_sha256: &str) -> Result<Option<TokenRecord>, StoreError> {
        if Digest::from_hex(secret_sha256).is_none() {
            return Err(StoreError::Backend("not a SHA-256 digest".to_owned()));
        }
        let mut conn = self.conn()?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend)?;
        let now = crate::clock::now().to_rfc3339();
        let changed = tx
            .execute(
                "UPDATE tokens SET secret_sha256 = ?2, update_time = ?3 WHERE name = ?1",
                params![name, secret_sha256, now],
            )
            .map_err(map_insert_error)?;
        if changed == 0 {
            return Ok(None);
        }
        let row = tx
            .query_row(
                &format!("SELECT {COLUMNS} FROM tokens WHERE name = ?1"),
                [name],
                read_row,
            )
            .map_err(backend)?
            .map_err(StoreError::Backend)?;
        bump_revision(&tx)?;
        tx.commit().map_err(backend)?;
        Ok(Some(row))
    }

    fn delete(&self, name: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn()?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend)?;
        let n = tx
            .execute("DELETE FROM tokens WHERE name = ?1", [name])
            .map_err(backend)?;
        if n == 0 {
            return Ok(false);
        }
        bump_revision(&tx)?;
        tx.commit().map_err(backend)?;
        Ok(true)
    }

    fn all(&self) -> Result<(u64, Vec<TokenRecord>), StoreError> {
        let mut conn = self.conn()?;
        // One read transaction: the revision matches the rows.
        let tx = conn.transaction().map_err(backend)?;
        let revision: i64 = tx
            .query_row("SELECT value FROM meta WHERE key = 'revision'", [], |r| r.get(0))
            .map_err(backend)?;
        let rows = {
            let mut stmt = tx
                .prepare(&format!("SELECT {COLUMNS} FROM tokens ORDER BY name"))
                .map_err(backend)?;
            let rows = stmt
                .query_map([], read_row)
                .map_err(backend)?
                .collect::<rusqlite::Result<Vec<_>>>()
                .map_err(backend)?;
            rows
        };
        tx.commit().map_err(backend)?;
        Ok((u64::try_from(revision).unwrap_or(0), collect(rows)))
    }

    fn revision(&self) -> Result<u64, StoreError> {
        let conn = self.conn()?;
        let revision: i64 = conn
            .query_row("SELECT value FROM meta WHERE key = 'revision'", [], |r| r.get(0))
            .map_err(backend)?;
        Ok(u64::try_from(revision).unwrap_or(0))
    }

    fn next_config_version(&self) -> Result<u64, StoreError> {
        let mut conn = self.conn()?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend)?;
        let version: i64 = tx
            .query_row(
                "UPDATE meta SET value = value + 1 WHERE key = 'config_version' RETURNING value",
                [],
                |r| r.get(0),
            )
            .map_err(backend)?;
        tx.commit().map_err(backend)?;
        Ok(u64::try_from(version).unwrap_or(0))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;

    fn record(name: &str, role: Role, digest_byte: u8) -> TokenRecord {
        TokenRecord {
            name: name.to_owned(),
            role,
            secret_sha256: format!("{digest_byte:02x}").repeat(32),
            create_time: Timestamp::from_unix(1_700_000_000, 0),
            expire_time: None,
        }
    }

    #[test]
    fn insert_get_list_delete() {
        let store = SqliteStore::in_memory().unwrap();
        let a = record("namespaces/default/apitokens/a", Role::Owner, 1);
        let mut b = record("namespaces/default/apitokens/b", Role::Viewer, 2);
        b.expire_time = Some(Timestamp::from_unix(1_900_000_000, 500_000_000));
        let c = record("namespaces/other/apitokens/a", Role::Editor, 3);
        for r in [&b, &a, &c] {
            store.insert(r).unwrap();
        }
        assert_eq!(store.get(&a.name).unwrap(), Some(a.clone()));
        assert_eq!(store.get(&b.name).unwrap(), Some(b.clone()));
        assert_eq!(store.get("namespaces/default/apitokens/zzz").unwrap(), None);
        assert_eq!(store.list("default").unwrap(), vec![a.clone(), b.clone()]);
        assert_eq!(store.list("other").unwrap(), vec![c.clone()]);
        assert_eq!(store.list("nobody").unwrap(), vec![]);
        assert!(store.delete(&a.name).unwrap());
        assert!(!store.delete(&a.name).unwrap());
        assert_eq!(store.all().unwrap().1, vec![b, c]);
    }

    #[test]
    fn duplicates_are_refused_and_change_nothing() {
        let store = SqliteStore::in_memory().unwrap();
        let a = record("namespaces/default/apitokens/a", Role::Owner, 1);
        store.insert(&a).unwrap();
        let rev = store.revision().unwrap();
        let same_name = record("namespaces/default/apitokens/a", Role::Viewer, 2);
        assert_eq!(store.insert(&same_name), Err(StoreError::NameTaken));
        let same_digest = record("namespaces/default/apitokens/b", Role::Viewer, 1);
        assert_eq!(store.insert(&same_digest), Err(StoreError::DigestTaken));
        assert_eq!(store.revision().unwrap(), rev);
        assert_eq!(store.all().unwrap().1, vec![a]);
    }

    #[test]
    fn insert_many_is_all_or_nothing() {
        let store = SqliteStore::in_memory().unwrap();
        let batch = [
            record("namespaces/default/apitokens/a", Role::Owner, 1),
            record("namespaces/default/apitokens/b", Role::Owner, 2),
            record("namespaces/default/apitokens/a", Role::Owner, 3),
        ];
        assert_eq!(store.insert_many(&batch), Err(StoreError::NameTaken));
        assert!(store.all().unwrap().1.is_empty());
        assert_eq!(store.revision().unwrap(), 0);
    }

    #[test]
    fn invalid_records_are_refused() {
        let store = SqliteStore::in_memory().unwrap();
        let mut r = record("default/a", Role::Owner, 1);
        assert!(matches!(store.insert(&r), Err(StoreError::Backend(_))));
        r.name = "namespaces/default/apitokens/a".into();
        r.secret_sha256 = "ABC".into();
        assert!(matches!(store.insert(&r), Err(StoreError::Backend(_))));
    }

    #[test]
    fn replace_secret_keeps_name_role_and_times() {
        let store = SqliteStore::in_memory().unwrap();
        let a = record("namespaces/default/apitokens/a", Role::Editor, 1);
        store.insert(&a).unwrap();
        let rev = store.revision().unwrap();
        let new_digest = "ab".repeat(32);
        let updated = store.replace_secret(&a.name, &new_digest).unwrap().unwrap();
        assert_eq!(updated.secret_sha256, new_digest);
        assert_eq!((updated.role, updated.create_time), (a.role, a.create_time));
        assert!(store.revision().unwrap() > rev);
        assert_eq!(
            store
                .replace_secret("namespaces/default/apitokens/none", &new_digest)
                .unwrap(),
            None
        );
        let b = record("namespaces/default/apitokens/b", Role::Editor, 2);
        store.insert(&b).unwrap();
        assert_eq!(store.replace_secret(&b.name, &new_digest), Err(StoreError::DigestTaken));
    }

    #[test]
    fn revision_and_config_versions_increase() {
        let store = SqliteStore::in_memory().unwrap();
        let r0 = store.revision().unwrap();
        store
            .insert(&record("namespaces/default/apitokens/a", Role::Owner, 1))
            .unwrap();
        let r1 = store.revision().unwrap();
        assert!(r1 > r0);
        assert_eq!(store.all().unwrap().0, r1);
        let v1 = store.next_config_version().unwrap();
        let v2 = store.next_config_version().unwrap();
        assert!(v2 > v1);
    }

    #[test]
    fn file_store_is_durable_and_shared_between_handles() {
        let dir = TempDir::new("store");
        let path = dir.path().join("t.db");
        let a = record("namespaces/default/apitokens/a", Role::Owner, 1);
        {
            let store = SqliteStore::open(&path).unwrap();
            store.insert(&a).unwrap();
            let other = SqliteStore::open(&path).unwrap();
            // A second process (bootstrap next to serve) sees the write and
            // the revision change.
            assert_eq!(other.get(&a.name).unwrap(), Some(a.clone()));
            let rev = store.revision().unwrap();
            other
                .insert(&record("namespaces/default/apitokens/b", Role::Owner, 2))
                .unwrap();
            assert!(store.revision().unwrap() > rev);
            let v = store.next_config_version().unwrap();
            assert!(other.next_config_version().unwrap() > v);
        }
        let reopened = SqliteStore::open_existing(&path).unwrap();
        assert_eq!(reopened.all().unwrap().1.len(), 2);
        let mode: String = reopened
            .conn()
            .unwrap()
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let sync: i64 = reopened
            .conn()
            .unwrap()
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2, "synchronous must be FULL");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "database must not be readable by others");
        }
    }

    #[test]
    fn open_existing_refuses_a_missing_file() {
        let dir = TempDir::new("store-missing");
        let err = SqliteStore::open_existing(&dir.path().join("nope.db")).err().unwrap();
        assert!(err.to_string().contains("no database"));
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

    #[test]
    fn corrupt_rows_are_skipped() {
        let store = SqliteStore::in_memory().unwrap();
        store
            .insert(&record("namespaces/default/apitokens/a", Role::Owner, 1))
            .unwrap();
        store
            .conn()
            .unwrap()
            .execute(
                "INSERT INTO tokens VALUES ('bad name', 'default', 'owner', ?1, 'x', NULL, 'x')",
                [&"cd".repeat(32)],
            )
            .unwrap();
        assert_eq!(store.all().unwrap().1.len(), 1);
    }
}
