//! The authorization decision: authenticate the bearer token, then check the
//! request's namespace and verb against the token's role.

use crate::bearer::{self, BearerError};
use crate::config::Config;
use crate::rules::{PathSegments, Scope};
use crate::table::{Digest, Overlay, Token};
use crate::timestamp::Timestamp;

/// Why a request is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Denial {
    /// No Authorization header (or an empty one).
    Missing,
    /// Another scheme than Bearer.
    NotBearer,
    /// The Bearer scheme with a malformed token.
    Malformed,
    /// More than one credential.
    MultipleCredentials,
    /// A URL-override header (`X-Original-URL`, `X-Rewrite-URL`): an upstream
    /// could route on it instead of the path the filter decided on.
    UrlOverride,
    /// No token has this secret.
    Unknown,
    /// The token's `expireTime` has passed.
    Expired,
    /// The path's namespace is not the token's.
    NamespaceDenied,
    /// The token's role does not permit the verb on this path, or no rule
    /// matches the path, or the method is unknown.
    RoleDenied,
    /// The host failed us (e.g. a header could not be set): fail closed.
    Internal,
    /// This VM's table may be older than one another VM of this Envoy
    /// enforces, and its delta stream has not caught up yet: a token
    /// revoked since could pass. Refused until it has (fail closed).
    CatchingUp,
}

impl Denial {
    pub const ALL: [Denial; 11] = [
        Denial::Missing,
        Denial::NotBearer,
        Denial::Malformed,
        Denial::MultipleCredentials,
        Denial::UrlOverride,
        Denial::Unknown,
        Denial::Expired,
        Denial::NamespaceDenied,
        Denial::RoleDenied,
        Denial::Internal,
        Denial::CatchingUp,
    ];

    pub const fn index(self) -> usize {
        self as usize
    }

    /// A short reason for logs, and (prefixed with `apitokens_`) Envoy's
    /// response code details.
    pub const fn reason(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::NotBearer => "not_bearer",
            Self::Malformed => "malformed",
            Self::MultipleCredentials => "multiple_credentials",
            Self::UrlOverride => "url_override",
            Self::Unknown => "unknown",
            Self::Expired => "expired",
            Self::NamespaceDenied => "namespace_denied",
            Self::RoleDenied => "role_denied",
            Self::Internal => "internal_error",
            Self::CatchingUp => "catching_up",
        }
    }

    pub const fn details(self) -> &'static str {
        match self {
            Self::Missing => "apitokens_missing",
            Self::NotBearer => "apitokens_not_bearer",
            Self::Malformed => "apitokens_malformed",
            Self::MultipleCredentials => "apitokens_multiple_credentials",
            Self::UrlOverride => "apitokens_url_override",
            Self::Unknown => "apitokens_unknown",
            Self::Expired => "apitokens_expired",
            Self::NamespaceDenied => "apitokens_namespace_denied",
            Self::RoleDenied => "apitokens_role_denied",
            Self::Internal => "apitokens_internal_error",
            Self::CatchingUp => "apitokens_catching_up",
        }
    }

    pub const fn counter(self) -> Counter {
        match self {
            Self::Missing => Counter::Missing,
            // Requests refused for their form rather than their credential's
            // standing.
            Self::NotBearer | Self::Malformed | Self::MultipleCredentials | Self::UrlOverride => Counter::Malformed,
            Self::Unknown => Counter::Unknown,
            Self::Expired => Counter::Expired,
            Self::NamespaceDenied => Counter::NamespaceDenied,
            Self::RoleDenied => Counter::RoleDenied,
            Self::Internal => Counter::InternalError,
            Self::CatchingUp => Counter::CatchingUp,
        }
    }
}

/// Outcome counters, exported as Envoy stats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Counter {
    Allowed,
    /// Allowed with a token's previous secret, during a rotation's overlap
    /// (not in `Allowed`): owners watch it fall to zero as clients move on.
    AllowedPreviousSecret,
    Missing,
    Malformed,
    Unknown,
    Expired,
    NamespaceDenied,
    RoleDenied,
    InternalError,
    CatchingUp,
}

impl Counter {
    pub const ALL: [Counter; 10] = [
        Counter::Allowed,
        Counter::AllowedPreviousSecret,
        Counter::Missing,
        Counter::Malformed,
        Counter::Unknown,
        Counter::Expired,
        Counter::NamespaceDenied,
        Counter::RoleDenied,
        Counter::InternalError,
        Counter::CatchingUp,
    ];

    pub const fn index(self) -> usize {
        self as usize
    }

    /// The stat name (Envoy adds its own prefix for wasm metrics).
    pub const fn name(self) -> &'static str {
        match self {
            Self::Allowed => "apitokens.allowed",
            Self::AllowedPreviousSecret => "apitokens.allowed_previous_secret",
            Self::Missing => "apitokens.missing",
            Self::Malformed => "apitokens.malformed",
            Self::Unknown => "apitokens.unknown",
            Self::Expired => "apitokens.expired",
            Self::NamespaceDenied => "apitokens.namespace_denied",
            Self::RoleDenied => "apitokens.role_denied",
            Self::InternalError => "apitokens.internal_error",
            Self::CatchingUp => "apitokens.catching_up",
        }
    }
}

/// What an allowed request may take upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grant {
    pub authorization: ForwardAuthorization,
}

/// What happens to the `Authorization` header of an allowed request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForwardAuthorization {
    /// Removed (the default).
    Remove,
    /// Kept: the matching rule's `forwardAuthorization`, else the
    /// configuration's.
    Keep,
    /// Kept if the route's upstream cluster is one of
    /// `forwardAuthorizationClusters` (the path matched
    /// `forwardAuthorizationPaths`), removed otherwise.
    KeepForClusters,
}

impl Config {
    /// Finds the token for an Authorization value. `now` is asked only when the
    /// token has an expiry; if the clock is unavailable the token is refused.
    pub fn authenticate<'c>(
        &'c self,
        overlay: Option<&'c Overlay>,
        authorization: Option<&[u8]>,
        now: impl FnOnce() -> Option<Timestamp>,
    ) -> Result<Token<'c>, (Denial, Option<Token<'c>>)> {
        let value = authorization.ok_or((Denial::Missing, None))?;
        let secret = bearer::parse(value).map_err(|e| {
            let denial = match e {
                BearerError::Empty => Denial::Missing,
                BearerError::NotBearer => Denial::NotBearer,
                BearerError::Malformed => Denial::Malformed,
                BearerError::Multiple => Denial::MultipleCredentials,
            };
            (denial, None)
        })?;
        let digest = Digest::of(secret);
        let token = match overlay {
            Some(overlay) => overlay.get(&self.tokens, &digest),
            None => self.tokens.get(&digest),
        }
        .ok_or((Denial::Unknown, None))?;
        if token.expire().is_some() && now().map_or(true, |now| token.is_expired(now)) {
            return Err((Denial::Expired, Some(token)));
        }
        Ok(token)
    }

    /// The rule deciding `path` for `token`: refused when no rule matches
    /// or the path is in another namespace. The path is split once, for the
    /// rules and for `forwardAuthorizationPaths`.
    pub fn scope<'p>(&self, token: Token<'_>, path: &'p [u8]) -> Result<Scope<'p>, Denial> {
        let mut buf = PathSegments::buffer();
        let segments = PathSegments::split(path, &mut buf).ok_or(Denial::RoleDenied)?;
        let mut scope = self.rules.classify_split(segments).ok_or(Denial::RoleDenied)?;
        if scope.namespace != token.namespace().as_bytes() {
            return Err(Denial::NamespaceDenied);
        }
        if scope.forward_authorization.is_none()
            && !self.forward_paths.is_empty()
            && self.forward_paths.matches(segments)
        {
            scope.forward_path = true;
        }
        Ok(scope)
    }

    /// What a request allowed in `scope` takes upstream.
    pub fn grant(&self, scope: &Scope<'_>) -> Grant {
        let authorization = match scope.forward_authorization {
            Some(true) => ForwardAuthorization::Keep,
            Some(false) => ForwardAuthorization::Remove,
            None if scope.forward_path => ForwardAuthorization::KeepForClusters,
            None if self.forward_authorization() => ForwardAuthorization::Keep,
            None => ForwardAuthorization::Remove,
        };
        Grant { authorization }
    }

    /// Checks the request's namespace and verb against the token.
    pub fn authorize(&self, token: Token<'_>, method: &[u8], path: &[u8]) -> Result<Grant, Denial> {
        let scope = self.scope(token, path)?;
        if scope.permits_method(token.role(), method) {
            Ok(self.grant(&scope))
        } else {
            Err(Denial::RoleDenied)
        }
    }
}
