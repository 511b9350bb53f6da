//! What can go wrong in the store: the answers about the tokens (a name or a
//! digest taken, a full namespace), a stored row that cannot be read, a store
//! behind what the gateways enforce, and a database that cannot be used right
//! now, with its cause.
//!
//! No message holds a secret, a stored value or the database's URL (it may
//! carry a password): PostgreSQL's DETAIL lines quote rows ("Key
//! (name)=(...)"), so a failed statement keeps only its severity, message and
//! SQLSTATE.

use super::Position;
use std::path::PathBuf;
use std::time::Duration;
use tokio_postgres::error::SqlState;

/// The store's result.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A token with this name exists.
    #[error("an API token named {0} already exists")]
    NameTaken(String),
    /// A token with this digest exists (another secret collided, or an
    /// import carries the same secret twice).
    #[error("an API token with this secret digest already exists")]
    DigestTaken,
    /// The namespace already holds `limit` tokens.
    #[error("namespace {namespace} already has {limit} API tokens, the most allowed")]
    QuotaExceeded { namespace: String, limit: u32 },
    /// A stored row that cannot be read (written by something else, or
    /// damaged): named, never skipped.
    #[error("stored token {name} cannot be read: {problem}")]
    Corrupt { name: String, problem: String },
    /// The database cannot be used right now (down, locked, full, too slow,
    /// or not as the options say). The words include the cause's, so that
    /// whatever logs the error logs why.
    #[error("the token store is unavailable: {0}")]
    Unavailable(#[source] Cause),
    /// The store is behind what the gateways enforce (see
    /// [`Head::behind`](super::Head::behind)): no write until an operator
    /// runs `apitokens new-epoch`.
    #[error(
        "the token store is behind the configuration the gateways enforce (version {} of epoch {}, the store is at \
         version {} of epoch {}): it was restored from a backup or failed over and lost writes; changes are refused \
         until an operator accepts the store as it is with `apitokens new-epoch` (revocations made after the copy \
         must then be made again)",
        seen.revision, seen.epoch, at.revision, at.epoch
    )]
    Behind { at: Position, seen: Position },
}

/// Why the database cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Cause {
    /// PostgreSQL failed a statement (a lock or statement timeout, a
    /// constraint, a full disk): its severity, message and code, never its
    /// DETAIL.
    #[error("{severity}: {message} (SQLSTATE {})", code.code())]
    Statement {
        severity: String,
        message: String,
        code: SqlState,
    },
    /// The TLS handshake refused the server's certificate.
    #[error("{0} (the server's certificate is checked against sslrootcert in the URL, or the system's roots)")]
    Certificate(tokio_postgres::Error),
    /// The connection to PostgreSQL failed or broke (refused, reset,
    /// authentication): tokio-postgres's words, which never hold the URL.
    #[error(transparent)]
    Connection(tokio_postgres::Error),
    /// No pooled connection in time, or the pool is closed.
    #[error(transparent)]
    Pool(deadpool_postgres::PoolError),
    /// The connection pool cannot be made.
    #[error(transparent)]
    PoolSetup(deadpool_postgres::BuildError),
    /// The PostgreSQL URL cannot be used as given.
    #[error(transparent)]
    Url(super::postgres::UrlError),
    /// A TLS file the URL names cannot be used.
    #[error(transparent)]
    Tls(super::postgres::TlsError),
    /// Where a failure happened when the operation alone does not say it
    /// (opening the store): the server, without the password.
    #[error("{server}: {cause}")]
    At { server: String, cause: Box<Cause> },
    /// SQLite failed (locked past its busy timeout, a full disk, damaged).
    #[error(transparent)]
    Sqlite(rusqlite::Error),
    /// The SQLite file cannot be opened.
    #[error("cannot open database {}: {error}", path.display())]
    Open { path: PathBuf, error: rusqlite::Error },
    /// `open_existing` of a file that is not there.
    #[error(
        "no database at {} (run `apitokens serve` or `apitokens bootstrap` first, or pass --db)",
        .0.display()
    )]
    Missing(PathBuf),
    #[error("the database does not support WAL (journal_mode is {0})")]
    NoWal(String),
    /// A newer apitokens migrated the database: this one would misread it.
    #[error("the database has schema version {found}; this apitokens understands {known}")]
    NewerSchema { found: i64, known: i64 },
    #[error("store_state.lineage is not 16 bytes")]
    BadLineage,
    /// A token this write changed was gone when read back in the same
    /// transaction.
    #[error("row vanished")]
    Vanished,
    #[error("the OS random source failed: {0}")]
    Random(getrandom::Error),
    /// The thread a SQLite call ran on failed.
    #[error("store task failed: {0}")]
    Task(tokio::task::JoinError),
    /// A thread panicked holding a SQLite connection.
    #[error("store lock poisoned")]
    Poisoned,
    /// The database did not answer in time (frozen, or cut off without a
    /// reset): a change sent may or may not have been made.
    #[error(
        "no answer from the database to {to} within {} ms (a change may or may not have been made)",
        within.as_millis()
    )]
    NoAnswer { to: &'static str, within: Duration },
}

impl From<Cause> for StoreError {
    fn from(cause: Cause) -> Self {
        Self::Unavailable(cause)
    }
}

impl From<tokio_postgres::Error> for Cause {
    fn from(e: tokio_postgres::Error) -> Self {
        if let Some(db) = e.as_db_error() {
            return Self::Statement {
                severity: db.severity().to_owned(),
                message: db.message().to_owned(),
                code: db.code().clone(),
            };
        }
        // The handshake's words say what failed ("invalid peer certificate:
        // UnknownIssuer"), somewhere down the chain.
        let mut said = Some(&e as &dyn std::error::Error);
        while let Some(cause) = said {
            if cause.to_string().contains("certificate") {
                return Self::Certificate(e);
            }
            said = cause.source();
        }
        Self::Connection(e)
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Unavailable(e.into())
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => e.into(),
            other => Self::Unavailable(Cause::Pool(other)),
        }
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Unavailable(Cause::Sqlite(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_statement_keeps_its_code_and_the_message_says_it() {
        let e = StoreError::from(Cause::Statement {
            severity: "ERROR".into(),
            message: "canceling statement due to statement timeout".into(),
            code: SqlState::QUERY_CANCELED,
        });
        assert_eq!(
            e.to_string(),
            "the token store is unavailable: ERROR: canceling statement due to statement timeout (SQLSTATE 57014)"
        );
        let source = std::error::Error::source(&e).unwrap();
        assert!(matches!(
            source.downcast_ref::<Cause>(),
            Some(Cause::Statement { code, .. }) if *code == SqlState::QUERY_CANCELED
        ));
    }
}
