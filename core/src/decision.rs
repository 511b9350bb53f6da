//! The authorization decision: authenticate the bearer token, then check the
//! request's namespace and verb against the token's role.

use crate::bearer::{self, BearerError};
use crate::config::Config;
use crate::denial::{Denial, Refusal};
use crate::rules::{PathSegments, Scope};
use crate::table::{Digest, Overlay, Token};
use crate::timestamp::Timestamp;

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
    /// token has an expiry or a not-before time; if the clock is unavailable
    /// the token is refused.
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
        // The clock is read once, and only for a token with a time to check.
        let not_before = token.conditions().and_then(|c| c.not_before());
        if token.expire().is_some() || not_before.is_some() {
            let now = now();
            if token.expire().is_some() && now.map_or(true, |now| token.is_expired(now)) {
                return Err((Denial::Expired, Some(token)));
            }
            // Valid from `notBeforeTime` on, inclusive.
            if not_before.is_some_and(|nb| now.map_or(true, |now| now < nb)) {
                return Err((Denial::NotYetValid, Some(token)));
            }
        }
        // After the times: an expired or not yet valid token that is also
        // disabled counts as such, a state an enable would not end, so
        // `disabled` counts exactly the refusals an enable would undo.
        if token.is_disabled() {
            return Err((Denial::Disabled, Some(token)));
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

    /// Checks the request's namespace and verb against the token; a role
    /// denial names the role the request needed.
    pub fn authorize(&self, token: Token<'_>, method: &[u8], path: &[u8]) -> Result<Grant, Refusal> {
        let scope = self.scope(token, path)?;
        let (admitting, _) = scope.access(method);
        if admitting.contains(token.role()) {
            Ok(self.grant(&scope))
        } else {
            Err(Refusal::role(admitting.to_ask_for(token.role())))
        }
    }
}
