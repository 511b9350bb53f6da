//! A recording host double for the per-request flow (`gate`): the request
//! headers it hands over, and every header write, reply, count and log.

use super::at;
use apitokens_core::denial::{Counter, Denial};
use apitokens_core::gate::{HeaderValue, Host, HostError, LogLevel, RequestHeaders};
use apitokens_core::reply::Reply;
use apitokens_core::table::Token;
use apitokens_core::{Access, Timestamp};
use std::fmt;

#[derive(Default)]
pub struct Recorder {
    pub headers: Vec<(String, Vec<u8>)>,
    pub now: Option<Timestamp>,
    pub reply: Option<(Denial, Reply)>,
    pub counters: Vec<Counter>,
    pub logs: Vec<String>,
    pub fail_writes: bool,
    /// A body follows the headers.
    pub body: bool,
    /// How many times the headers were read.
    pub reads: usize,
    pub writes: Vec<String>,
    /// Tokens reported as used, with what the request did.
    pub used: Vec<(String, Access)>,
    /// The route's upstream cluster.
    pub cluster: Option<String>,
    /// The VM's table may be behind its Envoy's (the delta channel).
    pub catching_up: bool,
    /// The client address the proxy determined.
    pub client: Option<std::net::IpAddr>,
    /// How many times it was asked.
    pub client_reads: usize,
}

impl Recorder {
    pub fn request(method: &str, path: &str, authorization: Option<&[u8]>) -> Self {
        let mut headers = vec![
            (":method".to_owned(), method.as_bytes().to_vec()),
            (":path".to_owned(), path.as_bytes().to_vec()),
        ];
        if let Some(a) = authorization {
            headers.push(("authorization".to_owned(), a.to_vec()));
        }
        Self {
            headers,
            now: Some(at("2026-06-01T00:00:00Z")),
            ..Self::default()
        }
    }

    pub fn with_client(mut self, address: &str) -> Self {
        self.client = Some(address.parse().unwrap());
        self
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.as_bytes().to_vec()));
        self
    }

    pub fn header(&self, name: &str) -> Option<String> {
        let values: Vec<_> = self
            .headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .collect();
        (!values.is_empty()).then(|| values.join(","))
    }
}

/// The request headers as the host handed them over.
pub struct Snapshot(Vec<(String, Vec<u8>)>);

impl RequestHeaders for Snapshot {
    fn get(&self, name: &str) -> HeaderValue<'_> {
        let mut values = self.0.iter().filter(|(k, _)| k == name).map(|(_, v)| &v[..]);
        match (values.next(), values.next()) {
            (None, _) => HeaderValue::Absent,
            (Some(v), None) => HeaderValue::One(v),
            (Some(_), Some(_)) => HeaderValue::Repeated,
        }
    }
}

impl Host for Recorder {
    type Headers = Snapshot;

    fn request_headers(&mut self) -> Result<Snapshot, HostError> {
        self.reads += 1;
        Ok(Snapshot(self.headers.clone()))
    }

    fn request_has_body(&mut self) -> bool {
        self.body
    }

    fn now(&mut self) -> Option<Timestamp> {
        self.now
    }

    fn client_address(&mut self) -> Option<std::net::IpAddr> {
        self.client_reads += 1;
        self.client
    }

    fn add_request_header(&mut self, name: &str, value: &[u8]) -> Result<(), HostError> {
        if self.fail_writes {
            return Err(HostError);
        }
        assert!(self.header(name).is_none(), "added {name} next to a client-sent copy");
        self.headers.push((name.to_owned(), value.to_vec()));
        self.writes.push(format!("add {name}"));
        Ok(())
    }

    fn set_request_header(&mut self, name: &str, value: &[u8]) -> Result<(), HostError> {
        if self.fail_writes {
            return Err(HostError);
        }
        self.headers.retain(|(k, _)| k != name);
        self.headers.push((name.to_owned(), value.to_vec()));
        self.writes.push(format!("set {name}"));
        Ok(())
    }

    fn remove_request_header(&mut self, name: &str) -> Result<(), HostError> {
        self.headers.retain(|(k, _)| k != name);
        self.writes.push(format!("remove {name}"));
        Ok(())
    }

    fn route_cluster(&mut self) -> Option<Vec<u8>> {
        self.writes.push("read cluster".to_owned());
        self.cluster.as_ref().map(|c| c.as_bytes().to_vec())
    }

    fn send_reply(&mut self, reply: &Reply) -> Result<(), HostError> {
        assert!(self.reply.is_none(), "one reply per request");
        self.reply = Some((reply.denial, reply.clone()));
        Ok(())
    }

    fn count(&mut self, counter: Counter) {
        self.counters.push(counter);
    }

    fn used(&mut self, token: Token<'_>, access: Access) {
        self.used.push((token.name().to_owned(), access));
    }

    fn log(&mut self, level: LogLevel, message: fmt::Arguments<'_>) {
        self.logs.push(format!("{level:?}: {message}"));
    }

    fn catching_up(&mut self) -> bool {
        self.catching_up
    }
}
