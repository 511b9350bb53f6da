//! The engine: reads the store, builds the filter configuration, publishes
//! versioned snapshots to every subscriber (xDS streams, the ECDS file), and
//! keeps the `Config` the API authenticates its callers with.

use crate::clock;
use crate::ecds::{self, FilterParams, Snapshot};
use crate::status::Tracker;
use crate::store::{Store, StoreError};
use apitokens_core::compact;
use apitokens_core::config::{Config, PluginConfig};
use apitokens_core::timestamp::Timestamp;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;
use tokio::sync::watch;

#[derive(Clone, Debug, Default)]
pub struct EngineOptions {
    /// Everything but the tokens: realm, rules, identity headers, ...
    pub base: PluginConfig,
    pub filter: FilterParams,
}

#[derive(Clone, Copy, Debug, Default)]
struct Refreshed {
    revision: u64,
    next_expiry: Option<Timestamp>,
}

pub struct Engine {
    store: Arc<dyn Store>,
    opts: EngineOptions,
    api: RwLock<Arc<Config>>,
    snapshots: watch::Sender<Arc<Snapshot>>,
    refreshed: Mutex<Refreshed>,
    pub status: Tracker,
}

struct Built {
    api: Config,
    json: String,
    resource: envoy_types::pb::google::protobuf::Any,
    tokens: usize,
    refreshed: Refreshed,
}

impl Engine {
    /// Loads the store and publishes the first snapshot. Blocking.
    pub fn open(store: Arc<dyn Store>, opts: EngineOptions) -> Result<Arc<Self>, String> {
        let built = build(store.as_ref(), &opts, clock::now())?;
        let version = store.next_config_version().map_err(|e| e.to_string())?;
        let snapshot = Snapshot {
            version,
            config_json: built.json,
            resource: built.resource,
            tokens: built.tokens,
            published_at: clock::now(),
        };
        log::info!("configuration version {version} published ({} tokens)", snapshot.tokens);
        let (snapshots, _) = watch::channel(Arc::new(snapshot));
        Ok(Arc::new(Self {
            store,
            opts,
            api: RwLock::new(Arc::new(built.api)),
            snapshots,
            refreshed: Mutex::new(built.refreshed),
            status: Tracker::new(),
        }))
    }

    pub fn store(&self) -> Arc<dyn Store> {
        Arc::clone(&self.store)
    }

    pub fn filter_params(&self) -> &FilterParams {
        &self.opts.filter
    }

    /// The configuration the API checks its callers against (the built-in
    /// rules, so that the token API's own permissions cannot be configured
    /// away).
    pub fn api_config(&self) -> Arc<Config> {
        Arc::clone(&self.api.read().unwrap_or_else(PoisonError::into_inner))
    }

    pub fn current(&self) -> Arc<Snapshot> {
        Arc::clone(&self.snapshots.borrow())
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshots.subscribe()
    }

    /// Re-reads the store and publishes a new version if the configuration
    /// changed. Blocking; serialised, so versions follow the order of writes.
    pub fn reload(&self) -> Result<Arc<Snapshot>, String> {
        let mut refreshed = self.refreshed.lock().unwrap_or_else(PoisonError::into_inner);
        let built = build(self.store.as_ref(), &self.opts, clock::now())?;
        *refreshed = built.refreshed;
        let current = self.current();
        if current.resource == built.resource {
            return Ok(current);
        }
        let version = self.store.next_config_version().map_err(|e| e.to_string())?;
        let snapshot = Arc::new(Snapshot {
            version,
            config_json: built.json,
            resource: built.resource,
            tokens: built.tokens,
            published_at: clock::now(),
        });
        *self.api.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(built.api);
        self.snapshots.send_replace(Arc::clone(&snapshot));
        log::info!("configuration version {version} published ({} tokens)", snapshot.tokens);
        Ok(snapshot)
    }

    /// [`Engine::reload`] off the async threads.
    pub async fn refresh(self: &Arc<Self>) -> Result<Arc<Snapshot>, String> {
        let engine = Arc::clone(self);
        tokio::task::spawn_blocking(move || engine.reload())
            .await
            .map_err(|e| format!("refresh task failed: {e}"))?
    }

    /// Reloads when another process changed the store or a token expired.
    pub fn reload_if_stale(&self) -> Result<bool, String> {
        let state = *self.refreshed.lock().unwrap_or_else(PoisonError::into_inner);
        let revision = self.store.revision().map_err(|e| e.to_string())?;
        let expired = state.next_expiry.is_some_and(|t| t <= clock::now());
        if revision != state.revision || expired {
            self.reload()?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Polls the store every `poll` and wakes exactly at the next expiry,
    /// until `shutdown` changes.
    pub async fn run_background(self: Arc<Self>, poll: Duration, mut shutdown: watch::Receiver<bool>) {
        loop {
            let next_expiry = self
                .refreshed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .next_expiry;
            let wait = next_expiry.map_or(poll, |t| clock::until(t, clock::now()).min(poll));
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
            let engine = Arc::clone(&self);
            match tokio::task::spawn_blocking(move || engine.reload_if_stale()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => log::error!("could not refresh the configuration: {e}"),
                Err(e) => log::error!("refresh task failed: {e}"),
            }
        }
    }
}

fn build(store: &dyn Store, opts: &EngineOptions, now: Timestamp) -> Result<Built, String> {
    let (revision, records) = store.all().map_err(|e: StoreError| e.to_string())?;
    let (spec, next_expiry) = ecds::plugin_config(&opts.base, &records, now);
    // Never publish what the filter would reject: the encoder validates with
    // the filter's code.
    let compact = compact::encode(&spec).map_err(|e| format!("the configuration is invalid: {e}"))?;
    let api = Config::from_spec(&PluginConfig {
        tokens: spec.tokens.clone(),
        realm: spec.realm.clone(),
        ..PluginConfig::default()
    })
    .map_err(|e| format!("the API configuration is invalid: {e}"))?;
    let json = spec.to_json();
    let resource = ecds::resource(&opts.filter, ecds::Payload::Compact(&compact));
    Ok(Built {
        api,
        tokens: spec.tokens.len(),
        json,
        resource,
        refreshed: Refreshed { revision, next_expiry },
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::store::{SqliteStore, TokenRecord};
    use apitokens_core::role::Role;

    fn rec(name: &str, byte: u8, expire: Option<Timestamp>) -> TokenRecord {
        TokenRecord {
            name: name.into(),
            role: Role::Owner,
            secret_sha256: format!("{byte:02x}").repeat(32),
            create_time: clock::now_seconds(),
            expire_time: expire,
        }
    }

    fn engine() -> (Arc<Engine>, Arc<dyn Store>) {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::in_memory().unwrap());
        (
            Engine::open(Arc::clone(&store), EngineOptions::default()).unwrap(),
            store,
        )
    }

    #[test]
    fn versions_increase_only_on_change() {
        let (e, store) = engine();
        let v0 = e.current().version;
        assert_eq!(e.reload().unwrap().version, v0, "nothing changed");
        store.insert(&rec("namespaces/a/apitokens/t", 1, None)).unwrap();
        let s1 = e.reload().unwrap();
        assert!(s1.version > v0);
        assert_eq!(s1.tokens, 1);
        assert!(s1.config_json.contains("namespaces/a/apitokens/t"));
        assert_eq!(e.current().version, s1.version);
    }

    #[test]
    fn api_config_follows_the_store() {
        let (e, store) = engine();
        assert_eq!(e.api_config().token_count(), 0);
        store.insert(&rec("namespaces/a/apitokens/t", 1, None)).unwrap();
        e.reload().unwrap();
        assert_eq!(e.api_config().token_count(), 1);
        store.delete("namespaces/a/apitokens/t").unwrap();
        e.reload().unwrap();
        assert_eq!(e.api_config().token_count(), 0);
    }

    #[test]
    fn changes_by_another_process_and_expiry_are_noticed() {
        let (e, store) = engine();
        assert!(!e.reload_if_stale().unwrap());
        store.insert(&rec("namespaces/a/apitokens/t", 1, None)).unwrap();
        assert!(e.reload_if_stale().unwrap(), "revision changed");
        assert!(!e.reload_if_stale().unwrap());
        let soon = Timestamp::from_unix(clock::now().unix_seconds() + 1, 0);
        store
            .insert(&rec("namespaces/a/apitokens/brief", 2, Some(soon)))
            .unwrap();
        e.reload_if_stale().unwrap();
        assert_eq!(e.current().tokens, 2);
        std::thread::sleep(clock::until(soon, clock::now()) + Duration::from_millis(20));
        assert!(e.reload_if_stale().unwrap(), "expiry passed");
        assert_eq!(e.current().tokens, 1);
        assert!(!e.current().config_json.contains("brief"));
    }

    #[tokio::test]
    async fn subscribers_see_new_snapshots() {
        let (e, store) = engine();
        let mut rx = e.subscribe();
        let v0 = rx.borrow_and_update().version;
        store.insert(&rec("namespaces/a/apitokens/t", 1, None)).unwrap();
        let s = e.refresh().await.unwrap();
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow().version, s.version);
        assert!(s.version > v0);
    }

    #[tokio::test]
    async fn background_task_wakes_at_expiry() {
        let (e, store) = engine();
        let at = Timestamp::from_unix(clock::now().unix_seconds() + 1, 0);
        store.insert(&rec("namespaces/a/apitokens/brief", 2, Some(at))).unwrap();
        e.refresh().await.unwrap();
        assert_eq!(e.current().tokens, 1);
        let (stop_tx, stop_rx) = watch::channel(false);
        // A long poll interval: only the expiry timer can wake it in time.
        let task = tokio::spawn(Arc::clone(&e).run_background(Duration::from_secs(60), stop_rx));
        let mut rx = e.subscribe();
        tokio::time::timeout(Duration::from_secs(3), rx.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(e.current().tokens, 0);
        stop_tx.send(true).unwrap();
        task.await.unwrap();
    }
}
