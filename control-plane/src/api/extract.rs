//! Extractors: who is calling (authenticated and authorized with the
//! filter's own code), which token the raw path names, and a JSON body whose
//! errors never quote the input.

use super::{AppError, AppState, API_PREFIX, MAX_BODY_BYTES};
use crate::config::Snapshot;
use crate::store::Credential;
use crate::tokens::secret::{self, Shape};
use crate::tokens::{self, Actor, Caller};
use apitokens_core::bearer;
use apitokens_core::denial::Denial;
use apitokens_core::error::describe_json_error;
use apitokens_core::name::is_dns_label;
use apitokens_core::table::{Digest, Token};
use apitokens_core::Timestamp;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method};
use serde::de::DeserializeOwned;
use std::net::SocketAddr;
use std::sync::Arc;

/// The custom methods on a token (`POST .../apitokens/{token}:ACTION`).
pub(crate) const TOKEN_ACTIONS: [&str; 3] = ["regenerate", "disable", "enable"];

/// The token API path, split as the filter splits it: raw, never decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Route {
    Collection {
        ns: String,
    },
    /// A custom method on the collection (`apitokens:events`, AIP-136).
    CollectionAction {
        ns: String,
        action: String,
    },
    Item {
        ns: String,
        id: String,
    },
    Action {
        ns: String,
        id: String,
        action: String,
    },
}

impl Route {
    pub(crate) fn parse(path: &str) -> Option<Self> {
        let rest = path.strip_prefix(API_PREFIX)?;
        let mut parts = rest.split('/');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(ns), Some("apitokens"), None, None) => Some(Self::Collection { ns: ns.to_owned() }),
            (Some(ns), Some(collection), None, None) => {
                let action = collection.strip_prefix("apitokens:")?;
                Some(Self::CollectionAction {
                    ns: ns.to_owned(),
                    action: action.to_owned(),
                })
            }
            (Some(ns), Some("apitokens"), Some(item), None) => Some(match item.split_once(':') {
                Some((id, action)) => Self::Action {
                    ns: ns.to_owned(),
                    id: id.to_owned(),
                    action: action.to_owned(),
                },
                None => Self::Item {
                    ns: ns.to_owned(),
                    id: item.to_owned(),
                },
            }),
            _ => None,
        }
    }

    pub(crate) fn namespace(&self) -> &str {
        match self {
            Self::Collection { ns }
            | Self::CollectionAction { ns, .. }
            | Self::Item { ns, .. }
            | Self::Action { ns, .. } => ns,
        }
    }

    pub(crate) fn id(&self) -> Option<&str> {
        match self {
            Self::Collection { .. } | Self::CollectionAction { .. } => None,
            Self::Item { id, .. } | Self::Action { id, .. } => Some(id),
        }
    }

    /// The methods this kind of path supports.
    pub(crate) fn allowed(&self) -> &'static str {
        match self {
            Self::Collection { .. } => "GET, POST",
            Self::CollectionAction { action, .. } if action == "inactivity" => super::INACTIVITY_METHODS,
            Self::CollectionAction { .. } => "GET",
            Self::Item { .. } => "GET, PATCH, DELETE",
            Self::Action { .. } => "POST",
        }
    }

    fn allows(&self, method: &Method) -> bool {
        match self {
            Self::Collection { .. } => method == Method::GET || method == Method::POST,
            Self::CollectionAction { action, .. } if action == "inactivity" => {
                method == Method::GET || method == Method::PUT || method == Method::DELETE
            }
            Self::CollectionAction { .. } => method == Method::GET,
            Self::Item { .. } => method == Method::GET || method == Method::PATCH || method == Method::DELETE,
            Self::Action { .. } => method == Method::POST,
        }
    }
}

/// The path as the log may show it: verbatim only when it is made of DNS
/// labels and the API's own segments.
pub(crate) fn loggable_path(path: &str) -> &str {
    match Route::parse(path) {
        Some(r) if is_dns_label(r.namespace().as_bytes()) && r.id().is_none_or(|id| is_dns_label(id.as_bytes())) => {
            path
        }
        Some(_) => "(other path)",
        None if matches!(
            path,
            "/healthz" | "/status" | "/metrics" | super::OPENAPI_PATH | super::REVOKE_PATH
        ) =>
        {
            path
        }
        None => "(other path)",
    }
}

/// A caller of the token API that the built-in rules allow this call: an
/// owner of the path's namespace, or any token of it reading itself
/// (`apitokens:self`).
pub(crate) struct Allowed {
    pub route: Route,
    /// Who calls, from where: for the audit trail.
    pub actor: Actor,
}

/// The connection's peer address.
pub(crate) fn peer(parts: &Parts) -> Option<std::net::IpAddr> {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip())
}

/// The caller's token, or the denial (the filter's own checks, plus the
/// secret format's checksum, which refuses a mistyped secret without lookup).
fn authenticate<'c>(config: &'c Snapshot, headers: &HeaderMap, now: Timestamp) -> Result<(Token<'c>, Digest), Denial> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let value = values.next().map(HeaderValue::as_bytes);
    if values.next().is_some() {
        return Err(Denial::MultipleCredentials);
    }
    if let Some(Ok(token)) = value.map(bearer::parse) {
        if secret::shape(token) == Shape::Corrupt {
            return Err(Denial::Malformed);
        }
    }
    let token = config.authenticate(value, || Some(now)).map_err(|(denial, _)| denial)?;
    // (Authenticated: the value is one bearer credential.)
    let digest = value
        .and_then(|v| bearer::parse(v).ok())
        .map(Digest::of)
        .ok_or(Denial::Malformed)?;
    Ok((token, digest))
}

impl FromRequestParts<Arc<AppState>> for Allowed {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<AppState>) -> Result<Self, AppError> {
        let path = parts.uri.path();
        let route = Route::parse(path).ok_or(AppError::UnknownPath)?;
        let snapshot = app.publisher.current();
        let config = snapshot.api();
        let (token, digest) = authenticate(&snapshot, &parts.headers, app.publisher.clock().now())
            .map_err(|denial| AppError::denied(config, denial))?;
        // The request's span (see `log_request`) names the caller from here.
        tracing::Span::current().record("caller", token.name());
        // A use, as a gateway's report would count it (authenticated, refused
        // or not; its last use, no evidence): a token that only ever calls
        // this API is not idle.
        app.service.record_api_use(digest);
        // Where from, before what, as the filter decides it: a token bound to
        // client addresses is refused from elsewhere here too (a caller that
        // reaches this port without passing a gateway, or through one whose
        // address is not a `--trusted-proxy`, is judged by its own).
        let peer = peer(parts);
        let bound = token.conditions().filter(|c| c.limits_addresses());
        if let Some(conditions) = bound {
            let client = app.trusted_proxies.client_ip(peer, &parts.headers);
            if !client.is_some_and(|ip| conditions.admits(ip)) {
                return Err(AppError::denied(config, Denial::AddressDenied));
            }
        }
        let addresses = bound
            .map(|c| c.conditions())
            .transpose()
            .map_err(|e| AppError::Internal(format!("the calling token's conditions: {e}")))?;
        if !route.allows(&parts.method) {
            return Err(AppError::MethodNotAllowed(route.allowed()));
        }
        // A malformed namespace or token id is a 400 naming the field, even
        // for a caller the rules would refuse (they match DNS labels only).
        crate::tokens::check_path(route.namespace(), route.id())?;
        match &route {
            Route::Action { action, .. } if !TOKEN_ACTIONS.contains(&action.as_str()) => {
                return Err(AppError::UnknownAction)
            }
            Route::CollectionAction { action, .. } if !COLLECTION_ACTIONS.contains(&action.as_str()) => {
                return Err(AppError::UnknownAction)
            }
            _ => {}
        }
        // Same decision as the filter (its address check is above), with the
        // same rules: the owner of
        // this namespace, or (for `apitokens:self`) any of its tokens.
        config
            .authorize(token, parts.method.as_str().as_bytes(), path.as_bytes())
            .map_err(|refusal| AppError::denied(config, refusal))?;
        Ok(Allowed {
            route,
            actor: Actor {
                name: token.name().to_owned(),
                address: app.trusted_proxies.client_address(peer, &parts.headers),
                peer: peer.map(|p| p.to_string()),
                caller: Some(Caller {
                    credential: if token.is_previous() {
                        Credential::Previous
                    } else {
                        Credential::Current
                    },
                    // A current secret's expiry is its token's (a previous
                    // one's is its overlap's end, but it never writes).
                    expire: token.expire(),
                    addresses,
                }),
            },
        })
    }
}

/// The request body, at most [`MAX_BODY_BYTES`].
async fn body(req: Request) -> Result<Bytes, AppError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(AppError::PayloadTooLarge);
    }
    axum::body::to_bytes(req.into_body(), MAX_BODY_BYTES)
        .await
        .map_err(|_| AppError::PayloadTooLarge)
}

fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, AppError> {
    // serde reads a struct from a JSON array too (its fields in order):
    // `["namespaces/default/apitokens/x", "viewer"]` would be a create.
    // Every body of this API is an object.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(AppError::BadBody("the request body must be a JSON object".to_owned()));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let problem = describe_body_error(e.inner());
        // A field of ours (`rateLimit.requests`, `clientAddresses.allow[2]`)
        // is named; anything else is not (a path can hold a key the client
        // sent, and a key could be a secret pasted in the wrong place).
        // Only a value of the wrong kind is the field's; a body cut short or
        // not JSON is the body's, and so is an unknown field (its path is the
        // key the client sent).
        let unknown_field = e.inner().to_string().starts_with("unknown field");
        if e.inner().classify() == serde_json::error::Category::Data && !unknown_field && is_field_path(&path) {
            AppError::Tokens(tokens::Error::invalid(path, problem))
        } else {
            AppError::BadBody(format!("the request body {problem}"))
        }
    })?;
    de.end()
        .map_err(|e| AppError::BadBody(format!("the request body {}", describe_body_error(&e))))?;
    Ok(value)
}

/// Whether `path` is made of our field names (camelCase words, dots and
/// list indices), not the root.
fn is_field_path(path: &str) -> bool {
    path.len() <= 64
        && path.starts_with(|c: char| c.is_ascii_lowercase())
        && path.split('.').all(|segment| {
            let name = segment.split_once('[').map_or(segment, |(name, _)| name);
            let index = segment.get(name.len()..).unwrap_or_default();
            !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphabetic())
                && (index.is_empty()
                    || index
                        .strip_prefix('[')
                        .and_then(|i| i.strip_suffix(']'))
                        .is_some_and(|i| !i.is_empty() && i.chars().all(|c| c.is_ascii_digit())))
        })
}

/// Never quote the input: it could be a secret pasted into the wrong field,
/// or as a key (serde names an unknown field by the key the client sent, so
/// only the fields expected are kept), and never name our types.
fn describe_body_error(e: &serde_json::Error) -> String {
    let described = describe_json_error(e);
    let at = format!("(line {}, column {})", e.line(), e.column());
    if described.starts_with("has unknown field") {
        // serde: "unknown field `KEY`, expected one of `a`, `b`": the last
        // ", expected " is serde's own (the list of our fields has none).
        // The position serde appends is the last " at line ".
        let text = e.to_string();
        let message = text.rsplit_once(" at line ").map_or(text.as_str(), |(m, _)| m);
        return match message.rsplit_once(", expected ") {
            Some((_, expected)) => format!("has an unknown field; expected {expected} {at}"),
            None => format!("has an unknown field {at}"),
        };
    }
    if described.contains("expected struct ") {
        return format!("must be a JSON object {at}");
    }
    described
}

/// The collection's actions (`apitokens:events`, ...).
const COLLECTION_ACTIONS: [&str; 3] = ["events", "self", "inactivity"];

/// A JSON object body, required.
pub(crate) struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = AppError;

    async fn from_request(req: Request, _: &S) -> Result<Self, AppError> {
        let bytes = body(req).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(AppError::BadBody("the request body must be a JSON object".to_owned()));
        }
        parse(&bytes).map(JsonBody)
    }
}

/// A body of at most [`MAX_BODY_BYTES`], read but not parsed yet: for a
/// handler whose body's shape depends on the path (the token actions).
pub(crate) struct RawBody(Bytes);

impl RawBody {
    /// A JSON object, or nothing at all (an empty body).
    pub(crate) fn optional_json<T: DeserializeOwned>(&self) -> Result<Option<T>, AppError> {
        match self.0.iter().find(|c| !c.is_ascii_whitespace()) {
            None => Ok(None),
            // serde reads a struct from an array too (`[]` as `{}`).
            Some(b'{') => parse(&self.0).map(Some),
            Some(_) => Err(AppError::BadBody("the request body must be a JSON object".to_owned())),
        }
    }
}

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = AppError;

    async fn from_request(req: Request, _: &S) -> Result<Self, AppError> {
        body(req).await.map(Self)
    }
}
