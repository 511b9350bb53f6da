//! Local replies for refused requests (RFC 6750 section 3), built once per
//! configuration.

use crate::denial::Denial;

/// A refusal as the gateway sends it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: u32,
    /// Envoy's response code details (`%RESPONSE_CODE_DETAILS%`).
    pub details: &'static str,
    pub headers: Box<[(&'static str, Box<str>)]>,
    /// `{"code": status, "message": ...}`; never mentions the secret.
    pub body: Box<[u8]>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replies {
    by_denial: Box<[Reply]>,
}

impl Replies {
    pub fn new(realm: &str) -> Self {
        Self {
            by_denial: Denial::ALL.iter().map(|d| reply(*d, realm)).collect(),
        }
    }

    pub fn get(&self, denial: Denial) -> Option<&Reply> {
        self.by_denial.get(denial.index())
    }
}

fn reply(denial: Denial, realm: &str) -> Reply {
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
        // Unknown, expired and disabled read the same to the client: no
        // oracle for which secrets once existed, nor for which are merely
        // suspended (whoever holds a leaked one would learn it may work
        // again). Stats, logs and response details tell them apart.
        Denial::Unknown | Denial::Expired | Denial::Disabled => {
            (401, Some("invalid_token"), "The bearer token is invalid or expired.")
        }
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
    } else if status != 500 {
        let challenge = match error {
            Some(error) => format!("Bearer realm=\"{realm}\", error=\"{error}\""),
            None => format!("Bearer realm=\"{realm}\""),
        };
        headers.push(("www-authenticate", challenge.into()));
    }
    let body = format!("{{\"code\":{status},\"message\":\"{message}\"}}");
    Reply {
        status,
        details: denial.details(),
        headers: headers.into_boxed_slice(),
        body: body.into_bytes().into_boxed_slice(),
    }
}
