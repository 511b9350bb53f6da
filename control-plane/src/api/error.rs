//! The API's one error type: every failure a handler can meet, mapped to a
//! response in one place (`{"code", "message", "field"?}`, never echoing a
//! value), so handlers use `?`.

use crate::metrics::Outcome;
use crate::store::StoreError;
use crate::tokens;
use apitokens_core::config::Config;
use apitokens_core::denial::Refusal;
use apitokens_core::reply::Reply;
use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Refused by the filter's own checks: its reply (status,
    /// `WWW-Authenticate`, body) as Envoy would send it.
    #[error("denied")]
    Denied(Option<Box<Reply>>),
    #[error("not found: the API is /apitokens/v1/namespaces/{{namespace}}/apitokens[/{{token}}[:regenerate]]")]
    UnknownPath,
    #[error("unknown action; the actions are {{token}}:regenerate, apitokens:events and apitokens:self")]
    UnknownAction,
    #[error("method not allowed here; allowed: {0}")]
    MethodNotAllowed(&'static str),
    #[error("the request body is larger than {} bytes", super::MAX_BODY_BYTES)]
    PayloadTooLarge,
    /// A body or query that is not what the call takes (no field to name).
    #[error("{0}")]
    BadBody(String),
    /// A query parameter or body field that is not what the call takes.
    #[error("{field}: {problem}")]
    BadField { field: &'static str, problem: &'static str },
    #[error(transparent)]
    Tokens(#[from] tokens::Error),
    /// Ours to fix (a task that ended without its answer): logged, never
    /// answered in detail.
    #[error("internal error: {0}")]
    Internal(String),
}

impl AppError {
    /// A query string the call's parameters cannot be read from (a
    /// parameter given twice): named, never quoted.
    pub(crate) fn bad_query() -> Self {
        Self::BadBody("the query string is not valid: give each parameter at most once".to_owned())
    }

    pub(crate) fn denied(config: &Config, refusal: impl Into<Refusal>) -> Self {
        Self::Denied(config.replies().get(refusal.into()).map(|r| Box::new(r.clone())))
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: u16,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
}

/// A JSON response that is never cached (responses may carry a secret).
pub(crate) fn json_response(status: StatusCode, body: &impl Serialize) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = (status, bytes).into_response();
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn error_response(status: StatusCode, message: &str, field: Option<&str>) -> Response {
    json_response(
        status,
        &ErrorBody {
            code: status.as_u16(),
            message,
            field,
        },
    )
}

fn reply_response(reply: &Reply) -> Response {
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

fn unavailable(what: &str, detail: &dyn std::fmt::Display) -> Response {
    tracing::error!("api: {what}: {detail}");
    let mut resp = error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        &format!("{what}; try again shortly"),
        None,
    );
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    resp
}

fn internal(detail: &dyn std::fmt::Display) -> Response {
    tracing::error!("api: internal error: {detail}");
    error_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal error; see the control plane's log",
        None,
    )
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let message = self.to_string();
        match self {
            Self::Denied(Some(reply)) => reply_response(&reply),
            // Every denial has a reply; refuse anyway.
            Self::Denied(None) => error_response(StatusCode::FORBIDDEN, &message, None),
            Self::UnknownPath | Self::UnknownAction => error_response(StatusCode::NOT_FOUND, &message, None),
            Self::MethodNotAllowed(allowed) => {
                let mut resp = error_response(StatusCode::METHOD_NOT_ALLOWED, &message, None);
                resp.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static(allowed));
                resp
            }
            Self::PayloadTooLarge => error_response(StatusCode::PAYLOAD_TOO_LARGE, &message, None),
            Self::BadBody(_) => error_response(StatusCode::BAD_REQUEST, &message, None),
            Self::BadField { field, .. } => error_response(StatusCode::BAD_REQUEST, &message, Some(field)),
            Self::Internal(detail) => internal(&detail),
            Self::Tokens(e) => match e {
                tokens::Error::Invalid { field, .. } => error_response(StatusCode::BAD_REQUEST, &message, Some(&field)),
                tokens::Error::Forbidden(_) => error_response(StatusCode::FORBIDDEN, &message, None),
                tokens::Error::NotFound(_) => error_response(StatusCode::NOT_FOUND, &message, None),
                tokens::Error::AlreadyExists(_) => error_response(StatusCode::CONFLICT, &message, Some("name")),
                tokens::Error::Conflict(_) => error_response(StatusCode::CONFLICT, &message, None),
                // Two 429s that `/metrics` tells apart.
                tokens::Error::QuotaExceeded { .. } => {
                    let mut resp = error_response(StatusCode::TOO_MANY_REQUESTS, &message, None);
                    resp.extensions_mut().insert(Outcome::quota_exceeded);
                    resp
                }
                tokens::Error::TooManyWrites { retry_after, .. } | tokens::Error::TooManyReports { retry_after } => {
                    let mut resp = error_response(StatusCode::TOO_MANY_REQUESTS, &message, None);
                    resp.extensions_mut().insert(Outcome::rate_limited);
                    if let Ok(value) = HeaderValue::from_str(&tokens::whole_seconds(retry_after).to_string()) {
                        resp.headers_mut().insert(header::RETRY_AFTER, value);
                    }
                    resp
                }
                // The cause is logged, never answered.
                tokens::Error::Store(StoreError::Unavailable(cause)) => {
                    unavailable("the token store is unavailable", &cause)
                }
                // An operator's step is needed (`apitokens new-epoch`): no
                // Retry-After, the message says what happened.
                tokens::Error::Store(e @ StoreError::Behind { .. }) => {
                    tracing::error!("api: {e}");
                    error_response(StatusCode::SERVICE_UNAVAILABLE, &e.to_string(), None)
                }
                // A digest collision from our own random source, a stored row
                // that cannot be read, the random source itself: ours to fix.
                other @ (tokens::Error::DigestTaken | tokens::Error::Store(_) | tokens::Error::Random(_)) => {
                    internal(&other)
                }
            },
        }
    }
}
