//! SQLite in one file: WAL journal with `synchronous = FULL`, so a committed
//! write survives a crash or power loss, and other processes (`apitokens
//! bootstrap` next to a running server) can read and write concurrently.
//!
//! Two connections: writes serialise on one, while reads (the publisher
//! asking what changed, API lists) proceed on the other (WAL readers never
//! wait for the writer).

use super::{Changes, Revision, Store, StoreError, TokenRecord};
use apitokens_core::compact::{Lineage, LINEAGE_LEN};
use apitokens_core::name::TokenName;
use apitokens_core::table::Digest;
use apitokens_core::{Role, Timestamp};
use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

const SCHEMA_VERSION: i64 = 2;

/// Version 2: integer times (comparable in SQL, exact to the nanosecond),
/// `retired`, the change log and the store's lineage.
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
    CHECK ((expire_seconds IS NULL) = (expire_nanos IS NULL))
);
CREATE INDEX tokens_by_namespace ON tokens (namespace, name);
CREATE INDEX tokens_by_expiry ON tokens (expire_seconds, expire_nanos) WHERE retired = 0 AND expire_seconds IS NOT NULL;
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

/// Revisions the change log keeps: a replica further behind loads everything.
const CHANGES_KEPT: u64 = 10_000;
/// A write that changes more tokens than this (a bulk import) restarts the
/// change log instead of listing them: whoever is behind loads everything.
const CHANGES_PER_WRITE: usize = 10_000;

pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    writer: Mutex<Connection>,
    reader: Mutex<Connection>,
    lineage: Lineage,
}

fn unavailable(e: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl SqliteStore {
    /// Opens (creating if needed) the database file.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let existed = path.exists();
        let open = || {
            Connection::open(path)
                .map_err(|e| StoreError::Unavailable(format!("cannot open database {}: {e}", path.display())))
        };
        let mut writer = open()?;
        if !existed {
            restrict_permissions(path);
        }
        let lineage = init(&mut writer)?;
        let reader = open()?;
        configure(&reader)?;
        Ok(Self {
            inner: Arc::new(Inner {
                writer: Mutex::new(writer),
                reader: Mutex::new(reader),
                lineage,
            }),
        })
    }

    /// Opens an existing database file; fails if it does not exist.
    pub fn open_existing(path: &Path) -> Result<Self, StoreError> {
        if !path.exists() {
            return Err(StoreError::Unavailable(format!(
                "no database at {} (run `apitokens serve` or `apitokens bootstrap` first, or pass --db)",
                path.display()
            )));
        }
        Self::open(path)
    }

    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = Arc::clone(&self.inner);
        blocking(move || {
            let mut conn = lock(&inner.writer)?;
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            let out = f(&tx)?;
            tx.commit().map_err(unavailable)?;
            Ok(out)
        })
        .await
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = Arc::clone(&self.inner);
        blocking(move || {
            let mut conn = lock(&inner.reader)?;
            // One read transaction: a consistent view across statements.
            let tx = conn.transaction().map_err(unavailable)?;
            let out = f(&tx)?;
            tx.commit().map_err(unavailable)?;
            Ok(out)
        })
        .await
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Unavailable(format!("store task failed: {e}")))?
}

fn lock(conn: &Mutex<Connection>) -> Result<MutexGuard<'_, Connection>, StoreError> {
    conn.lock()
        .map_err(|_| StoreError::Unavailable("store lock poisoned".to_owned()))
}

fn configure(conn: &Connection) -> Result<(), StoreError> {
    conn.busy_timeout(Duration::from_secs(10)).map_err(unavailable)?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
        .map_err(unavailable)?;
    if mode != "wal" {
        return Err(StoreError::Unavailable(format!(
            "the database does not support WAL (journal_mode is {mode})"
        )));
    }
    conn.pragma_update(None, "synchronous", "FULL").map_err(unavailable)
}

/// Creates or migrates the schema; returns the store's lineage.
fn init(conn: &mut Connection) -> Result<Lineage, StoreError> {
    configure(conn)?;
    // Immediate: two processes opening a new file must not both create it.
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(unavailable)?;
    let version: i64 = tx
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(unavailable)?;
    match version {
        0 => {
            tx.execute_batch(SCHEMA).map_err(unavailable)?;
            set_meta(&tx, "revision", 0)?;
            set_meta(&tx, "changes_from", 0)?;
            new_lineage(&tx)?;
        }
        1 => migrate_from_v1(&tx)?,
        SCHEMA_VERSION => {}
        other => {
            return Err(StoreError::Unavailable(format!(
                "the database has schema version {other}; this apitokens understands {SCHEMA_VERSION}"
            )))
        }
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)
        .map_err(unavailable)?;
    let lineage = lineage_of(&tx)?;
    tx.commit().map_err(unavailable)?;
    Ok(lineage)
}

fn set_meta(tx: &Transaction<'_>, key: &str, value: i64) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![key, value],
    )
    .map_err(unavailable)?;
    Ok(())
}

fn meta(tx: &Transaction<'_>, key: &str) -> Result<i64, StoreError> {
    tx.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .map_err(unavailable)
}

fn new_lineage(tx: &Transaction<'_>) -> Result<(), StoreError> {
    let mut bytes = [0u8; LINEAGE_LEN];
    getrandom::fill(&mut bytes).map_err(|e| StoreError::Unavailable(format!("the OS random source failed: {e}")))?;
    let (hi, lo) = bytes.split_at(8);
    let word = |b: &[u8]| i64::from_le_bytes(b.try_into().unwrap_or_default());
    set_meta(tx, "lineage_hi", word(hi))?;
    set_meta(tx, "lineage_lo", word(lo))
}

fn lineage_of(tx: &Transaction<'_>) -> Result<Lineage, StoreError> {
    let mut out = [0u8; LINEAGE_LEN];
    let (hi, lo) = out.split_at_mut(8);
    hi.copy_from_slice(&meta(tx, "lineage_hi")?.to_le_bytes());
    lo.copy_from_slice(&meta(tx, "lineage_lo")?.to_le_bytes());
    Ok(out)
}

/// Version 1 kept times as RFC 3339 text and no change log. Every row is
/// converted; one that cannot be is named and stops the migration.
fn migrate_from_v1(tx: &Transaction<'_>) -> Result<(), StoreError> {
    let rows: Vec<(String, String, String, String, String, Option<String>)> = {
        let mut stmt = tx
            .prepare("SELECT name, namespace, role, secret_sha256, create_time, expire_time FROM tokens")
            .map_err(unavailable)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
            })
            .map_err(unavailable)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(unavailable)?;
        rows
    };
    let revision = meta(tx, "revision")?.max(meta(tx, "config_version").unwrap_or(0));
    tx.execute_batch("DROP TABLE tokens; DROP TABLE meta;")
        .map_err(unavailable)?;
    tx.execute_batch(SCHEMA).map_err(unavailable)?;
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
        )
        .map_err(unavailable)?;
    }
    set_meta(tx, "revision", revision)?;
    // Nothing before the migration is in the change log.
    set_meta(tx, "changes_from", revision)?;
    new_lineage(tx)
}

#[cfg(unix)]
fn restrict_permissions(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    // Digests are not secrets, but the store is nobody else's business.
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
}

#[cfg(not(unix))]
fn restrict_permissions(_path: &Path) {}

/// Advances the revision and logs the names it changed, in the caller's
/// transaction.
fn commit_revision<'n>(
    tx: &Transaction<'_>,
    names: impl ExactSizeIterator<Item = &'n str>,
) -> Result<Revision, StoreError> {
    let revision: i64 = tx
        .query_row(
            "UPDATE meta SET value = value + 1 WHERE key = 'revision' RETURNING value",
            [],
            |r| r.get(0),
        )
        .map_err(unavailable)?;
    if names.len() > CHANGES_PER_WRITE {
        tx.execute("DELETE FROM changes", []).map_err(unavailable)?;
        set_meta(tx, "changes_from", revision)?;
    } else {
        let mut stmt = tx
            .prepare_cached("INSERT INTO changes (revision, name) VALUES (?1, ?2)")
            .map_err(unavailable)?;
        for name in names {
            stmt.execute(params![revision, name]).map_err(unavailable)?;
        }
    }
    let kept = CHANGES_KEPT as i64;
    if revision % 1000 == 0 && revision > kept {
        let from = revision - kept;
        tx.execute("DELETE FROM changes WHERE revision <= ?1", [from])
            .map_err(unavailable)?;
        tx.execute(
            "UPDATE meta SET value = max(value, ?1) WHERE key = 'changes_from'",
            [from],
        )
        .map_err(unavailable)?;
    }
    Ok(Revision(u64::try_from(revision).unwrap_or(0)))
}

const COLUMNS: &str = "name, role, secret_sha256, create_seconds, create_nanos, expire_seconds, expire_nanos, retired";

type Row = (String, String, String, i64, i64, Option<i64>, Option<i64>, bool);

fn read_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok((
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
        row.get(5)?,
        row.get(6)?,
        row.get(7)?,
    ))
}

/// A row as a record; a row that does not decode is an error naming it.
fn decode(
    (name, role, digest, create_s, create_n, expire_s, expire_n, retired): Row,
) -> Result<TokenRecord, StoreError> {
    let corrupt = |problem: &str| StoreError::Corrupt {
        name: name.clone(),
        problem: problem.to_owned(),
    };
    let time = |secs: i64, nanos: i64| {
        u32::try_from(nanos)
            .ok()
            .filter(|n| *n < 1_000_000_000)
            .map(|n| Timestamp::from_unix(secs, n))
    };
    TokenName::parse(&name).map_err(|_| corrupt("not a token name"))?;
    let record = TokenRecord {
        role: Role::parse(&role).ok_or_else(|| corrupt("unknown role"))?,
        digest: Digest::from_hex(&digest).ok_or_else(|| corrupt("secret_sha256 is not a digest"))?,
        create_time: time(create_s, create_n).ok_or_else(|| corrupt("bad create time"))?,
        expire_time: match (expire_s, expire_n) {
            (None, None) => None,
            (Some(s), Some(n)) => Some(time(s, n).ok_or_else(|| corrupt("bad expire time"))?),
            _ => return Err(corrupt("bad expire time")),
        },
        retired,
        name: name.clone(),
    };
    Ok(record)
}

fn query(tx: &Transaction<'_>, sql: &str, params: impl rusqlite::Params) -> Result<Vec<TokenRecord>, StoreError> {
    let mut stmt = tx.prepare_cached(sql).map_err(unavailable)?;
    let rows = stmt
        .query_map(params, read_row)
        .map_err(unavailable)?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(unavailable)?;
    rows.into_iter().map(decode).collect()
}

fn get_one(tx: &Transaction<'_>, name: &str) -> Result<Option<TokenRecord>, StoreError> {
    tx.prepare_cached(&format!("SELECT {COLUMNS} FROM tokens WHERE name = ?1"))
        .map_err(unavailable)?
        .query_row([name], read_row)
        .optional()
        .map_err(unavailable)?
        .map(decode)
        .transpose()
}

fn map_insert_error(e: rusqlite::Error, name: &str) -> StoreError {
    if let rusqlite::Error::SqliteFailure(err, Some(msg)) = &e {
        if err.code == rusqlite::ErrorCode::ConstraintViolation {
            if msg.contains("tokens.name") {
                return StoreError::NameTaken(name.to_owned());
            }
            if msg.contains("tokens.secret_sha256") {
                return StoreError::DigestTaken;
            }
        }
    }
    unavailable(e)
}

#[async_trait]
impl Store for SqliteStore {
    async fn insert(&self, records: Vec<TokenRecord>, quota: Option<u32>) -> Result<Revision, StoreError> {
        self.write(move |tx| {
            if let Some(limit) = quota {
                let mut added: BTreeMap<&str, i64> = BTreeMap::new();
                for r in &records {
                    *added.entry(r.namespace()).or_default() += 1;
                }
                for (namespace, n) in added {
                    let existing: i64 = tx
                        .query_row("SELECT COUNT(*) FROM tokens WHERE namespace = ?1", [namespace], |r| {
                            r.get(0)
                        })
                        .map_err(unavailable)?;
                    if existing + n > i64::from(limit) {
                        return Err(StoreError::QuotaExceeded {
                            namespace: namespace.to_owned(),
                            limit,
                        });
                    }
                }
            }
            {
                let mut stmt = tx
                    .prepare_cached(
                        "INSERT INTO tokens (name, namespace, role, secret_sha256, create_seconds, create_nanos,
                                             expire_seconds, expire_nanos, update_seconds, retired)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?5, ?9)",
                    )
                    .map_err(unavailable)?;
                for r in &records {
                    r.check().map_err(|problem| StoreError::Corrupt {
                        name: r.name.clone(),
                        problem,
                    })?;
                    stmt.execute(params![
                        r.name,
                        r.namespace(),
                        r.role.as_str(),
                        r.digest.to_hex(),
                        r.create_time.unix_seconds(),
                        r.create_time.subsec_nanos(),
                        r.expire_time.map(|t| t.unix_seconds()),
                        r.expire_time.map(|t| t.subsec_nanos()),
                        r.retired,
                    ])
                    .map_err(|e| map_insert_error(e, &r.name))?;
                }
            }
            commit_revision(tx, records.iter().map(|r| r.name.as_str()))
        })
        .await
    }

    async fn get(&self, name: &str) -> Result<Option<TokenRecord>, StoreError> {
        let name = name.to_owned();
        self.read(move |tx| get_one(tx, &name)).await
    }

    async fn list(&self, namespace: &str) -> Result<Vec<TokenRecord>, StoreError> {
        let namespace = namespace.to_owned();
        self.read(move |tx| {
            query(
                tx,
                &format!("SELECT {COLUMNS} FROM tokens WHERE namespace = ?1 ORDER BY name"),
                [namespace],
            )
        })
        .await
    }

    async fn replace_digest(&self, name: &str, digest: Digest) -> Result<Option<(TokenRecord, Revision)>, StoreError> {
        let name = name.to_owned();
        self.write(move |tx| {
            let now = crate::clock::now().unix_seconds();
            let changed = tx
                .execute(
                    "UPDATE tokens SET secret_sha256 = ?2, update_seconds = ?3 WHERE name = ?1",
                    params![name, digest.to_hex(), now],
                )
                .map_err(|e| map_insert_error(e, &name))?;
            if changed == 0 {
                return Ok(None);
            }
            let record = get_one(tx, &name)?.ok_or_else(|| StoreError::Unavailable("row vanished".to_owned()))?;
            let revision = commit_revision(tx, std::iter::once(name.as_str()))?;
            Ok(Some((record, revision)))
        })
        .await
    }

    async fn delete(&self, name: &str) -> Result<Option<Revision>, StoreError> {
        let name = name.to_owned();
        self.write(move |tx| {
            let n = tx
                .execute("DELETE FROM tokens WHERE name = ?1", [&name])
                .map_err(unavailable)?;
            if n == 0 {
                return Ok(None);
            }
            commit_revision(tx, std::iter::once(name.as_str())).map(Some)
        })
        .await
    }

    async fn load(&self) -> Result<(Revision, Vec<TokenRecord>), StoreError> {
        self.read(|tx| {
            let revision = meta(tx, "revision")?;
            let records = query(
                tx,
                &format!("SELECT {COLUMNS} FROM tokens WHERE retired = 0 ORDER BY name"),
                [],
            )?;
            Ok((Revision(u64::try_from(revision).unwrap_or(0)), records))
        })
        .await
    }

    async fn changes_since(&self, since: Revision) -> Result<Changes, StoreError> {
        self.read(move |tx| {
            let revision = u64::try_from(meta(tx, "revision")?).unwrap_or(0);
            let from = u64::try_from(meta(tx, "changes_from")?).unwrap_or(0);
            if since.0 < from || since.0 > revision {
                return Ok(Changes::TooOld);
            }
            let since_i = i64::try_from(since.0).unwrap_or(i64::MAX);
            let names: Vec<String> = {
                let mut stmt = tx
                    .prepare_cached("SELECT DISTINCT name FROM changes WHERE revision > ?1")
                    .map_err(unavailable)?;
                let names = stmt
                    .query_map([since_i], |r| r.get(0))
                    .map_err(unavailable)?
                    .collect::<rusqlite::Result<Vec<String>>>()
                    .map_err(unavailable)?;
                names
            };
            let mut changed = Vec::with_capacity(names.len());
            for name in names {
                let record = get_one(tx, &name)?;
                changed.push((name, record));
            }
            Ok(Changes::Since {
                revision: Revision(revision),
                changed,
            })
        })
        .await
    }

    async fn revision(&self) -> Result<Revision, StoreError> {
        self.read(|tx| Ok(Revision(u64::try_from(meta(tx, "revision")?).unwrap_or(0))))
            .await
    }

    async fn retire_expired(&self, cutoff: Timestamp) -> Result<Option<Revision>, StoreError> {
        self.write(move |tx| {
            let (s, n) = (cutoff.unix_seconds(), cutoff.subsec_nanos());
            let names: Vec<String> = {
                let mut stmt = tx
                    .prepare_cached(
                        "UPDATE tokens SET retired = 1
                         WHERE retired = 0 AND expire_seconds IS NOT NULL
                           AND (expire_seconds < ?1 OR (expire_seconds = ?1 AND expire_nanos <= ?2))
                         RETURNING name",
                    )
                    .map_err(unavailable)?;
                let names = stmt
                    .query_map(params![s, n], |r| r.get(0))
                    .map_err(unavailable)?
                    .collect::<rusqlite::Result<Vec<String>>>()
                    .map_err(unavailable)?;
                names
            };
            if names.is_empty() {
                return Ok(None);
            }
            commit_revision(tx, names.iter().map(String::as_str)).map(Some)
        })
        .await
    }

    async fn next_expiry(&self) -> Result<Option<Timestamp>, StoreError> {
        self.read(|tx| {
            let row: Option<(i64, i64)> = tx
                .query_row(
                    "SELECT expire_seconds, expire_nanos FROM tokens
                     WHERE retired = 0 AND expire_seconds IS NOT NULL
                     ORDER BY expire_seconds, expire_nanos LIMIT 1",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()
                .map_err(unavailable)?;
            Ok(row.map(|(s, n)| Timestamp::from_unix(s, u32::try_from(n).unwrap_or(0))))
        })
        .await
    }

    fn lineage(&self) -> Lineage {
        self.inner.lineage
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
            digest: Digest([digest_byte; 32]),
            create_time: Timestamp::from_unix(1_700_000_000, 0),
            expire_time: None,
            retired: false,
        }
    }

    fn store(dir: &TempDir) -> SqliteStore {
        SqliteStore::open(&dir.path().join("t.db")).unwrap()
    }

    #[tokio::test]
    async fn insert_get_list_delete() {
        let dir = TempDir::new("store");
        let store = store(&dir);
        let a = record("namespaces/default/apitokens/a", Role::Owner, 1);
        let mut b = record("namespaces/default/apitokens/b", Role::Viewer, 2);
        b.expire_time = Some(Timestamp::from_unix(1_900_000_000, 500_000_000));
        let c = record("namespaces/other/apitokens/a", Role::Editor, 3);
        for r in [&b, &a, &c] {
            store.insert(vec![r.clone()], None).await.unwrap();
        }
        assert_eq!(store.get(&a.name).await.unwrap(), Some(a.clone()));
        assert_eq!(store.get(&b.name).await.unwrap(), Some(b.clone()));
        assert_eq!(store.get("namespaces/default/apitokens/zzz").await.unwrap(), None);
        assert_eq!(store.list("default").await.unwrap(), vec![a.clone(), b.clone()]);
        assert_eq!(store.list("other").await.unwrap(), vec![c.clone()]);
        assert_eq!(store.list("nobody").await.unwrap(), vec![]);
        assert!(store.delete(&a.name).await.unwrap().is_some());
        assert!(store.delete(&a.name).await.unwrap().is_none());
        assert_eq!(store.load().await.unwrap().1, vec![b, c]);
    }

    #[tokio::test]
    async fn duplicates_and_quota_are_refused_and_change_nothing() {
        let dir = TempDir::new("store-dup");
        let store = store(&dir);
        let a = record("namespaces/default/apitokens/a", Role::Owner, 1);
        store.insert(vec![a.clone()], None).await.unwrap();
        let rev = store.revision().await.unwrap();
        let same_name = record("namespaces/default/apitokens/a", Role::Viewer, 2);
        assert_eq!(
            store.insert(vec![same_name], None).await,
            Err(StoreError::NameTaken("namespaces/default/apitokens/a".into()))
        );
        let same_digest = record("namespaces/default/apitokens/b", Role::Viewer, 1);
        assert_eq!(
            store.insert(vec![same_digest], None).await,
            Err(StoreError::DigestTaken)
        );
        let two = vec![
            record("namespaces/default/apitokens/b", Role::Viewer, 2),
            record("namespaces/default/apitokens/c", Role::Viewer, 3),
        ];
        assert_eq!(
            store.insert(two.clone(), Some(2)).await,
            Err(StoreError::QuotaExceeded {
                namespace: "default".into(),
                limit: 2
            })
        );
        assert_eq!(store.revision().await.unwrap(), rev);
        assert_eq!(store.load().await.unwrap().1, vec![a]);
        store.insert(two, Some(3)).await.unwrap();
    }

    #[tokio::test]
    async fn insert_is_all_or_nothing() {
        let dir = TempDir::new("store-batch");
        let store = store(&dir);
        let batch = vec![
            record("namespaces/default/apitokens/a", Role::Owner, 1),
            record("namespaces/default/apitokens/b", Role::Owner, 2),
            record("namespaces/default/apitokens/a", Role::Owner, 3),
        ];
        assert!(matches!(store.insert(batch, None).await, Err(StoreError::NameTaken(_))));
        assert!(store.load().await.unwrap().1.is_empty());
        assert_eq!(store.revision().await.unwrap(), Revision(0));
    }

    #[tokio::test]
    async fn replace_digest_keeps_name_role_and_times() {
        let dir = TempDir::new("store-replace");
        let store = store(&dir);
        let a = record("namespaces/default/apitokens/a", Role::Editor, 1);
        store.insert(vec![a.clone()], None).await.unwrap();
        let rev = store.revision().await.unwrap();
        let new_digest = Digest([0xab; 32]);
        let (updated, rev2) = store.replace_digest(&a.name, new_digest).await.unwrap().unwrap();
        assert_eq!(updated.digest, new_digest);
        assert_eq!((updated.role, updated.create_time), (a.role, a.create_time));
        assert!(rev2 > rev);
        assert_eq!(
            store
                .replace_digest("namespaces/default/apitokens/none", new_digest)
                .await
                .unwrap(),
            None
        );
        let b = record("namespaces/default/apitokens/b", Role::Editor, 2);
        store.insert(vec![b.clone()], None).await.unwrap();
        assert_eq!(
            store.replace_digest(&b.name, new_digest).await,
            Err(StoreError::DigestTaken)
        );
    }

    #[tokio::test]
    async fn changes_since_a_revision() {
        let dir = TempDir::new("store-changes");
        let store = store(&dir);
        let r0 = store.revision().await.unwrap();
        let a = record("namespaces/default/apitokens/a", Role::Owner, 1);
        let b = record("namespaces/default/apitokens/b", Role::Owner, 2);
        let r1 = store.insert(vec![a.clone(), b.clone()], None).await.unwrap();
        assert_eq!(r1, Revision(r0.0 + 1));
        let r2 = store.delete(&a.name).await.unwrap().unwrap();
        let (b2, r3) = store.replace_digest(&b.name, Digest([9; 32])).await.unwrap().unwrap();
        assert_eq!(
            store.changes_since(r0).await.unwrap(),
            Changes::Since {
                revision: r3,
                changed: vec![(a.name.clone(), None), (b.name.clone(), Some(b2.clone()))]
            }
        );
        assert_eq!(
            store.changes_since(r2).await.unwrap(),
            Changes::Since {
                revision: r3,
                changed: vec![(b.name.clone(), Some(b2))]
            }
        );
        assert_eq!(
            store.changes_since(r3).await.unwrap(),
            Changes::Since {
                revision: r3,
                changed: vec![]
            }
        );
        // A revision from the future (another store, a restored backup).
        assert_eq!(store.changes_since(Revision(r3.0 + 5)).await.unwrap(), Changes::TooOld);
    }

    #[tokio::test]
    async fn bulk_writes_restart_the_change_log() {
        let dir = TempDir::new("store-bulk");
        let store = store(&dir);
        let many: Vec<TokenRecord> = (0..=CHANGES_PER_WRITE)
            .map(|i| TokenRecord {
                digest: Digest::of(&i.to_le_bytes()),
                ..record(&format!("namespaces/bulk/apitokens/t{i}"), Role::Viewer, 0)
            })
            .collect();
        let r = store.insert(many, None).await.unwrap();
        assert_eq!(store.changes_since(Revision(0)).await.unwrap(), Changes::TooOld);
        assert_eq!(
            store.changes_since(r).await.unwrap(),
            Changes::Since {
                revision: r,
                changed: vec![]
            }
        );
    }

    #[tokio::test]
    async fn expired_tokens_retire_once() {
        let dir = TempDir::new("store-retire");
        let store = store(&dir);
        let mut soon = record("namespaces/default/apitokens/soon", Role::Owner, 1);
        soon.expire_time = Some(Timestamp::from_unix(1000, 500));
        let mut later = record("namespaces/default/apitokens/later", Role::Owner, 2);
        later.expire_time = Some(Timestamp::from_unix(2000, 0));
        let never = record("namespaces/default/apitokens/never", Role::Owner, 3);
        let r0 = store
            .insert(vec![soon.clone(), later.clone(), never.clone()], None)
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
        let Changes::Since { revision, changed } = store.changes_since(r0).await.unwrap() else {
            panic!()
        };
        assert_eq!(revision, r1);
        assert!(changed[0].1.as_ref().unwrap().retired);
    }

    #[tokio::test]
    async fn file_store_is_durable_private_and_shared_between_handles() {
        let dir = TempDir::new("store-file");
        let path = dir.path().join("t.db");
        let a = record("namespaces/default/apitokens/a", Role::Owner, 1);
        let lineage;
        {
            let store = SqliteStore::open(&path).unwrap();
            lineage = store.lineage();
            store.insert(vec![a.clone()], None).await.unwrap();
            let other = SqliteStore::open(&path).unwrap();
            assert_eq!(other.lineage(), lineage);
            // A second process (bootstrap next to serve) sees the write and
            // the revision change.
            assert_eq!(other.get(&a.name).await.unwrap(), Some(a.clone()));
            let rev = store.revision().await.unwrap();
            other
                .insert(vec![record("namespaces/default/apitokens/b", Role::Owner, 2)], None)
                .await
                .unwrap();
            assert!(store.revision().await.unwrap() > rev);
        }
        let reopened = SqliteStore::open_existing(&path).unwrap();
        assert_eq!(reopened.load().await.unwrap().1.len(), 2);
        assert_eq!(reopened.lineage(), lineage);
        let conn = Connection::open(&path).unwrap();
        let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
        assert_eq!(mode, "wal");
        let sync: i64 = lock(&reopened.inner.writer)
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
        // Another store has another lineage.
        assert_ne!(SqliteStore::open(&dir.path().join("u.db")).unwrap().lineage(), lineage);
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

    /// The version 1 schema as the previous release wrote it.
    const V1: &str = "
        CREATE TABLE tokens (name TEXT PRIMARY KEY NOT NULL, namespace TEXT NOT NULL, role TEXT NOT NULL,
            secret_sha256 TEXT NOT NULL UNIQUE, create_time TEXT NOT NULL, expire_time TEXT, update_time TEXT NOT NULL);
        CREATE TABLE meta (key TEXT PRIMARY KEY NOT NULL, value INTEGER NOT NULL);
        INSERT INTO meta VALUES ('revision', 7), ('config_version', 12);
        PRAGMA user_version = 1;";

    #[tokio::test]
    async fn version_1_databases_are_migrated() {
        let dir = TempDir::new("store-v1");
        let path = dir.path().join("t.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(V1).unwrap();
        conn.execute(
            "INSERT INTO tokens VALUES ('namespaces/a/apitokens/t', 'a', 'editor', ?1,
                 '2026-01-01T00:00:00Z', '2030-01-01T00:00:00.25Z', '2026-01-01T00:00:00Z')",
            [&"ab".repeat(32)],
        )
        .unwrap();
        drop(conn);
        let store = SqliteStore::open(&path).unwrap();
        let t = store.get("namespaces/a/apitokens/t").await.unwrap().unwrap();
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

    #[tokio::test]
    async fn a_row_that_cannot_be_read_is_an_error_naming_it() {
        let dir = TempDir::new("store-corrupt");
        let path = dir.path().join("t.db");
        let store = SqliteStore::open(&path).unwrap();
        store
            .insert(vec![record("namespaces/default/apitokens/a", Role::Owner, 1)], None)
            .await
            .unwrap();
        Connection::open(&path)
            .unwrap()
            .execute(
                "INSERT INTO tokens VALUES ('namespaces/default/apitokens/bad', 'default', 'owner', ?1,
                     1, 5000000000, NULL, NULL, 1, 0)",
                [&"cd".repeat(32)],
            )
            .unwrap();
        let err = store.load().await.unwrap_err();
        assert_eq!(
            err,
            StoreError::Corrupt {
                name: "namespaces/default/apitokens/bad".into(),
                problem: "bad create time".into()
            }
        );
        assert!(store.list("default").await.is_err());
    }
}
