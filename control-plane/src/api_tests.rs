//! REST API tests: the router driven with `tower::ServiceExt::oneshot`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use super::*;
use crate::engine::EngineOptions;
use crate::store::{SqliteStore, Store};
use axum::http::Request as HttpRequest;
use serde_json::{json, Value};
use tower::ServiceExt;

struct Fixture {
    engine: Arc<Engine>,
    store: Arc<dyn Store>,
    owner: String,
}

fn add_token(store: &dyn Store, name: &str, role: Role, expire: Option<Timestamp>) -> String {
    let secret = Secret::generate().unwrap();
    store
        .insert(&TokenRecord {
            name: name.into(),
            role,
            secret_sha256: secret.sha256_hex(),
            create_time: clock::now_seconds(),
            expire_time: expire,
        })
        .unwrap();
    secret.expose().to_owned()
}

fn fixture() -> Fixture {
    let store: Arc<dyn Store> = Arc::new(SqliteStore::in_memory().unwrap());
    let owner = add_token(store.as_ref(), "namespaces/default/apitokens/admin", Role::Owner, None);
    let engine = Engine::open(Arc::clone(&store), EngineOptions::default()).unwrap();
    Fixture { engine, store, owner }
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
        let resp = app(Arc::clone(&self.engine)).oneshot(req).await.unwrap();
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

    fn names(&self) -> Vec<String> {
        self.store.all().unwrap().1.into_iter().map(|r| r.name).collect()
    }
}

const COLLECTION: &str = "/apitokens/v1/namespaces/default/apitokens";

#[tokio::test]
async fn create_returns_the_secret_once_and_it_works() {
    let f = fixture();
    let v0 = f.engine.current().version;
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
    assert!(version > v0);
    // Published: the digest, never the secret.
    let snap = f.engine.current();
    assert_eq!(snap.version, version);
    assert!(snap.config_json.contains(&secret::sha256_hex(secret.as_bytes())));
    assert!(!snap.config_json.contains(&secret));
    // The store has the digest only.
    let stored = f.store.get("namespaces/default/apitokens/ci").unwrap().unwrap();
    assert_eq!(stored.secret_sha256, secret::sha256_hex(secret.as_bytes()));
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
    let f = fixture();
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
    let f = fixture();
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
    assert!(!f.engine.current().config_json.contains("apitokens/ci"));
    let a = f.call("GET", &format!("{COLLECTION}/ci"), Some(&f.owner), None).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert_eq!(a.body["code"], 404);
    let a = f
        .call("DELETE", &format!("{COLLECTION}/ci"), Some(&f.owner), None)
        .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn authentication_failures_get_the_filters_replies() {
    let f = fixture();
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
    // Expired owner.
    let past = Timestamp::from_unix(clock::now().unix_seconds() + 1, 0);
    let brief = add_token(
        f.store.as_ref(),
        "namespaces/default/apitokens/brief",
        Role::Owner,
        Some(past),
    );
    f.engine.reload().unwrap();
    assert_eq!(
        f.call("GET", COLLECTION, Some(&brief), None).await.status,
        StatusCode::OK
    );
    std::thread::sleep(clock::until(past, clock::now()) + Duration::from_millis(10));
    assert_eq!(
        f.call("GET", COLLECTION, Some(&brief), None).await.status,
        StatusCode::UNAUTHORIZED
    );
    // No reply ever echoes a secret.
    assert!(!a.raw.contains(&f.owner));
}

#[tokio::test]
async fn non_owners_and_other_namespaces_get_403() {
    let f = fixture();
    let editor = add_token(f.store.as_ref(), "namespaces/default/apitokens/ed", Role::Editor, None);
    let viewer = add_token(f.store.as_ref(), "namespaces/default/apitokens/vw", Role::Viewer, None);
    let other_owner = add_token(f.store.as_ref(), "namespaces/other/apitokens/boss", Role::Owner, None);
    f.engine.reload().unwrap();
    let body = r#"{"name": "namespaces/default/apitokens/x", "role": "viewer"}"#;
    for secret in [&editor, &viewer, &other_owner] {
        let before = f.names();
        let a = f.call("POST", COLLECTION, Some(secret), Some(body)).await;
        assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.raw);
        assert!(a.headers["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("insufficient_scope"));
        assert_eq!(f.names(), before);
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
    let f = fixture();
    f.create("taken", "viewer").await;
    let before = f.names();
    let version = f.engine.current().version;
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
            "unknown field `secret`",
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
            "wrong type",
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
            "namespace must be a DNS label",
        ),
        (
            "GET",
            "/apitokens/v1/namespaces/def%61ult/apitokens".into(),
            None,
            StatusCode::BAD_REQUEST,
            "namespace must be a DNS label",
        ),
        (
            "GET",
            format!("{COLLECTION}/UPPER"),
            None,
            StatusCode::BAD_REQUEST,
            "token id must be a DNS label",
        ),
        (
            "DELETE",
            format!("{COLLECTION}/-x"),
            None,
            StatusCode::BAD_REQUEST,
            "token id must be a DNS label",
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
            "allowed: GET, DELETE",
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
        assert_eq!(f.names(), before, "{method} {path} changed the store");
        assert_eq!(f.engine.current().version, version, "{method} {path} published");
    }
}

#[tokio::test]
async fn error_messages_never_quote_the_input() {
    let f = fixture();
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
    let f = fixture();
    let a = f.call("GET", "/healthz", None, None).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body["status"], "ok");
    let v = f.engine.current().version;
    f.engine.status.connected("host-1", "gw", "", clock::now());
    let a = f.call("GET", "/status", None, None).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body["version"], v.to_string());
    assert_eq!(a.body["applied"], false);
    assert_eq!(a.body["envoys"][0]["node"], "host-1");
    f.engine.status.acked("host-1", &v.to_string(), clock::now());
    let a = f.call("GET", &format!("/status?version={v}"), None, None).await;
    assert_eq!(a.body["applied"], true);
    assert_eq!(a.body["envoys"][0]["ackedVersion"], v.to_string());
    // Waiting for a version nobody has acknowledged times out with false.
    let started = Instant::now();
    let a = f
        .call("GET", &format!("/status?version={}&waitSeconds=0.2", v + 1), None, None)
        .await;
    assert_eq!(a.body["applied"], false);
    assert!(started.elapsed() >= Duration::from_millis(200));
    // ... and returns as soon as the ACK comes.
    let engine = Arc::clone(&f.engine);
    let next = (v + 1).to_string();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        engine.status.acked("host-1", &next, clock::now());
    });
    let started = Instant::now();
    let a = f
        .call("GET", &format!("/status?version={}&waitSeconds=10", v + 1), None, None)
        .await;
    assert_eq!(a.body["applied"], true);
    assert!(started.elapsed() < Duration::from_secs(5));
    let a = f.call("GET", "/status?version=x", None, None).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    let a = f.call("GET", "/status?version=1&waitSeconds=1000", None, None).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
}

#[test]
fn routes() {
    assert_eq!(
        Route::parse("/apitokens/v1/namespaces/a/apitokens"),
        Some(Route::Collection { ns: "a" })
    );
    assert_eq!(
        Route::parse("/apitokens/v1/namespaces/a/apitokens/b"),
        Some(Route::Item { ns: "a", id: "b" })
    );
    assert_eq!(
        Route::parse("/apitokens/v1/namespaces/a/apitokens/b:regenerate"),
        Some(Route::Action {
            ns: "a",
            id: "b",
            action: "regenerate"
        })
    );
    assert_eq!(Route::parse("/apitokens/v1/namespaces/a/apitokens/b/c"), None);
    assert_eq!(Route::parse("/apitokens/v1/namespaces/a/other"), None);
    assert_eq!(Route::parse("/apitokens/v2/namespaces/a/apitokens"), None);
}
