//! `POST /apitokens/v1/credentials:revoke`: leak reports (the rules are in
//! `tokens::leaks`). No authentication: holding a secret is the proof. The
//! answer is `202 {}` whatever matched.

use super::error::json_response;
use super::extract::{peer, JsonBody};
use super::{AppError, AppState};
use crate::tokens::leaks::REPORTER;
use crate::tokens::{self, Actor};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use std::sync::Arc;
use std::time::Instant;

/// Who reports, counted against its client address's rate before the body
/// is read.
pub(crate) struct Reporter {
    actor: Actor,
    arrived: Instant,
}

impl FromRequestParts<Arc<AppState>> for Reporter {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<AppState>) -> Result<Self, AppError> {
        let arrived = Instant::now();
        let peer = peer(parts);
        let actor = Actor {
            name: REPORTER.to_owned(),
            address: app.trusted_proxies.client_address(peer, &parts.headers),
            peer: peer.map(|p| p.to_string()),
            caller: None,
        };
        app.service.admit_report(&actor)?;
        Ok(Self { actor, arrived })
    }
}

/// GitHub's shape: `{"credentials": ["apt_…", …]}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RevokeBody {
    #[serde(default)]
    credentials: Option<serde_json::Value>,
}

pub(crate) async fn revoke(
    axum::extract::State(app): axum::extract::State<Arc<AppState>>,
    reporter: Reporter,
    JsonBody(body): JsonBody<RevokeBody>,
) -> Result<Response, AppError> {
    let list = match body.credentials {
        Some(serde_json::Value::Array(list)) => list,
        None => {
            return Err(AppError::BadField {
                field: "credentials",
                problem: "is required: the list of secrets found",
            })
        }
        Some(_) => {
            return Err(AppError::BadField {
                field: "credentials",
                problem: "must be a list of strings",
            })
        }
    };
    let mut credentials = Vec::with_capacity(list.len());
    for (i, value) in list.into_iter().enumerate() {
        match value {
            serde_json::Value::String(text) => credentials.push(text),
            _ => return Err(tokens::Error::invalid(format!("credentials[{i}]"), "must be a string").into()),
        }
    }
    // In a task of its own: a client that hangs up mid-way must not stop a
    // revocation half done (or before every Envoy has it).
    let service = Arc::clone(&app.service);
    let actor = reporter.actor.clone();
    let arrived = reporter.arrived;
    let count = credentials.len();
    let outcome = tokio::spawn(async move {
        let refs: Vec<&str> = credentials.iter().map(String::as_str).collect();
        service.revoke_leaked(&refs, &actor, arrived).await
    })
    .await
    .map_err(|e| AppError::Internal(format!("the revocation task ended without its answer: {e}")))??;
    // For the operator: how much was reported and revoked (the tokens are
    // named by the revocations' own lines), never a secret.
    tracing::info!(
        credentials = count,
        revoked = outcome.revoked.len(),
        client = reporter.actor.address.as_deref().unwrap_or("-"),
        "leak report of {count} credentials: {} tokens revoked",
        outcome.revoked.len()
    );
    Ok(json_response(StatusCode::ACCEPTED, &serde_json::json!({})))
}
