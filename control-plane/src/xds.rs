//! The ECDS state-of-the-world protocol for one stream, as a plain state
//! machine: requests and new snapshots go in, responses and ACK/NACK events
//! come out. No sockets here; `xds_grpc` adapts it to tonic streams.
//!
//! The protocol (xDS, SotW): the client's first request names the node and
//! the resources it wants, with an empty nonce; the server answers with the
//! current version and a fresh nonce. The client then answers every response
//! with a request carrying that nonce: an ACK names the version it applied, a
//! NACK keeps the previous version and carries `error_detail`. Requests with
//! an older nonce are stale (superseded by a later response) and ignored. The
//! server sends a new response whenever the configuration changes.

use crate::ecds::{Snapshot, TYPE_URL};
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use std::fmt;

/// What happened, for the status tracker and the logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// First request on the stream.
    Connected {
        node: String,
        cluster: String,
        /// The version the client already has (empty on a fresh Envoy).
        version: String,
    },
    Ack {
        version: String,
    },
    Nack {
        /// The version that was rejected.
        version: String,
        error: String,
    },
}

/// A request the stream cannot go on with; the stream is closed with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProtocolError {
    WrongType(String),
    NoNode,
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::WrongType(t) => write!(f, "this server only serves {TYPE_URL}, not {t:?}"),
            Self::NoNode => f.write_str("the first request must identify the node (node.id)"),
        }
    }
}

impl std::error::Error for ProtocolError {}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Step {
    pub events: Vec<Event>,
    pub response: Option<DiscoveryResponse>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Sent {
    nonce: String,
    version: u64,
}

/// One client stream.
#[derive(Debug)]
pub struct Session {
    resource_name: String,
    node: Option<String>,
    /// Resource names the client subscribed to; empty = wildcard.
    names: Option<Vec<String>>,
    last_sent: Option<Sent>,
    nonces: u64,
}

impl Session {
    /// A stream serving the resource `resource_name`.
    pub fn new(resource_name: &str) -> Self {
        Self {
            resource_name: resource_name.to_owned(),
            node: None,
            names: None,
            last_sent: None,
            nonces: 0,
        }
    }

    /// The client's node id, once known.
    pub fn node(&self) -> Option<&str> {
        self.node.as_deref()
    }

    /// Handles a request from the client, given the current snapshot.
    pub fn on_request(&mut self, req: &DiscoveryRequest, snapshot: &Snapshot) -> Result<Step, ProtocolError> {
        if !req.type_url.is_empty() && req.type_url != TYPE_URL {
            return Err(ProtocolError::WrongType(req.type_url.clone()));
        }
        let mut step = Step::default();
        if self.node.is_none() {
            let node = req
                .node
                .as_ref()
                .filter(|n| !n.id.is_empty())
                .ok_or(ProtocolError::NoNode)?;
            self.node = Some(node.id.clone());
            step.events.push(Event::Connected {
                node: node.id.clone(),
                cluster: node.cluster.clone(),
                version: req.version_info.clone(),
            });
        }
        let mut names = req.resource_names.clone();
        names.sort();
        names.dedup();

        if req.response_nonce.is_empty() {
            // A new subscription (or a re-subscription): answer with the
            // current state.
            self.names = Some(names);
            step.response = Some(self.respond(snapshot));
            return Ok(step);
        }
        let Some(sent) = self.last_sent.clone() else {
            // A nonce we never issued (e.g. from a previous control-plane
            // process): treat it as a fresh subscription.
            self.names = Some(names);
            step.response = Some(self.respond(snapshot));
            return Ok(step);
        };
        if req.response_nonce != sent.nonce {
            // Stale: it answers a response that a later one superseded.
            return Ok(step);
        }
        match &req.error_detail {
            Some(status) => step.events.push(Event::Nack {
                version: sent.version.to_string(),
                error: status.message.clone(),
            }),
            None => step.events.push(Event::Ack {
                version: req.version_info.clone(),
            }),
        }
        let names_changed = self.names.as_ref() != Some(&names);
        self.names = Some(names);
        if names_changed || snapshot.version != sent.version {
            step.response = Some(self.respond(snapshot));
        }
        Ok(step)
    }

    /// A new snapshot was published: the response to push, if the client
    /// subscribed and does not have this version yet.
    pub fn on_snapshot(&mut self, snapshot: &Snapshot) -> Option<DiscoveryResponse> {
        self.names.as_ref()?;
        if self.last_sent.as_ref().is_some_and(|s| s.version == snapshot.version) {
            return None;
        }
        Some(self.respond(snapshot))
    }

    fn wants_resource(&self) -> bool {
        self.names
            .as_ref()
            .is_some_and(|n| n.is_empty() || n.contains(&self.resource_name))
    }

    fn respond(&mut self, snapshot: &Snapshot) -> DiscoveryResponse {
        self.nonces += 1;
        let nonce = self.nonces.to_string();
        let response = snapshot.discovery_response(nonce.clone(), self.wants_resource());
        self.last_sent = Some(Sent {
            nonce,
            version: snapshot.version,
        });
        response
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::ecds::{resource, FilterParams, Payload};
    use apitokens_core::timestamp::Timestamp;
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::google::rpc::Status;

    fn snap(version: u64) -> Snapshot {
        Snapshot {
            version,
            config_json: format!("{{\"v\":{version}}}"),
            resource: resource(&FilterParams::default(), Payload::Json("{}")),
            tokens: 0,
            published_at: Timestamp::from_unix(0, 0),
        }
    }

    fn first(version_info: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            version_info: version_info.into(),
            node: Some(Node {
                id: "host-1".into(),
                cluster: "gateways".into(),
                ..Default::default()
            }),
            resource_names: vec!["apitokens".into()],
            type_url: TYPE_URL.into(),
            ..Default::default()
        }
    }

    fn ack(version: &str, nonce: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            version_info: version.into(),
            resource_names: vec!["apitokens".into()],
            type_url: TYPE_URL.into(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
    }

    fn nack(version: &str, nonce: &str, msg: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            error_detail: Some(Status {
                code: 3,
                message: msg.into(),
                details: vec![],
            }),
            ..ack(version, nonce)
        }
    }

    #[test]
    fn initial_request_gets_the_current_version() {
        let mut s = Session::new("apitokens");
        let step = s.on_request(&first(""), &snap(3)).unwrap();
        assert_eq!(
            step.events,
            [Event::Connected {
                node: "host-1".into(),
                cluster: "gateways".into(),
                version: "".into()
            }]
        );
        let r = step.response.unwrap();
        assert_eq!((r.version_info.as_str(), r.nonce.as_str()), ("3", "1"));
        assert_eq!(r.resources.len(), 1);
        assert_eq!(s.node(), Some("host-1"));
    }

    #[test]
    fn ack_then_push_on_change() {
        let mut s = Session::new("apitokens");
        s.on_request(&first(""), &snap(3)).unwrap();
        let step = s.on_request(&ack("3", "1"), &snap(3)).unwrap();
        assert_eq!(step.events, [Event::Ack { version: "3".into() }]);
        assert!(step.response.is_none(), "nothing new to send");
        // Same version again: nothing.
        assert!(s.on_snapshot(&snap(3)).is_none());
        let r = s.on_snapshot(&snap(4)).unwrap();
        assert_eq!((r.version_info.as_str(), r.nonce.as_str()), ("4", "2"));
        let step = s.on_request(&ack("4", "2"), &snap(4)).unwrap();
        assert_eq!(step.events, [Event::Ack { version: "4".into() }]);
    }

    #[test]
    fn nack_is_reported_with_the_rejected_version_and_not_resent() {
        let mut s = Session::new("apitokens");
        s.on_request(&first(""), &snap(3)).unwrap();
        s.on_request(&ack("3", "1"), &snap(3)).unwrap();
        s.on_snapshot(&snap(4)).unwrap();
        let step = s
            .on_request(&nack("3", "2", "Unable to create Wasm HTTP filter"), &snap(4))
            .unwrap();
        assert_eq!(
            step.events,
            [Event::Nack {
                version: "4".into(),
                error: "Unable to create Wasm HTTP filter".into()
            }]
        );
        assert!(step.response.is_none(), "the same version is not pushed again");
        // A fixed configuration goes out.
        let r = s.on_snapshot(&snap(5)).unwrap();
        assert_eq!(r.version_info, "5");
    }

    #[test]
    fn stale_nonces_are_ignored() {
        let mut s = Session::new("apitokens");
        s.on_request(&first(""), &snap(3)).unwrap();
        s.on_snapshot(&snap(4)).unwrap(); // nonce 2 supersedes nonce 1
        let step = s.on_request(&ack("3", "1"), &snap(4)).unwrap();
        assert_eq!(step, Step::default());
        let step = s.on_request(&nack("3", "1", "late"), &snap(4)).unwrap();
        assert_eq!(step, Step::default());
        let step = s.on_request(&ack("4", "2"), &snap(4)).unwrap();
        assert_eq!(step.events, [Event::Ack { version: "4".into() }]);
    }

    #[test]
    fn snapshot_that_arrives_while_waiting_is_sent_after_the_ack() {
        // The snapshot changed between our response and the ACK, and the
        // push raced: the ACK handler sends the newer version.
        let mut s = Session::new("apitokens");
        s.on_request(&first(""), &snap(3)).unwrap();
        let step = s.on_request(&ack("3", "1"), &snap(4)).unwrap();
        assert_eq!(step.response.unwrap().version_info, "4");
        assert!(s.on_snapshot(&snap(4)).is_none());
    }

    #[test]
    fn reconnect_with_a_version_from_a_previous_process() {
        let mut s = Session::new("apitokens");
        let step = s.on_request(&first("17"), &snap(20)).unwrap();
        assert_eq!(
            step.events[0],
            Event::Connected {
                node: "host-1".into(),
                cluster: "gateways".into(),
                version: "17".into()
            }
        );
        assert_eq!(step.response.unwrap().version_info, "20");
        // A nonce this session never issued: answered as a new subscription.
        let mut s = Session::new("apitokens");
        let mut req = first("17");
        req.response_nonce = "99".into();
        assert!(s.on_request(&req, &snap(20)).unwrap().response.is_some());
    }

    #[test]
    fn no_snapshot_pushed_before_subscription() {
        let mut s = Session::new("apitokens");
        assert!(s.on_snapshot(&snap(1)).is_none());
    }

    #[test]
    fn other_resource_names_get_no_resources() {
        let mut s = Session::new("apitokens");
        let mut req = first("");
        req.resource_names = vec!["something-else".into()];
        let r = s.on_request(&req, &snap(1)).unwrap().response.unwrap();
        assert!(r.resources.is_empty());
        // Changing the subscription to ours sends the resource at once.
        let mut req = ack("1", "1");
        req.resource_names = vec!["apitokens".into()];
        let r = s.on_request(&req, &snap(1)).unwrap().response.unwrap();
        assert_eq!(r.resources.len(), 1);
        // Wildcard (no names) gets it too.
        let mut s = Session::new("apitokens");
        let mut req = first("");
        req.resource_names.clear();
        assert_eq!(
            s.on_request(&req, &snap(1)).unwrap().response.unwrap().resources.len(),
            1
        );
    }

    #[test]
    fn protocol_errors() {
        let mut s = Session::new("apitokens");
        let mut req = first("");
        req.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster".into();
        assert!(matches!(s.on_request(&req, &snap(1)), Err(ProtocolError::WrongType(_))));
        let mut req = first("");
        req.node = None;
        assert_eq!(s.on_request(&req, &snap(1)), Err(ProtocolError::NoNode));
        // An empty type_url (allowed on non-aggregated streams) is ours.
        let mut req = first("");
        req.type_url.clear();
        assert!(s.on_request(&req, &snap(1)).is_ok());
    }
}
