//! SQLite in one file: WAL journal with `synchronous = FULL`, so a committed
//! write survives a crash or power loss, and other processes (`apitokens
//! bootstrap` next to a running server) can read and write concurrently.
//!
//! Two connections: writes serialise on one, while reads (the publisher
//! asking what changed, API lists) proceed on the other (WAL readers never
//! wait for the writer).
//!
//! The schema and its migrations are in `schema`; where the store stands
//! (revision, epoch, lineage) in the `meta` table, read and written by `meta`.

mod meta;
mod schema;

use super::changes;
use super::checks::{self, Quota, Taken, SHARED_DIGEST};
use super::row::{
    decode, decode_event, evidence_of, merge_addresses, split, time, Columns, EventRow, Row, Stored, COLUMNS,
    EVENT_FIELDS, EVIDENCE, INSERTED, USE_COLUMNS, WITH_USE,
};
use super::{
    next_epoch, AuditEvent, Cause, Changes, Credential, ExpiryScan, Head, NewDigest, Position, Result, Revision,
    StateSet, Store, StoreError, TokenRecord, Use,
};
use apitokens_core::compact::Lineage;
use apitokens_core::conditions::Packed;
use apitokens_core::{Role, Timestamp};
use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use meta::{head, meta, meta_opt, set_meta};
use schema::{configure, init};

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

    /// Runs `f` in a write transaction: on the writer connection, taking
    /// the database's write lock at once (IMMEDIATE), so that two writers
    /// never deadlock upgrading a read.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.run(Side::Writer, f).await
    }

    /// Runs `f` in one read transaction on the reader connection: a
    /// consistent view across its statements.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.run(Side::Reader, f).await
    }

    async fn run<T: Send + 'static>(
        &self,
        side: Side,
        f: impl FnOnce(&Transaction<'_>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let inner = Arc::clone(&self.inner);
        blocking(move || {
            let (conn, behavior) = match side {
                Side::Writer => (&inner.writer, TransactionBehavior::Immediate),
                Side::Reader => (&inner.reader, TransactionBehavior::Deferred),
            };
            let mut conn = lock(conn)?;
            let tx = conn.transaction_with_behavior(behavior)?;
            let out = f(&tx)?;
            tx.commit()?;
            Ok(out)
        })
        .await
    }
}

/// Which of the two connections a transaction runs on.
#[derive(Clone, Copy)]
enum Side {
    Writer,
    Reader,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(Cause::Task)?
}

fn lock(conn: &Mutex<Connection>) -> Result<MutexGuard<'_, Connection>> {
    Ok(conn.lock().map_err(|_| Cause::Poisoned)?)
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

/// Refuses a write while the store is behind the gateways (see
/// `Head::behind`).
fn refuse_if_behind(tx: &Transaction<'_>) -> Result<()> {
    if meta_opt(tx, "behind_epoch")?.is_some() {
        let now = head(tx)?;
        let seen = now.behind.unwrap_or(now.at);
        return Err(StoreError::Behind { at: now.at, seen });
    }
    Ok(())
}

/// Advances the revision and logs the names it changed, in the caller's
/// transaction; refuses (the transaction rolls back) while the store is
/// behind the gateways.
fn commit_revision<'n>(tx: &Transaction<'_>, names: impl ExactSizeIterator<Item = &'n str>) -> Result<Revision> {
    refuse_if_behind(tx)?;
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

impl Columns for rusqlite::Row<'_> {
    fn width(&self) -> usize {
        self.as_ref().column_count()
    }

    fn at<T: Stored>(&self, column: usize) -> Result<T> {
        Ok(self.get(column)?)
    }
}

/// Each row of `sql`'s answer, read by `read`.
fn read_all<T>(
    tx: &Transaction<'_>,
    sql: &str,
    params: impl rusqlite::Params,
    read: impl Fn(&rusqlite::Row<'_>) -> Result<T>,
) -> Result<Vec<T>> {
    let mut stmt = tx.prepare_cached(sql)?;
    let mut rows = stmt.query(params)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(read(row)?);
    }
    Ok(out)
}

fn query(tx: &Transaction<'_>, sql: &str, params: impl rusqlite::Params) -> Result<Vec<TokenRecord>> {
    read_all(tx, sql, params, |r| decode(Row::read(r, 0)?))
}

/// One token with its last use.
fn get_one(tx: &Transaction<'_>, name: &str) -> Result<Option<TokenRecord>> {
    let sql = format!("SELECT {COLUMNS}, {USE_COLUMNS} FROM tokens t {WITH_USE} WHERE t.name = ?1");
    Ok(query(tx, &sql, [name])?.pop())
}

/// Records an audit event in the caller's transaction.
fn record_event(tx: &Transaction<'_>, e: &AuditEvent) -> Result<()> {
    let (expire_s, expire_n) = split(e.expire_time);
    let (until_s, until_n) = split(e.previous_until);
    tx.prepare_cached(&format!(
        "INSERT INTO events (namespace, {EVENT_FIELDS})
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)"
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
        e.policy,
        e.conditions,
    ])?;
    Ok(())
}

/// The end of a change of one token's row (a disable, an enable, new
/// conditions) that changed `changed` rows: the token as it is now, and,
/// if anything changed, its audit event and a revision. Nothing changed:
/// nothing to write, and what the gateways enforce at the current revision
/// already says it.
fn token_changed(tx: &Transaction<'_>, name: &str, changed: usize, event: &AuditEvent) -> Result<Option<StateSet>> {
    let Some(token) = get_one(tx, name)? else {
        return Ok(None);
    };
    if changed == 0 {
        refuse_if_behind(tx)?;
        let revision = head(tx)?.at.revision;
        return Ok(Some(StateSet {
            token,
            revision,
            changed: false,
        }));
    }
    record_event(tx, event)?;
    let revision = commit_revision(tx, std::iter::once(name))?;
    Ok(Some(StateSet {
        token,
        revision,
        changed: true,
    }))
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
                    "INSERT INTO tokens ({INSERTED})
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?5, ?9, ?10, ?11, ?12, ?13, ?14, ?15)"
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
                        r.disabled,
                        r.conditions.as_ref().map(|c| c.bytes()),
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
                &format!(
                    "SELECT {COLUMNS}, {USE_COLUMNS} FROM tokens t {WITH_USE} WHERE t.namespace = ?1 ORDER BY t.name"
                ),
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
            // The time of the change as the service's clock says (its event's).
            let now = event.time.unix_seconds();
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

    async fn inactivity_policies(&self) -> Result<Vec<(String, String)>> {
        self.read(|tx| {
            read_all(
                tx,
                "SELECT namespace, policy FROM inactivity_policies ORDER BY namespace",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
        })
        .await
    }

    async fn set_inactivity_policy(&self, namespace: &str, policy: Option<&str>, event: AuditEvent) -> Result<bool> {
        let (namespace, policy) = (namespace.to_owned(), policy.map(str::to_owned));
        self.write(move |tx| {
            let changed = match &policy {
                Some(policy) => tx.execute(
                    "INSERT INTO inactivity_policies (namespace, policy) VALUES (?1, ?2)
                     ON CONFLICT (namespace) DO UPDATE SET policy = excluded.policy
                     WHERE inactivity_policies.policy <> excluded.policy",
                    params![namespace, policy],
                )?,
                None => tx.execute("DELETE FROM inactivity_policies WHERE namespace = ?1", [&namespace])?,
            };
            if changed > 0 {
                record_event(tx, &event)?;
            }
            Ok(changed > 0)
        })
        .await
    }

    async fn set_disabled(&self, name: &str, disabled: bool, event: AuditEvent) -> Result<Option<StateSet>> {
        let name = name.to_owned();
        self.write(move |tx| {
            // The time of the change as the service's clock says (its event's).
            let now = event.time.unix_seconds();
            let changed = tx.execute(
                "UPDATE tokens SET disabled = ?2, update_seconds = ?3 WHERE name = ?1 AND disabled <> ?2",
                params![name, disabled, now],
            )?;
            token_changed(tx, &name, changed, &event)
        })
        .await
    }

    async fn set_conditions(
        &self,
        name: &str,
        created: Timestamp,
        expected: Option<Packed>,
        new: Option<Packed>,
        event: AuditEvent,
    ) -> Result<Option<StateSet>> {
        let name = name.to_owned();
        self.write(move |tx| {
            let bytes = |c: &Option<Packed>| c.as_ref().map(|c| c.bytes().to_vec());
            // `IS`: equal, NULL included. (Not a change of the token's
            // activity: `update_seconds` stays.)
            let changed = tx.execute(
                "UPDATE tokens SET conditions = ?2
                 WHERE name = ?1 AND conditions IS ?3 AND conditions IS NOT ?2
                   AND create_seconds = ?4 AND create_nanos = ?5",
                params![
                    name,
                    bytes(&new),
                    bytes(&expected),
                    created.unix_seconds(),
                    created.subsec_nanos()
                ],
            )?;
            token_changed(tx, &name, changed, &event)
        })
        .await
    }

    async fn record_usage(&self, uses: Vec<Use>) -> Result<()> {
        if uses.is_empty() {
            return Ok(());
        }
        // Each time column keeps its latest value; SQLite's max() of a NULL
        // is NULL, hence the coalesces.
        let latest = |c: &str| format!("{c} = max(coalesce({c}, excluded.{c}), coalesce(excluded.{c}, {c}))");
        let sql = format!(
            "INSERT INTO usage (name, last_use_seconds, {columns})
             SELECT ?1, ?2, ?4, ?5, ?6, ?7, ?8, ?9, ?10 WHERE EXISTS (SELECT 1 FROM tokens WHERE name = ?1
                                         AND (secret_sha256 = ?3 OR previous_sha256 = ?3))
             ON CONFLICT (name) DO UPDATE SET {last_use}, {evidence}",
            columns = EVIDENCE.join(", "),
            last_use = latest("last_use_seconds"),
            evidence = EVIDENCE.map(latest).join(", "),
        );
        self.write(move |tx| {
            let mut stmt = tx.prepare_cached(&sql)?;
            // The uses written: those of a secret of the token (the name
            // could be another token's by now).
            let mut recorded = Vec::with_capacity(uses.len());
            for u in &uses {
                let [r, w, t, v, e, o, n] = evidence_of(u);
                let changed = stmt.execute(params![
                    u.name,
                    u.time.unix_seconds(),
                    u.digest.to_hex(),
                    r,
                    w,
                    t,
                    v,
                    e,
                    o,
                    n
                ])?;
                if changed > 0 {
                    recorded.push(u);
                }
            }
            drop(stmt);
            // The last addresses, merged in (the row was written just above).
            for u in recorded.into_iter().filter(|u| !u.addresses.is_empty()) {
                let stored: Option<Option<String>> = tx
                    .query_row("SELECT addresses FROM usage WHERE name = ?1", [&u.name], |r| r.get(0))
                    .optional()?;
                if let Some(stored) = stored {
                    let merged = merge_addresses(stored.as_deref(), &u.addresses, u.time.unix_seconds());
                    tx.execute(
                        "UPDATE usage SET addresses = ?2 WHERE name = ?1",
                        params![u.name, merged],
                    )?;
                }
            }
            Ok(())
        })
        .await
    }

    async fn events(&self, namespace: &str, before: Option<u64>, limit: u32) -> Result<Vec<(u64, AuditEvent)>> {
        let namespace = namespace.to_owned();
        self.read(move |tx| {
            let before = before.and_then(|b| i64::try_from(b).ok()).unwrap_or(i64::MAX);
            let sql = format!(
                "SELECT seq, {EVENT_FIELDS} FROM events WHERE namespace = ?1 AND seq < ?2 ORDER BY seq DESC LIMIT ?3"
            );
            read_all(tx, &sql, params![namespace, before, limit], |r| {
                decode_event(EventRow::read(r)?, &namespace)
            })
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
            let sql = "SELECT DISTINCT name FROM changes WHERE revision > ?1";
            let names: Vec<String> = read_all(tx, sql, [since.to_i64()], |r| r.at(0))?;
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

    async fn events_after(&self, after: u64, limit: u32) -> Result<Vec<(u64, AuditEvent)>> {
        self.read(move |tx| {
            let after = i64::try_from(after).unwrap_or(i64::MAX);
            let sql = format!("SELECT seq, {EVENT_FIELDS}, namespace FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2");
            read_all(tx, &sql, params![after, limit], |r| {
                let namespace: String = r.at(17)?;
                decode_event(EventRow::read(r)?, &namespace)
            })
        })
        .await
    }

    async fn claim_outbox(&self, endpoint: &str, holder: &str, now_ms: i64, until_ms: i64) -> Result<Option<u64>> {
        let (endpoint, holder) = (endpoint.to_owned(), holder.to_owned());
        self.write(move |tx| {
            let found: Option<(i64, Option<String>, i64)> = tx
                .query_row(
                    "SELECT cursor, holder, lease_until_ms FROM outbox WHERE endpoint = ?1",
                    [&endpoint],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?;
            let cursor = match found {
                None => {
                    let newest: i64 = tx.query_row("SELECT coalesce(max(seq), 0) FROM events", [], |r| r.get(0))?;
                    tx.execute(
                        "INSERT INTO outbox (endpoint, cursor, holder, lease_until_ms) VALUES (?1, ?2, ?3, ?4)",
                        params![endpoint, newest, holder, until_ms],
                    )?;
                    newest
                }
                Some((_, Some(other), until)) if other != holder && until > now_ms => return Ok(None),
                Some((cursor, _, _)) => {
                    tx.execute(
                        "UPDATE outbox SET holder = ?2, lease_until_ms = ?3 WHERE endpoint = ?1",
                        params![endpoint, holder, until_ms],
                    )?;
                    cursor
                }
            };
            Ok(Some(u64::try_from(cursor).unwrap_or(0)))
        })
        .await
    }

    async fn advance_outbox(&self, endpoint: &str, holder: &str, seq: u64) -> Result<bool> {
        let (endpoint, holder) = (endpoint.to_owned(), holder.to_owned());
        let seq = i64::try_from(seq).unwrap_or(i64::MAX);
        self.write(move |tx| {
            let moved = tx.execute(
                "UPDATE outbox SET cursor = max(cursor, ?3) WHERE endpoint = ?1 AND holder = ?2",
                params![endpoint, holder, seq],
            )?;
            Ok(moved == 1)
        })
        .await
    }

    async fn warn_expiring(&self, scan: ExpiryScan) -> Result<Vec<AuditEvent>> {
        self.write(move |tx| {
            let window = super::warning_window(&scan);
            let now = scan.now;
            let lead_s = window.lead_seconds;
            let sql = format!(
                "SELECT {COLUMNS} FROM tokens t
                 WHERE t.retired = 0 AND t.expire_seconds IS NOT NULL
                   AND (t.expire_seconds > ?1 OR (t.expire_seconds = ?1 AND t.expire_nanos > ?2))
                   AND (t.expire_seconds < ?3 OR (t.expire_seconds = ?3 AND t.expire_nanos <= ?6))
                   AND NOT EXISTS (SELECT 1 FROM expiry_warnings w WHERE w.name = t.name
                                   AND w.expire_seconds = t.expire_seconds AND w.lead_seconds = ?4)
                 ORDER BY t.expire_seconds, t.expire_nanos, t.name LIMIT ?5"
            );
            let ((start_s, start_n), (until_s, until_n)) = (window.from, window.until);
            let due = query(
                tx,
                &sql,
                params![start_s, start_n, until_s, lead_s, scan.limit, until_n],
            )?;
            let mut events = Vec::with_capacity(due.len());
            for token in &due {
                let Some(expire) = token.expire_time else { continue };
                tx.execute(
                    "INSERT INTO expiry_warnings (name, expire_seconds, lead_seconds) VALUES (?1, ?2, ?3)",
                    params![token.name, expire.unix_seconds(), lead_s],
                )?;
                let event = super::expiring_event(token, now, scan.actor);
                record_event(tx, &event)?;
                events.push(event);
            }
            Ok(events)
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
                names.extend(read_all(tx, sql, params![s, n], |r| r.at::<String>(0))?);
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
mod tests {
    use super::*;
    use crate::store::contract::{self, put, record, store_contract_tests};
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
                     1, 5000000000, NULL, NULL, 1, 0, NULL, NULL, NULL, NULL, 0, NULL)",
                [&"cd".repeat(32)],
            )
            .unwrap();
        contract::a_bad_row_is_named(&store, "namespaces/default/apitokens/bad").await;
    }

    #[tokio::test]
    async fn conditions_that_do_not_decode_are_an_error_naming_the_token() {
        let dir = TempDir::new("store-corrupt-conditions");
        let path = dir.path().join("t.db");
        let store = SqliteStore::open(&path).unwrap();
        put(&store, "namespaces/default/apitokens/bad", Role::Owner, 1).await;
        // An unknown condition: never read as none.
        Connection::open(&path)
            .unwrap()
            .execute("UPDATE tokens SET conditions = x'09'", [])
            .unwrap();
        let err = store.load().await.unwrap_err();
        assert!(
            matches!(&err, StoreError::Corrupt { name, problem }
                if name == "namespaces/default/apitokens/bad" && problem == "conditions do not decode"),
            "{err}"
        );
    }
}
