//! SQLite in one file: WAL journal with `synchronous = FULL`, so a committed
//! write survives a crash or power loss, and other processes (`apitokens
//! bootstrap` next to a running server) can read and write concurrently.
//!
//! Two connections: writes serialise on one, while reads (the publisher
//! asking what changed, API lists) proceed on the other (WAL readers never
//! wait for the writer).

use super::changes;
use super::checks::{self, Quota, Taken, SHARED_DIGEST};
use super::row::{decode, decode_event, split, time, EventRow, Row, COLUMNS, EVENT_FIELDS, INSERTED, WITH_USE};
use super::{
    next_epoch, AuditEvent, Cause, Changes, Credential, Epoch, Head, NewDigest, Position, Result, Revision, Store,
    StoreError, TokenRecord, Use,
};
use apitokens_core::compact::{Lineage, LINEAGE_LEN};
use apitokens_core::{Role, Timestamp};
use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

const SCHEMA_VERSION: i64 = 5;

/// Version 4 (the latest): integer times (comparable in SQL, exact to the
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
/// previous one are checked by [`no_shared_digest`]). The epoch is set in
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

/// Version 2 to 3, on an existing database.
const MIGRATE_2_TO_3: &str = "
ALTER TABLE tokens ADD COLUMN created_by TEXT;
ALTER TABLE tokens ADD COLUMN previous_sha256 TEXT;
ALTER TABLE tokens ADD COLUMN previous_until_seconds INTEGER;
ALTER TABLE tokens ADD COLUMN previous_until_nanos INTEGER;
DROP INDEX IF EXISTS tokens_by_expiry;
";

pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    writer: Mutex<Connection>,
    reader: Mutex<Connection>,
    lineage: Lineage,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file.
    pub fn open(path: &Path) -> Result<Self> {
        let existed = path.exists();
        let open = || {
            Connection::open(path).map_err(|error| Cause::Open {
                path: path.to_owned(),
                error,
            })
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
    pub fn open_existing(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Cause::Missing(path.to_owned()).into());
        }
        Self::open(path)
    }

    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let inner = Arc::clone(&self.inner);
        blocking(move || {
            let mut conn = lock(&inner.writer)?;
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let out = f(&tx)?;
            tx.commit()?;
            Ok(out)
        })
        .await
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let inner = Arc::clone(&self.inner);
        blocking(move || {
            let mut conn = lock(&inner.reader)?;
            // One read transaction: a consistent view across statements.
            let tx = conn.transaction()?;
            let out = f(&tx)?;
            tx.commit()?;
            Ok(out)
        })
        .await
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(Cause::Task)?
}

fn lock(conn: &Mutex<Connection>) -> Result<MutexGuard<'_, Connection>> {
    Ok(conn.lock().map_err(|_| Cause::Poisoned)?)
}

fn configure(conn: &Connection) -> Result<()> {
    conn.busy_timeout(Duration::from_secs(10))?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
    if mode != "wal" {
        return Err(Cause::NoWal(mode).into());
    }
    Ok(conn.pragma_update(None, "synchronous", "FULL")?)
}

/// Creates or migrates the schema; returns the store's lineage.
fn init(conn: &mut Connection) -> Result<Lineage> {
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
        4 | SCHEMA_VERSION => {}
        other => {
            return Err(Cause::NewerSchema {
                found: other,
                known: SCHEMA_VERSION,
            }
            .into())
        }
    }
    if version < SCHEMA_VERSION {
        tx.execute_batch(SCHEMA_5)?;
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

fn set_meta(tx: &Transaction<'_>, key: &str, value: i64) -> Result<()> {
    tx.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![key, value],
    )?;
    Ok(())
}

fn meta(tx: &Transaction<'_>, key: &str) -> Result<i64> {
    Ok(tx.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))?)
}

fn meta_opt(tx: &Transaction<'_>, key: &str) -> Result<Option<i64>> {
    Ok(tx
        .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()?)
}

/// Where the store stands: epoch, revision, and what it is behind.
fn head(tx: &Transaction<'_>) -> Result<Head> {
    let at = |e: i64, r: i64| Position::new(Epoch::from_i64(e), Revision::from_i64(r));
    let behind = match (meta_opt(tx, "behind_epoch")?, meta_opt(tx, "behind_revision")?) {
        (Some(e), Some(r)) => Some(at(e, r)),
        _ => None,
    };
    let at = at(meta(tx, "epoch")?, meta(tx, "revision")?);
    Ok(Head { at, behind })
}

fn new_lineage(tx: &Transaction<'_>) -> Result<()> {
    let mut bytes = [0u8; LINEAGE_LEN];
    getrandom::fill(&mut bytes).map_err(Cause::Random)?;
    let (hi, lo) = bytes.split_at(8);
    let word = |b: &[u8]| i64::from_le_bytes(b.try_into().unwrap_or_default());
    set_meta(tx, "lineage_hi", word(hi))?;
    set_meta(tx, "lineage_lo", word(lo))
}

fn lineage_of(tx: &Transaction<'_>) -> Result<Lineage> {
    let mut out = [0u8; LINEAGE_LEN];
    let (hi, lo) = out.split_at_mut(8);
    hi.copy_from_slice(&meta(tx, "lineage_hi")?.to_le_bytes());
    lo.copy_from_slice(&meta(tx, "lineage_lo")?.to_le_bytes());
    Ok(out)
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

#[cfg(unix)]
fn restrict_permissions(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    // Digests are not secrets, but the store is nobody else's business.
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
}

#[cfg(not(unix))]
fn restrict_permissions(_path: &Path) {}

/// See [`checks::SHARED_DIGEST`].
fn no_shared_digest(tx: &Transaction<'_>) -> Result<()> {
    checks::one_token_per_digest(tx.prepare_cached(SHARED_DIGEST)?.query_row([], |r| r.get(0))?)
}

/// Advances the revision and logs the names it changed, in the caller's
/// transaction; refuses (the transaction rolls back) while the store is
/// behind the gateways (see `Head::behind`).
fn commit_revision<'n>(tx: &Transaction<'_>, names: impl ExactSizeIterator<Item = &'n str>) -> Result<Revision> {
    if meta_opt(tx, "behind_epoch")?.is_some() {
        let now = head(tx)?;
        let seen = now.behind.unwrap_or(now.at);
        return Err(StoreError::Behind { at: now.at, seen });
    }
    let revision: i64 = tx.query_row(
        "UPDATE meta SET value = value + 1 WHERE key = 'revision' RETURNING value",
        [],
        |r| r.get(0),
    )?;
    if changes::restarts(names.len()) {
        tx.execute("DELETE FROM changes", [])?;
        set_meta(tx, "changes_from", revision)?;
    } else {
        let mut stmt = tx.prepare_cached("INSERT INTO changes (revision, name) VALUES (?1, ?2)")?;
        for name in names {
            stmt.execute(params![revision, name])?;
        }
    }
    if let Some(through) = changes::cut_through(revision) {
        tx.execute("DELETE FROM changes WHERE revision <= ?1", [through])?;
        tx.execute(
            "UPDATE meta SET value = max(value, ?1) WHERE key = 'changes_from'",
            [through],
        )?;
    }
    Ok(Revision::from_i64(revision))
}

fn read_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok(Row {
        name: row.get(0)?,
        role: row.get(1)?,
        digest: row.get(2)?,
        create: (row.get(3)?, row.get(4)?),
        expire: (row.get(5)?, row.get(6)?),
        retired: row.get(7)?,
        created_by: row.get(8)?,
        previous: (row.get(9)?, row.get(10)?, row.get(11)?),
        last_use: row.get(12).unwrap_or(None),
    })
}

fn query(tx: &Transaction<'_>, sql: &str, params: impl rusqlite::Params) -> Result<Vec<TokenRecord>> {
    let mut stmt = tx.prepare_cached(sql)?;
    let rows = stmt
        .query_map(params, read_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter().map(decode).collect()
}

fn get_one(tx: &Transaction<'_>, name: &str) -> Result<Option<TokenRecord>> {
    tx.prepare_cached(&format!(
        "SELECT {COLUMNS}, u.last_use_seconds FROM tokens t {WITH_USE} WHERE t.name = ?1"
    ))?
    .query_row([name], read_row)
    .optional()?
    .map(decode)
    .transpose()
}

/// Records an audit event in the caller's transaction.
fn record_event(tx: &Transaction<'_>, e: &AuditEvent) -> Result<()> {
    let (expire_s, expire_n) = split(e.expire_time);
    let (until_s, until_n) = split(e.previous_until);
    tx.prepare_cached(&format!(
        "INSERT INTO events (namespace, {EVENT_FIELDS})
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)"
    ))?
    .execute(params![
        e.namespace,
        e.time.unix_seconds(),
        e.time.subsec_nanos(),
        e.action.as_str(),
        e.token,
        e.actor,
        e.role.map(Role::as_str),
        expire_s,
        expire_n,
        until_s,
        until_n,
        e.client_address,
        e.count,
        e.peer_address,
        e.credential.map(Credential::as_str),
    ])?;
    Ok(())
}

/// A unique violation as the domain sees it. SQLite names the column
/// ("UNIQUE constraint failed: tokens.name"), never the value.
fn insert_error(e: rusqlite::Error, name: &str) -> StoreError {
    let taken = match &e {
        rusqlite::Error::SqliteFailure(err, Some(msg)) if err.code == rusqlite::ErrorCode::ConstraintViolation => {
            if msg.contains("tokens.name") {
                Some(Taken::Name)
            } else if msg.contains("tokens.secret_sha256") || msg.contains("tokens.previous_sha256") {
                Some(Taken::Digest)
            } else {
                None
            }
        }
        _ => None,
    };
    taken.map_or_else(|| e.into(), |taken| taken.error(name))
}

#[async_trait]
impl Store for SqliteStore {
    async fn insert(&self, records: Vec<TokenRecord>, quota: Option<u32>, events: Vec<AuditEvent>) -> Result<Revision> {
        checks::valid(&records)?;
        self.write(move |tx| {
            if let Some(limit) = quota {
                Quota::new(&records, limit).check(|namespace| {
                    let sql = "SELECT COUNT(*) FROM tokens WHERE namespace = ?1";
                    Ok(tx.query_row(sql, [namespace], |r| r.get(0))?)
                })?;
            }
            {
                let mut stmt = tx.prepare_cached(&format!(
                    "INSERT INTO tokens ({INSERTED}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?5, ?9, ?10, ?11, ?12, ?13)"
                ))?;
                for r in &records {
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
                        r.created_by,
                        r.previous.map(|p| p.digest.to_hex()),
                        r.previous.map(|p| p.until.unix_seconds()),
                        r.previous.map(|p| p.until.subsec_nanos()),
                    ])
                    .map_err(|e| insert_error(e, &r.name))?;
                }
            }
            no_shared_digest(tx)?;
            for event in &events {
                record_event(tx, event)?;
            }
            commit_revision(tx, records.iter().map(|r| r.name.as_str()))
        })
        .await
    }

    async fn get(&self, name: &str) -> Result<Option<TokenRecord>> {
        let name = name.to_owned();
        self.read(move |tx| get_one(tx, &name)).await
    }

    async fn list(&self, namespace: &str) -> Result<Vec<TokenRecord>> {
        let namespace = namespace.to_owned();
        self.read(move |tx| {
            query(
                tx,
                &format!("SELECT {COLUMNS}, u.last_use_seconds FROM tokens t {WITH_USE} WHERE t.namespace = ?1 ORDER BY t.name"),
                [namespace],
            )
        })
        .await
    }

    async fn replace_digest(&self, new: NewDigest, event: AuditEvent) -> Result<Option<(TokenRecord, Revision)>> {
        self.write(move |tx| {
            let NewDigest {
                name,
                digest,
                previous_until,
            } = new;
            let now = crate::clock::now().unix_seconds();
            let (until_s, until_n) = split(previous_until);
            // With an overlap the current digest becomes the previous one
            // (any earlier overlap ends); without, both are gone.
            let changed = tx
                .execute(
                    "UPDATE tokens SET
                         previous_sha256 = CASE WHEN ?4 IS NULL THEN NULL ELSE secret_sha256 END,
                         previous_until_seconds = ?4, previous_until_nanos = ?5,
                         secret_sha256 = ?2, update_seconds = ?3
                     WHERE name = ?1",
                    params![name, digest.to_hex(), now, until_s, until_n],
                )
                .map_err(|e| insert_error(e, &name))?;
            if changed == 0 {
                return Ok(None);
            }
            no_shared_digest(tx)?;
            let record = get_one(tx, &name)?.ok_or(Cause::Vanished)?;
            record_event(tx, &event)?;
            let revision = commit_revision(tx, std::iter::once(name.as_str()))?;
            Ok(Some((record, revision)))
        })
        .await
    }

    async fn delete(&self, name: &str, event: AuditEvent) -> Result<Option<Revision>> {
        let name = name.to_owned();
        self.write(move |tx| {
            let n = tx.execute("DELETE FROM tokens WHERE name = ?1", [&name])?;
            if n == 0 {
                return Ok(None);
            }
            tx.execute("DELETE FROM usage WHERE name = ?1", [&name])?;
            record_event(tx, &event)?;
            commit_revision(tx, std::iter::once(name.as_str())).map(Some)
        })
        .await
    }

    async fn record_usage(&self, uses: Vec<Use>) -> Result<()> {
        if uses.is_empty() {
            return Ok(());
        }
        self.write(move |tx| {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO usage (name, last_use_seconds)
                     SELECT ?1, ?2 WHERE EXISTS (SELECT 1 FROM tokens WHERE name = ?1
                                                 AND (secret_sha256 = ?3 OR previous_sha256 = ?3))
                     ON CONFLICT (name) DO UPDATE SET last_use_seconds = max(last_use_seconds, excluded.last_use_seconds)",
                )
                ?;
            for u in &uses {
                stmt.execute(params![u.name, u.time.unix_seconds(), u.digest.to_hex()])
                    ?;
            }
            Ok(())
        })
        .await
    }

    async fn events(&self, namespace: &str, before: Option<u64>, limit: u32) -> Result<Vec<(u64, AuditEvent)>> {
        let namespace = namespace.to_owned();
        self.read(move |tx| {
            let before = before.and_then(|b| i64::try_from(b).ok()).unwrap_or(i64::MAX);
            let mut stmt = tx.prepare_cached(&format!(
                "SELECT seq, {EVENT_FIELDS} FROM events WHERE namespace = ?1 AND seq < ?2 ORDER BY seq DESC LIMIT ?3"
            ))?;
            let rows = stmt
                .query_map(params![namespace, before, limit], |r| {
                    Ok(EventRow {
                        seq: r.get(0)?,
                        time: (r.get(1)?, r.get(2)?),
                        action: r.get(3)?,
                        token: r.get(4)?,
                        actor: r.get(5)?,
                        role: r.get(6)?,
                        expire: (r.get(7)?, r.get(8)?),
                        until: (r.get(9)?, r.get(10)?),
                        client_address: r.get(11)?,
                        count: r.get(12)?,
                        peer_address: r.get(13)?,
                        credential: r.get(14)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            rows.into_iter().map(|row| decode_event(row, &namespace)).collect()
        })
        .await
    }

    async fn load(&self) -> Result<(Head, Vec<TokenRecord>)> {
        self.read(|tx| {
            let head = head(tx)?;
            let records = query(
                tx,
                &format!("SELECT {COLUMNS} FROM tokens t WHERE t.retired = 0 ORDER BY t.name"),
                [],
            )?;
            Ok((head, records))
        })
        .await
    }

    async fn changes_since(&self, since: Revision) -> Result<Changes> {
        self.read(move |tx| {
            let head = head(tx)?;
            let from = Revision::from_i64(meta(tx, "changes_from")?);
            if let Some(answer) = changes::answer_unread(since, from, head) {
                return Ok(answer);
            }
            let names: Vec<String> = {
                let mut stmt = tx.prepare_cached("SELECT DISTINCT name FROM changes WHERE revision > ?1")?;
                let names = stmt
                    .query_map([since.to_i64()], |r| r.get(0))?
                    .collect::<rusqlite::Result<Vec<String>>>()?;
                names
            };
            let mut changed = Vec::with_capacity(names.len());
            for name in names {
                let record = get_one(tx, &name)?;
                changed.push((name, record));
            }
            Ok(Changes::Since { head, changed })
        })
        .await
    }

    async fn head(&self) -> Result<Head> {
        self.read(head).await
    }

    async fn mark_behind(&self, seen: Position) -> Result<Head> {
        self.write(move |tx| {
            let now = head(tx)?;
            if now.is_behind(seen) {
                set_meta(tx, "behind_epoch", seen.epoch.to_i64())?;
                set_meta(tx, "behind_revision", seen.revision.to_i64())?;
            }
            head(tx)
        })
        .await
    }

    async fn new_epoch(&self) -> Result<Head> {
        self.write(|tx| {
            let next = next_epoch(&head(tx)?);
            tx.execute("DELETE FROM meta WHERE key IN ('behind_epoch', 'behind_revision')", [])?;
            tx.execute("DELETE FROM changes", [])?;
            set_meta(tx, "epoch", next.epoch.to_i64())?;
            set_meta(tx, "revision", next.revision.to_i64())?;
            // Nothing before the new epoch is in the change log: everyone reloads.
            set_meta(tx, "changes_from", next.revision.to_i64())?;
            head(tx)
        })
        .await
    }

    async fn prune_events(&self, before: Timestamp, limit: u32) -> Result<u64> {
        self.write(move |tx| {
            let deleted = tx
                .prepare_cached(
                    "DELETE FROM events WHERE seq IN
                       (SELECT seq FROM events WHERE time_seconds < ?1 ORDER BY time_seconds LIMIT ?2)",
                )?
                .execute(params![before.unix_seconds(), limit])?;
            Ok(u64::try_from(deleted).unwrap_or(u64::MAX))
        })
        .await
    }

    async fn retire_expired(&self, cutoff: Timestamp) -> Result<Option<Revision>> {
        self.write(move |tx| {
            let (s, n) = (cutoff.unix_seconds(), cutoff.subsec_nanos());
            let mut names: Vec<String> = Vec::new();
            for sql in [
                "UPDATE tokens SET retired = 1
                 WHERE retired = 0 AND expire_seconds IS NOT NULL
                   AND (expire_seconds < ?1 OR (expire_seconds = ?1 AND expire_nanos <= ?2))
                 RETURNING name",
                "UPDATE tokens SET previous_sha256 = NULL, previous_until_seconds = NULL, previous_until_nanos = NULL
                 WHERE previous_sha256 IS NOT NULL
                   AND (previous_until_seconds < ?1 OR (previous_until_seconds = ?1 AND previous_until_nanos <= ?2))
                 RETURNING name",
            ] {
                let mut stmt = tx.prepare_cached(sql)?;
                let done = stmt
                    .query_map(params![s, n], |r| r.get::<_, String>(0))?
                    .collect::<rusqlite::Result<Vec<String>>>()?;
                names.extend(done);
            }
            if names.is_empty() {
                return Ok(None);
            }
            names.sort();
            names.dedup();
            commit_revision(tx, names.iter().map(String::as_str)).map(Some)
        })
        .await
    }

    async fn next_expiry(&self) -> Result<Option<Timestamp>> {
        self.read(|tx| {
            let mut next: Option<Timestamp> = None;
            for sql in [
                "SELECT expire_seconds, expire_nanos FROM tokens
                 WHERE retired = 0 AND expire_seconds IS NOT NULL
                 ORDER BY expire_seconds, expire_nanos LIMIT 1",
                "SELECT previous_until_seconds, previous_until_nanos FROM tokens
                 WHERE previous_sha256 IS NOT NULL
                 ORDER BY previous_until_seconds, previous_until_nanos LIMIT 1",
            ] {
                let row: Option<(i64, i64)> = tx.query_row(sql, [], |r| Ok((r.get(0)?, r.get(1)?))).optional()?;
                if let Some(t) = row.and_then(|(s, n)| time(s, n)) {
                    next = Some(next.map_or(t, |x| x.min(t)));
                }
            }
            Ok(next)
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
    use crate::store::contract::{self, new_digest, put, record, store_contract_tests, test_event};
    use crate::testutil::TempDir;
    use apitokens_core::table::Digest;
    use apitokens_core::Role;

    store_contract_tests!(async {
        let dir = TempDir::new("store");
        let store = SqliteStore::open(&dir.path().join("t.db")).unwrap();
        Some((Box::new(store) as Box<dyn Store>, dir))
    });

    #[tokio::test]
    async fn the_audit_trail_holds_no_digest() {
        let dir = TempDir::new("store-audit");
        let store = SqliteStore::open(&dir.path().join("t.db")).unwrap();
        contract::the_audit_trail_is_written_with_the_change_and_read_newest_first(&store).await;
        let conn = Connection::open(dir.path().join("t.db")).unwrap();
        let dump: String = conn
            .query_row(
                "SELECT group_concat(coalesce(token, '') || actor || coalesce(client_address, '')) FROM events",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert!(!dump.contains(&Digest([1; 32]).to_hex()) && !dump.contains(&Digest([2; 32]).to_hex()));
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
            store.insert(vec![a.clone()], None, vec![]).await.unwrap();
            let other = SqliteStore::open(&path).unwrap();
            assert_eq!(other.lineage(), lineage);
            // A second process (bootstrap next to serve) sees the write and
            // the revision change.
            assert_eq!(other.get(&a.name).await.unwrap(), Some(a.clone()));
            let rev = store.revision().await.unwrap();
            put(&other, "namespaces/default/apitokens/b", Role::Owner, 2).await;
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
    async fn version_2_databases_are_migrated() {
        let dir = TempDir::new("store-v2");
        let path = dir.path().join("t.db");
        let conn = Connection::open(&path).unwrap();
        // Version 2 as the previous release created it.
        conn.execute_batch(
            "CREATE TABLE tokens (name TEXT PRIMARY KEY NOT NULL, namespace TEXT NOT NULL, role TEXT NOT NULL,
                 secret_sha256 TEXT NOT NULL UNIQUE, create_seconds INTEGER NOT NULL, create_nanos INTEGER NOT NULL,
                 expire_seconds INTEGER, expire_nanos INTEGER, update_seconds INTEGER NOT NULL,
                 retired INTEGER NOT NULL DEFAULT 0);
             CREATE INDEX tokens_by_expiry ON tokens (expire_seconds, expire_nanos) WHERE retired = 0 AND expire_seconds IS NOT NULL;
             CREATE TABLE changes (revision INTEGER NOT NULL, name TEXT NOT NULL);
             CREATE TABLE meta (key TEXT PRIMARY KEY NOT NULL, value INTEGER NOT NULL);
             INSERT INTO meta VALUES ('revision', 5), ('changes_from', 0), ('lineage_hi', 1), ('lineage_lo', 2);
             PRAGMA user_version = 2;",
        )
        .unwrap();
        conn.execute(
            "INSERT INTO tokens VALUES ('namespaces/a/apitokens/t', 'a', 'owner', ?1, 7, 0, NULL, NULL, 7, 0)",
            [&"ab".repeat(32)],
        )
        .unwrap();
        drop(conn);
        let store = SqliteStore::open(&path).unwrap();
        let t = store.get("namespaces/a/apitokens/t").await.unwrap().unwrap();
        assert_eq!(
            (t.role, t.created_by, t.previous, t.last_use),
            (Role::Owner, None, None, None)
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
        put(&store, "namespaces/default/apitokens/a", Role::Owner, 1).await;
        Connection::open(&path)
            .unwrap()
            .execute(
                "INSERT INTO tokens VALUES ('namespaces/default/apitokens/bad', 'default', 'owner', ?1,
                     1, 5000000000, NULL, NULL, 1, 0, NULL, NULL, NULL, NULL)",
                [&"cd".repeat(32)],
            )
            .unwrap();
        let err = store.load().await.unwrap_err();
        assert!(
            matches!(&err, StoreError::Corrupt { name, problem }
                     if name == "namespaces/default/apitokens/bad" && problem == "bad create time"),
            "{err}"
        );
        assert!(store.list("default").await.is_err());
    }
}
