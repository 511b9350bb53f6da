//! The REST API (`/apitokens/v1/...`), the health check and the status
//! endpoint.
//!
//! Every token call is authenticated and authorized with the filter's own
//! decision code ([`Config::authenticate`], [`Config::authorize`]) against the
//! store's tokens and the built-in permission rules, which give the `owner`
//! role of a namespace every verb on its tokens and nobody else anything.
//! Paths are parsed from the raw request path, never percent-decoded, exactly
//! as the filter sees them.

// Handlers reject with a ready `Response`; boxing it buys nothing here.
#![allow(clippy::result_large_err)]

use crate::clock;
use crate::engine::Engine;
use crate::secret::{self, Secret, Shape};
use crate::store::{StoreError, TokenRecord};
use apitokens_core::bearer;
use apitokens_core::config::Config;
use apitokens_core::decision::Denial;
use apitokens_core::name::{is_dns_label, TokenName};
use apitokens_core::role::Role;
use apitokens_core::table::Token;
use apitokens_core::timestamp::Timestamp;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
pub const API_PREFIX: &str = "/apitokens/v1/namespaces/";
pub const CONFIG_VERSION_HEADER: &str = "x-apitokens-config-version";

pub struct AppState {
    engine: Arc<Engine>,
}

/// The HTTP application: `/apitokens/v1/...`, `GET /healthz`, `GET /status`,
/// and the web console under `/console/` ([`crate::console`]).
pub fn app(engine: Arc<Engine>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/status", get(status))
        .merge(crate::console::router())
        .fallback(api)
        .with_state(Arc::new(AppState { engine }))
}

// ---------------------------------------------------------------------------
// Responses

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: u16,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
}

fn json_response(status: StatusCode, body: &impl Serialize) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = (status, bytes).into_response();
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    // Responses may carry a secret: never cache them.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn error(status: StatusCode, message: &str) -> Response {
    json_response(
        status,
        &ErrorBody {
            code: status.as_u16(),
            message,
            field: None,
        },
    )
}

fn field_error(field: &str, message: &str) -> Response {
    json_response(
        StatusCode::BAD_REQUEST,
        &ErrorBody {
            code: 400,
            message: &format!("{field}: {message}"),
            field: Some(field),
        },
    )
}

fn internal(what: &str, e: impl std::fmt::Display) -> Response {
    log::error!("api: {what}: {e}");
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal error; see the control plane's log",
    )
}

/// The filter's own reply for a denial (status, `WWW-Authenticate`, body).
fn denial_response(config: &Config, denial: Denial) -> Response {
    let Some(reply) = config.replies().get(denial) else {
        return error(StatusCode::FORBIDDEN, "denied");
    };
    let status = u16::try_from(reply.status)
        .ok()
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::FORBIDDEN);
    let mut resp = (status, Body::from(reply.body.to_vec())).into_response();
    for (name, value) in reply.headers.iter() {
        if let Ok(value) = HeaderValue::from_str(value) {
            resp.headers_mut().insert(*name, value);
        }
    }
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ApiToken<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<&'a str>,
    role: &'a str,
    create_time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    expire_time: Option<String>,
}

impl<'a> ApiToken<'a> {
    fn new(r: &'a TokenRecord, secret: Option<&'a Secret>) -> Self {
        Self {
            name: &r.name,
            secret: secret.map(Secret::expose),
            role: r.role.as_str(),
            create_time: r.create_time.to_rfc3339(),
            expire_time: r.expire_time.map(|t| t.to_rfc3339()),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct One<'a> {
    api_token: ApiToken<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Many<'a> {
    api_tokens: Vec<ApiToken<'a>>,
}

// ---------------------------------------------------------------------------
// Health and status

async fn healthz(State(app): State<Arc<AppState>>) -> Response {
    let store = app.engine.store();
    match tokio::task::spawn_blocking(move || store.revision()).await {
        Ok(Ok(_)) => json_response(
            StatusCode::OK,
            &serde_json::json!({"status": "ok", "version": app.engine.current().version_info()}),
        ),
        Ok(Err(e)) => {
            log::error!("healthz: {e}");
            error(StatusCode::SERVICE_UNAVAILABLE, "the store is not available")
        }
        Err(e) => internal("healthz", e),
    }
}

fn query_param<'a>(query: Option<&'a str>, key: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

/// `GET /status`: the published version and, per Envoy, the versions it
/// acknowledged or rejected. `?version=N&waitSeconds=S` waits up to S seconds
/// (at most 60) until every connected Envoy has acknowledged version N.
async fn status(State(app): State<Arc<AppState>>, req: Request) -> Response {
    let query = req.uri().query();
    let wanted = match query_param(query, "version").map(str::parse::<u64>) {
        None => None,
        Some(Ok(v)) => Some(v),
        Some(Err(_)) => return field_error("version", "must be a configuration version number"),
    };
    let wait = match query_param(query, "waitSeconds").map(str::parse::<f64>) {
        None => 0.0,
        Some(Ok(s)) if (0.0..=60.0).contains(&s) => s,
        Some(_) => return field_error("waitSeconds", "must be a number of seconds from 0 to 60"),
    };
    let engine = &app.engine;
    if let Some(version) = wanted {
        let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(wait);
        loop {
            let changed = engine.status.changed();
            if engine.status.applied(version) {
                break;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                break;
            }
        }
    }
    let current = engine.current();
    let version = wanted.unwrap_or(current.version);
    let body = serde_json::json!({
        "version": current.version_info(),
        "tokens": current.tokens,
        "publishedAt": current.published_at.to_rfc3339(),
        "resourceName": engine.filter_params().resource_name,
        "checkedVersion": version.to_string(),
        "applied": engine.status.applied(version),
        "envoys": engine.status.envoys(),
        "file": engine.status.file(),
    });
    json_response(StatusCode::OK, &body)
}

// ---------------------------------------------------------------------------
// The token API

#[derive(Debug, PartialEq, Eq)]
enum Route<'p> {
    Collection { ns: &'p str },
    Item { ns: &'p str, id: &'p str },
    Action { ns: &'p str, id: &'p str, action: &'p str },
}

impl<'p> Route<'p> {
    fn parse(path: &'p str) -> Option<Self> {
        let rest = path.strip_prefix(API_PREFIX)?;
        let mut parts = rest.split('/');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(ns), Some("apitokens"), None, None) => Some(Self::Collection { ns }),
            (Some(ns), Some("apitokens"), Some(item), None) => Some(match item.split_once(':') {
                Some((id, action)) => Self::Action { ns, id, action },
                None => Self::Item { ns, id: item },
            }),
            _ => None,
        }
    }

    fn namespace(&self) -> &'p str {
        match self {
            Self::Collection { ns } | Self::Item { ns, .. } | Self::Action { ns, .. } => ns,
        }
    }

    fn id(&self) -> Option<&'p str> {
        match self {
            Self::Collection { .. } => None,
            Self::Item { id, .. } | Self::Action { id, .. } => Some(id),
        }
    }

    fn allowed(&self) -> &'static str {
        match self {
            Self::Collection { .. } => "GET, POST",
            Self::Item { .. } => "GET, DELETE",
            Self::Action { .. } => "POST",
        }
    }
}

async fn api(State(app): State<Arc<AppState>>, req: Request) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let mut caller = None;
    let resp = handle(&app, req, &mut caller).await;
    // Only paths that parsed into DNS labels are logged verbatim: a secret
    // pasted into a URL by mistake never reaches the log.
    let shown = match Route::parse(&path) {
        Some(r) if is_dns_label(r.namespace().as_bytes()) && r.id().is_none_or(|id| is_dns_label(id.as_bytes())) => {
            path.as_str()
        }
        _ => "(other path)",
    };
    log::info!(
        "api: {method} {shown} -> {} caller={} {}ms",
        resp.status().as_u16(),
        caller.as_deref().unwrap_or("-"),
        started.elapsed().as_millis()
    );
    resp
}

/// The caller's token, or the denial.
fn authenticate<'c>(config: &'c Config, headers: &HeaderMap) -> Result<Token<'c>, Denial> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let value = values.next().map(HeaderValue::as_bytes);
    if values.next().is_some() {
        return Err(Denial::MultipleCredentials);
    }
    if let Some(Ok(token)) = value.map(bearer::parse) {
        // A mistyped or truncated `apt_` secret: no lookup.
        if secret::shape(token) == Shape::Corrupt {
            return Err(Denial::Malformed);
        }
    }
    config
        .authenticate(value, || Some(clock::now()))
        .map_err(|(denial, _)| denial)
}

async fn handle(app: &Arc<AppState>, req: Request, caller: &mut Option<String>) -> Response {
    let path = req.uri().path().to_owned();
    let Some(route) = Route::parse(&path) else {
        return error(
            StatusCode::NOT_FOUND,
            "not found: the API is /apitokens/v1/namespaces/{namespace}/apitokens[/{token}[:regenerate]]",
        );
    };
    let config = app.engine.api_config();
    let token = match authenticate(&config, req.headers()) {
        Ok(token) => token,
        Err(denial) => return denial_response(&config, denial),
    };
    *caller = Some(token.name().to_owned());
    let method = req.method().clone();
    let method_ok = match route {
        Route::Collection { .. } => method == Method::GET || method == Method::POST,
        Route::Item { .. } => method == Method::GET || method == Method::DELETE,
        Route::Action { .. } => method == Method::POST,
    };
    if !method_ok {
        let mut resp = error(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("method not allowed here; allowed: {}", route.allowed()),
        );
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(route.allowed()));
        return resp;
    }
    let ns = route.namespace();
    if !is_dns_label(ns.as_bytes()) {
        return field_error(
            "namespace",
            "the path's namespace must be a DNS label (lower-case letters, digits and '-', at most 63 characters)",
        );
    }
    if let Some(id) = route.id() {
        if !is_dns_label(id.as_bytes()) {
            return field_error(
                "token",
                "the path's token id must be a DNS label (lower-case letters, digits and '-', at most 63 characters)",
            );
        }
    }
    if let Route::Action { action, .. } = route {
        if action != "regenerate" {
            return error(StatusCode::NOT_FOUND, "unknown action; the only action is :regenerate");
        }
    }
    // Same decision as the filter: owner of this namespace, or nothing.
    if let Err(denial) = config.authorize(token, method.as_str().as_bytes(), path.as_bytes()) {
        return denial_response(&config, denial);
    }
    let body = match read_body(req).await {
        Ok(body) => body,
        Err(resp) => return resp,
    };
    match route {
        Route::Collection { ns } if method == Method::GET => list(app, ns).await,
        Route::Collection { ns } => create(app, ns, &body).await,
        Route::Item { ns, id } if method == Method::GET => get_one(app, ns, id).await,
        Route::Item { ns, id } => delete(app, ns, id).await,
        Route::Action { ns, id, .. } => regenerate(app, ns, id, &body).await,
    }
}

async fn read_body(req: Request) -> Result<Bytes, Response> {
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("the request body is larger than {MAX_BODY_BYTES} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    axum::body::to_bytes(req.into_body(), MAX_BODY_BYTES)
        .await
        .map_err(|_| too_large())
}

fn parse_json<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, Response> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(error(StatusCode::BAD_REQUEST, "the request body must be a JSON object"));
    }
    // Never quote the input: it could be a secret pasted into the wrong field.
    serde_json::from_slice(body).map_err(|e| {
        let problem = apitokens_core::config::describe_json_error(&e);
        error(StatusCode::BAD_REQUEST, &format!("the request body {problem}"))
    })
}

async fn blocking<T: Send + 'static>(
    app: &Arc<AppState>,
    f: impl FnOnce(&dyn crate::store::Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<Result<T, StoreError>, Response> {
    let store = app.engine.store();
    tokio::task::spawn_blocking(move || f(store.as_ref()))
        .await
        .map_err(|e| internal("store task", e))
}

/// Publishes the change and answers with the version that carries it.
async fn publish_and_respond(app: &Arc<AppState>, body: &impl Serialize) -> Response {
    let mut resp = json_response(StatusCode::OK, body);
    match app.engine.refresh().await {
        Ok(snapshot) => {
            if let Ok(v) = HeaderValue::from_str(&snapshot.version_info()) {
                resp.headers_mut().insert(CONFIG_VERSION_HEADER, v);
            }
        }
        // The change is stored; the background refresh publishes it.
        Err(e) => log::error!("api: the change is stored but not yet published: {e}"),
    }
    resp
}

fn full_name(ns: &str, id: &str) -> String {
    TokenName {
        namespace: ns,
        token: id,
    }
    .to_string()
}

fn not_found(name: &str) -> Response {
    error(StatusCode::NOT_FOUND, &format!("API token {name} not found"))
}

async fn list(app: &Arc<AppState>, ns: &str) -> Response {
    let ns_owned = ns.to_owned();
    match blocking(app, move |s| s.list(&ns_owned)).await {
        Err(resp) => resp,
        Ok(Err(e)) => internal("list", e),
        Ok(Ok(records)) => json_response(
            StatusCode::OK,
            &Many {
                api_tokens: records.iter().map(|r| ApiToken::new(r, None)).collect(),
            },
        ),
    }
}

async fn get_one(app: &Arc<AppState>, ns: &str, id: &str) -> Response {
    let name = full_name(ns, id);
    let key = name.clone();
    match blocking(app, move |s| s.get(&key)).await {
        Err(resp) => resp,
        Ok(Err(e)) => internal("get", e),
        Ok(Ok(None)) => not_found(&name),
        Ok(Ok(Some(r))) => json_response(
            StatusCode::OK,
            &One {
                api_token: ApiToken::new(&r, None),
            },
        ),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CreateBody {
    name: String,
    role: String,
    #[serde(default)]
    expire_time: Option<String>,
}

/// Validates a create request into a record without a digest yet.
fn validate_create(ns: &str, body: &CreateBody, now: Timestamp) -> Result<(String, Role, Option<Timestamp>), Response> {
    let name = TokenName::parse(&body.name).map_err(|e| field_error("name", &e.to_string()))?;
    if name.namespace != ns {
        return Err(field_error(
            "name",
            "names another namespace than the path: it must be namespaces/{the path's namespace}/apitokens/{token}",
        ));
    }
    let role =
        Role::parse(&body.role).ok_or_else(|| field_error("role", "unknown role; expected viewer, editor or owner"))?;
    let expire = match body.expire_time.as_deref() {
        None => None,
        Some(text) => {
            let t = Timestamp::parse_rfc3339(text).map_err(|e| field_error("expireTime", &e.to_string()))?;
            if t <= now {
                return Err(field_error("expireTime", "must be in the future"));
            }
            Some(t)
        }
    };
    Ok((body.name.clone(), role, expire))
}

async fn create(app: &Arc<AppState>, ns: &str, body: &[u8]) -> Response {
    let body: CreateBody = match parse_json(body) {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let now = clock::now_seconds();
    let (name, role, expire_time) = match validate_create(ns, &body, now) {
        Ok(v) => v,
        Err(resp) => return resp,
    };
    let created = create_record(&name, role, expire_time, now);
    match created {
        Ok((record, secret)) => {
            let result = blocking(app, {
                let record = record.clone();
                move |s| s.insert(&record)
            })
            .await;
            match result {
                Err(resp) => resp,
                Ok(Ok(())) => {
                    log::info!("api: created {} (role {})", record.name, record.role);
                    publish_and_respond(
                        app,
                        &One {
                            api_token: ApiToken::new(&record, Some(&secret)),
                        },
                    )
                    .await
                }
                Ok(Err(StoreError::NameTaken)) => {
                    error(StatusCode::CONFLICT, &format!("API token {name} already exists"))
                }
                // 2^-256: a broken random source, not bad luck.
                Ok(Err(e)) => internal("create", e),
            }
        }
        Err(e) => internal("secret generation", e),
    }
}

fn create_record(
    name: &str,
    role: Role,
    expire_time: Option<Timestamp>,
    now: Timestamp,
) -> Result<(TokenRecord, Secret), getrandom::Error> {
    let secret = Secret::generate()?;
    Ok((
        TokenRecord {
            name: name.to_owned(),
            role,
            secret_sha256: secret.sha256_hex(),
            create_time: now,
            expire_time,
        },
        secret,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegenerateBody {}

async fn regenerate(app: &Arc<AppState>, ns: &str, id: &str, body: &[u8]) -> Response {
    if !body.iter().all(u8::is_ascii_whitespace) {
        if let Err(resp) = parse_json::<RegenerateBody>(body) {
            return resp;
        }
    }
    let name = full_name(ns, id);
    let secret = match Secret::generate() {
        Ok(s) => s,
        Err(e) => return internal("secret generation", e),
    };
    let (key, digest) = (name.clone(), secret.sha256_hex());
    match blocking(app, move |s| s.replace_secret(&key, &digest)).await {
        Err(resp) => resp,
        Ok(Err(e)) => internal("regenerate", e),
        Ok(Ok(None)) => not_found(&name),
        Ok(Ok(Some(record))) => {
            log::info!("api: regenerated the secret of {name}");
            publish_and_respond(
                app,
                &One {
                    api_token: ApiToken::new(&record, Some(&secret)),
                },
            )
            .await
        }
    }
}

async fn delete(app: &Arc<AppState>, ns: &str, id: &str) -> Response {
    let name = full_name(ns, id);
    let key = name.clone();
    match blocking(app, move |s| s.delete(&key)).await {
        Err(resp) => resp,
        Ok(Err(e)) => internal("delete", e),
        Ok(Ok(false)) => not_found(&name),
        Ok(Ok(true)) => {
            log::info!("api: deleted {name}");
            publish_and_respond(app, &serde_json::json!({})).await
        }
    }
}

#[cfg(test)]
#[path = "api_tests.rs"]
mod tests;
