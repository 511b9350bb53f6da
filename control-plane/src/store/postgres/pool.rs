//! The connections of one process: a pool (deadpool-postgres over
//! tokio-postgres) that replaces a connection the server closed (a restart)
//! at checkout, and gives up waiting within seconds.

use super::PostgresStore;
use crate::store::{Cause, Result};
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use std::time::Duration;
use tokio_postgres_rustls::MakeRustlsConnect;

/// Connections per process: writes serialise on the state row anyway, and
/// reads are short.
const POOL_SIZE: usize = 8;

pub(super) fn pool(config: &tokio_postgres::Config, tls: &MakeRustlsConnect) -> Result<Pool> {
    let manager = Manager::from_config(
        config.clone(),
        tls.clone(),
        ManagerConfig {
            // A connection the server closed (a restart) is replaced at
            // checkout; a broken one fails its request with 503 once.
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Ok(Pool::builder(manager)
        .max_size(POOL_SIZE)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(5)))
        .create_timeout(Some(Duration::from_secs(5)))
        .recycle_timeout(Some(Duration::from_secs(2)))
        .build()
        .map_err(Cause::PoolSetup)?)
}

impl PostgresStore {
    pub(super) async fn conn(&self) -> Result<Object> {
        Ok(self.pool.get().await?)
    }
}
