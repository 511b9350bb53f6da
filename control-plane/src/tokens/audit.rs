//! The audit trail: one event per create, regenerate, disable, enable,
//! delete, import and revocation by leak report (actor `reported leaked`;
//! none for a disable or an enable that changed nothing),
//! recorded in the store with the change (same transaction), and one JSON
//! line per event on stderr for log shippers. The same field set in both
//! places (`event`, `time`, `namespace`, `token`, `actor`, `role`,
//! `expireTime`, `previousSecretExpireTime`, `clientAddress`, `peerAddress`,
//! `credential` (`current` or `previous`: which of the caller's secrets
//! acted), `count`);
//! never a secret or a digest.

use crate::store::AuditEvent;
use apitokens_core::conditions::Conditions;
use serde_json::{json, Map, Value};

/// The event as the API lists it and the log writes it.
pub fn to_json(event: &AuditEvent) -> Value {
    let mut out = Map::new();
    out.insert("event".into(), json!(format!("apitoken.{}", event.action.as_str())));
    out.insert("time".into(), json!(event.time.to_rfc3339()));
    out.insert("namespace".into(), json!(event.namespace));
    let mut put = |key: &str, value: Option<Value>| {
        if let Some(value) = value {
            out.insert(key.into(), value);
        }
    };
    put("token", event.token.as_ref().map(|t| json!(t)));
    put("actor", Some(json!(event.actor)));
    put("role", event.role.map(|r| json!(r.as_str())));
    put("expireTime", event.expire_time.map(|t| json!(t.to_rfc3339())));
    put(
        "previousSecretExpireTime",
        event.previous_until.map(|t| json!(t.to_rfc3339())),
    );
    put("clientAddress", event.client_address.as_ref().map(|a| json!(a)));
    put("peerAddress", event.peer_address.as_ref().map(|a| json!(a)));
    put("credential", event.credential.map(|c| json!(c.as_str())));
    put("count", event.count.map(|c| json!(c)));
    put("policy", event.policy.as_ref().map(|p| json!(p)));
    put(
        "conditions",
        event
            .conditions
            .as_deref()
            .and_then(|c| serde_json::from_str::<Value>(c).ok()),
    );
    Value::Object(out)
}

/// A token's conditions as an event carries them: a JSON object with the
/// API's fields (`notBeforeTime`, `clientAddresses`, `rateLimit`), `{}` for
/// none.
pub fn conditions_text(conditions: Option<&Conditions>) -> String {
    let mut out = Map::new();
    if let Some(c) = conditions {
        if let Some(t) = c.not_before {
            out.insert("notBeforeTime".into(), json!(t.to_rfc3339()));
        }
        if let Some(a) = c.addresses_spec() {
            out.insert("clientAddresses".into(), json!(a));
        }
        if let Some(l) = c.rate_limit {
            out.insert("rateLimit".into(), json!(l.spec()));
        }
    }
    Value::Object(out).to_string()
}

/// The event's line on stderr: one JSON object, nothing else on the line.
pub fn log(event: &AuditEvent) {
    let mut line = json!({"audit": to_json(event)}).to_string();
    line.push('\n');
    use std::io::Write;
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}
