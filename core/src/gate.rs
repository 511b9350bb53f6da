//! The per-request flow, written against a narrow [`Host`] interface so that
//! it runs (and is tested) without a proxy. The proxy-wasm glue implements
//! `Host` with host calls; tests implement it with a recording double.
//!
//! Host calls dominate the cost of the filter (each is a crossing between the
//! VM and Envoy), so the flow reads every request header in one call and
//! writes only what it must: identity headers are added, or replaced only when
//! the client sent a copy; on a refusal only client-sent copies are removed.

use crate::access::{Access, Kind};
use crate::config::Config;
use crate::decision::{ForwardAuthorization, Grant};
use crate::denial::{Counter, Denial, Refusal};
use crate::overrides::{
    self, OverrideMethod, UrlOverrides, BODY_OVERRIDE_METHODS, METHOD_OVERRIDE_HEADERS, URL_OVERRIDE_HEADERS,
};
use crate::ratelimit::{self, Decision, RateLimit, Throttled};
use crate::reply::Reply;
use crate::role::RoleSet;
use crate::table::{Overlay, Token};
use crate::timestamp::Timestamp;
use std::fmt;
use std::net::IpAddr;

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

/// A request header as the filter sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderValue<'a> {
    Absent,
    One(&'a [u8]),
    /// More than one field line with this name.
    Repeated,
}

/// The request headers, read once.
pub trait RequestHeaders {
    /// `name` in lower case. Values are bytes, never decoded as UTF-8.
    fn get(&self, name: &str) -> HeaderValue<'_>;

    /// Whether any of `names` (lower case) is present. For headers that are
    /// rarely sent: an implementation can answer in one pass over the
    /// headers instead of one per name.
    fn any(&self, names: &[&str]) -> bool {
        names.iter().any(|name| self.get(name) != HeaderValue::Absent)
    }
}

/// What the filter needs from the proxy.
pub trait Host {
    type Headers: RequestHeaders;
    /// Every request header, in one read.
    fn request_headers(&mut self) -> Result<Self::Headers, HostError>;
    /// Whether a body follows the headers (proxy-wasm's `end_of_stream` is
    /// false).
    fn request_has_body(&mut self) -> bool;
    /// The host's wall clock, `None` if it cannot be read.
    fn now(&mut self) -> Option<Timestamp>;
    /// The request's client address as the proxy determined it (its
    /// downstream address, or the `X-Forwarded-For` hop its own settings
    /// select: with Envoy's `use_remote_address: false`, the last one,
    /// whoever wrote it), never a header the filter reads itself; `None`
    /// if there is none. Asked only for tokens bound to addresses.
    fn client_address(&mut self) -> Option<IpAddr>;
    /// Adds a request header (the request has none of this name).
    fn add_request_header(&mut self, name: &str, value: &[u8]) -> Result<(), HostError>;
    /// Sets a request header, replacing every existing value.
    fn set_request_header(&mut self, name: &str, value: &[u8]) -> Result<(), HostError>;
    fn remove_request_header(&mut self, name: &str) -> Result<(), HostError>;
    /// The upstream cluster the request's route sends it to (Envoy's
    /// `cluster_name` property), `None` without a route. Asked only for
    /// paths that may keep `Authorization`.
    fn route_cluster(&mut self) -> Option<Vec<u8>>;
    /// Answers the request locally; it does not go upstream. `extra`
    /// fields follow the reply's own (a 429's, built per request).
    fn send_reply(&mut self, reply: &Reply, extra: &[(&str, &str)]) -> Result<(), HostError>;
    /// A value every worker of this proxy shares (proxy-wasm shared data)
    /// and its version; `None` if it was never set. Asked only for tokens
    /// with a rate limit.
    fn shared(&mut self, key: &str) -> Result<Option<(Vec<u8>, u32)>, HostError>;
    /// Stores `value` under `key` if its version is still `version` (0:
    /// whatever it is); `Ok(false)` if another worker stored one first.
    fn set_shared(&mut self, key: &str, value: &[u8], version: u32) -> Result<bool, HostError>;
    fn count(&mut self, counter: Counter);
    /// A token authenticated (whatever the rules then decide): for its last
    /// use, and, when admitted, what the request did (`access`). Must be
    /// cheap, it runs on every request.
    fn used(&mut self, token: Token<'_>, access: Access);
    fn log(&mut self, level: LogLevel, message: fmt::Arguments<'_>);
    /// Whether this VM's table may be behind what its Envoy already enforces
    /// elsewhere (see [`Denial::CatchingUp`]). Asked of every request the
    /// table admits: an implementation answers from its own state whenever
    /// it can.
    fn catching_up(&mut self) -> bool {
        false
    }
}

/// Whether the request goes on upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Continue,
    /// A local reply was sent.
    Stop,
}

/// Every method- and URL-override header.
const OVERRIDE_HEADERS: [&str; 5] = [
    METHOD_OVERRIDE_HEADERS[0],
    METHOD_OVERRIDE_HEADERS[1],
    METHOD_OVERRIDE_HEADERS[2],
    URL_OVERRIDE_HEADERS[0],
    URL_OVERRIDE_HEADERS[1],
];

/// Decides one request and applies the decision through the host: the
/// token is looked up in `overlay` (the delta channel's changes), if any,
/// over the configuration's table.
pub fn on_request_headers<H: Host>(host: &mut H, config: &Config, overlay: Option<&Overlay>) -> Verdict {
    let headers = match host.request_headers() {
        Ok(headers) => headers,
        Err(HostError) => return deny(host, config, None, Denial::Internal.into(), None, None),
    };
    let (token, grant, access) = match check(host, config, overlay, &headers) {
        Ok(admitted) => admitted,
        Err((refusal, token)) => return deny(host, config, Some(&headers), refusal, token, None),
    };
    // Asked only of a request the table admits: one it refuses is refused
    // whatever this VM may be missing.
    let refused = if host.catching_up() {
        Some((Refusal::from(Denial::CatchingUp), None))
    } else {
        // How much, last: only a request that reaches the upstream counts
        // against the token's rate.
        match token.conditions().and_then(|c| c.rate_limit()) {
            None => None,
            Some(limit) => match take(host, token.name(), limit) {
                Ok(None) => None,
                Ok(Some(throttled)) => Some((Denial::RateLimited.into(), Some(throttled))),
                // Shared data failed: fail closed, as for any host failure.
                Err(HostError) => Some((Denial::Internal.into(), None)),
            },
        }
    };
    let refused = match refused {
        None => forward(host, config, &headers, token, grant)
            .err()
            .map(|HostError| (Denial::Internal.into(), None)),
        refused => refused,
    };
    // One mark per authenticated request, refused or not (its last use);
    // what it did only when it went on (the evidence for least privilege).
    match refused {
        None => {
            host.used(token, access);
            host.count(if token.is_previous() {
                Counter::AllowedPreviousSecret
            } else {
                Counter::Allowed
            });
            Verdict::Continue
        }
        Some((refusal, throttled)) => {
            host.used(token, Access::USED);
            deny(host, config, Some(&headers), refusal, Some(token), throttled)
        }
    }
}

/// Admitted by the table and the rules: the token, what it is granted and
/// what the request does; or a refusal, with the token if one
/// authenticated (marked used already).
type Checked<'c> = Result<(Token<'c>, Grant, Access), (Refusal, Option<Token<'c>>)>;

fn check<'c, H: Host>(
    host: &mut H,
    config: &'c Config,
    overlay: Option<&'c Overlay>,
    headers: &H::Headers,
) -> Checked<'c> {
    // Override headers are rare: one pass tells whether to look closer.
    let overridden = headers.any(&OVERRIDE_HEADERS);
    if overridden && config.url_overrides() == UrlOverrides::Reject && headers.any(&URL_OVERRIDE_HEADERS) {
        return Err((Denial::UrlOverride.into(), None));
    }
    let authorization = match headers.get("authorization") {
        HeaderValue::Absent => None,
        HeaderValue::One(value) => Some(value),
        HeaderValue::Repeated => return Err((Denial::MultipleCredentials.into(), None)),
    };
    let token = config
        .authenticate(overlay, authorization, || host.now())
        .map_err(|(denial, token)| (denial.into(), token))?;
    // Where from, before what: a request from an address the token may
    // not be used from is refused whatever it asks. (Still a use: the
    // token authenticated.)
    if let Some(conditions) = token.conditions().filter(|c| c.limits_addresses()) {
        if !host.client_address().is_some_and(|ip| conditions.admits(ip)) {
            host.used(token, Access::USED);
            return Err((Denial::AddressDenied.into(), Some(token)));
        }
    }
    match decide(host, config, headers, token, overridden) {
        Ok((grant, access)) => Ok((token, grant, access)),
        Err(refusal) => {
            // A use (its last), and no evidence: it did nothing.
            host.used(token, Access::USED);
            Err((refusal, Some(token)))
        }
    }
}

/// Whether the rules admit `token` for the request, and if so what the
/// request did ([`Access`]); if not, the role it needed.
fn decide<H: Host>(
    host: &mut H,
    config: &Config,
    headers: &H::Headers,
    token: Token<'_>,
    overridden: bool,
) -> Result<(Grant, Access), Refusal> {
    let one = |name| match headers.get(name) {
        HeaderValue::One(value) => value,
        HeaderValue::Absent | HeaderValue::Repeated => b"",
    };
    let path = one(":path");
    let method = one(":method");
    let scope = config.scope(token, path)?;
    // The method, and every method the request could be overridden to, must
    // be permitted: an upstream honouring an override would run it. Each
    // adds the roles it would refuse; the token's role must be none of them.
    let need = |method: &[u8]| {
        let (roles, kind) = scope.access(method);
        Access::admitted(kind, roles)
    };
    let role = token.role();
    let admits = |access: Access| !access.refusing().contains(role);
    let (roles, kind) = scope.access(method);
    let mut access = Access::admitted(kind, roles);
    if overridden && admits(access) {
        for name in overrides::METHOD_OVERRIDE_HEADERS {
            access = access.union(match headers.get(name) {
                HeaderValue::Absent => Access::NONE,
                HeaderValue::One(value) => need(OverrideMethod::from_header(value).as_bytes()),
                HeaderValue::Repeated => Access::admitted(Kind::Write, RoleSet::NONE),
            });
        }
    }
    if admits(access) {
        for m in overrides::query_methods(path) {
            access = access.union(need(m.as_bytes()));
        }
    }
    if admits(access) && method == b"POST" && has_body(host, headers) {
        // What a body could override the method to: its roles count, its
        // kind not (no evidence the body did).
        for m in BODY_OVERRIDE_METHODS {
            access = access.union(Access::admitted(kind, scope.access(m).0));
        }
    }
    if admits(access) {
        Ok((config.grant(&scope), access))
    } else {
        // The roles no part of the request refuses: what it needed.
        Err(Refusal::role(access.refusing().complement().to_ask_for(role)))
    }
}

/// Whether body bytes follow: the host says more than headers follow, and no
/// `content-length: 0` says the body is empty (HTTP/2 clients may end an
/// empty request with an empty DATA frame; Envoy refuses a body longer than
/// its content-length).
fn has_body<H: Host>(host: &mut H, headers: &H::Headers) -> bool {
    host.request_has_body() && headers.get("content-length") != HeaderValue::One(b"0")
}

fn forward<H: Host>(
    host: &mut H,
    config: &Config,
    headers: &H::Headers,
    token: Token<'_>,
    grant: Grant,
) -> Result<(), HostError> {
    let names = config.identity_headers();
    let identity = [
        (&*names.name, token.name()),
        (&*names.namespace, token.namespace()),
        (&*names.role, token.role().as_str()),
    ];
    for (name, value) in identity {
        // Replacing removes whatever the client sent under this name; when it
        // sent nothing, adding is enough (and one step cheaper for Envoy).
        if headers.get(name) == HeaderValue::Absent {
            host.add_request_header(name, value.as_bytes())?;
        } else {
            host.set_request_header(name, value.as_bytes())?;
        }
    }
    let keep = match grant.authorization {
        ForwardAuthorization::Keep => true,
        ForwardAuthorization::Remove => false,
        ForwardAuthorization::KeepForClusters => host.route_cluster().is_some_and(|c| config.forwards_to(&c)),
    };
    if !keep {
        host.remove_request_header("authorization")?;
    }
    if config.url_overrides() == UrlOverrides::Remove && headers.any(&URL_OVERRIDE_HEADERS) {
        for name in URL_OVERRIDE_HEADERS {
            if headers.get(name) != HeaderValue::Absent {
                host.remove_request_header(name)?;
            }
        }
    }
    Ok(())
}

fn deny<H: Host>(
    host: &mut H,
    config: &Config,
    headers: Option<&H::Headers>,
    refusal: Refusal,
    token: Option<Token<'_>>,
    throttled: Option<Throttled>,
) -> Verdict {
    let denial = refusal.denial;
    // The request is answered locally and never forwarded; still, no
    // client-sent identity header survives it (nor, if the headers could not
    // be read, any header of those names).
    let names = config.identity_headers();
    for name in [&names.name, &names.namespace, &names.role] {
        if headers.map_or(true, |h| h.get(name) != HeaderValue::Absent) {
            let _ = host.remove_request_header(name);
        }
    }
    host.count(denial.counter());
    // Debug, not info: one line per refused request would let any client
    // flood the gateway's log. The counters always count.
    host.log(
        LogLevel::Debug,
        format_args!(
            "denied reason={} token={}",
            denial.reason(),
            token.as_ref().map_or("-", Token::name)
        ),
    );
    if let Some(reply) = config.replies().get(refusal) {
        let mut values: [String; 3] = Default::default();
        let extra = throttled.map(|t| {
            t.header_values(&mut values);
            let [retry, policy, state] = &values;
            let [r, p, s] = Throttled::HEADERS;
            [(r, retry.as_str()), (p, policy.as_str()), (s, state.as_str())]
        });
        if host
            .send_reply(reply, extra.as_ref().map_or(&[], |e| e.as_slice()))
            .is_err()
        {
            host.log(LogLevel::Error, format_args!("could not send the local reply"));
        }
    }
    Verdict::Stop
}

/// How often a swap is tried before the request is refused as if the
/// limit were reached (never admitted uncounted). Each failed swap is
/// another worker's request counted, so this many in a row means the
/// token is being used at several workers at once, at its limit.
const ATTEMPTS: usize = 16;

/// The shared-data key's prefix; the token's full name follows.
const KEY_PREFIX: &str = "apitokens.rate.";

/// Counts one request against `limit` for the token named `name`, in the
/// shared data every worker of this proxy sees. `Ok(None)` if it passes;
/// `Err` if the host failed (the caller fails closed).
fn take<H: Host>(host: &mut H, name: &str, limit: RateLimit) -> Result<Option<Throttled>, HostError> {
    let now = host.now().and_then(ratelimit::nanos).ok_or(HostError)?;
    let mut key = String::with_capacity(KEY_PREFIX.len() + name.len());
    key.push_str(KEY_PREFIX);
    key.push_str(name);
    for _ in 0..ATTEMPTS {
        let Some((value, version)) = host.shared(&key)? else {
            // First use at this proxy: store "never used" unconditionally,
            // then swap as always. (Proxy-wasm has no create-if-absent: a
            // worker that read "missing" just before another stored and
            // swapped overwrites that count, so on a token's very first
            // requests at a gateway, the requests other workers admitted
            // in that window may go uncounted. Storing the first TAT
            // itself unconditionally would lose one on every such race.)
            host.set_shared(&key, &0u64.to_le_bytes(), 0)?;
            continue;
        };
        // Anything but 8 bytes was not written by this module: read as
        // never used, and overwritten by the swap.
        let stored = <[u8; 8]>::try_from(value.as_slice()).map_or(0, u64::from_le_bytes);
        let tat = limit.cap(stored, now);
        match limit.decide(tat, now) {
            Decision::Refuse(throttled) => {
                if tat != stored && version != 0 {
                    // Best effort: whoever swapped first stored a TAT of
                    // its own, within the limit.
                    host.set_shared(&key, &tat.to_le_bytes(), version)?;
                }
                return Ok(Some(throttled));
            }
            Decision::Admit(next) => {
                // A version of 0 would store unconditionally: Envoy never
                // hands one out, and a host that did gets no blind write.
                if version != 0 && host.set_shared(&key, &next.to_le_bytes(), version)? {
                    return Ok(None);
                }
            }
        }
    }
    Ok(Some(Throttled {
        limit,
        wait_nanos: limit.interval(),
    }))
}
