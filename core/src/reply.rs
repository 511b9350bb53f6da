//! Local replies for refused requests (RFC 6750 section 3), built once per
//! configuration.

use crate::denial::{Denial, Refusal};
use crate::role::Role;

/// The header naming the role a refused request needed.
pub const REQUIRED_ROLE_HEADER: &str = "x-apitokens-required-role";

/// A refusal as the gateway sends it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub denial: Denial,
    /// This reply's position in [`Replies::all`]: hosts that prepare
    /// something per reply (the filter serializes the headers once) index
    /// it by this.
    pub slot: usize,
    pub status: u32,
    pub headers: Box<[(&'static str, Box<str>)]>,
    /// `{"code": status, "message": ..., "requiredRole"?: ...}`; never
    /// mentions the secret.
    pub body: Box<[u8]>,
}

impl Reply {
    /// Envoy's response code details (`%RESPONSE_CODE_DETAILS%`).
    pub const fn details(&self) -> &'static str {
        self.denial.details()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replies {
    /// One per denial, in [`Denial::ALL`]'s order, then a role denial
    /// naming each role, in [`Role::ALL`]'s.
    all: Box<[Reply]>,
}

impl Replies {
    pub fn new(realm: &str) -> Self {
        let refusals = Denial::ALL
            .into_iter()
            .map(Refusal::from)
            .chain(Role::ALL.into_iter().map(|role| Refusal::role(Some(role))));
        Self {
            all: refusals.enumerate().map(|(slot, r)| reply(r, slot, realm)).collect(),
        }
    }

    pub fn get(&self, refusal: Refusal) -> Option<&Reply> {
        let slot = match refusal.required {
            Some(role) if refusal.denial == Denial::RoleDenied => Denial::ALL.len() + role.index(),
            _ => refusal.denial.index(),
        };
        self.all.get(slot)
    }

    pub fn all(&self) -> &[Reply] {
        &self.all
    }
}

fn reply(refusal: Refusal, slot: usize, realm: &str) -> Reply {
    let denial = refusal.denial;
    // RFC 6750 3.1: no error code when no bearer token was presented.
    let (status, error, message) = match denial {
        Denial::Missing => (401, None, "A bearer token is required."),
        Denial::NotBearer => (401, None, "The Authorization header must use the Bearer scheme."),
        Denial::Malformed => (401, Some("invalid_token"), "The bearer token is malformed."),
        Denial::MultipleCredentials => (
            400,
            Some("invalid_request"),
            "The request must carry exactly one Authorization header with one credential.",
        ),
        Denial::UrlOverride => (
            400,
            Some("invalid_request"),
            "The request must not carry X-Original-URL or X-Rewrite-URL.",
        ),
        // Unknown, expired, disabled and not yet valid read the same to the
        // client: no oracle for which secrets once existed, nor for which
        // are merely suspended or not valid yet (whoever holds a leaked one
        // would learn it may work later). Stats, logs and response details
        // tell them apart.
        Denial::Unknown | Denial::Expired | Denial::Disabled | Denial::NotYetValid => {
            (401, Some("invalid_token"), "The bearer token is invalid or expired.")
        }
        // The token is valid, its role no matter: the request comes from
        // where the token's owner said it may not be used. A 403 of its own
        // (as Cloudflare answers), so its user can tell a network problem
        // from a revoked token: it does tell whoever tries a leaked secret
        // from elsewhere that it is live, which is the trade (security.md).
        Denial::AddressDenied => (403, None, "The token may not be used from this client address."),
        Denial::NamespaceDenied => (
            403,
            Some("insufficient_scope"),
            "The token is not valid for this namespace.",
        ),
        Denial::RoleDenied => (
            403,
            Some("insufficient_scope"),
            "The token's role does not permit this request.",
        ),
        // Not an authentication failure (no challenge): the fields saying
        // when to retry are added per request (`Throttled::header_values`).
        Denial::RateLimited => (
            429,
            None,
            "The token's request rate limit is reached; retry after the time given.",
        ),
        Denial::Internal => (500, None, "The request could not be authorized."),
        Denial::CatchingUp => (
            503,
            None,
            "The gateway is applying recent token changes; retry in a moment.",
        ),
    };
    let mut headers: Vec<(&'static str, Box<str>)> = vec![("content-type", "application/json".into())];
    if status == 503 {
        headers.push(("retry-after", "1".into()));
    } else if status != 500 && status != 429 {
        let challenge = match error {
            Some(error) => format!("Bearer realm=\"{realm}\", error=\"{error}\""),
            None => format!("Bearer realm=\"{realm}\""),
        };
        headers.push(("www-authenticate", challenge.into()));
    }
    // Telling the role a request needed tells nothing a token's holder
    // could not read in the permissions table: only its own namespace's
    // rules, and only once the token authenticated.
    let body = match refusal.required {
        Some(role) => {
            headers.push((REQUIRED_ROLE_HEADER, role.as_str().into()));
            format!("{{\"code\":{status},\"message\":\"{message}\",\"requiredRole\":\"{role}\"}}")
        }
        None => format!("{{\"code\":{status},\"message\":\"{message}\"}}"),
    };
    Reply {
        denial,
        slot,
        status,
        headers: headers.into_boxed_slice(),
        body: body.into_bytes().into_boxed_slice(),
    }
}
