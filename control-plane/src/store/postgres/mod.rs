//! PostgreSQL: the store that several `serve` replicas share.
//!
//! - Connections: the URL's options (`url`), TLS with rustls when the URL
//!   asks for it, the server's certificate always verified (`tls`), a pool
//!   (`pool`).
//! - Versioned migrations, applied when a process opens the store
//!   (`migrate`).
//! - Every write is one transaction that first locks the one `store_state`
//!   row to advance the revision: writes are serialised across replicas,
//!   commit in revision order, and the per-namespace quota counted inside a
//!   write sees every earlier write. It logs the names it changed and
//!   `NOTIFY apitokens_changes`, delivered at commit (this module).
//! - Notifications of the other replicas' writes and Envoys (`listen`).
//! - What replicas share beyond the tokens: their heartbeats and Envoy
//!   streams (`replicas`).
//!
//! The URL may carry a password: it is never logged or shown; messages name
//! the server by [`PostgresStore::describe`] (user, host, port, database).

mod listen;
mod migrate;
mod pool;
pub(crate) mod replicas;
mod tls;
mod url;

pub use tls::TlsError;
pub use url::UrlError;

use super::changes;
use super::checks::{self, Quota, Taken, SHARED_DIGEST};
use super::row::{
    decode, decode_event, evidence_of, merge_addresses, split, time, Columns, EventRow, Row, Stored, COLUMNS,
    EVENT_FIELDS, EVIDENCE, INSERTED, USE_COLUMNS, WITH_USE,
};
use super::{
    next_epoch, AuditEvent, Cause, Changes, Credential, Epoch, ExpiryScan, Head, NewDigest, Position, Result, Revision,
    StateSet, Store, StoreError, TokenRecord, Use,
};
use apitokens_core::compact::{Lineage, LINEAGE_LEN};
use apitokens_core::conditions::Packed;
use apitokens_core::Timestamp;
use async_trait::async_trait;
use deadpool_postgres::Pool;
use listen::{Listener, CHANGES_CHANNEL};
use std::collections::BTreeMap;
use std::sync::OnceLock;
use tokio::sync::watch;
use tokio_postgres::error::SqlState;
use tokio_postgres::{IsolationLevel, Transaction};
use tokio_postgres_rustls::MakeRustlsConnect;

pub struct PostgresStore {
    pool: Pool,
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    lineage: Lineage,
    described: String,
    listener: OnceLock<Option<Listener>>,
}

impl PostgresStore {
    /// Connects, applies the migrations this database lacks, and reads the
    /// store's lineage (made by the first process that opened it).
    pub async fn connect(url: &str) -> Result<Self> {
        let (config, params) = url::parse(url).map_err(Cause::Url)?;
        if let Some(warning) = &params.downgradable {
            tracing::warn!("{warning}");
        }
        let tls = tls::connector(&params).map_err(Cause::Tls)?;
        let mut store = Self {
            pool: pool::pool(&config, &tls)?,
            described: url::describe(&config),
            config,
            tls,
            lineage: [0; LINEAGE_LEN],
            listener: OnceLock::new(),
        };
        store.lineage = migrate::migrate(&store).await.map_err(|e| match e {
            // Which server failed, by its description: the command line
            // never shows the URL (it may hold a password).
            StoreError::Unavailable(cause) => Cause::At {
                server: store.described.clone(),
                cause: Box::new(cause),
            }
            .into(),
            other => other,
        })?;
        Ok(store)
    }

    /// The server and database, without the password: for messages.
    pub fn describe(&self) -> &str {
        &self.described
    }

    /// A consistent read: one snapshot across its statements.
    async fn read<T>(&self, f: impl for<'t> FnOnce(&'t Transaction<'t>) -> ReadFuture<'t, T>) -> Result<T> {
        let mut conn = self.conn().await?;
        let tx = conn
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let out = f(&tx).await?;
        tx.commit().await?;
        Ok(out)
    }
}

/// A change of the store's position itself (see `Head`).
enum HeadChange {
    Behind(Position),
    NewEpoch(Position),
}

impl PostgresStore {
    /// Applies `change` (decided on the locked state row) in one transaction,
    /// tells the other replicas, and returns where the store is after.
    async fn change_head(&self, change: impl FnOnce(&Head) -> Option<HeadChange>) -> Result<Head> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        let now = head_of(&tx.query_one(&format!("{HEAD} FOR UPDATE"), &[]).await?)?;
        let what = match change(&now) {
            None => None,
            Some(HeadChange::Behind(seen)) => {
                tx.execute(
                    "UPDATE store_state SET behind_epoch = $1, behind_revision = $2 WHERE id = 1",
                    &[&seen.epoch.to_i64(), &seen.revision.to_i64()],
                )
                .await?;
                Some("behind")
            }
            Some(HeadChange::NewEpoch(next)) => {
                // Nothing before the new epoch is in the change log: everyone reloads.
                tx.execute("DELETE FROM changes", &[]).await?;
                tx.execute(
                    "UPDATE store_state SET epoch = $1, revision = $2, changes_from = $2,
                         behind_epoch = NULL, behind_revision = NULL WHERE id = 1",
                    &[&next.epoch.to_i64(), &next.revision.to_i64()],
                )
                .await?;
                Some("epoch")
            }
        };
        if let Some(what) = what {
            tx.execute("SELECT pg_notify($1, $2)", &[&CHANGES_CHANNEL, &what])
                .await?;
        }
        let after = head(&tx).await?;
        tx.commit().await?;
        Ok(after)
    }
}

type ReadFuture<'t, T> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<T>> + Send + 't>>;

const HEAD: &str = "SELECT epoch, revision, behind_epoch, behind_revision FROM store_state WHERE id = 1";

fn head_of(row: &tokio_postgres::Row) -> Result<Head> {
    let at = |e: i64, r: i64| Position::new(Epoch::from_i64(e), Revision::from_i64(r));
    let behind_epoch: Option<i64> = row.try_get(2)?;
    let behind_revision: Option<i64> = row.try_get(3)?;
    Ok(Head {
        at: at(row.try_get(0)?, row.try_get(1)?),
        behind: behind_epoch.zip(behind_revision).map(|(e, r)| at(e, r)),
    })
}

async fn head(tx: &Transaction<'_>) -> Result<Head> {
    head_of(&tx.query_one(HEAD, &[]).await?)
}

/// Locks the state row and advances the revision: the first statement of
/// every write (see the module's notes). Refuses (the transaction rolls back
/// when dropped) while the store is behind the gateways (`Head::behind`).
async fn next_revision(tx: &Transaction<'_>) -> Result<i64> {
    let row = tx
        .query_one(
            "UPDATE store_state SET revision = revision + 1 WHERE id = 1
             RETURNING epoch, revision - 1, behind_epoch, behind_revision, revision",
            &[],
        )
        .await?;
    let now = head_of(&row)?;
    if let Some(seen) = now.behind {
        return Err(StoreError::Behind { at: now.at, seen });
    }
    Ok(row.try_get(4)?)
}

/// See [`checks::SHARED_DIGEST`]. Writes serialise on the state row, so it
/// sees every commit.
async fn no_shared_digest(tx: &Transaction<'_>) -> Result<()> {
    checks::one_token_per_digest(tx.query_one(SHARED_DIGEST, &[]).await?.try_get(0)?)
}

/// Logs the names a write changed (see [`changes`]) and notifies the other
/// replicas (at commit).
async fn log_changes(tx: &Transaction<'_>, revision: i64, names: &[&str]) -> Result<Revision> {
    if changes::restarts(names.len()) {
        tx.execute("DELETE FROM changes", &[]).await?;
        tx.execute("UPDATE store_state SET changes_from = $1 WHERE id = 1", &[&revision])
            .await?;
    } else {
        tx.execute(
            "INSERT INTO changes (revision, name) SELECT $1, unnest($2::text[])",
            &[&revision, &names],
        )
        .await?;
    }
    if let Some(through) = changes::cut_through(revision) {
        tx.execute("DELETE FROM changes WHERE revision <= $1", &[&through])
            .await?;
        tx.execute(
            "UPDATE store_state SET changes_from = greatest(changes_from, $1) WHERE id = 1",
            &[&through],
        )
        .await?;
    }
    tx.execute("SELECT pg_notify($1, $2)", &[&CHANGES_CHANNEL, &revision.to_string()])
        .await?;
    Ok(Revision::from_i64(revision))
}

impl Columns for tokio_postgres::Row {
    fn width(&self) -> usize {
        self.len()
    }

    fn at<T: Stored>(&self, column: usize) -> Result<T> {
        Ok(self.try_get(column)?)
    }
}

async fn query(
    tx: &Transaction<'_>,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<TokenRecord>> {
    let rows = tx.query(sql, params).await?;
    rows.iter().map(|r| Row::read(r, 0).and_then(decode)).collect()
}

/// One token with its last use.
async fn get_one(tx: &Transaction<'_>, name: &str) -> Result<Option<TokenRecord>> {
    let mut found = query(
        tx,
        &format!("SELECT {COLUMNS}, {USE_COLUMNS} FROM tokens t {WITH_USE} WHERE t.name = $1"),
        &[&name],
    )
    .await?;
    Ok(found.pop())
}

/// The end of a change of one token's row (a disable, an enable, new
/// conditions) that changed `changed` rows, in `tx` at `revision` (taken
/// first): the token as it is now, and, if anything changed, its audit
/// event and the revision, committed. Nothing changed: nothing is written
/// (the transaction rolls back, the revision taken with it); the current
/// revision carries it.
async fn token_changed(
    tx: deadpool_postgres::Transaction<'_>,
    name: &str,
    revision: i64,
    changed: u64,
    event: &AuditEvent,
) -> Result<Option<StateSet>> {
    let Some(token) = get_one(&tx, name).await? else {
        return Ok(None);
    };
    if changed == 0 {
        return Ok(Some(StateSet {
            token,
            revision: Revision::from_i64(revision - 1),
            changed: false,
        }));
    }
    record_event(&tx, event).await?;
    let revision = log_changes(&tx, revision, &[name]).await?;
    tx.commit().await?;
    Ok(Some(StateSet {
        token,
        revision,
        changed: true,
    }))
}

/// Records an audit event in the caller's transaction.
async fn record_event(tx: &Transaction<'_>, e: &AuditEvent) -> Result<()> {
    let wide = |(s, n): (Option<i64>, Option<u32>)| (s, n.map(i64::from));
    let (expire_s, expire_n) = wide(split(e.expire_time));
    let (until_s, until_n) = wide(split(e.previous_until));
    tx.execute(
        &format!(
            "INSERT INTO events (namespace, {EVENT_FIELDS})
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)"
        ),
        &[
            &e.namespace,
            &e.time.unix_seconds(),
            &i64::from(e.time.subsec_nanos()),
            &e.action.as_str(),
            &e.token,
            &e.actor,
            &e.role.map(|r| r.as_str()),
            &expire_s,
            &expire_n,
            &until_s,
            &until_n,
            &e.client_address,
            &e.count.map(i64::from),
            &e.peer_address,
            &e.credential.map(Credential::as_str),
            &e.policy,
            &e.conditions,
        ],
    )
    .await?;
    Ok(())
}

/// A unique violation as the domain sees it. PostgreSQL names the index;
/// the name taken is read from the DETAIL (never logged).
fn insert_error(e: tokio_postgres::Error, first_name: &str) -> StoreError {
    let Some(db) = e.as_db_error().filter(|db| *db.code() == SqlState::UNIQUE_VIOLATION) else {
        return e.into();
    };
    let taken = match db.constraint() {
        Some("tokens_pkey") => Taken::Name,
        Some("tokens_secret_sha256_key" | "tokens_previous_unique") => Taken::Digest,
        _ => return e.into(),
    };
    let name = db
        .detail()
        .and_then(|d| d.split_once("=(")?.1.split_once(") already exists").map(|(n, _)| n))
        .unwrap_or(first_name);
    taken.error(name)
}

#[async_trait]
impl Store for PostgresStore {
    async fn insert(&self, records: Vec<TokenRecord>, quota: Option<u32>, events: Vec<AuditEvent>) -> Result<Revision> {
        checks::valid(&records)?;
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        let revision = next_revision(&tx).await?;
        if let Some(limit) = quota {
            let quota = Quota::new(&records, limit);
            let counts = tx
                .query(
                    "SELECT namespace, count(*) FROM tokens WHERE namespace = ANY($1) GROUP BY namespace",
                    &[&quota.namespaces()],
                )
                .await?;
            let mut held: BTreeMap<String, i64> = BTreeMap::new();
            for row in counts {
                held.insert(row.try_get(0)?, row.try_get(1)?);
            }
            quota.check(|namespace| Ok(held.get(namespace).copied().unwrap_or(0)))?;
        }
        let names: Vec<&str> = records.iter().map(|r| r.name.as_str()).collect();
        let namespaces: Vec<&str> = records.iter().map(TokenRecord::namespace).collect();
        let roles: Vec<&str> = records.iter().map(|r| r.role.as_str()).collect();
        let digests: Vec<String> = records.iter().map(|r| r.digest.to_hex()).collect();
        let create_s: Vec<i64> = records.iter().map(|r| r.create_time.unix_seconds()).collect();
        let create_n: Vec<i64> = records
            .iter()
            .map(|r| i64::from(r.create_time.subsec_nanos()))
            .collect();
        let expire_s: Vec<Option<i64>> = records
            .iter()
            .map(|r| r.expire_time.map(|t| t.unix_seconds()))
            .collect();
        let expire_n: Vec<Option<i64>> = records
            .iter()
            .map(|r| r.expire_time.map(|t| i64::from(t.subsec_nanos())))
            .collect();
        let retired: Vec<bool> = records.iter().map(|r| r.retired).collect();
        let created_by: Vec<Option<&str>> = records.iter().map(|r| r.created_by.as_deref()).collect();
        let previous: Vec<Option<String>> = records.iter().map(|r| r.previous.map(|p| p.digest.to_hex())).collect();
        let until_s: Vec<Option<i64>> = records
            .iter()
            .map(|r| r.previous.map(|p| p.until.unix_seconds()))
            .collect();
        let until_n: Vec<Option<i64>> = records
            .iter()
            .map(|r| r.previous.map(|p| i64::from(p.until.subsec_nanos())))
            .collect();
        let disabled: Vec<bool> = records.iter().map(|r| r.disabled).collect();
        let conditions: Vec<Option<&[u8]>> = records
            .iter()
            .map(|r| r.conditions.as_ref().map(|c| c.bytes()))
            .collect();
        // One statement for any number of tokens (an import of 100k).
        tx.execute(
            &format!(
                "INSERT INTO tokens ({INSERTED})
             SELECT n, ns, ro, d, cs, cn, es, en, cs, re, cb, ps, us, un, di, co
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::bigint[],
                         $7::bigint[], $8::bigint[], $9::boolean[], $10::text[], $11::text[], $12::bigint[],
                         $13::bigint[], $14::boolean[], $15::bytea[])
                  AS t(n, ns, ro, d, cs, cn, es, en, re, cb, ps, us, un, di, co)"
            ),
            &[
                &names,
                &namespaces,
                &roles,
                &digests,
                &create_s,
                &create_n,
                &expire_s,
                &expire_n,
                &retired,
                &created_by,
                &previous,
                &until_s,
                &until_n,
                &disabled,
                &conditions,
            ],
        )
        .await
        .map_err(|e| insert_error(e, names.first().copied().unwrap_or("")))?;
        no_shared_digest(&tx).await?;
        for event in &events {
            record_event(&tx, event).await?;
        }
        let revision = log_changes(&tx, revision, &names).await?;
        tx.commit().await?;
        Ok(revision)
    }

    async fn get(&self, name: &str) -> Result<Option<TokenRecord>> {
        let name = name.to_owned();
        self.read(move |tx| Box::pin(async move { get_one(tx, &name).await }))
            .await
    }

    async fn list(&self, namespace: &str) -> Result<Vec<TokenRecord>> {
        let namespace = namespace.to_owned();
        self.read(move |tx| {
            Box::pin(async move {
                query(
                    tx,
                    &format!(
                        "SELECT {COLUMNS}, {USE_COLUMNS} FROM tokens t {WITH_USE}
                         WHERE t.namespace = $1 ORDER BY t.name"
                    ),
                    &[&namespace],
                )
                .await
            })
        })
        .await
    }

    async fn replace_digest(&self, new: NewDigest, event: AuditEvent) -> Result<Option<(TokenRecord, Revision)>> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        let revision = next_revision(&tx).await?;
        // The time of the change as the service's clock says (its event's).
        let now = event.time.unix_seconds();
        let (until_s, until_n) = split(new.previous_until);
        let until_n = until_n.map(i64::from);
        // With an overlap the current digest becomes the previous one (any
        // earlier overlap ends); without, both are gone.
        let changed = tx
            .execute(
                "UPDATE tokens SET
                     previous_sha256 = CASE WHEN $4::bigint IS NULL THEN NULL ELSE secret_sha256 END,
                     previous_until_seconds = $4, previous_until_nanos = $5,
                     secret_sha256 = $2, update_seconds = $3
                 WHERE name = $1",
                &[&new.name, &new.digest.to_hex(), &now, &until_s, &until_n],
            )
            .await
            .map_err(|e| insert_error(e, &new.name))?;
        if changed == 0 {
            // Nothing changed: the revision stays (the transaction rolls back).
            return Ok(None);
        }
        no_shared_digest(&tx).await?;
        let record = get_one(&tx, &new.name).await?.ok_or(Cause::Vanished)?;
        record_event(&tx, &event).await?;
        let revision = log_changes(&tx, revision, &[&new.name]).await?;
        tx.commit().await?;
        Ok(Some((record, revision)))
    }

    async fn delete(&self, name: &str, event: AuditEvent) -> Result<Option<Revision>> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        let revision = next_revision(&tx).await?;
        let n = tx.execute("DELETE FROM tokens WHERE name = $1", &[&name]).await?;
        if n == 0 {
            return Ok(None);
        }
        tx.execute("DELETE FROM usage WHERE name = $1", &[&name]).await?;
        record_event(&tx, &event).await?;
        let revision = log_changes(&tx, revision, &[name]).await?;
        tx.commit().await?;
        Ok(Some(revision))
    }

    async fn inactivity_policies(&self) -> Result<Vec<(String, String)>> {
        let rows = self
            .conn()
            .await?
            .query(
                "SELECT namespace, policy FROM inactivity_policies ORDER BY namespace",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect::<Result<_, tokio_postgres::Error>>()?)
    }

    async fn set_inactivity_policy(&self, namespace: &str, policy: Option<&str>, event: AuditEvent) -> Result<bool> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        // Under the write lock, as every event: events commit in the order
        // of their numbers, the order the webhooks' outbox reads them in.
        tx.execute("SELECT 1 FROM store_state WHERE id = 1 FOR UPDATE", &[])
            .await?;
        let changed = match policy {
            Some(policy) => {
                tx.execute(
                    "INSERT INTO inactivity_policies (namespace, policy) VALUES ($1, $2)
                     ON CONFLICT (namespace) DO UPDATE SET policy = excluded.policy
                     WHERE inactivity_policies.policy <> excluded.policy",
                    &[&namespace, &policy],
                )
                .await?
            }
            None => {
                tx.execute("DELETE FROM inactivity_policies WHERE namespace = $1", &[&namespace])
                    .await?
            }
        };
        if changed > 0 {
            record_event(&tx, &event).await?;
        }
        tx.commit().await?;
        Ok(changed > 0)
    }

    async fn set_disabled(&self, name: &str, disabled: bool, event: AuditEvent) -> Result<Option<StateSet>> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        // First, as every write: it takes the state row (writes serialise on
        // it) and refuses while the store is behind the gateways.
        let revision = next_revision(&tx).await?;
        // The time of the change as the service's clock says (its event's).
        let now = event.time.unix_seconds();
        let changed = tx
            .execute(
                "UPDATE tokens SET disabled = $2, update_seconds = $3 WHERE name = $1 AND disabled <> $2",
                &[&name, &disabled, &now],
            )
            .await?;
        token_changed(tx, name, revision, changed, &event).await
    }

    async fn set_conditions(
        &self,
        name: &str,
        created: Timestamp,
        expected: Option<Packed>,
        new: Option<Packed>,
        event: AuditEvent,
    ) -> Result<Option<StateSet>> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        let revision = next_revision(&tx).await?;
        let bytes = |c: &Option<Packed>| c.as_ref().map(|c| c.bytes().to_vec());
        // (Not a change of the token's activity: `update_seconds` stays.)
        let changed = tx
            .execute(
                "UPDATE tokens SET conditions = $2
                 WHERE name = $1 AND conditions IS NOT DISTINCT FROM $3 AND conditions IS DISTINCT FROM $2
                   AND create_seconds = $4 AND create_nanos = $5",
                &[
                    &name,
                    &bytes(&new),
                    &bytes(&expected),
                    &created.unix_seconds(),
                    &i64::from(created.subsec_nanos()),
                ],
            )
            .await?;
        token_changed(tx, name, revision, changed, &event).await
    }

    async fn record_usage(&self, uses: Vec<Use>) -> Result<()> {
        if uses.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = uses.iter().map(|u| u.name.as_str()).collect();
        let times: Vec<i64> = uses.iter().map(|u| u.time.unix_seconds()).collect();
        let digests: Vec<String> = uses.iter().map(|u| u.digest.to_hex()).collect();
        // One array per evidence column, NULL where a use did not do it.
        let mut columns: [Vec<Option<i64>>; 7] = Default::default();
        for u in &uses {
            for (column, time) in columns.iter_mut().zip(evidence_of(u)) {
                column.push(time);
            }
        }
        // One statement per batch; a name twice in it counts once (its
        // latest use, and each fact's latest time: max() and greatest()
        // skip NULLs); names of tokens gone meanwhile are skipped.
        let sql = format!(
            "INSERT INTO usage (name, last_use_seconds, {columns})
             SELECT n, max(s), {maxes}
             FROM unnest($1::text[], $2::bigint[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[],
                         $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[])
                  AS u(n, s, d, e0, e1, e2, e3, e4, e5, e6)
             WHERE EXISTS (SELECT 1 FROM tokens WHERE name = n AND (secret_sha256 = d OR previous_sha256 = d))
             GROUP BY n
             ORDER BY n
             ON CONFLICT (name) DO UPDATE
                 SET last_use_seconds = greatest(usage.last_use_seconds, excluded.last_use_seconds), {latest}
             RETURNING name",
            columns = EVIDENCE.join(", "),
            maxes = (0..EVIDENCE.len())
                .map(|i| format!("max(e{i})"))
                .collect::<Vec<_>>()
                .join(", "),
            latest = EVIDENCE
                .map(|c| format!("{c} = greatest(usage.{c}, excluded.{c})"))
                .join(", "),
        );
        let [c0, c1, c2, c3, c4, c5, c6] = &columns;
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        // Rows in name order (`ORDER BY n`): replicas writing the same
        // tokens lock them in the same order, never in a cycle. The names
        // returned are those written: a secret of the token (the name
        // could be another token's by now).
        let recorded: std::collections::HashSet<String> = tx
            .query(&sql, &[&names, &times, &digests, c0, c1, c2, c3, c4, c5, c6])
            .await?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?;
        let with_addresses: Vec<&Use> = uses
            .iter()
            .filter(|u| !u.addresses.is_empty() && recorded.contains(&u.name))
            .collect();
        if !with_addresses.is_empty() {
            // The last addresses, merged in: read under a row lock (replicas
            // merge the same token's reports), written back in one statement.
            let named: Vec<&str> = with_addresses.iter().map(|u| u.name.as_str()).collect();
            let rows = tx
                .query(
                    "SELECT name, addresses FROM usage WHERE name = ANY($1) ORDER BY name FOR UPDATE",
                    &[&named],
                )
                .await?;
            let mut stored: std::collections::HashMap<String, Option<String>> = rows
                .iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .collect::<Result<_, tokio_postgres::Error>>()?;
            for u in &with_addresses {
                if let Some(now) = stored.get_mut(&u.name) {
                    *now = Some(merge_addresses(now.as_deref(), &u.addresses, u.time.unix_seconds()));
                }
            }
            let (names, merged): (Vec<String>, Vec<Option<String>>) = stored.into_iter().unzip();
            if names.is_empty() {
                tx.commit().await?;
                return Ok(());
            }
            tx.execute(
                "UPDATE usage SET addresses = m.a FROM unnest($1::text[], $2::text[]) AS m(n, a) WHERE usage.name = m.n",
                &[&names, &merged],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn events(&self, namespace: &str, before: Option<u64>, limit: u32) -> Result<Vec<(u64, AuditEvent)>> {
        let before = before.and_then(|b| i64::try_from(b).ok()).unwrap_or(i64::MAX);
        let rows = self
            .conn()
            .await?
            .query(
                &format!(
                    "SELECT seq, {EVENT_FIELDS} FROM events
                     WHERE namespace = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3"
                ),
                &[&namespace, &before, &i64::from(limit)],
            )
            .await?;
        rows.iter()
            .map(|r| decode_event(EventRow::read(r)?, namespace))
            .collect()
    }

    async fn load(&self) -> Result<(Head, Vec<TokenRecord>)> {
        self.read(|tx| {
            Box::pin(async move {
                let head = head(tx).await?;
                let records = query(
                    tx,
                    &format!("SELECT {COLUMNS} FROM tokens t WHERE NOT t.retired ORDER BY t.name"),
                    &[],
                )
                .await?;
                Ok((head, records))
            })
        })
        .await
    }

    async fn changes_since(&self, since: Revision) -> Result<Changes> {
        self.read(move |tx| {
            Box::pin(async move {
                let head = head(tx).await?;
                let from: i64 = tx
                    .query_one("SELECT changes_from FROM store_state WHERE id = 1", &[])
                    .await?
                    .try_get(0)?;
                if let Some(answer) = changes::answer_unread(since, Revision::from_i64(from), head) {
                    return Ok(answer);
                }
                let rows = tx
                    .query(
                        &format!(
                            "SELECT c.name, t.name IS NOT NULL, {COLUMNS}, {USE_COLUMNS}
                             FROM (SELECT DISTINCT name FROM changes WHERE revision > $1) c
                             LEFT JOIN tokens t ON t.name = c.name {WITH_USE}
                             ORDER BY c.name"
                        ),
                        &[&since.to_i64()],
                    )
                    .await?;
                let mut changed = Vec::with_capacity(rows.len());
                for row in rows {
                    let name: String = row.try_get(0)?;
                    let exists: bool = row.try_get(1)?;
                    let record = if exists {
                        Some(decode(Row::read(&row, 2)?)?)
                    } else {
                        None
                    };
                    changed.push((name, record));
                }
                Ok(Changes::Since { head, changed })
            })
        })
        .await
    }

    async fn head(&self) -> Result<Head> {
        let conn = self.conn().await?;
        head_of(&conn.query_one(HEAD, &[]).await?)
    }

    async fn mark_behind(&self, seen: Position) -> Result<Head> {
        self.change_head(|now| now.is_behind(seen).then_some(HeadChange::Behind(seen)))
            .await
    }

    async fn new_epoch(&self) -> Result<Head> {
        self.change_head(|now| Some(HeadChange::NewEpoch(next_epoch(now))))
            .await
    }

    async fn prune_events(&self, before: Timestamp, limit: u32) -> Result<u64> {
        Ok(self
            .conn()
            .await?
            .execute(
                "DELETE FROM events WHERE seq IN
                   (SELECT seq FROM events WHERE time_seconds < $1 ORDER BY time_seconds LIMIT $2)",
                &[&before.unix_seconds(), &i64::from(limit)],
            )
            .await?)
    }

    async fn events_after(&self, after: u64, limit: u32) -> Result<Vec<(u64, AuditEvent)>> {
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let rows = self
            .conn()
            .await?
            .query(
                &format!("SELECT seq, {EVENT_FIELDS}, namespace FROM events WHERE seq > $1 ORDER BY seq LIMIT $2"),
                &[&after, &i64::from(limit)],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let namespace: String = r.try_get(17)?;
                decode_event(EventRow::read(r)?, &namespace)
            })
            .collect()
    }

    async fn claim_outbox(&self, endpoint: &str, holder: &str, now_ms: i64, until_ms: i64) -> Result<Option<u64>> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        // A new endpoint starts after the newest event: read under the
        // write lock, so that no write commits an older one after it.
        tx.execute("SELECT 1 FROM store_state WHERE id = 1 FOR UPDATE", &[])
            .await?;
        tx.execute(
            "INSERT INTO outbox (endpoint, cursor, holder, lease_until_ms)
             SELECT $1, coalesce(max(seq), 0), NULL, 0 FROM events
             ON CONFLICT (endpoint) DO NOTHING",
            &[&endpoint],
        )
        .await?;
        let claimed = tx
            .query_opt(
                "UPDATE outbox SET holder = $2, lease_until_ms = $4
                 WHERE endpoint = $1 AND (holder IS NULL OR holder = $2 OR lease_until_ms <= $3)
                 RETURNING cursor",
                &[&endpoint, &holder, &now_ms, &until_ms],
            )
            .await?;
        tx.commit().await?;
        match claimed {
            Some(row) => Ok(Some(u64::try_from(row.try_get::<_, i64>(0)?).unwrap_or(0))),
            None => Ok(None),
        }
    }

    async fn advance_outbox(&self, endpoint: &str, holder: &str, seq: u64) -> Result<bool> {
        let seq = i64::try_from(seq).unwrap_or(i64::MAX);
        let moved = self
            .conn()
            .await?
            .execute(
                "UPDATE outbox SET cursor = greatest(cursor, $3) WHERE endpoint = $1 AND holder = $2",
                &[&endpoint, &holder, &seq],
            )
            .await?;
        Ok(moved == 1)
    }

    async fn warn_expiring(&self, scan: ExpiryScan) -> Result<Vec<AuditEvent>> {
        let now = scan.now;
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        // Events are written under the write lock, in the order of the
        // log the webhooks read (see `events_after`).
        tx.execute("SELECT 1 FROM store_state WHERE id = 1 FOR UPDATE", &[])
            .await?;
        let window = super::warning_window(&scan);
        let lead_s = window.lead_seconds;
        let ((start_s, start_n), (until_s, until_n)) = (window.from, window.until);
        let due = query(
            &tx,
            &format!(
                "SELECT {COLUMNS} FROM tokens t
                 WHERE NOT t.retired AND t.expire_seconds IS NOT NULL
                   AND (t.expire_seconds > $1 OR (t.expire_seconds = $1 AND t.expire_nanos > $2))
                   AND (t.expire_seconds < $3 OR (t.expire_seconds = $3 AND t.expire_nanos <= $6))
                   AND NOT EXISTS (SELECT 1 FROM expiry_warnings w WHERE w.name = t.name
                                   AND w.expire_seconds = t.expire_seconds AND w.lead_seconds = $4)
                 ORDER BY t.expire_seconds, t.expire_nanos, t.name LIMIT $5"
            ),
            &[
                &start_s,
                &i64::from(start_n),
                &until_s,
                &lead_s,
                &i64::from(scan.limit),
                &i64::from(until_n),
            ],
        )
        .await?;
        let mut events = Vec::with_capacity(due.len());
        for token in &due {
            let Some(expire) = token.expire_time else { continue };
            tx.execute(
                "INSERT INTO expiry_warnings (name, expire_seconds, lead_seconds) VALUES ($1, $2, $3)",
                &[&token.name, &expire.unix_seconds(), &lead_s],
            )
            .await?;
            let event = super::expiring_event(token, now, scan.actor);
            record_event(&tx, &event).await?;
            events.push(event);
        }
        tx.commit().await?;
        Ok(events)
    }

    async fn retire_expired(&self, cutoff: Timestamp) -> Result<Option<Revision>> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        let revision = next_revision(&tx).await?;
        let (s, n) = (cutoff.unix_seconds(), i64::from(cutoff.subsec_nanos()));
        let mut names: Vec<String> = Vec::new();
        for sql in [
            "UPDATE tokens SET retired = true
             WHERE NOT retired AND expire_seconds IS NOT NULL
               AND (expire_seconds < $1 OR (expire_seconds = $1 AND expire_nanos <= $2))
             RETURNING name",
            "UPDATE tokens SET previous_sha256 = NULL, previous_until_seconds = NULL, previous_until_nanos = NULL
             WHERE previous_sha256 IS NOT NULL
               AND (previous_until_seconds < $1 OR (previous_until_seconds = $1 AND previous_until_nanos <= $2))
             RETURNING name",
        ] {
            let rows = tx.query(sql, &[&s, &n]).await?;
            for row in rows {
                names.push(row.try_get(0)?);
            }
        }
        if names.is_empty() {
            return Ok(None);
        }
        names.sort();
        names.dedup();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let revision = log_changes(&tx, revision, &refs).await?;
        tx.commit().await?;
        Ok(Some(revision))
    }

    async fn next_expiry(&self) -> Result<Option<Timestamp>> {
        let conn = self.conn().await?;
        let mut next: Option<Timestamp> = None;
        for sql in [
            "SELECT expire_seconds, expire_nanos FROM tokens
             WHERE NOT retired AND expire_seconds IS NOT NULL
             ORDER BY expire_seconds, expire_nanos LIMIT 1",
            "SELECT previous_until_seconds, previous_until_nanos FROM tokens
             WHERE previous_sha256 IS NOT NULL
             ORDER BY previous_until_seconds, previous_until_nanos LIMIT 1",
        ] {
            let row = conn.query_opt(sql, &[]).await?;
            if let Some(row) = row {
                let s: i64 = row.try_get(0)?;
                let n: i64 = row.try_get(1)?;
                if let Some(t) = time(s, n) {
                    next = Some(next.map_or(t, |x| x.min(t)));
                }
            }
        }
        Ok(next)
    }

    fn lineage(&self) -> Lineage {
        self.lineage
    }

    fn change_feed(&self) -> Option<watch::Receiver<u64>> {
        self.listener().map(|l| l.changes.clone())
    }
}

/// A fresh schema on the tests' server (`$APITOKENS_TEST_POSTGRES`, set by
/// `make unit` through scripts/postgres.sh) for each test: `None` without a
/// server, unless `$APITOKENS_REQUIRE_POSTGRES` is set (then a missing server
/// fails the test instead of skipping it).
#[cfg(test)]
pub(crate) async fn test_url() -> Option<String> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let Ok(base) = std::env::var("APITOKENS_TEST_POSTGRES") else {
        assert!(
            std::env::var_os("APITOKENS_REQUIRE_POSTGRES").is_none(),
            "APITOKENS_REQUIRE_POSTGRES is set but APITOKENS_TEST_POSTGRES is not"
        );
        eprintln!("no PostgreSQL for the tests (APITOKENS_TEST_POSTGRES): skipped");
        return None;
    };
    let mut tag = [0u8; 4];
    getrandom::fill(&mut tag).unwrap();
    let schema = format!(
        "t{}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        u32::from_le_bytes(tag)
    );
    let (client, connection) = tokio_postgres::connect(&base, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client.batch_execute(&format!("CREATE SCHEMA {schema}")).await.unwrap();
    let sep = if base.contains('?') { '&' } else { '?' };
    Some(format!("{base}{sep}options=-csearch_path%3D{schema}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::contract::{put, record, store_contract_tests};
    use apitokens_core::Role;
    use std::sync::Arc;
    use std::time::Duration;

    store_contract_tests!(async {
        let url = test_url().await?;
        let store = PostgresStore::connect(&url).await.unwrap();
        Some((Box::new(store) as Box<dyn Store>, ()))
    });

    #[tokio::test]
    async fn replicas_share_lineage_revision_and_notifications() {
        let Some(url) = test_url().await else { return };
        // Two processes opening a new database at once: one applies the
        // migrations, both read the same lineage.
        let (a, b) = tokio::join!(PostgresStore::connect(&url), PostgresStore::connect(&url));
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.lineage(), b.lineage());
        assert_ne!(a.lineage(), [0; LINEAGE_LEN]);
        let mut feed = b.change_feed().unwrap();
        // The listener is connected once it has announced itself.
        tokio::time::timeout(Duration::from_secs(5), feed.changed())
            .await
            .unwrap()
            .unwrap();
        let r = put(&a, "namespaces/default/apitokens/a", Role::Owner, 1).await;
        tokio::time::timeout(Duration::from_secs(5), feed.changed())
            .await
            .expect("a write on one replica notifies the other")
            .unwrap();
        assert_eq!(b.revision().await.unwrap(), r);
        let reopened = PostgresStore::connect(&url).await.unwrap();
        assert_eq!(reopened.lineage(), a.lineage());
    }

    #[tokio::test]
    async fn the_quota_holds_under_concurrent_replicas() {
        let Some(url) = test_url().await else { return };
        let stores: Vec<Arc<PostgresStore>> = futures_join(&url, 4).await;
        let mut tasks = Vec::new();
        for i in 0..40u8 {
            let store = Arc::clone(&stores[usize::from(i) % stores.len()]);
            tasks.push(tokio::spawn(async move {
                store
                    .insert(
                        vec![record(&format!("namespaces/q/apitokens/t{i}"), Role::Viewer, i)],
                        Some(10),
                        vec![],
                    )
                    .await
            }));
        }
        let mut ok = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => ok += 1,
                Err(StoreError::QuotaExceeded { .. }) => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(ok, 10, "exactly the quota, however the writes interleave");
        assert_eq!(stores[0].list("q").await.unwrap().len(), 10);
    }

    async fn futures_join(url: &str, n: usize) -> Vec<Arc<PostgresStore>> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(Arc::new(PostgresStore::connect(url).await.unwrap()));
        }
        out
    }

    /// Somebody's session holds the state row (a stuck migration, a manual
    /// `SELECT ... FOR UPDATE`): a write gives up after the statement
    /// timeout with an error the API answers 503, the server rolls it back,
    /// and once the row is free the store writes again.
    #[tokio::test]
    async fn a_write_blocked_by_a_lock_gives_up_and_leaves_nothing() {
        let Some(url) = test_url().await else { return };
        let default = PostgresStore::connect(&url).await.unwrap();
        let row = default
            .conn()
            .await
            .unwrap()
            .query_one("SHOW statement_timeout", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "30s");
        let store = PostgresStore::connect(&format!("{url}%20-c%20statement_timeout%3D300"))
            .await
            .unwrap();
        let before = store.revision().await.unwrap();
        let mut holder = store.conn().await.unwrap();
        let held = holder.transaction().await.unwrap();
        held.execute("SELECT revision FROM store_state WHERE id = 1 FOR UPDATE", &[])
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let name = "namespaces/default/apitokens/blocked";
        let write = store.insert(vec![record(name, Role::Owner, 1)], None, vec![]);
        let err = tokio::time::timeout(Duration::from_secs(10), write)
            .await
            .expect("the write gave up")
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::Unavailable(Cause::Statement { code, .. }) if *code == SqlState::QUERY_CANCELED),
            "{err}"
        );
        assert!(err.to_string().contains("57014"), "{err}");
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "{:?}",
            started.elapsed()
        );
        held.rollback().await.unwrap();
        assert_eq!(store.get(name).await.unwrap(), None);
        assert_eq!(store.revision().await.unwrap(), before);
        assert!(put(&store, name, Role::Owner, 2).await > before);
    }

    #[tokio::test]
    async fn a_row_that_cannot_be_read_is_an_error_naming_it() {
        let Some(url) = test_url().await else { return };
        let store = PostgresStore::connect(&url).await.unwrap();
        put(&store, "namespaces/default/apitokens/a", Role::Owner, 1).await;
        store
            .conn()
            .await
            .unwrap()
            .execute(
                "INSERT INTO tokens VALUES ('namespaces/default/apitokens/bad', 'default', 'owner', $1,
                     1, 5000000000, NULL, NULL, 1, false, NULL, NULL, NULL, NULL, false)",
                &[&"cd".repeat(32)],
            )
            .await
            .unwrap();
        crate::store::contract::a_bad_row_is_named(&store, "namespaces/default/apitokens/bad").await;
    }

    /// A database a previous release migrated (version 5, no `disabled`
    /// column, no outbox, no evidence), opened by this one: migrations 6 to
    /// 8 applied once, every token enabled.
    #[tokio::test]
    async fn a_version_5_database_is_migrated_with_every_token_enabled() {
        let Some(url) = test_url().await else { return };
        let store = PostgresStore::connect(&url).await.unwrap();
        let name = "namespaces/default/apitokens/old";
        put(&store, name, Role::Owner, 1).await;
        store
            .conn()
            .await
            .unwrap()
            .batch_execute(
                "ALTER TABLE tokens DROP COLUMN disabled;
                 ALTER TABLE tokens DROP COLUMN conditions;
                 ALTER TABLE usage DROP COLUMN addresses;
                 DROP TABLE inactivity_policies; ALTER TABLE events DROP COLUMN policy;
                 ALTER TABLE events DROP COLUMN conditions;
                 DROP TABLE outbox; DROP TABLE expiry_warnings;
                 ALTER TABLE usage DROP COLUMN read_seconds, DROP COLUMN write_seconds,
                     DROP COLUMN tokens_seconds, DROP COLUMN past_viewer_seconds,
                     DROP COLUMN past_editor_seconds, DROP COLUMN past_owner_seconds,
                     DROP COLUMN unreported_seconds;
                 DELETE FROM apitokens_migrations WHERE version >= 6;",
            )
            .await
            .unwrap();
        drop(store);
        let store = PostgresStore::connect(&url).await.unwrap();
        assert!(!store.get(name).await.unwrap().unwrap().disabled);
        let applied: i32 = store
            .conn()
            .await
            .unwrap()
            .query_one("SELECT max(version) FROM apitokens_migrations", &[])
            .await
            .unwrap()
            .get(0);
        // 6, then what came after it (7: the webhooks' outbox; 8: the
        // evidence; 9: conditions; 10: the last addresses; 11: inactivity
        // policies; 12: the conditions in events).
        assert_eq!(applied, 12);
        let set = store
            .set_disabled(name, true, crate::store::contract::test_event())
            .await
            .unwrap()
            .unwrap();
        assert!(set.changed && set.token.disabled);
        drop(store);
        let again = PostgresStore::connect(&url).await.unwrap();
        assert!(again.get(name).await.unwrap().unwrap().disabled);
    }

    #[tokio::test]
    async fn a_newer_schema_is_refused_and_errors_never_quote_rows() {
        let Some(url) = test_url().await else { return };
        let store = PostgresStore::connect(&url).await.unwrap();
        let conn = store.conn().await.unwrap();
        // A unique violation's DETAIL quotes the row: the error must not.
        let err = conn
            .execute(
                "INSERT INTO tokens (name, namespace, role, secret_sha256, create_seconds, create_nanos,
                                     update_seconds)
                 VALUES ('x', 'x', 'owner', $1, 1, 1, 1), ('y', 'x', 'owner', $1, 1, 1, 1)",
                &[&"ef".repeat(32)],
            )
            .await
            .unwrap_err();
        let shown = StoreError::from(err).to_string();
        assert!(shown.contains("23505") && !shown.contains("efef"), "{shown}");
        conn.execute(
            "INSERT INTO apitokens_migrations (version, name) VALUES (99, 'future')",
            &[],
        )
        .await
        .unwrap();
        let err = PostgresStore::connect(&url).await.err().unwrap();
        assert!(err.to_string().contains("schema version 99"), "{err}");
    }
}
