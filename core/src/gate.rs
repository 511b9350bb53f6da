//! The per-request flow, written against a narrow [`Host`] interface so that
//! it runs (and is tested) without a proxy. The proxy-wasm glue implements
//! `Host` with host calls; tests implement it with a recording double.

use crate::config::Config;
use crate::decision::{Counter, Denial, Grant};
use crate::reply::Reply;
use crate::table::Token;
use crate::timestamp::Timestamp;
use std::fmt;

/// A host call failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
    Error,
}

/// What the filter needs from the proxy.
pub trait Host {
    /// All values of a request header as one byte string (Envoy joins repeated
    /// headers with a comma), or `None` when absent. Never decoded as UTF-8.
    fn request_header(&mut self, name: &str) -> Result<Option<Vec<u8>>, HostError>;
    /// The host's wall clock, `None` if it cannot be read.
    fn now(&mut self) -> Option<Timestamp>;
    /// Sets a request header, replacing every existing value.
    fn set_request_header(&mut self, name: &str, value: &[u8]) -> Result<(), HostError>;
    fn remove_request_header(&mut self, name: &str) -> Result<(), HostError>;
    /// Answers the request locally; it does not go upstream.
    fn send_reply(&mut self, denial: Denial, reply: &Reply) -> Result<(), HostError>;
    fn count(&mut self, counter: Counter);
    fn log(&mut self, level: LogLevel, message: fmt::Arguments<'_>);
}

/// Whether the request goes on upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Continue,
    /// A local reply was sent.
    Stop,
}

/// Decides one request and applies the decision through the host.
pub fn on_request_headers<H: Host>(host: &mut H, config: &Config) -> Verdict {
    match check(host, config) {
        Ok((token, grant)) => match forward(host, config, token, grant) {
            Ok(()) => {
                host.count(Counter::Allowed);
                Verdict::Continue
            }
            Err(HostError) => deny(host, config, Denial::Internal, Some(token)),
        },
        Err((denial, token)) => deny(host, config, denial, token),
    }
}

type Checked<'c> = Result<(Token<'c>, Grant), (Denial, Option<Token<'c>>)>;

fn check<'c, H: Host>(host: &mut H, config: &'c Config) -> Checked<'c> {
    let internal = |_| (Denial::Internal, None);
    let authorization = host.request_header("authorization").map_err(internal)?;
    let token = config.authenticate(authorization.as_deref(), || host.now())?;
    // Only now, with a known token, is the rest of the request worth reading.
    let method = host.request_header(":method").map_err(internal)?;
    let path = host.request_header(":path").map_err(internal)?;
    let grant = config
        .authorize(
            token,
            method.as_deref().unwrap_or_default(),
            path.as_deref().unwrap_or_default(),
        )
        .map_err(|denial| (denial, Some(token)))?;
    Ok((token, grant))
}

fn forward<H: Host>(host: &mut H, config: &Config, token: Token<'_>, grant: Grant) -> Result<(), HostError> {
    let headers = config.identity_headers();
    // Setting replaces whatever the client sent under these names.
    host.set_request_header(&headers.name, token.name().as_bytes())?;
    host.set_request_header(&headers.namespace, token.namespace().as_bytes())?;
    host.set_request_header(&headers.role, token.role().as_str().as_bytes())?;
    if !grant.forward_authorization {
        host.remove_request_header("authorization")?;
    }
    Ok(())
}

fn deny<H: Host>(host: &mut H, config: &Config, denial: Denial, token: Option<Token<'_>>) -> Verdict {
    // The request is answered locally, but strip forged identity anyway: if
    // the reply cannot be sent, nothing downstream may trust these headers.
    let headers = config.identity_headers();
    for name in [&headers.name, &headers.namespace, &headers.role] {
        let _ = host.remove_request_header(name);
    }
    host.count(denial.counter());
    host.log(
        LogLevel::Info,
        format_args!(
            "denied reason={} token={}",
            denial.reason(),
            token.as_ref().map_or("-", Token::name)
        ),
    );
    if let Some(reply) = config.replies().get(denial) {
        if host.send_reply(denial, reply).is_err() {
            host.log(LogLevel::Error, format_args!("could not send the local reply"));
        }
    }
    Verdict::Stop
}
