//! The ECDS state-of-the-world protocol for one stream, as a plain state
//! machine: requests and new versions go in, what to send and ACK/NACK
//! events come out. No sockets and no encoding here; `server` adapts it to
//! gRPC streams.
//!
//! The protocol (xDS, SotW): the client's first request names the node and
//! the resources it wants, with an empty nonce; the server answers with the
//! current version and a fresh nonce. The client then answers every response
//! with a request carrying that nonce: an ACK names the version it applied, a
//! NACK keeps the previous version and carries `error_detail`. Requests with
//! an older nonce are stale (superseded by a later response) and ignored. The
//! server sends a new response whenever the configuration changes.
//!
//! An ACK counts for the version this stream sent with that nonce, never for
//! a version the client merely names: a reconnecting Envoy that reports a
//! version from before has applied nothing on this stream yet.
//!
//! Never backwards: an Envoy that reconnects reporting a version newer than
//! the current one (it was configured by a replica that is ahead, or before
//! the store was restored from a backup) is sent nothing: the stream is held
//! until the current version reaches the one it reported. Sending the
//! current version would bring back every token revoked in between.
//!
//! One response at a time is in flight: a new version waits until Envoy has
//! answered the previous one, then goes out as the newest there is. Envoy
//! applies responses one after the other (a large table takes a while), so
//! sending every version as it is published would queue work Envoy then
//! discards, and each new nonce would make the ACKs of the earlier ones
//! stale: under a stream of writes no ACK would ever count.

use super::resource::TYPE_URL;
use crate::config::Version;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;

/// What happened, for the ACK tracker and the logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Event {
    /// First request on the stream.
    Connected {
        node: String,
        cluster: String,
        /// The version the client says it has (empty on a fresh Envoy).
        version: String,
    },
    /// The client enforces `reported`, newer than the current version:
    /// nothing is sent until the current version reaches it.
    Held { reported: Version, current: Version },
    /// A held stream gets the current version at last.
    Released { version: Version },
    /// The client applied the version sent with the nonce it answered.
    Ack { version: Version },
    /// The client rejected the version sent with the nonce it answered.
    Nack { version: Version, error: String },
}

/// The most of a node id or cluster name kept (logged, shown, stored and
/// shared with the other replicas): a client could otherwise send megabytes.
pub(crate) const MAX_NAME: usize = 256;
/// The most of a NACK's error text kept.
pub(crate) const MAX_ERROR: usize = 4096;

/// `text` cut to at most `max` bytes, on a character boundary, marked as cut.
fn bounded(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max.saturating_sub(3);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", text.get(..end).unwrap_or_default())
}

/// A request the stream cannot go on with; the stream is closed with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ProtocolError {
    #[error("this server only serves {TYPE_URL}, not {0:?}")]
    WrongType(String),
    #[error("the first request must identify the node (node.id)")]
    NoNode,
}

/// A response to send: the current version under a fresh nonce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Respond {
    pub version: Version,
    pub nonce: String,
    /// Whether the client subscribed to our resource (otherwise the
    /// response carries no resources).
    pub include: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Step {
    pub events: Vec<Event>,
    pub respond: Option<Respond>,
}

impl Step {
    fn respond(respond: Option<Respond>) -> Self {
        Self {
            events: Vec::new(),
            respond,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Sent {
    nonce: String,
    version: Version,
}

/// One client stream.
#[derive(Debug)]
pub(crate) struct Session {
    resource_name: String,
    node: Option<String>,
    /// Resource names the client subscribed to; empty = wildcard.
    names: Option<Vec<String>>,
    last_sent: Option<Sent>,
    /// `last_sent` is not answered yet.
    in_flight: bool,
    nonces: u64,
    /// The version the client reported when it connected, while it is newer
    /// than the current one: nothing is sent before the current one reaches it.
    held: Option<Version>,
}

impl Session {
    /// A stream serving the resource `resource_name`.
    pub fn new(resource_name: &str) -> Self {
        Self {
            resource_name: resource_name.to_owned(),
            node: None,
            names: None,
            last_sent: None,
            in_flight: false,
            nonces: 0,
            held: None,
        }
    }

    /// Handles a request from the client, given the current version.
    pub fn on_request(&mut self, req: &DiscoveryRequest, current: Version) -> Result<Step, ProtocolError> {
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
            self.node = Some(bounded(&node.id, MAX_NAME));
            step.events.push(Event::Connected {
                node: bounded(&node.id, MAX_NAME),
                cluster: bounded(&node.cluster, MAX_NAME),
                version: bounded(&req.version_info, MAX_NAME),
            });
            if let Some(reported) = Version::from_xds(&req.version_info).filter(|r| *r > current) {
                self.held = Some(reported);
                step.events.push(Event::Held { reported, current });
            }
        }
        let mut names = req.resource_names.clone();
        names.sort();
        names.dedup();

        let sent = match &self.last_sent {
            // A nonce we issued: an answer to a response of ours.
            Some(sent) if !req.response_nonce.is_empty() => sent.clone(),
            // A new subscription, a re-subscription, or a nonce from a
            // previous control-plane process: answer with the current state
            // (unless the stream is held).
            _ => {
                self.names = Some(names);
                if self.held.is_none() {
                    step.respond = Some(self.respond(current));
                }
                return Ok(step);
            }
        };
        if req.response_nonce != sent.nonce {
            // Stale: it answers a response that a later one superseded.
            return Ok(step);
        }
        self.in_flight = false;
        match &req.error_detail {
            Some(status) => step.events.push(Event::Nack {
                version: sent.version,
                error: bounded(&status.message, MAX_ERROR),
            }),
            None => step.events.push(Event::Ack { version: sent.version }),
        }
        let names_changed = self.names.as_ref() != Some(&names);
        self.names = Some(names);
        if names_changed || current != sent.version {
            step.respond = Some(self.respond(current));
        }
        Ok(step)
    }

    /// A new version was published: the response to push, if the client
    /// subscribed, was not sent this version yet, and answered the last
    /// response (otherwise its answer brings the newest version); for a held
    /// stream, once `current` reaches the version the client reported.
    pub fn on_version(&mut self, current: Version) -> Step {
        if let Some(reported) = self.held {
            if current < reported {
                return Step::default();
            }
            self.held = None;
            let mut step = Step::default();
            step.events.push(Event::Released { version: current });
            if self.names.is_some() {
                step.respond = Some(self.respond(current));
            }
            return step;
        }
        if self.names.is_none() || self.in_flight || self.last_sent.as_ref().is_some_and(|s| s.version == current) {
            return Step::default();
        }
        Step::respond(Some(self.respond(current)))
    }

    fn wants_resource(&self) -> bool {
        self.names
            .as_ref()
            .is_some_and(|n| n.is_empty() || n.contains(&self.resource_name))
    }

    fn respond(&mut self, version: Version) -> Respond {
        self.nonces += 1;
        let nonce = self.nonces.to_string();
        self.last_sent = Some(Sent {
            nonce: nonce.clone(),
            version,
        });
        self.in_flight = true;
        Respond {
            version,
            nonce,
            include: self.wants_resource(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Epoch, Revision};
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::google::rpc::Status;

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

    /// Version `n` of epoch 1.
    fn v(n: u64) -> Version {
        Version::new(Epoch(1), Revision(n))
    }

    fn respond(version: u64, nonce: &str) -> Option<Respond> {
        Some(Respond {
            version: v(version),
            nonce: nonce.into(),
            include: true,
        })
    }

    #[test]
    fn initial_request_gets_the_current_version() {
        let mut s = Session::new("apitokens");
        let step = s.on_request(&first(""), v(3)).unwrap();
        assert_eq!(
            step.events,
            [Event::Connected {
                node: "host-1".into(),
                cluster: "gateways".into(),
                version: "".into()
            }]
        );
        assert_eq!(step.respond, respond(3, "1"));
    }

    #[test]
    fn ack_then_push_on_change() {
        let mut s = Session::new("apitokens");
        s.on_request(&first(""), v(3)).unwrap();
        let step = s.on_request(&ack("3", "1"), v(3)).unwrap();
        assert_eq!(step.events, [Event::Ack { version: v(3) }]);
        assert!(step.respond.is_none(), "nothing new to send");
        // Same version again: nothing.
        assert!(s.on_version(v(3)).respond.is_none());
        assert_eq!(s.on_version(v(4)).respond, respond(4, "2"));
        let step = s.on_request(&ack("4", "2"), v(4)).unwrap();
        assert_eq!(step.events, [Event::Ack { version: v(4) }]);
    }

    #[test]
    fn an_ack_counts_for_the_version_sent_with_its_nonce() {
        // A client naming another version than the one sent with the nonce
        // applied what was sent, nothing else.
        let mut s = Session::new("apitokens");
        s.on_request(&first(""), v(3)).unwrap();
        let step = s.on_request(&ack("99", "1"), v(3)).unwrap();
        assert_eq!(step.events, [Event::Ack { version: v(3) }]);
    }

    #[test]
    fn nack_is_reported_with_the_rejected_version_and_not_resent() {
        let mut s = Session::new("apitokens");
        s.on_request(&first(""), v(3)).unwrap();
        s.on_request(&ack("3", "1"), v(3)).unwrap();
        s.on_version(v(4)).respond.unwrap();
        let step = s
            .on_request(&nack("3", "2", "Unable to create Wasm HTTP filter"), v(4))
            .unwrap();
        assert_eq!(
            step.events,
            [Event::Nack {
                version: v(4),
                error: "Unable to create Wasm HTTP filter".into()
            }]
        );
        assert!(step.respond.is_none(), "the same version is not pushed again");
        // A fixed configuration goes out.
        assert_eq!(s.on_version(v(5)).respond.unwrap().version, v(5));
    }

    #[test]
    fn stale_nonces_are_ignored() {
        let mut s = Session::new("apitokens");
        s.on_request(&first(""), v(3)).unwrap();
        // A re-subscription (no nonce) is answered at once: nonce 2
        // supersedes nonce 1.
        s.on_request(&first(""), v(4)).unwrap();
        assert_eq!(s.on_request(&ack("3", "1"), v(4)).unwrap(), Step::default());
        assert_eq!(s.on_request(&nack("3", "1", "late"), v(4)).unwrap(), Step::default());
        let step = s.on_request(&ack("4", "2"), v(4)).unwrap();
        assert_eq!(step.events, [Event::Ack { version: v(4) }]);
    }

    #[test]
    fn one_response_in_flight_then_the_newest_version() {
        let mut s = Session::new("apitokens");
        s.on_request(&first(""), v(3)).unwrap();
        // Versions 4 and 5 are published while 3 is not answered yet.
        assert!(s.on_version(v(4)).respond.is_none());
        assert!(s.on_version(v(5)).respond.is_none());
        // The ACK of 3 counts, and brings 5 (4 is skipped).
        let step = s.on_request(&ack("3", "1"), v(5)).unwrap();
        assert_eq!(step.events, [Event::Ack { version: v(3) }]);
        assert_eq!(step.respond, respond(5, "2"));
        assert!(s.on_version(v(6)).respond.is_none(), "5 is in flight");
        let step = s.on_request(&nack("3", "2", "no"), v(6)).unwrap();
        assert_eq!(
            step.events,
            [Event::Nack {
                version: v(5),
                error: "no".into()
            }]
        );
        assert_eq!(step.respond, respond(6, "3"));
    }

    #[test]
    fn a_version_that_arrives_while_waiting_is_sent_after_the_ack() {
        let mut s = Session::new("apitokens");
        s.on_request(&first(""), v(3)).unwrap();
        let step = s.on_request(&ack("3", "1"), v(4)).unwrap();
        assert_eq!(step.respond.unwrap().version, v(4));
        assert!(s.on_version(v(4)).respond.is_none());
    }

    #[test]
    fn reconnect_with_a_version_from_a_previous_process() {
        let mut s = Session::new("apitokens");
        let step = s.on_request(&first("17"), v(20)).unwrap();
        assert_eq!(
            step.events[0],
            Event::Connected {
                node: "host-1".into(),
                cluster: "gateways".into(),
                version: "17".into()
            }
        );
        assert_eq!(step.respond.unwrap().version, v(20));
        // A nonce this session never issued: answered as a new subscription,
        // and no ACK is counted for it.
        let mut s = Session::new("apitokens");
        let mut req = first("17");
        req.response_nonce = "99".into();
        let step = s.on_request(&req, v(20)).unwrap();
        assert!(step.respond.is_some());
        assert!(!step.events.iter().any(|e| matches!(e, Event::Ack { .. })));
    }

    #[test]
    fn no_version_pushed_before_subscription() {
        let mut s = Session::new("apitokens");
        assert!(s.on_version(v(1)).respond.is_none());
    }

    #[test]
    fn other_resource_names_get_no_resources() {
        let mut s = Session::new("apitokens");
        let mut req = first("");
        req.resource_names = vec!["something-else".into()];
        assert!(!s.on_request(&req, v(1)).unwrap().respond.unwrap().include);
        // Changing the subscription to ours sends the resource at once.
        let mut req = ack("1", "1");
        req.resource_names = vec!["apitokens".into()];
        assert!(s.on_request(&req, v(1)).unwrap().respond.unwrap().include);
        // Wildcard (no names) gets it too.
        let mut s = Session::new("apitokens");
        let mut req = first("");
        req.resource_names.clear();
        assert!(s.on_request(&req, v(1)).unwrap().respond.unwrap().include);
    }

    #[test]
    fn protocol_errors() {
        let mut s = Session::new("apitokens");
        let mut req = first("");
        req.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster".into();
        assert!(matches!(s.on_request(&req, v(1)), Err(ProtocolError::WrongType(_))));
        let mut req = first("");
        req.node = None;
        assert_eq!(s.on_request(&req, v(1)), Err(ProtocolError::NoNode));
        // An empty type_url (allowed on non-aggregated streams) is ours.
        let mut req = first("");
        req.type_url.clear();
        assert!(s.on_request(&req, v(1)).is_ok());
    }

    #[test]
    fn an_envoy_ahead_of_this_control_plane_is_held_until_it_catches_up() {
        // The Envoy enforces version 7 (from a replica that is ahead, or
        // from before the store was restored); this control plane has 5.
        let mut s = Session::new("apitokens");
        let step = s.on_request(&first(&v(7).xds()), v(5)).unwrap();
        assert_eq!(step.respond, None, "never sent anything older");
        assert_eq!(
            step.events[1],
            Event::Held {
                reported: v(7),
                current: v(5)
            }
        );
        // A re-subscription changes nothing; nor does version 6.
        assert_eq!(s.on_request(&first(&v(7).xds()), v(5)).unwrap().respond, None);
        assert_eq!(s.on_version(v(6)), Step::default());
        // Version 7 (the same content, now caught up): sent.
        let step = s.on_version(v(7));
        assert_eq!(step.events, [Event::Released { version: v(7) }]);
        assert_eq!(step.respond, respond(7, "1"));
        let step = s.on_request(&ack(&v(7).xds(), "1"), v(7)).unwrap();
        assert_eq!(step.events, [Event::Ack { version: v(7) }]);
    }

    #[test]
    fn a_later_epoch_is_ahead_of_any_revision_of_an_earlier_one() {
        let later = Version::new(Epoch(2), Revision(3));
        // An Envoy on epoch 2 is not sent revision 50 of epoch 1.
        let mut s = Session::new("apitokens");
        assert_eq!(s.on_request(&first(&later.xds()), v(50)).unwrap().respond, None);
        // An Envoy on epoch 1 gets epoch 2 at once.
        let mut s = Session::new("apitokens");
        let step = s.on_request(&first(&v(50).xds()), later).unwrap();
        assert_eq!(step.respond.unwrap().version, later);
        // Versions from before epochs (a bare number) are older than any epoch.
        let mut s = Session::new("apitokens");
        assert!(s.on_request(&first("900"), v(3)).unwrap().respond.is_some());
        assert_eq!(Version::from_xds("900"), Some(Version::new(Epoch(0), Revision(900))));
        assert_eq!(Version::from_xds(&later.xds()), Some(later));
        assert_eq!(Version::from_xds(""), None);
        assert_eq!(Version::from_xds("x.1"), None);
    }

    #[test]
    fn what_a_client_names_is_kept_bounded() {
        let mut s = Session::new("apitokens");
        let mut req = first("");
        req.node.as_mut().unwrap().id = "é".repeat(10_000);
        req.node.as_mut().unwrap().cluster = "c".repeat(10_000);
        let step = s.on_request(&req, v(1)).unwrap();
        let Event::Connected { node, cluster, .. } = &step.events[0] else {
            panic!()
        };
        assert!(node.len() <= MAX_NAME && node.ends_with("...") && node.starts_with("éé"));
        assert_eq!(cluster.len(), MAX_NAME);
        let step = s.on_request(&nack("1", "1", &"x".repeat(1 << 20)), v(1)).unwrap();
        let Event::Nack { error, .. } = &step.events[0] else {
            panic!()
        };
        assert_eq!(error.len(), MAX_ERROR);
    }
}
