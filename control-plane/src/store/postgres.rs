//! PostgreSQL: the store that several `serve` replicas share.
//!
//! - A pool of connections (deadpool-postgres over tokio-postgres), TLS with
//!   rustls when the URL asks for it (`sslmode`), the server's certificate
//!   always verified (`sslrootcert`, or the system's roots).
//! - Versioned migrations (`control-plane/migrations/postgres/`), applied in
//!   one transaction under an advisory lock when a process opens the store.
//! - Every write is one transaction that first locks the one `store_state`
//!   row to advance the revision: writes are serialised across replicas,
//!   commit in revision order, and the per-namespace quota counted inside a
//!   write sees every earlier write. It logs the names it changed and
//!   `NOTIFY apitokens_changes`, delivered at commit.
//! - One more connection per process LISTENs (lazily, for `serve`): to
//!   `apitokens_changes`, which wakes the publisher, and `apitokens_envoys`,
//!   which tells the replica coordinator that another replica's Envoys moved.
//!   A reconnection wakes both, since notifications sent meanwhile are lost.
//!
//! The URL may carry a password: it is never logged or shown; messages name
//! the server by [`PostgresStore::describe`] (user, host, port, database).

use super::row::{decode, decode_event, split, EventRow, Row, COLUMNS, WITH_USE};
use super::sqlite::{CHANGES_KEPT, CHANGES_PER_WRITE};
use super::{
    next_epoch, AuditEvent, Changes, Credential, Epoch, Head, Position, Revision, Store, StoreError, TokenRecord, Use,
};
use apitokens_core::compact::{Lineage, LINEAGE_LEN};
use apitokens_core::table::Digest;
use apitokens_core::Timestamp;
use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::watch;
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, IsolationLevel, Transaction};
use tokio_postgres_rustls::MakeRustlsConnect;

/// The migrations, in order; version N is the N-th.
const MIGRATIONS: &[(&str, &str)] = &[
    ("0001_tokens", include_str!("../../migrations/postgres/0001_tokens.sql")),
    (
        "0002_replicas",
        include_str!("../../migrations/postgres/0002_replicas.sql"),
    ),
    (
        "0003_rotation_usage_audit",
        include_str!("../../migrations/postgres/0003_rotation_usage_audit.sql"),
    ),
    (
        "0004_epochs_and_digests",
        include_str!("../../migrations/postgres/0004_epochs_and_digests.sql"),
    ),
    (
        "0005_audit_credential_peer",
        include_str!("../../migrations/postgres/0005_audit_credential_peer.sql"),
    ),
];

/// Serialises schema changes between processes opening the store at once
/// (an arbitrary constant: "apitoken" in ASCII).
const MIGRATION_LOCK: i64 = 0x6170_6974_6f6b_656e;

pub(crate) const CHANGES_CHANNEL: &str = "apitokens_changes";
pub(crate) const ENVOYS_CHANNEL: &str = "apitokens_envoys";

/// The longest a statement may run unless the URL says otherwise: far above
/// any request's statements (milliseconds) and an import of 100k tokens in
/// one statement (about a second), far below "forever".
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Connections per process: writes serialise on the state row anyway, and
/// reads are short.
const POOL_SIZE: usize = 8;

pub struct PostgresStore {
    pool: Pool,
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    lineage: Lineage,
    described: String,
    listener: OnceLock<Option<Listener>>,
}

/// The notification connection's signals (counters that change at each
/// notification or reconnection).
struct Listener {
    changes: watch::Receiver<u64>,
    envoys: watch::Receiver<u64>,
    /// Dropped with the store: ends the listening task.
    _stop: watch::Sender<()>,
}

/// A database error in words that never carry a value: PostgreSQL's DETAIL
/// lines quote rows ("Key (name)=(...)"), so only the message and code are kept.
fn unavailable(e: tokio_postgres::Error) -> StoreError {
    StoreError::Unavailable(match e.as_db_error() {
        Some(db) => format!("{}: {} (SQLSTATE {})", db.severity(), db.message(), db.code().code()),
        None => {
            // The cause says what failed ("invalid peer certificate:
            // UnknownIssuer", "Connection refused"); it never holds the URL.
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                text = format!("{text}: {cause}");
                source = cause.source();
            }
            if text.contains("certificate") {
                text.push_str(
                    " (the server's certificate is checked against sslrootcert in the URL, or the system's roots)",
                );
            }
            text
        }
    })
}

fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => unavailable(e),
        other => StoreError::Unavailable(other.to_string()),
    }
}

/// What the URL asked of TLS, taken out before tokio-postgres reads the rest
/// (it knows neither `sslrootcert` nor the `verify-*` modes).
#[derive(Debug, Default, PartialEq, Eq)]
struct TlsParams {
    root_cert: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
    /// A warning for the log: TLS that a man in the middle can turn off,
    /// to a server beyond this host.
    downgradable: Option<String>,
}

/// Whether every host of the URL is on this machine: a Unix socket,
/// `localhost`, or a loopback address.
fn local_only(config: &tokio_postgres::Config) -> bool {
    config.get_hosts().iter().all(|host| match host {
        tokio_postgres::config::Host::Tcp(name) => {
            name == "localhost"
                || name
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        #[cfg(unix)]
        tokio_postgres::config::Host::Unix(_) => true,
    })
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Splits a `postgres://` URL into what tokio-postgres reads and the TLS
/// parameters. Errors name the parameter, never the URL (it may hold a
/// password).
fn parse_url(url: &str) -> Result<(tokio_postgres::Config, TlsParams), String> {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut tls = TlsParams::default();
    let mut kept = Vec::new();
    let mut sslmode = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let decoded = || percent_decode(value).ok_or_else(|| format!("--store: {key}: not a valid URL value"));
        match key {
            "sslrootcert" => tls.root_cert = Some(PathBuf::from(decoded()?)),
            "sslcert" => tls.client_cert = Some(PathBuf::from(decoded()?)),
            "sslkey" => tls.client_key = Some(PathBuf::from(decoded()?)),
            // The certificate is always verified, host name included, so
            // libpq's strictest modes are what `require` does here.
            "sslmode" => match value {
                "disable" | "prefer" | "require" => {
                    sslmode = Some(value);
                    kept.push(pair.to_owned());
                }
                "verify-ca" | "verify-full" => {
                    sslmode = Some(value);
                    kept.push("sslmode=require".to_owned());
                }
                _ => {
                    return Err(
                        "--store: sslmode must be disable, prefer, require, verify-ca or verify-full".to_owned(),
                    )
                }
            },
            _ => kept.push(pair.to_owned()),
        }
    }
    if tls.client_cert.is_some() != tls.client_key.is_some() {
        return Err("--store: sslcert and sslkey go together".to_owned());
    }
    let rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    let mut config =
        tokio_postgres::Config::from_str(&rest).map_err(|e| format!("--store: not a usable PostgreSQL URL: {e}"))?;
    // libpq's default, `prefer`, takes whatever the network answers: a man
    // in the middle says "no TLS" and reads or writes the store (an owner's
    // digest inserted is a namespace taken over). Beyond this machine, TLS
    // is required unless the URL says otherwise, and saying otherwise is
    // logged as the risk it is.
    if !local_only(&config) {
        match sslmode {
            None => {
                config.ssl_mode(tokio_postgres::config::SslMode::Require);
            }
            Some(mode @ ("disable" | "prefer")) => {
                tls.downgradable = Some(format!(
                    "--store: sslmode={mode} to a server beyond this machine: whoever sits on the network between \
                     can read and change every token (remove sslmode to require TLS, the default)"
                ));
            }
            Some(_) => {}
        }
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(5));
    }
    config.application_name("apitokens");
    // A dead peer (a failed-over server, a cut network) is noticed within
    // seconds, not after the kernel's two hours of keepalive or its quarter
    // of an hour of retransmissions: idle 10 s + 3 probes 5 s apart, and
    // unacknowledged data gives up after 30 s.
    config.keepalives_idle(Duration::from_secs(10));
    config.keepalives_interval(Duration::from_secs(5));
    config.keepalives_retries(3);
    config.tcp_user_timeout(Duration::from_secs(30));
    // A database that is up but does not answer (a lock held by somebody's
    // session, an overloaded server) holds a request for at most this long,
    // then the request answers 503; the server rolls the statement back, so
    // nothing half-done is left. Set in the URL to change it
    // (`options=-c%20statement_timeout%3D60s`, 0 for none).
    let options = config.get_options().unwrap_or_default();
    if !options.contains("statement_timeout") {
        let joined = format!("{options} -c statement_timeout={}", STATEMENT_TIMEOUT.as_millis());
        config.options(joined.trim_start());
    }
    Ok((config, tls))
}

fn read_pem(what: &str, path: &PathBuf) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("--store: {what} {}: {e}", path.display()))
}

/// rustls for the database connections: the server's certificate verified
/// against `sslrootcert` (or the system's roots) and its host name.
fn tls_connector(params: &TlsParams) -> Result<MakeRustlsConnect, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    match &params.root_cert {
        Some(path) => {
            let pem = read_pem("sslrootcert", path)?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| format!("--store: sslrootcert {}: {e}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("--store: sslrootcert {}: {e}", path.display()))?;
            }
            if roots.is_empty() {
                return Err(format!("--store: sslrootcert {}: no certificate in it", path.display()));
            }
        }
        None => {
            // Unreadable system certificates only matter if TLS is used.
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("--store: TLS: {e}"))?
        .with_root_certificates(roots);
    let config = match (&params.client_cert, &params.client_key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_slice_iter(&read_pem("sslcert", cert)?)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("--store: sslcert {}: {e}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_slice(&read_pem("sslkey", key)?)
                .map_err(|e| format!("--store: sslkey {}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("--store: sslcert/sslkey: {e}"))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(MakeRustlsConnect::new(config))
}

/// `user@host:port/dbname`: the server without the password.
fn describe(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgres://{}@{host}:{port}/{}",
        config.get_user().unwrap_or("-"),
        config.get_dbname().unwrap_or("-")
    )
}

impl PostgresStore {
    /// Connects, applies the migrations this database lacks, and reads the
    /// store's lineage (made by the first process that opened it).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let (config, params) = parse_url(url).map_err(StoreError::Unavailable)?;
        if let Some(warning) = &params.downgradable {
            tracing::warn!("{warning}");
        }
        let tls = tls_connector(&params).map_err(StoreError::Unavailable)?;
        let described = describe(&config);
        let manager = Manager::from_config(
            config.clone(),
            tls.clone(),
            ManagerConfig {
                // A connection the server closed (a restart) is replaced at
                // checkout; a broken one fails its request with 503 once.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(5)))
            .create_timeout(Some(Duration::from_secs(5)))
            .recycle_timeout(Some(Duration::from_secs(2)))
            .build()
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let mut store = Self {
            pool,
            config,
            tls,
            lineage: [0; LINEAGE_LEN],
            described,
            listener: OnceLock::new(),
        };
        store.lineage = store
            .migrate()
            .await
            .map_err(|e| StoreError::Unavailable(format!("{}: {e}", store.described)))?;
        Ok(store)
    }

    /// The server and database, without the password: for messages.
    pub fn describe(&self) -> &str {
        &self.described
    }

    pub(crate) async fn conn(&self) -> Result<Object, StoreError> {
        self.pool.get().await.map_err(pool_error)
    }

    async fn migrate(&self) -> Result<Lineage, StoreError> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await.map_err(unavailable)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(unavailable)?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS apitokens_migrations (
                 version    integer PRIMARY KEY,
                 name       text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now()
             )",
        )
        .await
        .map_err(unavailable)?;
        let applied: i32 = tx
            .query_one("SELECT coalesce(max(version), 0) FROM apitokens_migrations", &[])
            .await
            .and_then(|r| r.try_get(0))
            .map_err(unavailable)?;
        let known = i32::try_from(MIGRATIONS.len()).unwrap_or(i32::MAX);
        if applied > known {
            return Err(StoreError::Unavailable(format!(
                "the database has schema version {applied}; this apitokens understands {known}"
            )));
        }
        for (version, (name, sql)) in (1..).zip(MIGRATIONS).skip(usize::try_from(applied).unwrap_or(0)) {
            tx.batch_execute(sql).await.map_err(unavailable)?;
            tx.execute(
                "INSERT INTO apitokens_migrations (version, name) VALUES ($1, $2)",
                &[&version, name],
            )
            .await
            .map_err(unavailable)?;
            tracing::info!("store: applied migration {name}");
        }
        let mut lineage = [0u8; LINEAGE_LEN];
        getrandom::fill(&mut lineage)
            .map_err(|e| StoreError::Unavailable(format!("the OS random source failed: {e}")))?;
        tx.execute(
            "INSERT INTO store_state (id, revision, changes_from, lineage, epoch) VALUES (1, 0, 0, $1, $2)
             ON CONFLICT (id) DO NOTHING",
            &[&&lineage[..], &epoch_i64(Epoch::after(Epoch(0)))],
        )
        .await
        .map_err(unavailable)?;
        let stored: Vec<u8> = tx
            .query_one("SELECT lineage FROM store_state WHERE id = 1", &[])
            .await
            .and_then(|r| r.try_get(0))
            .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        stored
            .try_into()
            .map_err(|_| StoreError::Unavailable("store_state.lineage is not 16 bytes".to_owned()))
    }

    /// A consistent read: one snapshot across its statements.
    async fn read<T>(&self, f: impl for<'t> FnOnce(&'t Transaction<'t>) -> ReadFuture<'t, T>) -> Result<T, StoreError> {
        let mut conn = self.conn().await?;
        let tx = conn
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(unavailable)?;
        let out = f(&tx).await?;
        tx.commit().await.map_err(unavailable)?;
        Ok(out)
    }

    fn listener(&self) -> Option<&Listener> {
        self.listener
            .get_or_init(|| {
                let handle = tokio::runtime::Handle::try_current().ok()?;
                let (changes_tx, changes) = watch::channel(0u64);
                let (envoys_tx, envoys) = watch::channel(0u64);
                let (stop, stopped) = watch::channel(());
                handle.spawn(listen(
                    self.config.clone(),
                    self.tls.clone(),
                    self.described.clone(),
                    changes_tx,
                    envoys_tx,
                    stopped,
                ));
                Some(Listener {
                    changes,
                    envoys,
                    _stop: stop,
                })
            })
            .as_ref()
    }

    /// Changes at every notification that another replica's Envoy streams
    /// changed (and at every reconnection of the listening connection).
    pub(crate) fn envoy_feed(&self) -> Option<watch::Receiver<u64>> {
        self.listener().map(|l| l.envoys.clone())
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
    async fn change_head(&self, change: impl FnOnce(&Head) -> Option<HeadChange>) -> Result<Head, StoreError> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await.map_err(unavailable)?;
        let now = head_of(
            &tx.query_one(&format!("{HEAD} FOR UPDATE"), &[])
                .await
                .map_err(unavailable)?,
        )?;
        let what = match change(&now) {
            None => None,
            Some(HeadChange::Behind(seen)) => {
                tx.execute(
                    "UPDATE store_state SET behind_epoch = $1, behind_revision = $2 WHERE id = 1",
                    &[&epoch_i64(seen.epoch), &to_i64(seen.revision)],
                )
                .await
                .map_err(unavailable)?;
                Some("behind")
            }
            Some(HeadChange::NewEpoch(next)) => {
                // Nothing before the new epoch is in the change log: everyone reloads.
                tx.execute("DELETE FROM changes", &[]).await.map_err(unavailable)?;
                tx.execute(
                    "UPDATE store_state SET epoch = $1, revision = $2, changes_from = $2,
                         behind_epoch = NULL, behind_revision = NULL WHERE id = 1",
                    &[&epoch_i64(next.epoch), &to_i64(next.revision)],
                )
                .await
                .map_err(unavailable)?;
                Some("epoch")
            }
        };
        if let Some(what) = what {
            tx.execute("SELECT pg_notify($1, $2)", &[&CHANGES_CHANNEL, &what])
                .await
                .map_err(unavailable)?;
        }
        let after = head(&tx).await?;
        tx.commit().await.map_err(unavailable)?;
        Ok(after)
    }
}

/// Holds a LISTEN connection, reconnecting with backoff, until `stop` closes.
async fn listen(
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    described: String,
    changes: watch::Sender<u64>,
    envoys: watch::Sender<u64>,
    mut stop: watch::Receiver<()>,
) {
    let bump = |tx: &watch::Sender<u64>| tx.send_modify(|n| *n = n.wrapping_add(1));
    let mut backoff = Duration::from_millis(100);
    let mut connected_before = false;
    loop {
        let session = async {
            let (client, mut connection) = config.connect(tls.clone()).await.map_err(unavailable)?;
            let (note_tx, mut notes) = tokio::sync::mpsc::unbounded_channel::<String>();
            let driver = tokio::spawn(async move {
                while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                    match message {
                        Ok(AsyncMessage::Notification(n)) => {
                            if note_tx.send(n.channel().to_owned()).is_err() {
                                break;
                            }
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
            });
            let listening = client
                .batch_execute(&format!("LISTEN {CHANGES_CHANNEL}; LISTEN {ENVOYS_CHANNEL}"))
                .await
                .map_err(unavailable);
            if let Err(e) = listening {
                driver.abort();
                return Err(e);
            }
            if connected_before {
                tracing::info!("store: notifications from {described} again");
            }
            // Whatever was notified while nobody listened: look now.
            bump(&changes);
            bump(&envoys);
            while let Some(channel) = notes.recv().await {
                match channel.as_str() {
                    CHANGES_CHANNEL => bump(&changes),
                    ENVOYS_CHANNEL => bump(&envoys),
                    _ => {}
                }
            }
            driver.abort();
            Ok::<(), StoreError>(())
        };
        tokio::select! {
            result = session => {
                match result {
                    Ok(()) => tracing::warn!("store: lost the notification connection to {described}; reconnecting"),
                    Err(e) if connected_before => tracing::debug!("store: notifications: {e}"),
                    Err(e) => tracing::warn!("store: cannot listen for notifications from {described} (retrying): {e}"),
                }
                connected_before = true;
            }
            _ = stop.changed() => return,
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

type ReadFuture<'t, T> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, StoreError>> + Send + 't>>;

fn revision_of(value: i64) -> Revision {
    Revision(u64::try_from(value).unwrap_or(0))
}

fn to_i64(revision: Revision) -> i64 {
    i64::try_from(revision.0).unwrap_or(i64::MAX)
}

fn epoch_i64(epoch: Epoch) -> i64 {
    i64::try_from(epoch.0).unwrap_or(i64::MAX)
}

const HEAD: &str = "SELECT epoch, revision, behind_epoch, behind_revision FROM store_state WHERE id = 1";

fn head_of(row: &tokio_postgres::Row) -> Result<Head, StoreError> {
    let at = |e: i64, r: i64| Position::new(Epoch(u64::try_from(e).unwrap_or(0)), revision_of(r));
    let behind_epoch: Option<i64> = row.try_get(2).map_err(unavailable)?;
    let behind_revision: Option<i64> = row.try_get(3).map_err(unavailable)?;
    Ok(Head {
        at: at(
            row.try_get(0).map_err(unavailable)?,
            row.try_get(1).map_err(unavailable)?,
        ),
        behind: behind_epoch.zip(behind_revision).map(|(e, r)| at(e, r)),
    })
}

async fn head(tx: &Transaction<'_>) -> Result<Head, StoreError> {
    head_of(&tx.query_one(HEAD, &[]).await.map_err(unavailable)?)
}

/// Locks the state row and advances the revision: the first statement of
/// every write (see the module's notes). Refuses (the transaction rolls back
/// when dropped) while the store is behind the gateways (`Head::behind`).
async fn next_revision(tx: &Transaction<'_>) -> Result<i64, StoreError> {
    let row = tx
        .query_one(
            "UPDATE store_state SET revision = revision + 1 WHERE id = 1
             RETURNING epoch, revision - 1, behind_epoch, behind_revision, revision",
            &[],
        )
        .await
        .map_err(unavailable)?;
    let now = head_of(&row)?;
    if let Some(seen) = now.behind {
        return Err(StoreError::Behind { at: now.at, seen });
    }
    row.try_get(4).map_err(unavailable)
}

/// One digest, one token: refuses (the caller's transaction is dropped, so
/// rolled back) a write that made a token's previous secret another token's
/// current one, or its own. Only tokens in a rotation's overlap have a
/// previous secret, so this is a probe per such token, whatever the size of
/// the table. Writes serialise on the state row, so it sees every commit.
async fn no_shared_digest(tx: &Transaction<'_>) -> Result<(), StoreError> {
    let shared: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM tokens a JOIN tokens b ON b.secret_sha256 = a.previous_sha256
                            WHERE a.previous_sha256 IS NOT NULL)",
            &[],
        )
        .await
        .and_then(|r| r.try_get(0))
        .map_err(unavailable)?;
    if shared {
        return Err(StoreError::DigestTaken);
    }
    Ok(())
}

/// Logs the names a write changed and notifies the other replicas (at commit).
async fn log_changes(tx: &Transaction<'_>, revision: i64, names: &[&str]) -> Result<Revision, StoreError> {
    if names.len() > CHANGES_PER_WRITE {
        tx.execute("DELETE FROM changes", &[]).await.map_err(unavailable)?;
        tx.execute("UPDATE store_state SET changes_from = $1 WHERE id = 1", &[&revision])
            .await
            .map_err(unavailable)?;
    } else {
        tx.execute(
            "INSERT INTO changes (revision, name) SELECT $1, unnest($2::text[])",
            &[&revision, &names],
        )
        .await
        .map_err(unavailable)?;
    }
    let kept = i64::try_from(CHANGES_KEPT).unwrap_or(i64::MAX);
    if revision % 1000 == 0 && revision > kept {
        let from = revision - kept;
        tx.execute("DELETE FROM changes WHERE revision <= $1", &[&from])
            .await
            .map_err(unavailable)?;
        tx.execute(
            "UPDATE store_state SET changes_from = greatest(changes_from, $1) WHERE id = 1",
            &[&from],
        )
        .await
        .map_err(unavailable)?;
    }
    tx.execute("SELECT pg_notify($1, $2)", &[&CHANGES_CHANNEL, &revision.to_string()])
        .await
        .map_err(unavailable)?;
    Ok(revision_of(revision))
}

/// The token columns of `row` from column `at` on (`COLUMNS`, then the last
/// use when the query selected it).
fn read_row(row: &tokio_postgres::Row, at: usize) -> Result<Row, StoreError> {
    let get = |e: tokio_postgres::Error| unavailable(e);
    Ok(Row {
        name: row.try_get(at).map_err(get)?,
        role: row.try_get(at + 1).map_err(get)?,
        digest: row.try_get(at + 2).map_err(get)?,
        create: (row.try_get(at + 3).map_err(get)?, row.try_get(at + 4).map_err(get)?),
        expire: (row.try_get(at + 5).map_err(get)?, row.try_get(at + 6).map_err(get)?),
        retired: row.try_get(at + 7).map_err(get)?,
        created_by: row.try_get(at + 8).map_err(get)?,
        previous: (
            row.try_get(at + 9).map_err(get)?,
            row.try_get(at + 10).map_err(get)?,
            row.try_get(at + 11).map_err(get)?,
        ),
        last_use: if row.len() > at + 12 {
            row.try_get(at + 12).map_err(get)?
        } else {
            None
        },
    })
}

async fn query(
    tx: &Transaction<'_>,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<TokenRecord>, StoreError> {
    let rows = tx.query(sql, params).await.map_err(unavailable)?;
    rows.iter().map(|r| read_row(r, 0).and_then(decode)).collect()
}

/// One token with its last use.
async fn get_one(tx: &Transaction<'_>, name: &str) -> Result<Option<TokenRecord>, StoreError> {
    let mut found = query(
        tx,
        &format!("SELECT {COLUMNS}, u.last_use_seconds FROM tokens t {WITH_USE} WHERE t.name = $1"),
        &[&name],
    )
    .await?;
    Ok(found.pop())
}

/// Records an audit event in the caller's transaction.
async fn record_event(tx: &Transaction<'_>, e: &AuditEvent) -> Result<(), StoreError> {
    let wide = |(s, n): (Option<i64>, Option<u32>)| (s, n.map(i64::from));
    let (expire_s, expire_n) = wide(split(e.expire_time));
    let (until_s, until_n) = wide(split(e.previous_until));
    tx.execute(
        "INSERT INTO events (time_seconds, time_nanos, namespace, action, token, actor, role, expire_seconds,
                             expire_nanos, previous_until_seconds, previous_until_nanos, client_address, count,
                             peer_address, credential)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
        &[
            &e.time.unix_seconds(),
            &i64::from(e.time.subsec_nanos()),
            &e.namespace,
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
        ],
    )
    .await
    .map_err(unavailable)?;
    Ok(())
}

/// A unique violation as the domain sees it. PostgreSQL names the
/// constraint; the name taken is read from the DETAIL (never logged).
fn insert_error(e: tokio_postgres::Error, first_name: &str) -> StoreError {
    if let Some(db) = e.as_db_error() {
        if *db.code() == SqlState::UNIQUE_VIOLATION {
            match db.constraint() {
                Some("tokens_pkey") => {
                    let name = db
                        .detail()
                        .and_then(|d| d.split_once("=(")?.1.split_once(") already exists").map(|(n, _)| n))
                        .unwrap_or(first_name);
                    return StoreError::NameTaken(name.to_owned());
                }
                Some("tokens_secret_sha256_key" | "tokens_previous_unique") => return StoreError::DigestTaken,
                _ => {}
            }
        }
    }
    unavailable(e)
}

#[async_trait]
impl Store for PostgresStore {
    async fn insert(
        &self,
        records: Vec<TokenRecord>,
        quota: Option<u32>,
        events: Vec<AuditEvent>,
    ) -> Result<Revision, StoreError> {
        for r in &records {
            r.check().map_err(|problem| StoreError::Corrupt {
                name: r.name.clone(),
                problem,
            })?;
        }
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await.map_err(unavailable)?;
        let revision = next_revision(&tx).await?;
        if let Some(limit) = quota {
            let mut added: BTreeMap<&str, i64> = BTreeMap::new();
            for r in &records {
                *added.entry(r.namespace()).or_default() += 1;
            }
            let namespaces: Vec<&str> = added.keys().copied().collect();
            let counts = tx
                .query(
                    "SELECT namespace, count(*) FROM tokens WHERE namespace = ANY($1) GROUP BY namespace",
                    &[&namespaces],
                )
                .await
                .map_err(unavailable)?;
            let mut existing: BTreeMap<String, i64> = BTreeMap::new();
            for row in counts {
                existing.insert(
                    row.try_get(0).map_err(unavailable)?,
                    row.try_get(1).map_err(unavailable)?,
                );
            }
            for (namespace, n) in added {
                if existing.get(namespace).copied().unwrap_or(0) + n > i64::from(limit) {
                    return Err(StoreError::QuotaExceeded {
                        namespace: namespace.to_owned(),
                        limit,
                    });
                }
            }
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
        // One statement for any number of tokens (an import of 100k).
        tx.execute(
            "INSERT INTO tokens (name, namespace, role, secret_sha256, create_seconds, create_nanos,
                                 expire_seconds, expire_nanos, update_seconds, retired, created_by,
                                 previous_sha256, previous_until_seconds, previous_until_nanos)
             SELECT n, ns, ro, d, cs, cn, es, en, cs, re, cb, ps, us, un
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::bigint[],
                         $7::bigint[], $8::bigint[], $9::boolean[], $10::text[], $11::text[], $12::bigint[],
                         $13::bigint[])
                  AS t(n, ns, ro, d, cs, cn, es, en, re, cb, ps, us, un)",
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
            ],
        )
        .await
        .map_err(|e| insert_error(e, names.first().copied().unwrap_or("")))?;
        no_shared_digest(&tx).await?;
        for event in &events {
            record_event(&tx, event).await?;
        }
        let revision = log_changes(&tx, revision, &names).await?;
        tx.commit().await.map_err(unavailable)?;
        Ok(revision)
    }

    async fn get(&self, name: &str) -> Result<Option<TokenRecord>, StoreError> {
        let name = name.to_owned();
        self.read(move |tx| Box::pin(async move { get_one(tx, &name).await }))
            .await
    }

    async fn list(&self, namespace: &str) -> Result<Vec<TokenRecord>, StoreError> {
        let namespace = namespace.to_owned();
        self.read(move |tx| {
            Box::pin(async move {
                query(
                    tx,
                    &format!(
                        "SELECT {COLUMNS}, u.last_use_seconds FROM tokens t {WITH_USE}
                         WHERE t.namespace = $1 ORDER BY t.name"
                    ),
                    &[&namespace],
                )
                .await
            })
        })
        .await
    }

    async fn replace_digest(
        &self,
        name: &str,
        digest: Digest,
        previous_until: Option<Timestamp>,
        event: AuditEvent,
    ) -> Result<Option<(TokenRecord, Revision)>, StoreError> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await.map_err(unavailable)?;
        let revision = next_revision(&tx).await?;
        let now = crate::clock::now().unix_seconds();
        let (until_s, until_n) = split(previous_until);
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
                &[&name, &digest.to_hex(), &now, &until_s, &until_n],
            )
            .await
            .map_err(|e| insert_error(e, name))?;
        if changed == 0 {
            // Nothing changed: the revision stays (the transaction rolls back).
            return Ok(None);
        }
        no_shared_digest(&tx).await?;
        let record = get_one(&tx, name)
            .await?
            .ok_or_else(|| StoreError::Unavailable("row vanished".to_owned()))?;
        record_event(&tx, &event).await?;
        let revision = log_changes(&tx, revision, &[name]).await?;
        tx.commit().await.map_err(unavailable)?;
        Ok(Some((record, revision)))
    }

    async fn delete(&self, name: &str, event: AuditEvent) -> Result<Option<Revision>, StoreError> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await.map_err(unavailable)?;
        let revision = next_revision(&tx).await?;
        let n = tx
            .execute("DELETE FROM tokens WHERE name = $1", &[&name])
            .await
            .map_err(unavailable)?;
        if n == 0 {
            return Ok(None);
        }
        tx.execute("DELETE FROM usage WHERE name = $1", &[&name])
            .await
            .map_err(unavailable)?;
        record_event(&tx, &event).await?;
        let revision = log_changes(&tx, revision, &[name]).await?;
        tx.commit().await.map_err(unavailable)?;
        Ok(Some(revision))
    }

    async fn record_usage(&self, uses: Vec<Use>) -> Result<(), StoreError> {
        if uses.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = uses.iter().map(|u| u.name.as_str()).collect();
        let times: Vec<i64> = uses.iter().map(|u| u.time.unix_seconds()).collect();
        let digests: Vec<String> = uses.iter().map(|u| u.digest.to_hex()).collect();
        // One statement per batch; a name twice in it counts once (its
        // latest use); names of tokens gone meanwhile are skipped.
        self.conn()
            .await?
            .execute(
                "INSERT INTO usage (name, last_use_seconds)
                 SELECT n, max(s) FROM unnest($1::text[], $2::bigint[], $3::text[]) AS u(n, s, d)
                 WHERE EXISTS (SELECT 1 FROM tokens WHERE name = n AND (secret_sha256 = d OR previous_sha256 = d))
                 GROUP BY n
                 ON CONFLICT (name) DO UPDATE
                     SET last_use_seconds = greatest(usage.last_use_seconds, excluded.last_use_seconds)",
                &[&names, &times, &digests],
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn events(
        &self,
        namespace: &str,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<(u64, AuditEvent)>, StoreError> {
        let before = before.and_then(|b| i64::try_from(b).ok()).unwrap_or(i64::MAX);
        let rows = self
            .conn()
            .await?
            .query(
                "SELECT seq, time_seconds, time_nanos, action, token, actor, role, expire_seconds, expire_nanos,
                        previous_until_seconds, previous_until_nanos, client_address, count,
                        peer_address, credential
                 FROM events WHERE namespace = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3",
                &[&namespace, &before, &i64::from(limit)],
            )
            .await
            .map_err(unavailable)?;
        rows.iter()
            .map(|r| {
                let get = |e: tokio_postgres::Error| unavailable(e);
                let count: Option<i64> = r.try_get(12).map_err(get)?;
                let row = EventRow {
                    seq: r.try_get(0).map_err(get)?,
                    time: (r.try_get(1).map_err(get)?, r.try_get(2).map_err(get)?),
                    action: r.try_get(3).map_err(get)?,
                    token: r.try_get(4).map_err(get)?,
                    actor: r.try_get(5).map_err(get)?,
                    role: r.try_get(6).map_err(get)?,
                    expire: (r.try_get(7).map_err(get)?, r.try_get(8).map_err(get)?),
                    until: (r.try_get(9).map_err(get)?, r.try_get(10).map_err(get)?),
                    client_address: r.try_get(11).map_err(get)?,
                    count: count.and_then(|c| u32::try_from(c).ok()),
                    peer_address: r.try_get(13).map_err(get)?,
                    credential: r.try_get(14).map_err(get)?,
                };
                decode_event(row, namespace)
            })
            .collect()
    }

    async fn load(&self) -> Result<(Head, Vec<TokenRecord>), StoreError> {
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

    async fn changes_since(&self, since: Revision) -> Result<Changes, StoreError> {
        self.read(move |tx| {
            Box::pin(async move {
                let head = head(tx).await?;
                let from: i64 = tx
                    .query_one("SELECT changes_from FROM store_state WHERE id = 1", &[])
                    .await
                    .and_then(|r| r.try_get(0))
                    .map_err(unavailable)?;
                if since < revision_of(from) {
                    return Ok(Changes::TooOld);
                }
                if since >= head.at.revision {
                    return Ok(Changes::Since {
                        head,
                        changed: Vec::new(),
                    });
                }
                let rows = tx
                    .query(
                        &format!(
                            "SELECT c.name, t.name IS NOT NULL, {COLUMNS}, u.last_use_seconds
                             FROM (SELECT DISTINCT name FROM changes WHERE revision > $1) c
                             LEFT JOIN tokens t ON t.name = c.name {WITH_USE}
                             ORDER BY c.name"
                        ),
                        &[&to_i64(since)],
                    )
                    .await
                    .map_err(unavailable)?;
                let mut changed = Vec::with_capacity(rows.len());
                for row in rows {
                    let name: String = row.try_get(0).map_err(unavailable)?;
                    let exists: bool = row.try_get(1).map_err(unavailable)?;
                    let record = if exists {
                        Some(decode(read_row(&row, 2)?)?)
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

    async fn head(&self) -> Result<Head, StoreError> {
        let conn = self.conn().await?;
        head_of(&conn.query_one(HEAD, &[]).await.map_err(unavailable)?)
    }

    async fn mark_behind(&self, seen: Position) -> Result<Head, StoreError> {
        self.change_head(|now| {
            (seen > now.at && now.behind.is_none_or(|b| seen > b)).then_some(HeadChange::Behind(seen))
        })
        .await
    }

    async fn new_epoch(&self) -> Result<Head, StoreError> {
        self.change_head(|now| Some(HeadChange::NewEpoch(next_epoch(now))))
            .await
    }

    async fn prune_events(&self, before: Timestamp, limit: u32) -> Result<u64, StoreError> {
        self.conn()
            .await?
            .execute(
                "DELETE FROM events WHERE seq IN
                   (SELECT seq FROM events WHERE time_seconds < $1 ORDER BY time_seconds LIMIT $2)",
                &[&before.unix_seconds(), &i64::from(limit)],
            )
            .await
            .map_err(unavailable)
    }

    async fn retire_expired(&self, cutoff: Timestamp) -> Result<Option<Revision>, StoreError> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await.map_err(unavailable)?;
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
            let rows = tx.query(sql, &[&s, &n]).await.map_err(unavailable)?;
            for row in rows {
                names.push(row.try_get(0).map_err(unavailable)?);
            }
        }
        if names.is_empty() {
            return Ok(None);
        }
        names.sort();
        names.dedup();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let revision = log_changes(&tx, revision, &refs).await?;
        tx.commit().await.map_err(unavailable)?;
        Ok(Some(revision))
    }

    async fn next_expiry(&self) -> Result<Option<Timestamp>, StoreError> {
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
            let row = conn.query_opt(sql, &[]).await.map_err(unavailable)?;
            if let Some(row) = row {
                let s: i64 = row.try_get(0).map_err(unavailable)?;
                let n: i64 = row.try_get(1).map_err(unavailable)?;
                if let Some(t) = super::row::time(s, n) {
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
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
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
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::store::contract::{record, store_contract_tests};
    use apitokens_core::Role;

    store_contract_tests!(async {
        let url = test_url().await?;
        let store = PostgresStore::connect(&url).await.unwrap();
        Some((Box::new(store) as Box<dyn Store>, ()))
    });

    #[test]
    fn tls_is_required_beyond_this_machine_unless_the_url_says_otherwise() {
        use tokio_postgres::config::SslMode;
        let mode = |url: &str| {
            let (config, tls) = parse_url(url).unwrap();
            (config.get_ssl_mode(), tls.downgradable.is_some())
        };
        assert_eq!(mode("postgres://u@db.example/t"), (SslMode::Require, false));
        assert_eq!(mode("postgres://u@10.0.0.5:5432/t"), (SslMode::Require, false));
        assert_eq!(mode("postgres://u@[2001:db8::1]/t"), (SslMode::Require, false));
        // Said otherwise: as said, with a warning.
        assert_eq!(
            mode("postgres://u@db.example/t?sslmode=prefer"),
            (SslMode::Prefer, true)
        );
        assert_eq!(
            mode("postgres://u@db.example/t?sslmode=disable"),
            (SslMode::Disable, true)
        );
        assert_eq!(
            mode("postgres://u@db.example/t?sslmode=verify-full"),
            (SslMode::Require, false)
        );
        // This machine: libpq's default.
        assert_eq!(mode("postgres://u@127.0.0.1:5432/t"), (SslMode::Prefer, false));
        assert_eq!(mode("postgres://u@localhost/t"), (SslMode::Prefer, false));
        assert_eq!(mode("postgres://u@[::1]/t"), (SslMode::Prefer, false));
        assert_eq!(mode("postgres://u@%2Frun%2Fpostgresql/t"), (SslMode::Prefer, false));
        assert_eq!(
            mode("postgres://u@127.0.0.1/t?sslmode=disable"),
            (SslMode::Disable, false)
        );
        // One remote host among several is enough.
        assert_eq!(mode("postgres://u@127.0.0.1,db.example/t"), (SslMode::Require, false));
    }

    #[test]
    fn urls_keep_tls_parameters_for_rustls_and_never_echo_the_url() {
        let (config, tls) = parse_url(
            "postgres://u:pw@db.example:6432/tokens?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=x",
        )
        .unwrap();
        assert_eq!(tls.root_cert, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(config.get_ssl_mode(), tokio_postgres::config::SslMode::Require);
        assert_eq!(describe(&config), "postgres://u@db.example:6432/tokens");
        let err = parse_url("postgres://u:hunter2@h/d?sslmode=sometimes").unwrap_err();
        assert!(err.contains("sslmode") && !err.contains("hunter2"), "{err}");
        let err = parse_url("postgres://u:hunter2@h/d?sslcert=/c.pem").unwrap_err();
        assert!(err.contains("sslkey") && !err.contains("hunter2"), "{err}");
        let err = parse_url("postgres://u:hunter2@h:notaport/d").unwrap_err();
        assert!(!err.contains("hunter2"), "{err}");
    }

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
        let r = a
            .insert(
                vec![record("namespaces/default/apitokens/a", Role::Owner, 1)],
                None,
                vec![],
            )
            .await
            .unwrap();
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

    #[test]
    fn a_statement_timeout_unless_the_url_sets_one() {
        let (config, _) = parse_url("postgres://u@h/d").unwrap();
        assert_eq!(config.get_options(), Some("-c statement_timeout=30000"));
        let (config, _) = parse_url("postgres://u@h/d?options=-csearch_path%3Dx").unwrap();
        assert_eq!(config.get_options(), Some("-csearch_path=x -c statement_timeout=30000"));
        let (config, _) = parse_url("postgres://u@h/d?options=-c%20statement_timeout%3D0").unwrap();
        assert_eq!(config.get_options(), Some("-c statement_timeout=0"));
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
            matches!(&err, StoreError::Unavailable(why) if why.contains("57014")),
            "{err}"
        );
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "{:?}",
            started.elapsed()
        );
        held.rollback().await.unwrap();
        assert_eq!(store.get(name).await.unwrap(), None);
        assert_eq!(store.revision().await.unwrap(), before);
        let after = store
            .insert(vec![record(name, Role::Owner, 2)], None, vec![])
            .await
            .unwrap();
        assert!(after > before);
    }

    #[tokio::test]
    async fn a_row_that_cannot_be_read_is_an_error_naming_it() {
        let Some(url) = test_url().await else { return };
        let store = PostgresStore::connect(&url).await.unwrap();
        store
            .insert(
                vec![record("namespaces/default/apitokens/a", Role::Owner, 1)],
                None,
                vec![],
            )
            .await
            .unwrap();
        store
            .conn()
            .await
            .unwrap()
            .execute(
                "INSERT INTO tokens VALUES ('namespaces/default/apitokens/bad', 'default', 'owner', $1,
                     1, 5000000000, NULL, NULL, 1, false, NULL, NULL, NULL, NULL)",
                &[&"cd".repeat(32)],
            )
            .await
            .unwrap();
        assert_eq!(
            store.load().await.unwrap_err(),
            StoreError::Corrupt {
                name: "namespaces/default/apitokens/bad".into(),
                problem: "bad create time".into()
            }
        );
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
        let shown = unavailable(err).to_string();
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
