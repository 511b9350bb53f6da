//! A recording host double for the per-request flow (`gate`): the request
//! headers it hands over, and every header write, reply, count and log.

use super::at;
use apitokens_core::denial::{Counter, Denial};
use apitokens_core::gate::{HeaderValue, Host, HostError, LogLevel, RequestHeaders};
use apitokens_core::reply::Reply;
use apitokens_core::table::Token;
use apitokens_core::{Access, Timestamp};
use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::rc::Rc;

/// Shared data as Envoy keeps it (`SharedData::set`): a value and a
/// version per key, versions from 1; a set at version 0, or of a key never
/// set, stores whatever is there. Recorders given the same store stand
/// for one Envoy's workers.
#[derive(Clone, Default)]
pub struct SharedStore(Rc<RefCell<Versions>>);

/// Each key's value and version, and the last version handed out.
type Versions = (HashMap<String, (Vec<u8>, u32)>, u32);

/// What another worker does between this one's read and swap.
pub type Interleaved = Box<dyn FnMut(&SharedStore, &str)>;

impl SharedStore {
    pub fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.0.borrow().0.get(key).cloned()
    }

    pub fn set(&self, key: &str, value: &[u8], version: u32) -> bool {
        let mut inner = self.0.borrow_mut();
        let (map, next) = &mut *inner;
        if let Some((_, current)) = map.get(key) {
            if version != 0 && version != *current {
                return false;
            }
        }
        *next += 1;
        map.insert(key.to_owned(), (value.to_vec(), *next));
        true
    }
}

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
    /// The reply's fields built for this request.
    pub reply_extra: Vec<(String, String)>,
    /// This proxy's shared data.
    pub shared: SharedStore,
    /// Shared data fails.
    pub shared_fails: bool,
    /// Run before this worker's next swaps, one each: what other workers
    /// store in between this one's read and swap.
    pub interleaved: Vec<Interleaved>,
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

    fn send_reply(&mut self, reply: &Reply, extra: &[(&str, &str)]) -> Result<(), HostError> {
        assert!(self.reply.is_none(), "one reply per request");
        self.reply = Some((reply.denial, reply.clone()));
        self.reply_extra = extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        Ok(())
    }

    fn shared(&mut self, key: &str) -> Result<Option<(Vec<u8>, u32)>, HostError> {
        if self.shared_fails {
            return Err(HostError);
        }
        Ok(self.shared.get(key))
    }

    fn set_shared(&mut self, key: &str, value: &[u8], version: u32) -> Result<bool, HostError> {
        if self.shared_fails {
            return Err(HostError);
        }
        if version != 0 && !self.interleaved.is_empty() {
            // Another worker swaps first, between this one's read and swap.
            let mut other = self.interleaved.remove(0);
            other(&self.shared, key);
        }
        Ok(self.shared.set(key, value, version))
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
