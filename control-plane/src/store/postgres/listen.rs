//! One more connection per process LISTENs (lazily, for `serve`): to
//! [`CHANGES_CHANNEL`], which wakes the publisher, and [`ENVOYS_CHANNEL`],
//! which tells the replica coordinator that another replica's Envoys moved.
//! A reconnection wakes both, since notifications sent meanwhile are lost.

use super::PostgresStore;
use crate::store::StoreError;
use std::time::Duration;
use tokio::sync::watch;
use tokio_postgres::AsyncMessage;
use tokio_postgres_rustls::MakeRustlsConnect;

/// Notified at the commit of every write of the tokens or the store's head.
pub(super) const CHANGES_CHANNEL: &str = "apitokens_changes";
/// Notified whenever a replica's Envoy streams change, or a replica leaves.
pub(super) const ENVOYS_CHANNEL: &str = "apitokens_envoys";

/// The notification connection's signals (counters that change at each
/// notification or reconnection).
pub(super) struct Listener {
    pub(super) changes: watch::Receiver<u64>,
    envoys: watch::Receiver<u64>,
    /// Dropped with the store: ends the listening task.
    _stop: watch::Sender<()>,
}

impl PostgresStore {
    /// The listener, started at the first call on the current tokio runtime
    /// (`None` outside one).
    pub(super) fn listener(&self) -> Option<&Listener> {
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
            let (client, mut connection) = config.connect(tls.clone()).await?;
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
                .await;
            if let Err(e) = listening {
                driver.abort();
                return Err(StoreError::from(e));
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
