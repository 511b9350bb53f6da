//! The HTTP surface: the token REST API (`/apitokens/v1/...`, a thin adapter
//! over [`tokens::Service`]), leak reports (`credentials:revoke`),
//! `GET /healthz`, `GET /status`, `GET /metrics`,
//! and the web console under `/console/` ([`console`]).
//!
//! Every token call is authenticated and authorized with the filter's own
//! decision code against the published table and the built-in permission
//! rules, which give the `owner` role of a namespace every verb on its tokens
//! and nobody else anything. Paths are parsed from the raw request path,
//! never percent-decoded, exactly as the filter sees them.

pub mod console;
mod error;
mod extract;
mod forwarded;
mod leaks;
mod status;
mod tokens;

pub use error::AppError;
use extract::Route;
pub use forwarded::{Cidr, TrustedProxies};

use crate::acks::Tracker;
use crate::config::Publisher;
use crate::metrics::{Metrics, Operation, Outcome};
use crate::tokens::Service;
use axum::extract::{Request, State};
use axum::handler::Handler;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, MethodRouter};
use axum::Router;
use std::sync::Arc;
use std::time::Instant;

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
pub const API_PREFIX: &str = "/apitokens/v1/namespaces/";
/// The API's OpenAPI 3.1 document (`control-plane/openapi.json`, checked
/// against the running server by `tests/contract`).
pub const OPENAPI_PATH: &str = "/apitokens/v1/openapi.json";
pub const OPENAPI: &str = include_str!("../../openapi.json");
/// Leak reports: no authentication, `202 {}` whatever matched.
pub const REVOKE_PATH: &str = "/apitokens/v1/credentials:revoke";
pub const CONFIG_VERSION_HEADER: &str = "x-apitokens-config-version";
pub const APPLIED_HEADER: &str = "x-apitokens-applied";
pub const ENVOYS_HEADER: &str = "x-apitokens-envoys";
pub const NOT_APPLIED_HEADER: &str = "x-apitokens-not-applied";

pub struct AppState {
    pub service: Arc<Service>,
    /// `/metrics`; the token API counts its writes into it.
    pub metrics: Arc<Metrics>,
    pub publisher: Arc<Publisher>,
    pub acks: Arc<Tracker>,
    /// The ECDS resource name, shown by `/status`.
    pub resource_name: String,
    /// Write answers name the Envoys that did not apply a change
    /// (`--name-envoys-in-answers`); otherwise they count them.
    pub name_envoys: bool,
    /// Whose `X-Forwarded-For` the audit trail believes (`--trusted-proxy`).
    pub trusted_proxies: TrustedProxies,
}

/// What `apitokens:inactivity` answers to.
pub(crate) const INACTIVITY_METHODS: &str = "GET, PUT, DELETE";

/// The HTTP application: the token API, the console, `/healthz`, and
/// `/status` when `with_status` (otherwise the operators' listener serves
/// it, [`operator`]).
pub fn app(state: Arc<AppState>, with_status: bool) -> Router {
    let collection = format!("{API_PREFIX}{{namespace}}/apitokens");
    let item = format!("{collection}/{{item}}");
    let events = format!("{collection}:events");
    let own = format!("{collection}:self");
    let inactivity = format!("{collection}:inactivity");
    let mut router = Router::new()
        .route("/healthz", read_only(status::healthz))
        .route(OPENAPI_PATH, read_only(openapi))
        .route(
            REVOKE_PATH,
            axum::routing::post(leaks::revoke).fallback(|| async { AppError::MethodNotAllowed("POST") }),
        );
    if with_status {
        router = router
            .route("/status", read_only(status::status))
            .route("/metrics", read_only(status::metrics));
    }
    router
        .route(
            &collection,
            get(tokens::list)
                .post(tokens::create)
                .fallback(|| async { AppError::MethodNotAllowed("GET, POST") }),
        )
        .route(
            &events,
            get(tokens::events).fallback(|| async { AppError::MethodNotAllowed("GET") }),
        )
        .route(
            &own,
            get(tokens::own).fallback(|| async { AppError::MethodNotAllowed("GET") }),
        )
        .route(
            &inactivity,
            get(tokens::inactivity)
                .put(tokens::set_inactivity)
                .delete(tokens::remove_inactivity)
                .fallback(|| async { AppError::MethodNotAllowed(INACTIVITY_METHODS) }),
        )
        .route(
            &item,
            get(tokens::get)
                .patch(tokens::update)
                .delete(tokens::delete)
                .post(tokens::action)
                .fallback(tokens::item_method_not_allowed),
        )
        .merge(console::router())
        .fallback(|| async { AppError::UnknownPath })
        .layer(middleware::from_fn_with_state(Arc::clone(&state), log_request))
        .with_state(state)
}

/// The operators' endpoints on a listener of their own (`--status-listen`):
/// `/status` (every Envoy, replica and version) and `/healthz`.
pub fn operator(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", read_only(status::healthz))
        .route("/status", read_only(status::status))
        .route("/metrics", read_only(status::metrics))
        .fallback(|| async { AppError::UnknownPath })
        .with_state(state)
}

/// A GET endpoint whose other methods get the API's JSON 405 with `Allow`.
fn read_only<H, T>(handler: H) -> MethodRouter<Arc<AppState>>
where
    H: Handler<T, Arc<AppState>>,
    T: 'static,
{
    get(handler).fallback(|| async { AppError::MethodNotAllowed("GET") })
}

/// The OpenAPI document: public, like the API's shape it describes.
async fn openapi() -> Response {
    use axum::http::{header, HeaderValue};
    use axum::response::IntoResponse as _;
    let mut resp = OPENAPI.into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// The write an API call makes, if it is one (`/metrics` counts them).
fn write_operation(method: &axum::http::Method, path: &str) -> Option<Operation> {
    use axum::http::Method;
    match (Route::parse(path)?, method) {
        (Route::Collection { .. }, &Method::POST) => Some(Operation::create),
        (Route::Action { action, .. }, &Method::POST) => match action.as_str() {
            "regenerate" => Some(Operation::regenerate),
            "disable" => Some(Operation::disable),
            "enable" => Some(Operation::enable),
            _ => None,
        },
        (Route::Item { .. }, &Method::DELETE) => Some(Operation::delete),
        (Route::Item { .. }, &Method::PATCH) => Some(Operation::update),
        _ => None,
    }
}

/// How a write's answer ended, for `/metrics`.
fn outcome(resp: &Response) -> Outcome {
    if let Some(outcome) = resp.extensions().get::<Outcome>() {
        return *outcome;
    }
    match resp.status().as_u16() {
        200..=299 => Outcome::ok,
        401 => Outcome::unauthenticated,
        403 => Outcome::forbidden,
        400 | 413 | 415 => Outcome::invalid,
        404 => Outcome::not_found,
        409 => Outcome::conflict,
        503 => Outcome::unavailable,
        _ => Outcome::error,
    }
}

/// One log line per API call, and a span around the call (`request`: the
/// method, the path and, once authenticated, the caller's token name), so
/// that whatever the call logs carries them. Only paths made of the API's
/// own segments and DNS labels are logged verbatim: a secret pasted into a
/// URL by mistake never reaches the log.
async fn log_request(State(app): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    use tracing::Instrument as _;
    let started = Instant::now();
    let method = req.method().clone();
    let write = write_operation(&method, req.uri().path());
    let shown = extract::loggable_path(req.uri().path()).to_owned();
    let span = tracing::info_span!(
        "request",
        method = %method,
        path = %shown,
        caller = tracing::field::Empty
    );
    let resp = next.run(req).instrument(span.clone()).await;
    if let Some(operation) = write {
        app.metrics.write(operation, outcome(&resp));
    }
    if !matches!(shown.as_str(), "/healthz" | "/status" | "/metrics") {
        let status = resp.status().as_u16();
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        span.in_scope(|| {
            tracing::info!(status, duration_ms = ms, "api: {method} {shown} -> {status} {ms:.0}ms");
        });
    }
    resp
}

#[cfg(test)]
mod tests;
