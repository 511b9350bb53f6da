//! REST API tests: the router driven with `tower::ServiceExt::oneshot`.
use super::*;
use crate::acks::Tracker;
use crate::clock::{self, Clock};
use crate::config::{Publisher, PublisherOptions, Version};
use crate::store::{
    AuditEvent, Changes, Head, NewDigest, Position, Revision, SqliteStore, Store, StoreError, TokenRecord,
};
use crate::testutil::TempDir;
use crate::tokens::secret::{self, Secret, Shape};
use crate::tokens::{Service, ServiceOptions};
use apitokens_core::table::Digest;
use apitokens_core::{Role, Timestamp};
use async_trait::async_trait;
use axum::body::Body;
use axum::http::{HeaderMap, Request as HttpRequest, StatusCode};
use serde_json::{json, Value};
use std::time::Duration;
use tower::ServiceExt;

struct Fixture {
    publisher: Arc<Publisher>,
    acks: Arc<Tracker>,
    store: Arc<dyn Store>,
    owner: String,
    state: Arc<AppState>,
    _dir: TempDir,
}

async fn add_token(f: &Fixture, name: &str, role: Role, expire: Option<Timestamp>) -> String {
    let secret = Secret::generate().unwrap();
    f.store
        .insert(
            vec![TokenRecord {
                last_addresses: Vec::new(),
                update_time: Timestamp::from_unix(0, 0),
                conditions: None,
                name: name.into(),
                role,
                digest: secret.digest(),
                create_time: f.state.service.clock().now_seconds(),
                expire_time: expire,
                retired: false,
                created_by: None,
                previous: None,
                last_use: None,
                evidence: Default::default(),
                disabled: false,
            }],
            None,
            vec![],
        )
        .await
        .unwrap();
    f.publisher.refresh().await.unwrap();
    secret.expose().to_owned()
}

/// A fixture on its own store (`name`) whose clock stands at `secs` until
/// advanced, with `opts` as `adjust` leaves them.
async fn fixture_at(name: &str, secs: i64, adjust: impl FnOnce(&mut ServiceOptions)) -> (Fixture, Clock) {
    let (dir, store) = changes_fail(name);
    let clock = Clock::manual(Timestamp::from_unix(secs, 0));
    let mut opts = ServiceOptions {
        clock: clock.clone(),
        ..ServiceOptions::default()
    };
    adjust(&mut opts);
    (fixture_with(store as Arc<dyn Store>, dir, opts).await, clock)
}

async fn fixture_with(store: Arc<dyn Store>, dir: TempDir, opts: ServiceOptions) -> Fixture {
    // The service and the publisher read one clock, as in `serve`.
    let publisher = Publisher::open(
        Arc::clone(&store),
        PublisherOptions {
            clock: opts.clock.clone(),
            ..PublisherOptions::default()
        },
    )
    .await
    .unwrap();
    let acks = Arc::new(Tracker::new());
    let service = Arc::new(Service::with_push(
        Arc::clone(&store),
        Arc::clone(&publisher),
        Arc::clone(&acks),
        opts,
    ));
    let metrics = Arc::new(crate::metrics::Metrics::new(
        &service,
        &crate::store::StoreMetrics::default(),
        &crate::push::server::PushCounters::default(),
    ));
    let state = Arc::new(AppState {
        metrics,
        service,
        publisher: Arc::clone(&publisher),
        acks: Arc::clone(&acks),
        resource_name: "apitokens".into(),
        name_envoys: false,
        trusted_proxies: TrustedProxies::default(),
    });
    let mut f = Fixture {
        publisher,
        acks,
        store,
        owner: String::new(),
        state,
        _dir: dir,
    };
    f.owner = add_token(&f, "namespaces/default/apitokens/admin", Role::Owner, None).await;
    f
}

/// On a fresh SQLite file in a directory named after `name`.
async fn fixture_on_sqlite(name: &str, opts: ServiceOptions) -> Fixture {
    let dir = TempDir::new(name);
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("api.db")).unwrap());
    fixture_with(store, dir, opts).await
}

async fn fixture() -> Fixture {
    fixture_on_sqlite("api", ServiceOptions::default()).await
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
    raw: String,
}

impl Fixture {
    async fn call(&self, method: &str, path: &str, auth: Option<&str>, body: Option<&str>) -> Answer {
        let mut req = HttpRequest::builder().method(method).uri(path);
        if let Some(secret) = auth {
            req = req.header("authorization", format!("Bearer {secret}"));
        }
        let req = req.body(Body::from(body.unwrap_or("").to_owned())).unwrap();
        self.send(req).await
    }

    async fn send(&self, req: HttpRequest<Body>) -> Answer {
        let resp = app(Arc::clone(&self.state), true).oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
        let raw = String::from_utf8(bytes.to_vec()).unwrap();
        let body = serde_json::from_str(&raw).unwrap_or(Value::Null);
        Answer {
            status,
            headers,
            body,
            raw,
        }
    }

    /// The namespace's audit events of `kind` (`apitoken.update`), newest
    /// first, as the owner reads them.
    async fn events_of(&self, kind: &str) -> Vec<Value> {
        let events = self
            .call("GET", &format!("{COLLECTION}:events"), Some(&self.owner), None)
            .await;
        events.body["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["event"] == kind)
            .cloned()
            .collect()
    }

    /// Writes the uses remembered so far to the store (as `run_usage` does
    /// on its timer).
    async fn flush_uses(&self) {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let flusher = tokio::spawn(Arc::clone(&self.state.service).run_usage(Duration::from_secs(3600), stop_rx));
        stop_tx.send(true).unwrap();
        flusher.await.unwrap();
    }

    async fn create(&self, id: &str, role: &str) -> Answer {
        let body = json!({"name": format!("namespaces/default/apitokens/{id}"), "role": role}).to_string();
        self.call(
            "POST",
            "/apitokens/v1/namespaces/default/apitokens",
            Some(&self.owner),
            Some(&body),
        )
        .await
    }

    async fn names(&self) -> Vec<String> {
        self.store.load().await.unwrap().1.into_iter().map(|r| r.name).collect()
    }

    /// The names in the configuration pushed to Envoy, as the filter reads it.
    async fn pushed(&self) -> Vec<String> {
        let config =
            apitokens_core::Config::from_plugin_configuration(self.publisher.encoded().await.payload.to_vec()).unwrap();
        let mut names: Vec<String> = config.tokens().iter().map(|(_, t)| t.name().to_owned()).collect();
        names.sort();
        names
    }
}

const COLLECTION: &str = "/apitokens/v1/namespaces/default/apitokens";

#[tokio::test]
async fn create_returns_the_secret_once_and_it_works() {
    let f = fixture().await;
    let v0 = f.publisher.current().version;
    let a = f
        .call(
            "POST",
            COLLECTION,
            Some(&f.owner),
            Some(r#"{"name": "namespaces/default/apitokens/ci", "role": "owner", "expireTime": "2099-01-01T00:00:00+01:00"}"#),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.raw);
    let t = &a.body["apiToken"];
    assert_eq!(t["name"], "namespaces/default/apitokens/ci");
    assert_eq!(t["role"], "owner");
    assert_eq!(t["expireTime"], "2098-12-31T23:00:00Z");
    assert!(t["createTime"].as_str().unwrap().ends_with('Z'));
    let secret = t["secret"].as_str().unwrap().to_owned();
    assert_eq!(secret::shape(secret.as_bytes()), Shape::Valid);
    assert_eq!(a.headers["cache-control"], "no-store");
    let version: u64 = a.headers[CONFIG_VERSION_HEADER].to_str().unwrap().parse().unwrap();
    assert!(version > v0.revision.0);
    // No Envoy is connected: nothing to wait for.
    assert_eq!(a.headers[APPLIED_HEADER], "true");
    assert_eq!(a.headers[ENVOYS_HEADER], "0/0");
    // Published: the digest, never the secret.
    let snap = f.publisher.encoded().await;
    assert_eq!(snap.version.revision.0, version);
    let digest = Digest::of(secret.as_bytes());
    let pushed = apitokens_core::Config::from_plugin_configuration(snap.payload.to_vec()).unwrap();
    assert_eq!(
        pushed.tokens().get(&digest).unwrap().name(),
        "namespaces/default/apitokens/ci"
    );
    assert!(!snap.payload.windows(secret.len()).any(|w| w == secret.as_bytes()));
    // The store has the digest only.
    let stored = f.store.get("namespaces/default/apitokens/ci").await.unwrap().unwrap();
    assert_eq!(stored.digest, digest);
    // The new owner token works at once.
    let list = f.call("GET", COLLECTION, Some(&secret), None).await;
    assert_eq!(list.status, StatusCode::OK);
    let names: Vec<_> = list.body["apiTokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].clone())
        .collect();
    assert_eq!(
        names,
        [
            json!("namespaces/default/apitokens/admin"),
            json!("namespaces/default/apitokens/ci")
        ]
    );
    // List and get never show a secret.
    assert!(!list.raw.contains("secret"));
    let get = f.call("GET", &format!("{COLLECTION}/ci"), Some(&f.owner), None).await;
    assert_eq!(get.status, StatusCode::OK);
    assert_eq!(get.body["apiToken"]["name"], "namespaces/default/apitokens/ci");
    assert!(get.body["apiToken"].get("secret").is_none());
    assert_eq!(get.body["apiToken"]["expireTime"], "2098-12-31T23:00:00Z");
}

#[tokio::test]
async fn regenerate_replaces_the_secret_at_once() {
    let f = fixture().await;
    let old = f.create("ci", "owner").await.body["apiToken"]["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    let a = f
        .call("POST", &format!("{COLLECTION}/ci:regenerate"), Some(&f.owner), None)
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.raw);
    let new = a.body["apiToken"]["secret"].as_str().unwrap().to_owned();
    assert_ne!(new, old);
    assert_eq!(a.body["apiToken"]["role"], "owner");
    assert_eq!(a.body["apiToken"]["name"], "namespaces/default/apitokens/ci");
    assert_eq!(
        f.call("GET", COLLECTION, Some(&old), None).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(f.call("GET", COLLECTION, Some(&new), None).await.status, StatusCode::OK);
    // `{}` is an accepted body too; anything else is not.
    let a = f
        .call(
            "POST",
            &format!("{COLLECTION}/ci:regenerate"),
            Some(&f.owner),
            Some("{}"),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK);
    let a = f
        .call(
            "POST",
            &format!("{COLLECTION}/ci:regenerate"),
            Some(&f.owner),
            Some(r#"{"secret": "x"}"#),
        )
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    let a = f
        .call("POST", &format!("{COLLECTION}/nope:regenerate"), Some(&f.owner), None)
        .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn delete_revokes_at_once() {
    let f = fixture().await;
    let secret = f.create("ci", "owner").await.body["apiToken"]["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    let a = f
        .call("DELETE", &format!("{COLLECTION}/ci"), Some(&f.owner), None)
        .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body, json!({}));
    assert!(a.headers.contains_key(CONFIG_VERSION_HEADER));
    let a = f.call("GET", COLLECTION, Some(&secret), None).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert!(!f.pushed().await.contains(&"namespaces/default/apitokens/ci".to_owned()));
    let a = f.call("GET", &format!("{COLLECTION}/ci"), Some(&f.owner), None).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert_eq!(a.body["code"], 404);
    let a = f
        .call("DELETE", &format!("{COLLECTION}/ci"), Some(&f.owner), None)
        .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
}

/// The token of this name in a list answer.
fn listed<'v>(body: &'v Value, name: &str) -> &'v Value {
    body["apiTokens"]
        .as_array()
        .and_then(|all| all.iter().find(|t| t["name"] == name))
        .unwrap_or_else(|| panic!("{name} is not listed: {body}"))
}

#[tokio::test]
async fn disable_refuses_at_once_and_enable_restores_the_same_secret() {
    let f = fixture().await;
    let created = f.create("ci", "owner").await;
    assert_eq!(created.body["apiToken"]["state"], "enabled");
    let secret = created.body["apiToken"]["secret"].as_str().unwrap().to_owned();
    let name = "namespaces/default/apitokens/ci";
    // Used once (a filter's report), so that a disable has a last use to keep.
    f.state
        .service
        .record_use(&f.store.lineage(), &Digest::of(secret.as_bytes()).0, &[]);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let flusher = tokio::spawn(Arc::clone(&f.state.service).run_usage(Duration::from_secs(3600), stop_rx));
    stop_tx.send(true).unwrap();
    flusher.await.unwrap();
    let before = f.call("GET", &format!("{COLLECTION}/ci"), Some(&f.owner), None).await;
    let last_use = before.body["apiToken"]["lastUseTime"].clone();
    assert!(last_use.is_string(), "{}", before.raw);
    assert_eq!(
        f.call("GET", COLLECTION, Some(&secret), None).await.status,
        StatusCode::OK
    );

    let a = f
        .call("POST", &format!("{COLLECTION}/ci:disable"), Some(&f.owner), None)
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.raw);
    let token = &a.body["apiToken"];
    assert_eq!(token["state"], "disabled");
    assert_eq!((&token["name"], &token["role"]), (&json!(name), &json!("owner")));
    assert!(token.get("secret").is_none() && !a.raw.contains(&secret));
    assert_eq!(a.headers["cache-control"], "no-store");
    assert_eq!(a.headers[APPLIED_HEADER], "true");
    assert_eq!(a.headers[ENVOYS_HEADER], "0/0");
    let disabled_at: u64 = a.headers[CONFIG_VERSION_HEADER].to_str().unwrap().parse().unwrap();
    // Refused at once, by the table the gateways get and by the API itself
    // (a disabled owner cannot call it), with the answer an unknown secret
    // gets.
    let refused = f.call("GET", COLLECTION, Some(&secret), None).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        refused.headers["www-authenticate"],
        "Bearer realm=\"apitokens\", error=\"invalid_token\""
    );
    let unknown = f.call("GET", COLLECTION, Some("unknown-secret"), None).await;
    assert_eq!(refused.raw, unknown.raw);
    let snapshot = f.publisher.encoded().await;
    assert_eq!(snapshot.version.revision.0, disabled_at);
    let pushed = apitokens_core::Config::from_plugin_configuration(snapshot.payload.to_vec()).unwrap();
    let entry = pushed.tokens().get(&Digest::of(secret.as_bytes())).unwrap();
    assert!(entry.is_disabled() && entry.name() == name);
    // Kept: get and list show it disabled, with its last use.
    let got = f.call("GET", &format!("{COLLECTION}/ci"), Some(&f.owner), None).await;
    assert_eq!(got.body["apiToken"]["state"], "disabled");
    assert_eq!(got.body["apiToken"]["lastUseTime"], last_use);
    let list = f.call("GET", COLLECTION, Some(&f.owner), None).await;
    assert_eq!(listed(&list.body, name)["state"], "disabled");
    assert_eq!(
        listed(&list.body, "namespaces/default/apitokens/admin")["state"],
        "enabled"
    );

    // Again: the same answer, nothing written.
    let again = f
        .call("POST", &format!("{COLLECTION}/ci:disable"), Some(&f.owner), Some("{}"))
        .await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.raw);
    assert_eq!(again.body, a.body);
    assert_eq!(again.headers[CONFIG_VERSION_HEADER], a.headers[CONFIG_VERSION_HEADER]);
    assert_eq!(again.headers[APPLIED_HEADER], "true");
    assert_eq!(f.store.revision().await.unwrap().0, disabled_at);

    let a = f
        .call("POST", &format!("{COLLECTION}/ci:enable"), Some(&f.owner), None)
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.raw);
    assert_eq!(a.body["apiToken"]["state"], "enabled");
    assert!(a.body["apiToken"].get("secret").is_none());
    let enabled_at: u64 = a.headers[CONFIG_VERSION_HEADER].to_str().unwrap().parse().unwrap();
    assert!(enabled_at > disabled_at);
    // The same secret works again, and nothing else changed.
    assert_eq!(
        f.call("GET", COLLECTION, Some(&secret), None).await.status,
        StatusCode::OK
    );
    let got = f.call("GET", &format!("{COLLECTION}/ci"), Some(&f.owner), None).await;
    assert_eq!(got.body, before.body);
    let again = f
        .call("POST", &format!("{COLLECTION}/ci:enable"), Some(&f.owner), None)
        .await;
    assert_eq!((again.status, &again.body), (StatusCode::OK, &a.body));
    assert_eq!(f.store.revision().await.unwrap().0, enabled_at);

    // One audit event per change, none for the repeats.
    let events = f
        .call("GET", &format!("{COLLECTION}:events"), Some(&f.owner), None)
        .await;
    let events = events.body["events"].as_array().unwrap().clone();
    let kinds: Vec<&str> = events.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["apitoken.enable", "apitoken.disable", "apitoken.create"]);
    for e in &events[..2] {
        assert_eq!(e["token"], name);
        assert_eq!(e["actor"], "namespaces/default/apitokens/admin");
        assert_eq!(e["credential"], "current");
    }

    // Bodies: none or `{}`; anything else is refused.
    for action in ["disable", "enable"] {
        for body in [r#"{"previousSecretTtl": "60s"}"#, r#"{"secret": "x"}"#, "[]"] {
            let a = f
                .call("POST", &format!("{COLLECTION}/ci:{action}"), Some(&f.owner), Some(body))
                .await;
            assert_eq!(a.status, StatusCode::BAD_REQUEST, "{action} {body}: {}", a.raw);
        }
        let a = f
            .call("POST", &format!("{COLLECTION}/nope:{action}"), Some(&f.owner), None)
            .await;
        assert_eq!(a.status, StatusCode::NOT_FOUND, "{}", a.raw);
        assert!(a.body["message"].as_str().unwrap().contains("not found"), "{}", a.raw);
        let a = f
            .call("GET", &format!("{COLLECTION}/ci:{action}"), Some(&f.owner), None)
            .await;
        assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED);
    }
    // Any other action is unknown.
    let a = f
        .call("POST", &format!("{COLLECTION}/ci:suspend"), Some(&f.owner), None)
        .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert_eq!(
        f.store.revision().await.unwrap().0,
        enabled_at,
        "a refused call writes nothing"
    );
}

#[tokio::test]
async fn disable_and_enable_take_an_owners_current_secret_and_a_token_that_does_not_outlive_it() {
    let opts = ServiceOptions {
        clock: Clock::manual(clock::now()),
        ..ServiceOptions::default()
    };
    let f = fixture_on_sqlite("api-disable-rules", opts).await;
    let target = add_token(&f, "namespaces/default/apitokens/target", Role::Viewer, None).await;
    let path = |action: &str| format!("{COLLECTION}/target:{action}");
    // Not an owner of this namespace.
    let editor = add_token(&f, "namespaces/default/apitokens/ed", Role::Editor, None).await;
    let other = add_token(&f, "namespaces/other/apitokens/boss", Role::Owner, None).await;
    for secret in [&editor, &other] {
        for action in ["disable", "enable"] {
            let a = f.call("POST", &path(action), Some(secret), None).await;
            assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.raw);
            assert!(a.headers["www-authenticate"]
                .to_str()
                .unwrap()
                .contains("insufficient_scope"));
        }
    }
    // A previous secret (an owner's rotation's overlap) never writes.
    let rotating = add_token(&f, "namespaces/default/apitokens/rotating", Role::Owner, None).await;
    let a = f
        .call(
            "POST",
            &format!("{COLLECTION}/rotating:regenerate"),
            Some(&f.owner),
            Some(r#"{"previousSecretTtl": "3600s"}"#),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK);
    for action in ["disable", "enable"] {
        let a = f.call("POST", &path(action), Some(&rotating), None).await;
        assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.raw);
        assert!(
            a.body["message"].as_str().unwrap().contains("previous secret"),
            "{}",
            a.raw
        );
        assert!(a.headers.get("www-authenticate").is_none());
    }
    // A short-lived owner may not disable or enable a token that outlives it.
    let now = f.state.service.clock().now();
    let hour = Timestamp::from_unix(now.unix_seconds() + 3600, 0);
    let short = add_token(&f, "namespaces/default/apitokens/short", Role::Owner, Some(hour)).await;
    for action in ["disable", "enable"] {
        let a = f.call("POST", &path(action), Some(&short), None).await;
        assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.raw);
        let message = a.body["message"].as_str().unwrap();
        assert!(
            message.contains("never expires") && message.contains("regenerate, disable or enable only tokens"),
            "{message}"
        );
    }
    // Nothing refused was written: the target still works.
    assert!(
        !f.store
            .get("namespaces/default/apitokens/target")
            .await
            .unwrap()
            .unwrap()
            .disabled
    );
    assert!(!f
        .publisher
        .current()
        .token(&Digest::of(target.as_bytes()))
        .unwrap()
        .is_disabled());
    // One that expires sooner, it may.
    let sooner = Timestamp::from_unix(now.unix_seconds() + 60, 0);
    add_token(&f, "namespaces/default/apitokens/sooner", Role::Viewer, Some(sooner)).await;
    let a = f
        .call("POST", &format!("{COLLECTION}/sooner:disable"), Some(&short), None)
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.raw);
    // A disabled owner is refused by the API: it cannot enable itself.
    let a = f
        .call("POST", &format!("{COLLECTION}/short:disable"), Some(&f.owner), None)
        .await;
    assert_eq!(a.status, StatusCode::OK);
    let a = f
        .call("POST", &format!("{COLLECTION}/short:enable"), Some(&short), None)
        .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{}", a.raw);
}

#[tokio::test]
async fn disables_and_enables_count_in_the_namespace_write_rate() {
    let opts = ServiceOptions {
        write_rate: crate::tokens::Rate {
            per_second: 0.001,
            burst: 2.0,
        },
        ..ServiceOptions::default()
    };
    let f = fixture_on_sqlite("api-disable-rate", opts).await;
    add_token(&f, "namespaces/default/apitokens/t", Role::Viewer, None).await;
    let mut statuses = Vec::new();
    for action in ["disable", "enable", "disable"] {
        let a = f
            .call("POST", &format!("{COLLECTION}/t:{action}"), Some(&f.owner), None)
            .await;
        statuses.push(a.status);
        if a.status == StatusCode::TOO_MANY_REQUESTS {
            assert!(a.headers.contains_key("retry-after"));
        }
    }
    assert_eq!(
        statuses,
        [StatusCode::OK, StatusCode::OK, StatusCode::TOO_MANY_REQUESTS]
    );
    assert!(
        !f.store
            .get("namespaces/default/apitokens/t")
            .await
            .unwrap()
            .unwrap()
            .disabled
    );
}

#[tokio::test]
async fn an_imported_token_stays_disabled() {
    let f = fixture().await;
    let secret = "a-secret-from-another-system";
    let spec = apitokens_core::PluginConfig::from_json(
        format!(
            r#"{{"tokens": [{{"name": "namespaces/default/apitokens/legacy", "role": "viewer",
                 "secretSha256": "{}", "disabled": true}}]}}"#,
            Digest::of(secret.as_bytes()).to_hex()
        )
        .as_bytes(),
    )
    .unwrap();
    assert_eq!(f.state.service.import(&spec).await.unwrap(), 1);
    let got = f
        .call("GET", &format!("{COLLECTION}/legacy"), Some(&f.owner), None)
        .await;
    assert_eq!(got.body["apiToken"]["state"], "disabled", "{}", got.raw);
    assert!(f
        .publisher
        .current()
        .token(&Digest::of(secret.as_bytes()))
        .unwrap()
        .is_disabled());
    let a = f
        .call("POST", &format!("{COLLECTION}/legacy:enable"), Some(&f.owner), None)
        .await;
    assert_eq!(a.body["apiToken"]["state"], "enabled", "{}", a.raw);
    assert!(!f
        .publisher
        .current()
        .token(&Digest::of(secret.as_bytes()))
        .unwrap()
        .is_disabled());
}

#[tokio::test]
async fn a_token_with_conditions_keeps_them_from_create_to_every_envoy() {
    let f = fixture().await;
    let body = json!({
        "name": "namespaces/default/apitokens/office",
        "role": "editor",
        "expireTime": "2031-01-01T00:00:00Z",
        "notBeforeTime": "2030-06-01T00:00:00+02:00",
        "clientAddresses": {"allow": ["10.0.0.0/8", "2001:db8::/32"], "except": ["10.1.0.0/16"]},
        "rateLimit": {"requests": 600, "per": "minute"}
    })
    .to_string();
    let a = f.call("POST", COLLECTION, Some(&f.owner), Some(&body)).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.raw);
    let token = &a.body["apiToken"];
    // As the filter reads them back: UTC, canonical ranges.
    assert_eq!(token["notBeforeTime"], "2030-05-31T22:00:00Z");
    assert_eq!(
        token["clientAddresses"],
        json!({"allow": ["10.0.0.0/8", "2001:db8::/32"], "except": ["10.1.0.0/16"]})
    );
    let secret = token["secret"].as_str().unwrap().to_owned();
    let got = f
        .call("GET", &format!("{COLLECTION}/office"), Some(&f.owner), None)
        .await;
    assert_eq!(got.body["apiToken"]["clientAddresses"], token["clientAddresses"]);
    assert_eq!(got.body["apiToken"]["notBeforeTime"], token["notBeforeTime"]);
    // The burst, a period's worth unless given, is shown.
    assert_eq!(
        got.body["apiToken"]["rateLimit"],
        json!({"requests": 600, "per": "minute", "burst": 600})
    );
    assert_eq!(token["rateLimit"], got.body["apiToken"]["rateLimit"]);
    // In the table every Envoy gets.
    let current = f.publisher.current();
    let pushed = current
        .token(&Digest::of(secret.as_bytes()))
        .unwrap()
        .conditions()
        .unwrap();
    assert_eq!(
        pushed.not_before(),
        Some(Timestamp::parse_rfc3339("2030-05-31T22:00:00Z").unwrap())
    );
    assert!(pushed.admits("10.2.3.4".parse().unwrap()));
    assert!(!pushed.admits("10.1.3.4".parse().unwrap()));
    assert!(!pushed.admits("192.0.2.1".parse().unwrap()));
    assert_eq!(pushed.rate_limit().map(|l| (l.requests, l.burst)), Some((600, 600)));
    // A token without them shows none.
    let plain = f.create("plain", "viewer").await;
    assert!(plain.body["apiToken"].get("clientAddresses").is_none(), "{}", plain.raw);
    assert!(plain.body["apiToken"].get("notBeforeTime").is_none());
    assert!(plain.body["apiToken"].get("rateLimit").is_none());
}

#[tokio::test]
async fn an_unknown_body_field_is_never_named_back() {
    // Named by its path, an unknown key would be quoted: it could be a
    // secret pasted in the wrong place (all letters, as this one).
    let f = fixture().await;
    for body in [
        json!({"name": "namespaces/default/apitokens/x", "role": "viewer", "hunterTwoSecretKey": 1}),
        json!({"name": "namespaces/default/apitokens/x", "role": "viewer",
               "rateLimit": {"requests": 1, "per": "second", "hunterTwoSecretKey": 1}}),
    ] {
        let a = f
            .call("POST", COLLECTION, Some(&f.owner), Some(&body.to_string()))
            .await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.raw);
        assert!(!a.raw.contains("hunterTwo"), "{}", a.raw);
    }
}

#[tokio::test]
async fn conditions_that_are_not_valid_are_a_400_naming_the_field() {
    let f = fixture().await;
    let before = f.names().await;
    for (extra, field) in [
        (
            json!({"clientAddresses": {"allow": ["10.0.0.0/8", "10.0.0.1/8"]}}),
            "clientAddresses.allow[1]",
        ),
        (
            json!({"clientAddresses": {"except": ["not an address"]}}),
            "clientAddresses.except[0]",
        ),
        (json!({"clientAddresses": {"allow": []}}), "clientAddresses.allow"),
        (json!({"clientAddresses": {}}), "clientAddresses"),
        (json!({"notBeforeTime": "soon"}), "notBeforeTime"),
        (
            json!({"rateLimit": {"requests": 0, "per": "second"}}),
            "rateLimit.requests",
        ),
        (json!({"rateLimit": {"requests": 5, "per": "day"}}), "rateLimit.per"),
        (
            json!({"rateLimit": {"requests": 5, "per": "second", "burst": 10000000}}),
            "rateLimit.burst",
        ),
        (json!({"rateLimit": {"requests": 5}}), "rateLimit"),
        (json!({"rateLimit": {"requests": "5", "per": "second"}}), "rateLimit"),
        (json!({"role": 7}), "role"),
        (
            json!({"notBeforeTime": "2031-01-01T00:00:00Z", "expireTime": "2030-01-01T00:00:00Z"}),
            "notBeforeTime",
        ),
    ] {
        let mut body = json!({"name": "namespaces/default/apitokens/bad", "role": "viewer"});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let a = f
            .call("POST", COLLECTION, Some(&f.owner), Some(&body.to_string()))
            .await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{extra}: {}", a.raw);
        assert_eq!(a.body["field"], field, "{extra}: {}", a.raw);
        // Named, never quoted.
        assert!(
            !a.raw.contains("not an address") && !a.raw.contains("10.0.0.1/8"),
            "{}",
            a.raw
        );
    }
    // A key the object does not have; an array where the object goes.
    for addresses in [json!({"deny": ["10.0.0.0/8"]}), json!([["10.0.0.0/8"]])] {
        let body = json!({"name": "namespaces/default/apitokens/bad", "role": "viewer",
                          "clientAddresses": addresses});
        let a = f
            .call("POST", COLLECTION, Some(&f.owner), Some(&body.to_string()))
            .await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.raw);
        // Never quoting the key sent.
        assert!(!a.raw.contains("deny"), "{}", a.raw);
    }
    assert_eq!(f.names().await, before);
}

#[tokio::test]
async fn an_imported_token_keeps_its_conditions() {
    let f = fixture().await;
    let spec = apitokens_core::PluginConfig::from_json(
        format!(
            r#"{{"tokens": [{{"name": "namespaces/default/apitokens/bound", "role": "viewer",
                 "secretSha256": "{}", "clientAddresses": {{"allow": ["10.0.0.0/8"]}}}}]}}"#,
            Digest::of(b"bound").to_hex()
        )
        .as_bytes(),
    )
    .unwrap();
    assert_eq!(f.state.service.import(&spec).await.unwrap(), 1);
    let pushed = f.publisher.current();
    let conditions = pushed.token(&Digest::of(b"bound")).unwrap().conditions().unwrap();
    assert!(!conditions.admits("192.0.2.1".parse().unwrap()));
    let got = f
        .call("GET", &format!("{COLLECTION}/bound"), Some(&f.owner), None)
        .await;
    assert_eq!(
        got.body["apiToken"]["clientAddresses"],
        json!({"allow": ["10.0.0.0/8"]})
    );
}

#[tokio::test]
async fn authentication_failures_get_the_filters_replies() {
    let opts = ServiceOptions {
        clock: Clock::manual(clock::now()),
        ..ServiceOptions::default()
    };
    let f = fixture_on_sqlite("api-auth", opts).await;
    let a = f.call("GET", COLLECTION, None, None).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(a.headers["www-authenticate"], "Bearer realm=\"apitokens\"");
    assert_eq!(a.body["code"], 401);
    let a = f.call("GET", COLLECTION, Some("unknown-secret"), None).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        a.headers["www-authenticate"],
        "Bearer realm=\"apitokens\", error=\"invalid_token\""
    );
    // A mistyped secret of our format: refused without lookup.
    let mut typo = f.owner.clone();
    typo.pop();
    typo.push(if f.owner.ends_with('a') { 'b' } else { 'a' });
    let a = f.call("GET", COLLECTION, Some(&typo), None).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    // Two Authorization headers.
    let req = HttpRequest::builder()
        .uri(COLLECTION)
        .header("authorization", format!("Bearer {}", f.owner))
        .header("authorization", format!("Bearer {}", f.owner))
        .body(Body::empty())
        .unwrap();
    let a = f.send(req).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert!(a.headers["www-authenticate"]
        .to_str()
        .unwrap()
        .contains("invalid_request"));
    // Another scheme.
    let req = HttpRequest::builder()
        .uri(COLLECTION)
        .header("authorization", "Basic YTpi")
        .body(Body::empty())
        .unwrap();
    assert_eq!(f.send(req).await.status, StatusCode::UNAUTHORIZED);
    // Expired owner: refused from its expiry on, by the API's clock.
    let clock = f.state.service.clock();
    let past = Timestamp::from_unix(clock.now().unix_seconds() + 1, 0);
    let brief = add_token(&f, "namespaces/default/apitokens/brief", Role::Owner, Some(past)).await;
    assert_eq!(
        f.call("GET", COLLECTION, Some(&brief), None).await.status,
        StatusCode::OK
    );
    clock.advance(clock::until(past, clock.now()));
    assert_eq!(
        f.call("GET", COLLECTION, Some(&brief), None).await.status,
        StatusCode::UNAUTHORIZED
    );
    // No reply ever echoes a secret.
    assert!(!a.raw.contains(&f.owner));
}

#[tokio::test]
async fn non_owners_and_other_namespaces_get_403() {
    let f = fixture().await;
    let editor = add_token(&f, "namespaces/default/apitokens/ed", Role::Editor, None).await;
    let viewer = add_token(&f, "namespaces/default/apitokens/vw", Role::Viewer, None).await;
    let other_owner = add_token(&f, "namespaces/other/apitokens/boss", Role::Owner, None).await;
    let body = r#"{"name": "namespaces/default/apitokens/x", "role": "viewer"}"#;
    for secret in [&editor, &viewer, &other_owner] {
        let before = f.names().await;
        let a = f.call("POST", COLLECTION, Some(secret), Some(body)).await;
        assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.raw);
        assert!(a.headers["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("insufficient_scope"));
        // What to ask for: this namespace's owner role; the other
        // namespace's owner could hold no role that would do.
        let required = (secret != &other_owner).then_some("owner");
        assert_eq!(
            a.headers.get("x-apitokens-required-role").map(|v| v.to_str().unwrap()),
            required,
            "{}",
            a.raw
        );
        assert_eq!(a.body.get("requiredRole").and_then(Value::as_str), required);
        assert_eq!(f.names().await, before);
        assert_eq!(
            f.call("GET", COLLECTION, Some(secret), None).await.status,
            StatusCode::FORBIDDEN
        );
    }
    // The other namespace's owner manages its own namespace only.
    let a = f
        .call(
            "GET",
            "/apitokens/v1/namespaces/other/apitokens",
            Some(&other_owner),
            None,
        )
        .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body["apiTokens"].as_array().unwrap().len(), 1);
    let a = f
        .call("GET", "/apitokens/v1/namespaces/other/apitokens", Some(&f.owner), None)
        .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn bad_input_is_refused_and_changes_nothing() {
    let f = fixture().await;
    f.create("taken", "viewer").await;
    let before = f.names().await;
    let version = f.publisher.current().version;
    let big = format!(
        r#"{{"name": "namespaces/default/apitokens/big", "role": "viewer", "x": "{}"}}"#,
        "a".repeat(70_000)
    );
    let cases: Vec<(&str, String, Option<String>, StatusCode, &str)> = vec![
        (
            "POST",
            COLLECTION.into(),
            Some(r#"{"name": "big", "role": "viewer"}"#.into()),
            StatusCode::BAD_REQUEST,
            "fully qualified",
        ),
        (
            "POST",
            COLLECTION.into(),
            Some(r#"{"name": "namespaces/other/apitokens/x", "role": "viewer"}"#.into()),
            StatusCode::BAD_REQUEST,
            "another namespace",
        ),
        (
            "POST",
            COLLECTION.into(),
            Some(r#"{"name": "namespaces/default/apitokens/Bad_Id", "role": "viewer"}"#.into()),
            StatusCode::BAD_REQUEST,
            "token id",
        ),
        (
            "POST",
            COLLECTION.into(),
            Some(r#"{"name": "namespaces/default/apitokens/x", "role": "admin"}"#.into()),
            StatusCode::BAD_REQUEST,
            "unknown role",
        ),
        (
            // serde would read the fields in order from an array.
            "POST",
            COLLECTION.into(),
            Some(r#"["namespaces/default/apitokens/x", "viewer"]"#.into()),
            StatusCode::BAD_REQUEST,
            "must be a JSON object",
        ),
        (
            "POST",
            COLLECTION.into(),
            Some(
                r#"{"name": "namespaces/default/apitokens/x", "role": "viewer", "expireTime": "2001-01-01T00:00:00Z"}"#
                    .into(),
            ),
            StatusCode::BAD_REQUEST,
            "in the future",
        ),
        (
            "POST",
            COLLECTION.into(),
            Some(r#"{"name": "namespaces/default/apitokens/x", "role": "viewer", "expireTime": "tomorrow"}"#.into()),
            StatusCode::BAD_REQUEST,
            "RFC 3339",
        ),
        (
            "POST",
            COLLECTION.into(),
            Some(r#"{"name": "namespaces/default/apitokens/x", "role": "viewer""#.into()),
            StatusCode::BAD_REQUEST,
            "not valid JSON",
        ),
        (
            "POST",
            COLLECTION.into(),
            Some(r#"{"name": "namespaces/default/apitokens/x", "role": "viewer", "secret": "mine"}"#.into()),
            StatusCode::BAD_REQUEST,
            "secret: the control plane generates the secret",
        ),
        (
            "POST",
            COLLECTION.into(),
            Some(r#"{"name": "namespaces/default/apitokens/x"}"#.into()),
            StatusCode::BAD_REQUEST,
            "missing field `role`",
        ),
        (
            "POST",
            COLLECTION.into(),
            Some(r#"{"name": 7, "role": "viewer"}"#.into()),
            StatusCode::BAD_REQUEST,
            "wrong type",
        ),
        (
            "POST",
            COLLECTION.into(),
            Some("[]".into()),
            StatusCode::BAD_REQUEST,
            // Never a Rust type's name ("expected struct CreateBody").
            "must be a JSON object",
        ),
        ("POST", COLLECTION.into(), None, StatusCode::BAD_REQUEST, "JSON object"),
        (
            "POST",
            COLLECTION.into(),
            Some(big),
            StatusCode::PAYLOAD_TOO_LARGE,
            "larger than",
        ),
        (
            "POST",
            COLLECTION.into(),
            Some(r#"{"name": "namespaces/default/apitokens/taken", "role": "owner"}"#.into()),
            StatusCode::CONFLICT,
            "already exists",
        ),
        (
            "GET",
            "/apitokens/v1/namespaces/Default/apitokens".into(),
            None,
            StatusCode::BAD_REQUEST,
            "namespace: must be a DNS label",
        ),
        (
            "GET",
            "/apitokens/v1/namespaces/def%61ult/apitokens".into(),
            None,
            StatusCode::BAD_REQUEST,
            "namespace: must be a DNS label",
        ),
        (
            "GET",
            format!("{COLLECTION}/UPPER"),
            None,
            StatusCode::BAD_REQUEST,
            "token: must be a DNS label",
        ),
        (
            "DELETE",
            format!("{COLLECTION}/-x"),
            None,
            StatusCode::BAD_REQUEST,
            "token: must be a DNS label",
        ),
        (
            "GET",
            format!("{COLLECTION}/missing"),
            None,
            StatusCode::NOT_FOUND,
            "not found",
        ),
        (
            "DELETE",
            format!("{COLLECTION}/missing"),
            None,
            StatusCode::NOT_FOUND,
            "not found",
        ),
        (
            "POST",
            format!("{COLLECTION}/taken:rotate"),
            None,
            StatusCode::NOT_FOUND,
            "unknown action",
        ),
        (
            "PUT",
            format!("{COLLECTION}/taken"),
            Some("{}".into()),
            StatusCode::METHOD_NOT_ALLOWED,
            "allowed: GET, PATCH, DELETE",
        ),
        (
            "DELETE",
            COLLECTION.into(),
            None,
            StatusCode::METHOD_NOT_ALLOWED,
            "allowed: GET, POST",
        ),
        (
            "GET",
            "/apitokens/v1/namespaces/default".into(),
            None,
            StatusCode::NOT_FOUND,
            "not found",
        ),
        ("GET", "/elsewhere".into(), None, StatusCode::NOT_FOUND, "not found"),
    ];
    for (method, path, body, status, needle) in cases {
        let a = f.call(method, &path, Some(&f.owner), body.as_deref()).await;
        assert_eq!(a.status, status, "{method} {path}: {}", a.raw);
        assert_eq!(a.body["code"], status.as_u16(), "{method} {path}");
        let message = a.body["message"].as_str().unwrap();
        assert!(
            message.contains(needle),
            "{method} {path}: {message:?} lacks {needle:?}"
        );
        assert_eq!(a.headers["content-type"], "application/json");
        assert_eq!(f.names().await, before, "{method} {path} changed the store");
        assert_eq!(f.publisher.current().version, version, "{method} {path} published");
    }
}

#[tokio::test]
async fn error_messages_never_quote_the_input() {
    let f = fixture().await;
    let secretish = "apt_ThisIsNotARealSecretButLooksLikeOne0000";
    for body in [
        json!({"name": secretish, "role": "viewer"}),
        json!({"name": "namespaces/default/apitokens/x", "role": secretish}),
        json!({"name": "namespaces/default/apitokens/x", "role": "viewer", "expireTime": secretish}),
        json!({"name": "namespaces/default/apitokens/x", "role": ["viewer", secretish]}),
    ] {
        let a = f
            .call("POST", COLLECTION, Some(&f.owner), Some(&body.to_string()))
            .await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST);
        assert!(!a.raw.contains("ThisIsNot"), "{}", a.raw);
    }
}

#[tokio::test]
async fn healthz_and_status() {
    let f = fixture().await;
    let a = f.call("GET", "/healthz", None, None).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body["status"], "ok");
    let v = f.publisher.current().version;
    let stream = f.acks.connected("host-1", "gw", "127.0.0.1:9", "");
    let a = f.call("GET", "/status", None, None).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body["version"], v.to_string());
    assert_eq!(a.body["applied"], false);
    assert_eq!(a.body["envoys"][0]["node"], "host-1");
    assert_eq!(a.body["envoys"][0]["stream"], 1);
    assert_eq!(a.body["lagging"][0]["who"], "host-1 (stream 1)");
    f.acks.acked(stream, v);
    let a = f.call("GET", &format!("/status?version={v}"), None, None).await;
    assert_eq!(a.body["applied"], true);
    assert_eq!(a.body["envoys"][0]["ackedVersion"], v.to_string());
    // Waiting for a version nobody has acknowledged times out with false.
    let next = Version::new(v.epoch, Revision(v.revision.0 + 1));
    let started = Instant::now();
    let a = f
        .call("GET", &format!("/status?version={next}&waitSeconds=0.2"), None, None)
        .await;
    assert_eq!(a.body["applied"], false);
    assert!(started.elapsed() >= Duration::from_millis(200));
    // ... and returns as soon as the ACK comes.
    let acks = Arc::clone(&f.acks);
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        acks.acked(stream, next);
    });
    let started = Instant::now();
    let a = f
        .call("GET", &format!("/status?version={next}&waitSeconds=10"), None, None)
        .await;
    assert_eq!(a.body["applied"], true);
    assert!(started.elapsed() < Duration::from_secs(5));
    let a = f.call("GET", "/status?version=x", None, None).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(a.body["field"], "version");
    let a = f.call("GET", "/status?version=1&waitSeconds=1000", None, None).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(a.body["field"], "waitSeconds");
}

#[tokio::test]
async fn a_write_waits_for_every_stream_and_says_which_did_not_apply() {
    let f = fixture_on_sqlite(
        "api-wait",
        ServiceOptions {
            apply_timeout: Duration::from_millis(300),
            ..ServiceOptions::default()
        },
    )
    .await;
    // Two Envoys with one node id: one applies every version it is sent, the
    // other rejects them.
    let good = f.acks.connected("gateway", "gw", "127.0.0.1:1", "");
    let bad = f.acks.connected("gateway", "gw", "127.0.0.1:2", "");
    let mut published = f.publisher.subscribe();
    let acks = Arc::clone(&f.acks);
    let envoys = tokio::spawn(async move {
        while published.changed().await.is_ok() {
            let version = published.borrow_and_update().snapshot.version;
            acks.acked(good, version);
            acks.nacked(bad, version, "Unable to create Wasm HTTP filter");
        }
    });
    let started = Instant::now();
    let a = f.create("ci", "viewer").await;
    assert_eq!(a.status, StatusCode::OK, "the change is committed: {}", a.raw);
    assert!(started.elapsed() < Duration::from_millis(300), "a NACK ends the wait");
    assert_eq!(a.headers[APPLIED_HEADER], "false");
    assert_eq!(a.headers[ENVOYS_HEADER], "1/2");
    // Counted for the caller (a namespace's owner); named on /status.
    assert_eq!(a.headers[NOT_APPLIED_HEADER], "1 rejected (NACK) (which: /status)");
    assert!(a.body["apiToken"]["secret"].is_string(), "the seed's body shape");
    let version = a.headers[CONFIG_VERSION_HEADER].to_str().unwrap();
    let st = f.call("GET", &format!("/status?version={version}"), None, None).await;
    assert_eq!(st.body["applied"], false);
    assert_eq!(st.body["lagging"][0]["reason"], "rejected");
    assert_eq!(st.body["lagging"][0]["who"], "gateway (stream 2)");
    envoys.abort();
    // Nobody answers: the limit passes, the answer says so.
    let started = Instant::now();
    let a = f
        .call("DELETE", &format!("{COLLECTION}/ci"), Some(&f.owner), None)
        .await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(a.headers[APPLIED_HEADER], "false");
    assert!(a.headers[NOT_APPLIED_HEADER]
        .to_str()
        .unwrap()
        .contains("no ACK in time"));
    // Opting out: answered once published.
    let started = Instant::now();
    let a = f
        .call(
            "POST",
            &format!("{COLLECTION}?waitForEnvoys=false"),
            Some(&f.owner),
            Some(r#"{"name": "namespaces/default/apitokens/bulk", "role": "viewer"}"#),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(started.elapsed() < Duration::from_millis(300));
    assert_eq!(a.headers[APPLIED_HEADER], "not-waited");
    assert!(f
        .pushed()
        .await
        .contains(&"namespaces/default/apitokens/bulk".to_owned()));
    let a = f
        .call(
            "DELETE",
            &format!("{COLLECTION}/bulk?waitForEnvoys=maybe"),
            Some(&f.owner),
            None,
        )
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(a.body["field"], "waitForEnvoys");
}

#[tokio::test]
async fn the_namespace_quota_answers_429() {
    let f = fixture_on_sqlite(
        "api-quota",
        ServiceOptions {
            quota: Some(3),
            ..ServiceOptions::default()
        },
    )
    .await;
    assert_eq!(f.create("a", "viewer").await.status, StatusCode::OK);
    assert_eq!(f.create("b", "viewer").await.status, StatusCode::OK);
    let a = f.create("c", "viewer").await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS, "{}", a.raw);
    assert!(a.body["message"].as_str().unwrap().contains("already has 3 API tokens"));
    assert!(!f.names().await.contains(&"namespaces/default/apitokens/c".to_owned()));
    // Another namespace has its own quota.
    let other = add_token(&f, "namespaces/other/apitokens/boss", Role::Owner, None).await;
    let a = f
        .call(
            "POST",
            "/apitokens/v1/namespaces/other/apitokens",
            Some(&other),
            Some(r#"{"name": "namespaces/other/apitokens/x", "role": "viewer"}"#),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK);
}

/// The real store, except that reading what changed fails once `failing`
/// is set: a database that went away between a commit and the publish.
/// It counts the last uses written.
struct ChangesFail(
    SqliteStore,
    std::sync::atomic::AtomicBool,
    std::sync::atomic::AtomicUsize,
);

/// A fresh [`ChangesFail`] store in a directory named after `name`.
fn changes_fail(name: &str) -> (TempDir, Arc<ChangesFail>) {
    let dir = TempDir::new(name);
    let store = Arc::new(ChangesFail(
        SqliteStore::open(&dir.path().join("api.db")).unwrap(),
        std::sync::atomic::AtomicBool::new(false),
        std::sync::atomic::AtomicUsize::new(0),
    ));
    (dir, store)
}

#[async_trait]
impl Store for ChangesFail {
    async fn insert(
        &self,
        records: Vec<TokenRecord>,
        quota: Option<u32>,
        events: Vec<AuditEvent>,
    ) -> Result<Revision, StoreError> {
        self.0.insert(records, quota, events).await
    }
    async fn get(&self, name: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.0.get(name).await
    }
    async fn list(&self, namespace: &str) -> Result<Vec<TokenRecord>, StoreError> {
        self.0.list(namespace).await
    }
    async fn replace_digest(
        &self,
        new: NewDigest,
        event: AuditEvent,
    ) -> Result<Option<(TokenRecord, Revision)>, StoreError> {
        self.0.replace_digest(new, event).await
    }
    async fn delete(&self, name: &str, event: AuditEvent) -> Result<Option<Revision>, StoreError> {
        self.0.delete(name, event).await
    }
    async fn set_conditions(
        &self,
        name: &str,
        created: Timestamp,
        expected: Option<apitokens_core::conditions::Packed>,
        new: Option<apitokens_core::conditions::Packed>,
        event: AuditEvent,
    ) -> Result<Option<crate::store::StateSet>, StoreError> {
        self.0.set_conditions(name, created, expected, new, event).await
    }
    async fn inactivity_policies(&self) -> Result<Vec<(String, String)>, StoreError> {
        self.0.inactivity_policies().await
    }
    async fn set_inactivity_policy(
        &self,
        namespace: &str,
        policy: Option<&str>,
        event: AuditEvent,
    ) -> Result<bool, StoreError> {
        self.0.set_inactivity_policy(namespace, policy, event).await
    }
    async fn set_disabled(
        &self,
        name: &str,
        disabled: bool,
        event: AuditEvent,
    ) -> Result<Option<crate::store::StateSet>, StoreError> {
        self.0.set_disabled(name, disabled, event).await
    }
    async fn record_usage(&self, uses: Vec<crate::store::Use>) -> Result<(), StoreError> {
        self.2.fetch_add(uses.len(), std::sync::atomic::Ordering::SeqCst);
        self.0.record_usage(uses).await
    }
    async fn events(
        &self,
        namespace: &str,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<(u64, AuditEvent)>, StoreError> {
        self.0.events(namespace, before, limit).await
    }
    async fn prune_events(&self, before: Timestamp, limit: u32) -> Result<u64, StoreError> {
        self.0.prune_events(before, limit).await
    }
    async fn events_after(&self, after: u64, limit: u32) -> Result<Vec<(u64, AuditEvent)>, StoreError> {
        self.0.events_after(after, limit).await
    }
    async fn claim_outbox(
        &self,
        endpoint: &str,
        holder: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> Result<Option<u64>, StoreError> {
        self.0.claim_outbox(endpoint, holder, now_ms, until_ms).await
    }
    async fn advance_outbox(&self, endpoint: &str, holder: &str, seq: u64) -> Result<bool, StoreError> {
        self.0.advance_outbox(endpoint, holder, seq).await
    }
    async fn warn_expiring(&self, scan: crate::store::ExpiryScan) -> Result<Vec<AuditEvent>, StoreError> {
        self.0.warn_expiring(scan).await
    }
    async fn load(&self) -> Result<(Head, Vec<TokenRecord>), StoreError> {
        self.0.load().await
    }
    async fn changes_since(&self, since: Revision) -> Result<Changes, StoreError> {
        if self.1.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::Unavailable(crate::store::Cause::NoAnswer {
                to: "a read of the changes",
                within: std::time::Duration::ZERO,
            }));
        }
        self.0.changes_since(since).await
    }
    async fn head(&self) -> Result<Head, StoreError> {
        self.0.head().await
    }
    async fn mark_behind(&self, seen: Position) -> Result<Head, StoreError> {
        self.0.mark_behind(seen).await
    }
    async fn new_epoch(&self) -> Result<Head, StoreError> {
        self.0.new_epoch().await
    }
    async fn retire_expired(&self, cutoff: Timestamp) -> Result<Option<Revision>, StoreError> {
        self.0.retire_expired(cutoff).await
    }
    async fn next_expiry(&self) -> Result<Option<Timestamp>, StoreError> {
        self.0.next_expiry().await
    }
    fn lineage(&self) -> apitokens_core::compact::Lineage {
        self.0.lineage()
    }
}

#[tokio::test]
async fn a_committed_change_that_cannot_be_published_yet_still_gives_its_secret() {
    let (dir, store) = changes_fail("api-nopub");
    let f = fixture_with(
        Arc::clone(&store) as Arc<dyn Store>,
        dir,
        ServiceOptions {
            apply_timeout: Duration::from_millis(200),
            ..ServiceOptions::default()
        },
    )
    .await;
    let before = f.publisher.current().version;
    store.1.store(true, std::sync::atomic::Ordering::SeqCst);
    // The store goes away between the commit and the publish.
    let a = f.create("ci", "viewer").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.raw);
    let secret = a.body["apiToken"]["secret"].as_str().unwrap().to_owned();
    assert_eq!(secret::shape(secret.as_bytes()), Shape::Valid);
    assert_eq!(a.headers[APPLIED_HEADER], "not-published");
    assert!(a.headers[NOT_APPLIED_HEADER]
        .to_str()
        .unwrap()
        .starts_with("committed, not published"));
    assert!(a.headers.get(CONFIG_VERSION_HEADER).is_none());
    assert_eq!(f.publisher.current().version, before);
    // A regeneration without overlap revokes the old secret: its answer must
    // carry the new one, or the token is lost.
    let a = f
        .call("POST", &format!("{COLLECTION}/ci:regenerate"), Some(&f.owner), None)
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.raw);
    let regenerated = a.body["apiToken"]["secret"].as_str().unwrap().to_owned();
    assert_ne!(regenerated, secret);
    // The store is back: the next catch-up publishes both writes.
    store.1.store(false, std::sync::atomic::Ordering::SeqCst);
    f.publisher.refresh().await.unwrap();
    let pushed = f.publisher.current();
    assert!(pushed.version > before);
    assert_eq!(
        pushed.token(&Digest::of(regenerated.as_bytes())).unwrap().name(),
        "namespaces/default/apitokens/ci"
    );
    assert!(pushed.token(&Digest::of(secret.as_bytes())).is_none());
}

#[test]
fn routes() {
    use super::extract::Route;
    assert_eq!(
        Route::parse("/apitokens/v1/namespaces/a/apitokens"),
        Some(Route::Collection { ns: "a".into() })
    );
    assert_eq!(
        Route::parse("/apitokens/v1/namespaces/a/apitokens/b"),
        Some(Route::Item {
            ns: "a".into(),
            id: "b".into()
        })
    );
    assert_eq!(
        Route::parse("/apitokens/v1/namespaces/a/apitokens/b:regenerate"),
        Some(Route::Action {
            ns: "a".into(),
            id: "b".into(),
            action: "regenerate".into()
        })
    );
    assert_eq!(
        Route::parse("/apitokens/v1/namespaces/a/apitokens/b:disable"),
        Some(Route::Action {
            ns: "a".into(),
            id: "b".into(),
            action: "disable".into()
        })
    );
    assert_eq!(Route::parse("/apitokens/v1/namespaces/a/apitokens/b/c"), None);
    assert_eq!(Route::parse("/apitokens/v1/namespaces/a/other"), None);
    assert_eq!(Route::parse("/apitokens/v2/namespaces/a/apitokens"), None);
}

#[tokio::test]
async fn a_regeneration_with_an_overlap_keeps_the_old_secret_until_then() {
    let f = fixture().await;
    let old = f.create("ci", "owner").await.body["apiToken"]["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    let before = clock::now();
    let a = f
        .call(
            "POST",
            &format!("{COLLECTION}/ci:regenerate"),
            Some(&f.owner),
            Some(r#"{"previousSecretTtl": "3600s"}"#),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.raw);
    let new = a.body["apiToken"]["secret"].as_str().unwrap().to_owned();
    let until = Timestamp::parse_rfc3339(a.body["apiToken"]["previousSecretExpireTime"].as_str().unwrap()).unwrap();
    assert!(
        until.unix_seconds() >= before.unix_seconds() + 3599 && until.unix_seconds() <= before.unix_seconds() + 3601
    );
    // Both work now, as the gateway's table has both (the old one flagged).
    for secret in [&old, &new] {
        assert_eq!(
            f.call("GET", COLLECTION, Some(secret), None).await.status,
            StatusCode::OK
        );
    }
    let pushed =
        apitokens_core::Config::from_plugin_configuration(f.publisher.encoded().await.payload.to_vec()).unwrap();
    assert!(pushed.tokens().get(&Digest::of(old.as_bytes())).unwrap().is_previous());
    // Get shows until when.
    let got = f.call("GET", &format!("{COLLECTION}/ci"), Some(&new), None).await;
    assert_eq!(
        got.body["apiToken"]["previousSecretExpireTime"],
        a.body["apiToken"]["previousSecretExpireTime"]
    );
    // A second regeneration without an overlap ends it at once.
    let a = f
        .call(
            "POST",
            &format!("{COLLECTION}/ci:regenerate"),
            Some(&f.owner),
            Some("{}"),
        )
        .await;
    let newest = a.body["apiToken"]["secret"].as_str().unwrap().to_owned();
    assert!(a.body["apiToken"].get("previousSecretExpireTime").is_none());
    for (secret, status) in [
        (&old, StatusCode::UNAUTHORIZED),
        (&new, StatusCode::UNAUTHORIZED),
        (&newest, StatusCode::OK),
    ] {
        assert_eq!(f.call("GET", COLLECTION, Some(secret), None).await.status, status);
    }
    // Bounded, and spelled as a duration.
    for (body, field) in [
        (r#"{"previousSecretTtl": "604801s"}"#, "previousSecretTtl"),
        (r#"{"previousSecretTtl": "1h"}"#, "previousSecretTtl"),
        (r#"{"previousSecretTtl": "-5s"}"#, "previousSecretTtl"),
    ] {
        let a = f
            .call(
                "POST",
                &format!("{COLLECTION}/ci:regenerate"),
                Some(&f.owner),
                Some(body),
            )
            .await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{body}: {}", a.raw);
        assert_eq!(a.body["field"], field);
    }
}

#[tokio::test]
async fn the_audit_trail_says_who_did_what_from_where() {
    let f = fixture().await;
    let req = |method: &str, path: &str, body: Option<&str>| {
        HttpRequest::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {}", f.owner))
            // Sent by the client itself: no trusted proxy appended it.
            .header("x-forwarded-for", "10.9.9.9, 203.0.113.5")
            .extension(axum::extract::ConnectInfo(std::net::SocketAddr::from((
                [192, 0, 2, 44],
                5555,
            ))))
            .body(Body::from(body.unwrap_or("").to_owned()))
            .unwrap()
    };
    let created = f
        .send(req(
            "POST",
            COLLECTION,
            Some(r#"{"name": "namespaces/default/apitokens/ci", "role": "editor", "expireTime": "2099-01-01T00:00:00Z"}"#),
        ))
        .await;
    assert_eq!(created.status, StatusCode::OK);
    assert_eq!(
        created.body["apiToken"]["createdBy"],
        "namespaces/default/apitokens/admin"
    );
    f.send(req(
        "POST",
        &format!("{COLLECTION}/ci:regenerate"),
        Some(r#"{"previousSecretTtl": "60s"}"#),
    ))
    .await;
    f.send(req("DELETE", &format!("{COLLECTION}/ci"), None)).await;
    let a = f
        .call(
            "GET",
            "/apitokens/v1/namespaces/default/apitokens:events",
            Some(&f.owner),
            None,
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.raw);
    let events = a.body["events"].as_array().unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["apitoken.delete", "apitoken.regenerate", "apitoken.create"]);
    for e in events {
        assert_eq!(e["actor"], "namespaces/default/apitokens/admin");
        // A header from a peer that is not a trusted proxy is ignored.
        assert_eq!(e["clientAddress"], "192.0.2.44");
        assert_eq!(e["peerAddress"], "192.0.2.44");
        assert_eq!(e["credential"], "current");
        assert_eq!(e["token"], "namespaces/default/apitokens/ci");
        assert_eq!(e["namespace"], "default");
    }
    assert_eq!(events[2]["role"], "editor");
    assert_eq!(events[2]["expireTime"], "2099-01-01T00:00:00Z");
    assert!(events[1]["previousSecretExpireTime"].is_string());
    assert!(!a.raw.contains("apt_") && !a.raw.contains(&Digest::of(f.owner.as_bytes()).to_hex()));
    // Pages, newest first.
    let a = f
        .call(
            "GET",
            "/apitokens/v1/namespaces/default/apitokens:events?pageSize=2",
            Some(&f.owner),
            None,
        )
        .await;
    assert_eq!(a.body["events"].as_array().unwrap().len(), 2);
    let next = a.body["nextPageToken"].as_str().unwrap().to_owned();
    let a = f
        .call(
            "GET",
            &format!("/apitokens/v1/namespaces/default/apitokens:events?pageSize=2&pageToken={next}"),
            Some(&f.owner),
            None,
        )
        .await;
    assert_eq!(a.body["events"][0]["event"], "apitoken.create");
    assert!(a.body.get("nextPageToken").is_none());
    // Owners only, their namespace only; bad paging names the field.
    let other = add_token(&f, "namespaces/other/apitokens/boss", Role::Owner, None).await;
    let a = f
        .call(
            "GET",
            "/apitokens/v1/namespaces/default/apitokens:events",
            Some(&other),
            None,
        )
        .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    for (query, field) in [
        ("pageSize=0", "pageSize"),
        ("pageSize=x", "pageSize"),
        ("pageToken=abc", "pageToken"),
    ] {
        let a = f
            .call(
                "GET",
                &format!("/apitokens/v1/namespaces/default/apitokens:events?{query}"),
                Some(&f.owner),
                None,
            )
            .await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{query}");
        assert_eq!(a.body["field"], field);
    }
    let a = f
        .call(
            "POST",
            "/apitokens/v1/namespaces/default/apitokens:events",
            Some(&f.owner),
            None,
        )
        .await;
    assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn reported_uses_become_the_last_use_time() {
    let f = fixture().await;
    let secret = f.create("ci", "viewer").await.body["apiToken"]["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    let got = f.call("GET", &format!("{COLLECTION}/ci"), Some(&f.owner), None).await;
    assert!(got.body["apiToken"].get("lastUseTime").is_none(), "never used");
    let digest = Digest::of(secret.as_bytes());
    // Another store's report is ignored; this store's is recorded.
    f.state.service.record_use(&[0; 16], &digest.0, &[]);
    f.state
        .service
        .record_use(&f.store.lineage(), &[digest.0, [7; 32]].concat(), &[]);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let flusher = tokio::spawn(Arc::clone(&f.state.service).run_usage(Duration::from_secs(3600), stop_rx));
    stop_tx.send(true).unwrap();
    flusher.await.unwrap();
    let got = f.call("GET", COLLECTION, Some(&f.owner), None).await;
    let tokens = got.body["apiTokens"].as_array().unwrap();
    let ci = tokens
        .iter()
        .find(|t| t["name"] == "namespaces/default/apitokens/ci")
        .unwrap();
    let used = Timestamp::parse_rfc3339(ci["lastUseTime"].as_str().unwrap()).unwrap();
    assert!((clock::now().unix_seconds() - used.unix_seconds()).abs() < 60);
    let admin = tokens
        .iter()
        .find(|t| t["name"] == "namespaces/default/apitokens/admin")
        .unwrap();
    // The owner's own calls to this API are uses too (no gateway reported
    // them: the API authenticated them itself).
    assert!(admin["lastUseTime"].is_string(), "{admin}");
}

#[tokio::test]
async fn reported_addresses_become_the_last_five_distinct_the_latest_first() {
    let (f, clock) = fixture_at("api-addresses", 1_800_000_000, |_| {}).await;
    let secret = f.create("ci", "viewer").await.body["apiToken"]["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    let digest = Digest::of(secret.as_bytes());
    let ip = |s: &str| -> std::net::IpAddr { s.parse().unwrap() };
    let addresses = |got: &Answer| -> Vec<(String, String)> {
        got.body["apiToken"]["lastAddresses"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|s| {
                        (
                            s["address"].as_str().unwrap().to_owned(),
                            s["lastSeenTime"].as_str().unwrap().to_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let path = format!("{COLLECTION}/ci");
    let get = || f.call("GET", &path, Some(&f.owner), None);
    assert!(
        get().await.body["apiToken"].get("lastAddresses").is_none(),
        "never seen"
    );
    // Another store's report is ignored; this store's is kept, each address
    // once (two VMs saw the same client), mapped addresses as IPv4.
    f.state.service.record_seen(&[0; 16], &[(digest, ip("192.0.2.99"))]);
    f.state.service.record_seen(
        &f.store.lineage(),
        &[
            (digest, ip("10.0.0.1")),
            (digest, ip("::ffff:10.0.0.2")),
            (digest, ip("10.0.0.1")),
            (Digest([7; 32]), ip("10.0.0.3")),
        ],
    );
    f.flush_uses().await;
    let t0 = "2027-01-15T08:00:00Z".to_owned();
    assert_eq!(
        addresses(&get().await),
        [("10.0.0.1".to_owned(), t0.clone()), ("10.0.0.2".to_owned(), t0.clone())]
    );
    // Later, five more: the latest five are kept, the latest first; one seen
    // again moves up.
    clock.advance(Duration::from_secs(120));
    let t1 = "2027-01-15T08:02:00Z".to_owned();
    let later: Vec<_> = ["2001:db8::1", "10.0.0.4", "10.0.0.5", "10.0.0.6", "10.0.0.1"]
        .iter()
        .map(|a| (digest, ip(a)))
        .collect();
    f.state.service.record_seen(&f.store.lineage(), &later);
    f.flush_uses().await;
    let got = addresses(&get().await);
    assert_eq!(got.len(), 5, "{got:?}");
    assert!(got.iter().all(|(_, t)| *t == t1), "{got:?}");
    let mut names: Vec<_> = got.iter().map(|(a, _)| a.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["10.0.0.1", "10.0.0.4", "10.0.0.5", "10.0.0.6", "2001:db8::1"]);
    // They are a use as well (the token's last use).
    assert_eq!(get().await.body["apiToken"]["lastUseTime"], t1);
}

#[tokio::test]
async fn reported_access_becomes_the_evidence_and_the_narrowest_role() {
    use apitokens_core::access::{Access, Kind};
    use apitokens_core::role::RoleSet;
    use apitokens_core::Role;
    let (f, clock) = fixture_at("api-evidence", 1_800_000_030, |_| {}).await;
    let secret = f.create("ci", "owner").await.body["apiToken"]["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    let digest = Digest::of(secret.as_bytes());
    let access = || async {
        let got = f.call("GET", &format!("{COLLECTION}/ci"), Some(&f.owner), None).await;
        got.body["apiToken"].get("access").cloned()
    };
    // Used by a filter that reports no access: no claim.
    f.state.service.record_use(&f.store.lineage(), &digest.0, &[]);
    f.flush_uses().await;
    assert_eq!(access().await, None);
    // Past that use's window, reports from filters that say what was done.
    clock.advance(Duration::from_secs(31 * 86_400));
    let read = Access::admitted(Kind::Read, RoleSet::ALL).bits();
    let write = Access::admitted(Kind::Write, RoleSet::NONE.with(Role::Editor).with(Role::Owner)).bits();
    f.state.service.record_use(&f.store.lineage(), &digest.0, &[read]);
    f.flush_uses().await;
    assert_eq!(
        access().await,
        Some(serde_json::json!({"days": 30, "kinds": ["read"], "complete": true, "narrowestRole": "viewer"}))
    );
    // A write in the same minute is new evidence: written, not skipped as
    // the minute's use already written.
    f.state.service.record_use(&f.store.lineage(), &digest.0, &[write]);
    f.flush_uses().await;
    assert_eq!(
        access().await,
        Some(serde_json::json!({"days": 30, "kinds": ["read", "write"], "complete": true, "narrowestRole": "editor"}))
    );
    // A month and a day later, only reads since: the write is forgotten.
    clock.advance(Duration::from_secs(31 * 86_400));
    f.state.service.record_use(&f.store.lineage(), &digest.0, &[read]);
    f.flush_uses().await;
    assert_eq!(
        access().await,
        Some(serde_json::json!({"days": 30, "kinds": ["read"], "complete": true, "narrowestRole": "viewer"}))
    );
    // A fleet with an older filter too: its use may have written, so no
    // role is suggested while it is in the window.
    clock.advance(Duration::from_secs(120));
    f.state.service.record_use(&f.store.lineage(), &digest.0, &[]);
    f.flush_uses().await;
    assert_eq!(
        access().await,
        Some(serde_json::json!({"days": 30, "kinds": ["read"], "complete": false}))
    );
}

#[tokio::test]
async fn a_token_used_again_within_the_minute_costs_no_second_write() {
    let (dir, store) = changes_fail("api-usage-minute");
    // 12:00:30 on a clock the test moves.
    let clock = Clock::manual(Timestamp::from_unix(1_800_000_030, 0));
    let opts = ServiceOptions {
        clock: clock.clone(),
        ..ServiceOptions::default()
    };
    let f = fixture_with(Arc::clone(&store) as Arc<dyn Store>, dir, opts).await;
    let digest = Digest::of(f.owner.as_bytes());
    let writes = || store.2.load(std::sync::atomic::Ordering::SeqCst);
    // Reports from many filters, flushed again and again within a minute.
    let before = writes();
    for _ in 0..5 {
        f.state.service.record_use(&f.store.lineage(), &digest.0, &[]);
        f.state.service.record_use(&f.store.lineage(), &digest.0, &[]);
        f.flush_uses().await;
        clock.advance(Duration::from_secs(5));
    }
    assert_eq!(writes() - before, 1, "one write for one token's uses within a minute");
    // The next minute's use is written again.
    clock.advance(Duration::from_secs(60));
    f.state.service.record_use(&f.store.lineage(), &digest.0, &[]);
    f.flush_uses().await;
    assert_eq!(writes() - before, 2, "a use in the next minute is written");
    let got = f.call("GET", COLLECTION, Some(&f.owner), None).await;
    let used = got.body["apiTokens"][0]["lastUseTime"].as_str().unwrap().to_owned();
    // Kept to the minute, by the receiving clock.
    assert!(used.ends_with(":00Z"), "{used}");
}

#[tokio::test]
async fn metrics_count_writes_by_operation_and_outcome() {
    let f = fixture_on_sqlite(
        "metrics",
        ServiceOptions {
            quota: Some(3),
            ..ServiceOptions::default()
        },
    )
    .await;
    assert_eq!(f.create("ci", "viewer").await.status, StatusCode::OK);
    assert_eq!(f.create("ci", "viewer").await.status, StatusCode::CONFLICT);
    assert_eq!(f.create("more", "viewer").await.status, StatusCode::OK);
    assert_eq!(f.create("extra", "viewer").await.status, StatusCode::TOO_MANY_REQUESTS);
    let anonymous = f.call("DELETE", &format!("{COLLECTION}/ci"), None, None).await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    let regenerated = f
        .call("POST", &format!("{COLLECTION}/ci:regenerate"), Some(&f.owner), None)
        .await;
    assert_eq!(regenerated.status, StatusCode::OK, "{}", regenerated.raw);
    let disabled = f
        .call("POST", &format!("{COLLECTION}/ci:disable"), Some(&f.owner), None)
        .await;
    assert_eq!(disabled.status, StatusCode::OK, "{}", disabled.raw);
    // Reads are not writes.
    assert_eq!(
        f.call("GET", COLLECTION, Some(&f.owner), None).await.status,
        StatusCode::OK
    );
    let scrape = f.call("GET", "/metrics", None, None).await;
    assert_eq!(scrape.status, StatusCode::OK);
    assert!(scrape.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let samples: Vec<&str> = scrape
        .raw
        .lines()
        .filter(|l| l.starts_with("apitokens_writes_total"))
        .collect();
    let mut expected = vec![
        r#"apitokens_writes_total{operation="create",outcome="ok"} 2"#,
        r#"apitokens_writes_total{operation="create",outcome="conflict"} 1"#,
        r#"apitokens_writes_total{operation="create",outcome="quota_exceeded"} 1"#,
        r#"apitokens_writes_total{operation="delete",outcome="unauthenticated"} 1"#,
        r#"apitokens_writes_total{operation="regenerate",outcome="ok"} 1"#,
        r#"apitokens_writes_total{operation="disable",outcome="ok"} 1"#,
        // From zero: a rate exists before the first delete.
        r#"apitokens_writes_total{operation="delete",outcome="ok"} 0"#,
        r#"apitokens_writes_total{operation="enable",outcome="ok"} 0"#,
        r#"apitokens_writes_total{operation="update",outcome="ok"} 0"#,
    ];
    let mut got = samples.clone();
    got.sort_unstable();
    expected.sort_unstable();
    assert_eq!(got, expected, "{}", scrape.raw);
    assert!(scrape.raw.contains("apitokens_published_tokens 3\n"), "{}", scrape.raw);
    assert!(scrape.raw.ends_with("# EOF\n"));
}

#[tokio::test]
async fn the_openapi_document_is_served_as_kept_in_the_repository() {
    let f = fixture().await;
    let a = f.call("GET", OPENAPI_PATH, None, None).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.headers["content-type"], "application/json");
    assert_eq!(a.raw, OPENAPI);
    assert!(a.body["openapi"].as_str().unwrap().starts_with("3.1"));
}

#[tokio::test]
async fn every_role_reads_itself_and_nothing_else() {
    let f = fixture().await;
    let expire = Timestamp::from_unix(f.state.service.clock().now().unix_seconds() + 3600, 0);
    let viewer = add_token(&f, "namespaces/default/apitokens/vw", Role::Viewer, Some(expire)).await;
    let editor = add_token(&f, "namespaces/default/apitokens/ed", Role::Editor, None).await;
    let other = add_token(&f, "namespaces/other/apitokens/vw", Role::Viewer, None).await;
    let own = format!("{COLLECTION}:self");
    for (secret, name, role) in [
        (&viewer, "namespaces/default/apitokens/vw", "viewer"),
        (&editor, "namespaces/default/apitokens/ed", "editor"),
        (&f.owner, "namespaces/default/apitokens/admin", "owner"),
    ] {
        let a = f.call("GET", &own, Some(secret), None).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.raw);
        let token = a.body["apiToken"].as_object().unwrap();
        assert_eq!(token["name"], name);
        assert_eq!(token["role"], role);
        assert!(token.contains_key("createTime"));
        // Its own fields only: never a secret, nor who created it.
        let mut keys: Vec<&str> = token.keys().map(String::as_str).collect();
        keys.retain(|k| !["name", "role", "createTime", "expireTime", "lastUseTime"].contains(k));
        assert!(keys.is_empty(), "{keys:?}");
        assert!(!a.raw.contains(secret.as_str()));
    }
    let a = f.call("GET", &own, Some(&viewer), None).await;
    assert_eq!(a.body["apiToken"]["expireTime"], expire.to_rfc3339());
    // Only in its own namespace, only GET, and not the other calls.
    let a = f.call("GET", &own, Some(&other), None).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.raw);
    assert_eq!(
        f.call("POST", &own, Some(&viewer), None).await.status,
        StatusCode::METHOD_NOT_ALLOWED
    );
    for path in [
        COLLECTION.to_owned(),
        format!("{COLLECTION}/vw"),
        format!("{COLLECTION}:events"),
    ] {
        let a = f.call("GET", &path, Some(&viewer), None).await;
        assert_eq!(a.status, StatusCode::FORBIDDEN, "{path}: {}", a.raw);
    }
    assert_eq!(f.call("GET", &own, None, None).await.status, StatusCode::UNAUTHORIZED);
    // Its last use, once reported.
    f.state
        .service
        .record_use(&f.store.lineage(), &Digest::of(editor.as_bytes()).0, &[]);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let flusher = tokio::spawn(Arc::clone(&f.state.service).run_usage(Duration::from_secs(3600), stop_rx));
    stop_tx.send(true).unwrap();
    flusher.await.unwrap();
    let a = f.call("GET", &own, Some(&editor), None).await;
    assert!(a.body["apiToken"]["lastUseTime"].is_string(), "{}", a.raw);
}

mod leak_reports {
    use super::*;
    use crate::tokens::leaks::ANSWER_AFTER;
    use axum::extract::ConnectInfo;
    use std::net::SocketAddr;
    use std::time::Instant;

    const REVOKE: &str = "/apitokens/v1/credentials:revoke";

    impl Fixture {
        /// A report from `peer`, no authentication: the answer and its time.
        async fn report(&self, peer: &str, body: &str) -> (Answer, Duration) {
            let mut req = HttpRequest::builder()
                .method("POST")
                .uri(REVOKE)
                .body(Body::from(body.to_owned()))
                .unwrap();
            let addr: SocketAddr = peer.parse().unwrap();
            req.extensions_mut().insert(ConnectInfo(addr));
            let started = Instant::now();
            let a = self.send(req).await;
            (a, started.elapsed())
        }

        async fn secret_of(&self, id: &str, role: &str) -> String {
            let a = self.create(id, role).await;
            assert_eq!(a.status, StatusCode::OK, "{}", a.raw);
            a.body["apiToken"]["secret"].as_str().unwrap().to_owned()
        }

        /// A new token `id`, regenerated with an overlap of `ttl`: its
        /// previous secret.
        async fn rotated(&self, id: &str, ttl: &str) -> String {
            let old = self.secret_of(id, "viewer").await;
            let body = json!({"previousSecretTtl": ttl}).to_string();
            let a = self
                .call(
                    "POST",
                    &format!("{COLLECTION}/{id}:regenerate"),
                    Some(&self.owner),
                    Some(&body),
                )
                .await;
            assert_eq!(a.status, StatusCode::OK, "{}", a.raw);
            old
        }
    }

    /// The same secret with its last character changed: the checksum breaks.
    fn checksum_broken(secret: &str) -> String {
        let (body, last) = secret.split_at(secret.len() - 1);
        format!("{body}{}", if last == "A" { "B" } else { "A" })
    }

    #[tokio::test]
    async fn a_reported_secret_revokes_its_token_at_once_and_says_nothing() {
        let f = fixture().await;
        let leaked = f.secret_of("leaky", "editor").await;
        let kept = f.secret_of("kept", "viewer").await;
        let body = json!({"credentials": ["not-ours", leaked, "apt_0000"]}).to_string();
        let (a, took) = f.report("203.0.113.5:4000", &body).await;
        assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.raw);
        assert_eq!(a.body, json!({}));
        assert!(took >= ANSWER_AFTER, "{took:?}");
        // Gone from the store and from what the gateways get, now.
        let names = f.names().await;
        assert!(
            !names.contains(&"namespaces/default/apitokens/leaky".to_owned()),
            "{names:?}"
        );
        assert!(!f
            .pushed()
            .await
            .contains(&"namespaces/default/apitokens/leaky".to_owned()));
        assert_eq!(
            f.call("GET", COLLECTION, Some(&leaked), None).await.status,
            StatusCode::UNAUTHORIZED
        );
        assert!(names.contains(&"namespaces/default/apitokens/kept".to_owned()));
        let _ = kept;
        // Audited as reported leaked, with the reporter's address.
        let events = f
            .call("GET", &format!("{COLLECTION}:events"), Some(&f.owner), None)
            .await;
        let revoke = &events.body["events"][0];
        assert_eq!(revoke["event"], "apitoken.revoke", "{}", events.raw);
        assert_eq!(revoke["token"], "namespaces/default/apitokens/leaky");
        assert_eq!(revoke["actor"], "reported leaked");
        assert_eq!(revoke["clientAddress"], "203.0.113.5");
        assert!(!events.raw.contains(&leaked));
        // Reported again: the same answer, nothing left to change.
        let revision = f.store.head().await.unwrap().at;
        let (a, _) = f.report("203.0.113.5:4000", &body).await;
        assert_eq!((a.status, a.body), (StatusCode::ACCEPTED, json!({})));
        assert_eq!(f.store.head().await.unwrap().at, revision);
    }

    #[tokio::test]
    async fn unknown_malformed_and_checksum_broken_secrets_change_nothing() {
        let f = fixture().await;
        let secret = f.secret_of("ci", "owner").await;
        let revision = f.store.head().await.unwrap().at;
        let names = f.names().await;
        let unknown = Secret::generate().unwrap().expose().to_owned();
        let body = json!({"credentials": [unknown, checksum_broken(&secret), &secret[..20], "", "apt_"]}).to_string();
        let (a, took) = f.report("203.0.113.6:4000", &body).await;
        assert_eq!((a.status, &a.body), (StatusCode::ACCEPTED, &json!({})), "{}", a.raw);
        assert!(took >= ANSWER_AFTER, "{took:?}");
        assert_eq!(f.store.head().await.unwrap().at, revision);
        assert_eq!(f.names().await, names);
        assert_eq!(
            f.call("GET", COLLECTION, Some(&secret), None).await.status,
            StatusCode::OK
        );
    }

    #[tokio::test]
    async fn a_previous_secret_in_its_overlap_revokes_the_token() {
        let f = fixture().await;
        let old = f.rotated("rotated", "3600s").await;
        let body = json!({"credentials": [old]}).to_string();
        assert_eq!(f.report("203.0.113.7:1", &body).await.0.status, StatusCode::ACCEPTED);
        assert!(!f
            .names()
            .await
            .contains(&"namespaces/default/apitokens/rotated".to_owned()));
    }

    #[tokio::test]
    async fn a_previous_secret_whose_overlap_ended_revokes_nothing() {
        let clock = Clock::manual(clock::now());
        let f = fixture_on_sqlite(
            "api-leak-ended",
            ServiceOptions {
                clock: clock.clone(),
                ..ServiceOptions::default()
            },
        )
        .await;
        let old = f.rotated("rotated", "60s").await;
        // The overlap is over: the old secret is refused, though still in
        // the table (expired entries stay a while). Whoever kept it must
        // not be able to delete the live token with it.
        clock.advance(Duration::from_secs(61));
        assert_eq!(
            f.call("GET", COLLECTION, Some(&old), None).await.status,
            StatusCode::UNAUTHORIZED
        );
        let revision = f.store.head().await.unwrap().at;
        let body = json!({"credentials": [old]}).to_string();
        assert_eq!(f.report("203.0.113.9:1", &body).await.0.status, StatusCode::ACCEPTED);
        assert!(f
            .names()
            .await
            .contains(&"namespaces/default/apitokens/rotated".to_owned()));
        assert_eq!(f.store.head().await.unwrap().at, revision);
    }

    #[tokio::test]
    async fn bad_reports_name_the_field_and_never_quote_it() {
        let f = fixture().await;
        let secret = f.secret_of("ci", "viewer").await;
        let too_many: Vec<&str> = std::iter::repeat_n("x", 1001).collect();
        let cases = [
            ("{}".to_owned(), Some("credentials")),
            (json!({"credentials": secret}).to_string(), Some("credentials")),
            (json!({"credentials": []}).to_string(), Some("credentials")),
            (json!({"credentials": too_many}).to_string(), Some("credentials")),
            (json!({"credentials": [secret, 7]}).to_string(), Some("credentials[1]")),
            (json!({"credentials": [secret], secret.clone(): 1}).to_string(), None),
            (format!("[\"{secret}\"]"), None),
            (format!("{{\"credentials\": [\"{secret}\""), None),
        ];
        let revision = f.store.head().await.unwrap().at;
        for (body, field) in cases {
            let (a, _) = f.report("203.0.113.8:1", &body).await;
            assert_eq!(a.status, StatusCode::BAD_REQUEST, "{body}: {}", a.raw);
            assert_eq!(a.body["field"].as_str(), field, "{body}: {}", a.raw);
            assert!(!a.raw.contains(&secret), "{}", a.raw);
        }
        assert_eq!(f.store.head().await.unwrap().at, revision);
        // No authentication is needed, and another method is a 405.
        let a = f.call("GET", REVOKE, None, None).await;
        assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(a.headers["allow"], "POST");
    }

    #[tokio::test]
    async fn reports_are_rate_limited_per_client_address() {
        let f = fixture_on_sqlite(
            "api-leak-rate",
            ServiceOptions {
                report_rate: crate::tokens::Rate {
                    per_second: 0.001,
                    burst: 2.0,
                },
                ..ServiceOptions::default()
            },
        )
        .await;
        let body = json!({"credentials": ["nothing"]}).to_string();
        for _ in 0..2 {
            assert_eq!(f.report("198.51.100.1:1", &body).await.0.status, StatusCode::ACCEPTED);
        }
        // Counted before the body is read: a bad one is refused too.
        for body in [body.as_str(), "not json"] {
            let (a, took) = f.report("198.51.100.1:2", body).await;
            assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS, "{}", a.raw);
            assert!(a.headers["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
            assert!(took < ANSWER_AFTER, "a refusal holds no connection: {took:?}");
        }
        // Another client, and another IPv6 /64, have their own.
        assert_eq!(f.report("198.51.100.2:1", &body).await.0.status, StatusCode::ACCEPTED);
        for _ in 0..2 {
            assert_eq!(
                f.report("[2001:db8:0:1::1]:1", &body).await.0.status,
                StatusCode::ACCEPTED
            );
        }
        assert_eq!(
            f.report("[2001:db8:0:1::2]:1", &body).await.0.status,
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(
            f.report("[2001:db8:0:2::1]:1", &body).await.0.status,
            StatusCode::ACCEPTED
        );
    }
}

mod bound_callers {
    use super::*;
    use apitokens_core::conditions::{Cidr, Conditions, Packed};
    use axum::extract::ConnectInfo;
    use std::net::SocketAddr;

    /// An owner of `default` bound to 10.0.0.0/8 except 10.1.0.0/16.
    async fn bound_owner(f: &Fixture) -> String {
        let secret = Secret::generate().unwrap();
        let mut record = crate::store::contract::record("namespaces/default/apitokens/lan-owner", Role::Owner, 0);
        record.digest = secret.digest();
        record.conditions = Some(Packed::new(&Conditions {
            allow: vec![Cidr::parse("10.0.0.0/8").unwrap()],
            except: vec![Cidr::parse("10.1.0.0/16").unwrap()],
            ..Conditions::default()
        }));
        f.store.insert(vec![record], None, vec![]).await.unwrap();
        f.publisher.refresh().await.unwrap();
        secret.expose().to_owned()
    }

    async fn from(f: &Fixture, peer: &str, method: &str, path: &str, secret: &str, body: Option<&str>) -> Answer {
        let mut req = HttpRequest::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {secret}"))
            .body(Body::from(body.unwrap_or("").to_owned()))
            .unwrap();
        let addr: SocketAddr = format!("{peer}:4444").parse().unwrap();
        req.extensions_mut().insert(ConnectInfo(addr));
        f.send(req).await
    }

    #[tokio::test]
    async fn a_token_bound_to_addresses_is_refused_from_elsewhere_by_the_api_too() {
        let f = fixture().await;
        let owner = bound_owner(&f).await;
        assert_eq!(
            from(&f, "10.2.0.1", "GET", COLLECTION, &owner, None).await.status,
            StatusCode::OK
        );
        for outside in ["10.1.0.1", "192.0.2.1"] {
            let a = from(&f, outside, "GET", COLLECTION, &owner, None).await;
            assert_eq!(a.status, StatusCode::FORBIDDEN, "{outside}: {}", a.raw);
            assert_eq!(
                a.body["message"], "The token may not be used from this client address.",
                "{}",
                a.raw
            );
        }
        // No address at all (no connection info): nothing shows it is allowed.
        assert_eq!(
            f.call("GET", COLLECTION, Some(&owner), None).await.status,
            StatusCode::FORBIDDEN
        );
    }

    #[tokio::test]
    async fn a_bound_owner_makes_only_tokens_bound_within_its_addresses() {
        let f = fixture().await;
        let owner = bound_owner(&f).await;
        // Without ranges: the caller's.
        let body = r#"{"name": "namespaces/default/apitokens/child", "role": "viewer"}"#;
        let a = from(&f, "10.2.0.1", "POST", COLLECTION, &owner, Some(body)).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.raw);
        assert_eq!(
            a.body["apiToken"]["clientAddresses"],
            json!({"allow": ["10.0.0.0/8"], "except": ["10.1.0.0/16"]})
        );
        // Narrower: kept, with the caller's excepted range added.
        let body = r#"{"name": "namespaces/default/apitokens/narrow", "role": "viewer",
                       "clientAddresses": {"allow": ["10.2.0.0/16"]}}"#;
        let a = from(&f, "10.2.0.1", "POST", COLLECTION, &owner, Some(body)).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.raw);
        assert_eq!(
            a.body["apiToken"]["clientAddresses"],
            json!({"allow": ["10.2.0.0/16"], "except": ["10.1.0.0/16"]})
        );
        // Wider, or elsewhere: a 400 naming the field, nothing created.
        let before = f.names().await;
        for allow in [r#"["0.0.0.0/0"]"#, r#"["192.0.2.0/24"]"#, r#"["::/0"]"#] {
            let body = format!(
                r#"{{"name": "namespaces/default/apitokens/wide", "role": "viewer", "clientAddresses": {{"allow": {allow}}}}}"#
            );
            let a = from(&f, "10.2.0.1", "POST", COLLECTION, &owner, Some(&body)).await;
            assert_eq!(a.status, StatusCode::BAD_REQUEST, "{allow}: {}", a.raw);
            assert_eq!(a.body["field"], "clientAddresses.allow");
        }
        assert_eq!(f.names().await, before);
        // An unbound token is not the bound owner's to regenerate, disable
        // or enable; one bound within its ranges is.
        let unbound = format!("{COLLECTION}/ci-token");
        f.create("ci-token", "viewer").await;
        for action in ["regenerate", "disable"] {
            let a = from(
                &f,
                "10.2.0.1",
                "POST",
                &format!("{unbound}:{action}"),
                &owner,
                Some("{}"),
            )
            .await;
            assert_eq!(a.status, StatusCode::FORBIDDEN, "{action}: {}", a.raw);
            assert!(a.raw.contains("not bound within"), "{}", a.raw);
        }
        let a = from(
            &f,
            "10.2.0.1",
            "POST",
            &format!("{COLLECTION}/narrow:regenerate"),
            &owner,
            Some("{}"),
        )
        .await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.raw);
    }
}

#[tokio::test]
async fn inactive_tokens_are_disabled_then_deleted_by_the_policy_and_audited() {
    use crate::store::Action;
    use crate::tokens::inactivity::{self, Policies};
    let (f, clock) = fixture_at("api-inactivity", 1_800_000_030, |_| {}).await;
    let service = Arc::clone(&f.state.service);
    for id in ["idle", "busy"] {
        assert_eq!(f.create(id, "viewer").await.status, StatusCode::OK);
    }
    let expiring = json!({"name": "namespaces/default/apitokens/brief", "role": "viewer",
                          "expireTime": "2027-01-20T00:00:00Z"})
    .to_string();
    assert_eq!(
        f.call("POST", COLLECTION, Some(&f.owner), Some(&expiring)).await.status,
        StatusCode::OK
    );
    /// Writes the uses remembered so far.
    async fn flush(f: &Fixture) {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let flusher = tokio::spawn(Arc::clone(&f.state.service).run_usage(Duration::from_secs(3600), stop_rx));
        stop_tx.send(true).unwrap();
        flusher.await.unwrap();
    }
    /// The token `busy` is used now (a gateway's report).
    async fn use_busy(f: &Fixture) {
        let digest = f
            .store
            .get("namespaces/default/apitokens/busy")
            .await
            .unwrap()
            .unwrap()
            .digest;
        f.state.service.record_use(&f.store.lineage(), &digest.0, &[]);
        flush(f).await;
    }
    async fn state(f: &Fixture, id: &str) -> Option<TokenRecord> {
        f.store
            .get(&format!("namespaces/default/apitokens/{id}"))
            .await
            .unwrap()
    }
    let mut policies = Policies::default();
    policies.add("30d:disable").unwrap();
    policies.add("other=off").unwrap();
    // A day short of 30: nothing. The owner calls the API itself (not
    // through a gateway): a use too.
    clock.advance(Duration::from_secs(29 * 86_400));
    use_busy(&f).await;
    assert_eq!(
        f.call("GET", COLLECTION, Some(&f.owner), None).await.status,
        StatusCode::OK
    );
    flush(&f).await;
    assert!(state(&f, "admin").await.unwrap().last_use.is_some());
    assert_eq!(
        inactivity::sweep(&service, &policies, clock.now()).await,
        Default::default()
    );
    // 30 days on: the one never used since its creation, not the ones used
    // two days ago (by a report, by the API), not the one already expired.
    clock.advance(Duration::from_secs(2 * 86_400));
    let swept = inactivity::sweep(&service, &policies, clock.now()).await;
    assert_eq!(swept.disabled, ["namespaces/default/apitokens/idle"]);
    assert!(state(&f, "idle").await.unwrap().disabled && !state(&f, "busy").await.unwrap().disabled);
    assert!(!state(&f, "brief").await.unwrap().disabled && !state(&f, "admin").await.unwrap().disabled);
    // Every Envoy refuses it: the table carries the flag.
    let idle = state(&f, "idle").await.unwrap().digest;
    assert!(f.publisher.current().token(&idle).unwrap().is_disabled());
    // Audited as the policy's.
    let events = f.store.events("default", None, 10).await.unwrap();
    let by_policy: Vec<_> = events
        .iter()
        .filter(|(_, e)| e.actor == inactivity::ACTOR)
        .map(|(_, e)| (e.action, e.token.clone().unwrap_or_default()))
        .collect();
    assert_eq!(
        by_policy,
        [(Action::Disable, "namespaces/default/apitokens/idle".to_owned())]
    );
    // Again: nothing more to do.
    assert_eq!(
        inactivity::sweep(&service, &policies, clock.now()).await,
        Default::default()
    );
    // An owner enables it: active again from then, not disabled at once.
    let a = f
        .call("POST", &format!("{COLLECTION}/idle:enable"), Some(&f.owner), Some("{}"))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.raw);
    assert_eq!(
        inactivity::sweep(&service, &policies, clock.now()).await,
        Default::default()
    );
    // A month on, the owner idle too, but the namespace's last enabled
    // owner: kept, said so.
    clock.advance(Duration::from_secs(31 * 86_400));
    use_busy(&f).await;
    let swept = inactivity::sweep(&service, &policies, clock.now()).await;
    assert_eq!(swept.disabled, ["namespaces/default/apitokens/idle"]);
    assert_eq!(swept.kept_last_owner, ["namespaces/default/apitokens/admin"]);
    // A delete policy, a month after that disable: the disabled one goes;
    // the one used lately stays.
    let mut deleting = Policies::default();
    deleting.add("default=30d:delete").unwrap();
    clock.advance(Duration::from_secs(31 * 86_400));
    use_busy(&f).await;
    let swept = inactivity::sweep(&service, &deleting, clock.now()).await;
    assert_eq!(swept.deleted, ["namespaces/default/apitokens/idle"]);
    assert!(state(&f, "idle").await.is_none() && state(&f, "busy").await.is_some());
    assert!(f.publisher.current().token(&idle).is_none());
}

#[tokio::test]
async fn owners_pick_their_namespaces_inactivity_policy_audited_and_the_sweep_applies_it() {
    use crate::tokens::inactivity::{self, Policies};
    const POLICY: &str = "/apitokens/v1/namespaces/default/apitokens:inactivity";
    let mut operator = Policies::default();
    operator.add("other=off").unwrap();
    let (f, clock) = fixture_at("api-inactivity-owner", 1_800_000_030, |o| {
        o.inactivity = Some(operator.clone())
    })
    .await;
    assert_eq!(f.create("idle", "viewer").await.status, StatusCode::OK);
    let editor = f.create("ed", "editor").await.body["apiToken"]["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    let get = || f.call("GET", POLICY, Some(&f.owner), None);
    // Off by default.
    let a = get().await;
    assert_eq!(
        (a.status, &a.body),
        (StatusCode::OK, &json!({"inactivityPolicy": null}))
    );
    // Set by an owner: answered as the namespace has it now, audited once.
    let body = json!({"after": "30d", "action": "disable"}).to_string();
    for _ in 0..2 {
        let a = f.call("PUT", POLICY, Some(&f.owner), Some(&body)).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.raw);
        assert_eq!(
            a.body,
            json!({"inactivityPolicy": {"after": "30d", "action": "disable", "setBy": "namespace"}})
        );
    }
    assert_eq!(get().await.body["inactivityPolicy"]["after"], "30d");
    let set = f.events_of("apitoken.inactivity").await;
    assert_eq!(set.len(), 1, "the same policy again changes nothing: {set:?}");
    assert_eq!(set[0]["policy"], "30d:disable");
    assert_eq!(set[0]["actor"], "namespaces/default/apitokens/admin");
    // Bad bodies name the field; an editor may not; other methods are 405.
    for (bad, field) in [
        (json!({"after": "12h", "action": "disable"}), Some("after")),
        (json!({"after": "90", "action": "disable"}), Some("after")),
        (json!({"after": "720h", "action": "disable"}), Some("after")),
        (json!({"after": "090d", "action": "disable"}), Some("after")),
        (json!({"after": "36501d", "action": "disable"}), Some("after")),
        (json!({"after": "90d", "action": "revoke"}), Some("action")),
        (json!({"after": "90d"}), None),
        (json!({"after": "90d", "action": "disable", "when": "now"}), None),
    ] {
        let a = f.call("PUT", POLICY, Some(&f.owner), Some(&bad.to_string())).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{bad}: {}", a.raw);
        assert_eq!(a.body["field"].as_str(), field, "{bad}: {}", a.raw);
    }
    let a = f.call("PUT", POLICY, Some(&editor), Some(&body)).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.raw);
    let a = f.call("POST", POLICY, Some(&f.owner), Some(&body)).await;
    assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(a.headers["allow"], "GET, PUT, DELETE");
    // The sweep applies it (the owners' policies as stored, with the
    // operator's): 30 days idle, disabled; the owner is kept (used: its
    // own calls to the API).
    clock.advance(Duration::from_secs(31 * 86_400));
    assert_eq!(get().await.status, StatusCode::OK);
    f.flush_uses().await;
    let stored = f.state.service.stored_inactivity_policies().await.unwrap();
    let swept = inactivity::sweep(&f.state.service, &operator.with_owners(&stored), clock.now()).await;
    assert_eq!(
        swept.disabled,
        ["namespaces/default/apitokens/ed", "namespaces/default/apitokens/idle"]
    );
    // Removed: off again (audited as "off").
    let a = f.call("DELETE", POLICY, Some(&f.owner), None).await;
    assert_eq!(
        (a.status, &a.body),
        (StatusCode::OK, &json!({"inactivityPolicy": null}))
    );
    let events = f
        .call("GET", &format!("{COLLECTION}:events"), Some(&f.owner), None)
        .await;
    assert_eq!(events.body["events"][0]["event"], "apitoken.inactivity");
    assert_eq!(events.body["events"][0]["policy"], "off");
    // The operator's own policy for a namespace wins over its owners'.
    let mut strict = Policies::default();
    strict.add("default=90d:delete").unwrap();
    assert_eq!(
        strict.effective("default", Some(inactivity::Policy::parse("30d:disable").unwrap())),
        Some((
            inactivity::Policy::parse("90d:delete").unwrap(),
            inactivity::SetBy::Operator
        ))
    );
}

#[tokio::test]
async fn no_inactivity_policy_without_usage_reports() {
    let f = fixture().await;
    let body = json!({"after": "30d", "action": "delete"}).to_string();
    let a = f
        .call(
            "PUT",
            "/apitokens/v1/namespaces/default/apitokens:inactivity",
            Some(&f.owner),
            Some(&body),
        )
        .await;
    assert_eq!(a.status, StatusCode::CONFLICT, "{}", a.raw);
    assert!(
        a.body["message"].as_str().unwrap().contains("usage reports"),
        "{}",
        a.raw
    );
    // A removal is always taken.
    let a = f
        .call(
            "DELETE",
            "/apitokens/v1/namespaces/default/apitokens:inactivity",
            Some(&f.owner),
            None,
        )
        .await;
    assert_eq!(
        (a.status, &a.body),
        (StatusCode::OK, &json!({"inactivityPolicy": null}))
    );
}

#[tokio::test]
async fn a_tokens_conditions_change_as_a_merge_patch_audited_and_pushed() {
    let f = fixture().await;
    let body = json!({"name": "namespaces/default/apitokens/office", "role": "editor",
                      "clientAddresses": {"allow": ["10.0.0.0/8"]}})
    .to_string();
    let a = f.call("POST", COLLECTION, Some(&f.owner), Some(&body)).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.raw);
    let secret = a.body["apiToken"]["secret"].as_str().unwrap().to_owned();
    let item = format!("{COLLECTION}/office");
    let patch = |body: Value| {
        let item = item.clone();
        let f = &f;
        async move { f.call("PATCH", &item, Some(&f.owner), Some(&body.to_string())).await }
    };
    // A rate limit added; the addresses, left out, stay.
    let a = patch(json!({"rateLimit": {"requests": 10, "per": "second"}})).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.raw);
    let token = &a.body["apiToken"];
    assert_eq!(token["clientAddresses"], json!({"allow": ["10.0.0.0/8"]}));
    assert_eq!(
        token["rateLimit"],
        json!({"requests": 10, "per": "second", "burst": 10})
    );
    assert!(token.get("secret").is_none());
    // In the table every Envoy gets.
    let pushed = f.publisher.current();
    let conditions = pushed
        .token(&Digest::of(secret.as_bytes()))
        .unwrap()
        .conditions()
        .unwrap();
    assert_eq!(conditions.rate_limit().map(|l| l.requests), Some(10));
    assert!(conditions.admits("10.1.2.3".parse().unwrap()));
    // The addresses removed (null), a not-before time set.
    let a = patch(json!({"clientAddresses": null, "notBeforeTime": "2026-01-01T00:00:00Z"})).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.raw);
    assert!(a.body["apiToken"].get("clientAddresses").is_none(), "{}", a.raw);
    assert_eq!(a.body["apiToken"]["notBeforeTime"], "2026-01-01T00:00:00Z");
    assert!(f
        .publisher
        .current()
        .token(&Digest::of(secret.as_bytes()))
        .unwrap()
        .conditions()
        .unwrap()
        .admits("192.0.2.1".parse().unwrap()));
    // Every condition removed: none left, in the table too.
    let a = patch(json!({"notBeforeTime": null, "rateLimit": null})).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.raw);
    for field in ["notBeforeTime", "rateLimit", "clientAddresses"] {
        assert!(a.body["apiToken"].get(field).is_none(), "{field}: {}", a.raw);
    }
    assert!(f
        .publisher
        .current()
        .token(&Digest::of(secret.as_bytes()))
        .unwrap()
        .conditions()
        .is_none());
    // Each change audited with the conditions it set; the same again (an
    // empty patch) writes nothing.
    assert_eq!(patch(json!({})).await.status, StatusCode::OK);
    let updates = f.events_of("apitoken.update").await;
    assert_eq!(updates.len(), 3, "{updates:?}");
    assert_eq!(updates[0]["conditions"], json!({}));
    assert_eq!(
        updates[2]["conditions"],
        json!({"clientAddresses": {"allow": ["10.0.0.0/8"]}, "rateLimit": {"requests": 10, "per": "second", "burst": 10}})
    );
    let created = f
        .events_of("apitoken.create")
        .await
        .into_iter()
        .find(|e| e["token"] == "namespaces/default/apitokens/office")
        .unwrap();
    assert_eq!(
        created["conditions"],
        json!({"clientAddresses": {"allow": ["10.0.0.0/8"]}})
    );
    // Bad input names the field and changes nothing; only conditions change.
    for (bad, field) in [
        (
            json!({"rateLimit": {"requests": 0, "per": "second"}}),
            Some("rateLimit.requests"),
        ),
        (json!({"clientAddresses": {"allow": []}}), Some("clientAddresses.allow")),
        (json!({"notBeforeTime": "soon"}), Some("notBeforeTime")),
        (json!({"role": "owner"}), None),
        (json!({"expireTime": "2030-01-01T00:00:00Z"}), None),
    ] {
        let a = patch(bad.clone()).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{bad}: {}", a.raw);
        assert_eq!(a.body["field"].as_str(), field, "{bad}: {}", a.raw);
    }
    // An unknown token is a 404; an editor may not.
    let a = f
        .call("PATCH", &format!("{COLLECTION}/nobody"), Some(&f.owner), Some("{}"))
        .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND, "{}", a.raw);
    let editor = f.create("ed", "editor").await.body["apiToken"]["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    let a = f.call("PATCH", &item, Some(&editor), Some("{}")).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.raw);
}
