//! `GET /healthz`, `GET /status` and `GET /metrics` (no authentication: keep them on
//! loopback, or behind the gateway's own access control).

use super::error::json_response;
use super::{AppError, AppState};
use crate::acks::Lag;
use crate::config::Version;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The Prometheus scrape ([`crate::metrics`]).
pub(crate) async fn metrics(State(app): State<Arc<AppState>>) -> Response {
    let text = app.metrics.encode(&app.publisher, &app.acks);
    let mut resp = (StatusCode::OK, text).into_response();
    resp.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
    );
    resp
}

/// `{"status": "ok", "version": "N"}`, or 503 when the store cannot be read.
pub(crate) async fn healthz(State(app): State<Arc<AppState>>) -> Response {
    match app.service.store().revision().await {
        Ok(_) => json_response(
            StatusCode::OK,
            &serde_json::json!({"status": "ok", "version": app.publisher.current().version.to_string()}),
        ),
        Err(e) => {
            tracing::error!("healthz: {e}");
            json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &serde_json::json!({"code": 503, "message": "the token store is not available"}),
            )
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct StatusQuery {
    version: Option<String>,
    wait_seconds: Option<String>,
}

/// The published version and, per Envoy stream, the versions it acknowledged
/// or rejected, and its node's filter VMs' delta streams (`delta: false`:
/// ECDS only, an older filter). `?version=N&waitSeconds=S` waits up to S
/// seconds (at most 60) until at least one Envoy is connected and every
/// connected one has applied version N (its VMs, with delta streams).
pub(crate) async fn status(
    State(app): State<Arc<AppState>>,
    query: Result<Query<StatusQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, AppError> {
    let Query(query) = query.map_err(|_| AppError::bad_query())?;
    let wanted = match query.version.as_deref().map(Version::parse_number) {
        None => None,
        Some(Some(v)) => Some(v),
        Some(None) => {
            return Err(AppError::BadField {
                field: "version",
                problem: "must be a configuration version number",
            })
        }
    };
    let wait = match query.wait_seconds.as_deref().map(str::parse::<f64>) {
        None => 0.0,
        Some(Ok(s)) if (0.0..=60.0).contains(&s) => s,
        Some(_) => {
            return Err(AppError::BadField {
                field: "waitSeconds",
                problem: "must be a number of seconds from 0 to 60",
            })
        }
    };
    let state = app.publisher.state();
    let current = &state.snapshot;
    // A number is a version of the store's current epoch.
    let version = wanted.map_or(current.version, |n| Version::new(state.epoch, n));
    if wait > 0.0 {
        app.acks
            .wait_applied(version, Instant::now() + Duration::from_secs_f64(wait))
            .await;
    }
    let rollout = app.acks.rollout(version);
    let lagging: Vec<_> = rollout
        .lagging
        .iter()
        .map(|l| {
            let (reason, error) = match &l.lag {
                Lag::Pending => ("pending", None),
                Lag::Rejected(e) => ("rejected", Some(e.clone())),
                Lag::WriteFailed(e) => ("writeFailed", Some(e.clone())),
                Lag::Unresponsive(d) => (
                    "unresponsive",
                    Some(format!("no answer to a response sent {:.1} s ago", d.as_secs_f64())),
                ),
                Lag::Held(v) => (
                    "held",
                    Some(format!(
                        "it enforces version {} of epoch {}, newer than this control plane's",
                        v.revision, v.epoch
                    )),
                ),
            };
            serde_json::json!({"who": l.who, "reason": reason, "error": error})
        })
        .collect();
    let body = serde_json::json!({
        "version": current.version.to_string(),
        "revision": state.revision.to_string(),
        "epoch": state.epoch.to_string(),
        // The store went back in time (see docs/operations.md, "Restoring
        // the store"): the newest version seen, writes refused.
        "behind": state.behind.map(|b| serde_json::json!({"version": b.revision.to_string(), "epoch": b.epoch.to_string()})),
        "tokens": current.tokens,
        "publishedAt": current.published_at.to_rfc3339(),
        "publishError": state.error,
        "resourceName": app.resource_name,
        "checkedVersion": version.to_string(),
        "applied": app.acks.applied(version),
        "connectedEnvoys": rollout.envoys,
        "appliedEnvoys": rollout.applied,
        "lagging": lagging,
        "envoys": app.acks.envoys(),
        // The filter VMs' delta streams connected (with replicas, every
        // live replica's), and those whose node has no Envoy stream shown.
        "deltaStreams": app.acks.delta_streams(),
        "vmsWithoutEnvoy": app.acks.vms_without_envoy(),
        // With replicas on PostgreSQL: every replica and its Envoy count.
        "replicas": app.acks.replicas(),
        "file": app.acks.file(),
        "usageReports": {
            "taken": app.service.metrics.usage_accepted.get(),
            "digests": app.service.metrics.usage_digests.get(),
            "refused": app.service.metrics.usage_refused.get(),
        },
    });
    Ok(json_response(StatusCode::OK, &body))
}
