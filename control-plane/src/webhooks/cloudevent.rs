//! An audit event as a CloudEvent (CloudEvents 1.0, HTTP structured mode:
//! the whole event is the JSON body, `Content-Type:
//! application/cloudevents+json`). Its `id` is the event's place in the
//! store's log (the store's lineage and the event's sequence number): the
//! same event delivered twice (at least once, after a crash between the
//! receiver's answer and the cursor's write) has the same `id`, so a
//! receiver drops the second. `data` is the audit event exactly as
//! `apitokens:events` lists it: never a secret or a digest.

use crate::store::AuditEvent;
use crate::tokens::audit;
use serde_json::{json, Value};

/// `Content-Type` of a structured-mode CloudEvent.
pub const CONTENT_TYPE: &str = "application/cloudevents+json; charset=utf-8";

/// The event's `id`: unique per store (its lineage) and per event.
pub fn id(lineage: &str, seq: u64) -> String {
    format!("{lineage}-{seq}")
}

/// The event as a structured-mode CloudEvent body: `type` is
/// `io.apitokens.apitoken.create` and so on, `source` names this store,
/// `subject` the token (or the namespace, for an import).
pub fn body(source: &str, lineage: &str, seq: u64, event: &AuditEvent) -> Vec<u8> {
    let data = audit::to_json(event);
    let kind = data.get("event").and_then(Value::as_str).unwrap_or("apitoken.unknown");
    let subject = event
        .token
        .clone()
        .unwrap_or_else(|| format!("namespaces/{}", event.namespace));
    let envelope = json!({
        "specversion": "1.0",
        "id": id(lineage, seq),
        "source": source,
        "type": format!("io.apitokens.{kind}"),
        "subject": subject,
        "time": event.time.to_rfc3339(),
        "datacontenttype": "application/json",
        "data": data,
    });
    serde_json::to_vec(&envelope).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Action;
    use apitokens_core::Timestamp;

    #[test]
    fn an_audit_event_becomes_a_structured_cloudevent() {
        let event = AuditEvent {
            conditions: None,
            policy: None,
            time: Timestamp::from_unix(1_800_000_000, 0),
            namespace: "default".into(),
            action: Action::Delete,
            token: Some("namespaces/default/apitokens/ci".into()),
            actor: "namespaces/default/apitokens/admin".into(),
            role: None,
            expire_time: None,
            previous_until: None,
            client_address: Some("203.0.113.5".into()),
            peer_address: None,
            credential: None,
            count: None,
        };
        let v: Value = serde_json::from_slice(&body("apitokens://prod", "00ff", 42, &event)).unwrap();
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["id"], "00ff-42");
        assert_eq!(v["source"], "apitokens://prod");
        assert_eq!(v["type"], "io.apitokens.apitoken.delete");
        assert_eq!(v["subject"], "namespaces/default/apitokens/ci");
        assert_eq!(v["time"], "2027-01-15T08:00:00Z");
        assert_eq!(v["data"], audit::to_json(&event));
        let import = AuditEvent {
            action: Action::Import,
            token: None,
            count: Some(3),
            ..event
        };
        let v: Value = serde_json::from_slice(&body("s", "l", 1, &import)).unwrap();
        assert_eq!(v["subject"], "namespaces/default");
    }
}
