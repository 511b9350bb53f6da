//! Why a request is refused, and the outcome counters: the vocabulary that
//! the decision, the local replies and the stats share.

use crate::role::Role;

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
    /// The token is disabled (suspended by its owner, to be enabled again):
    /// refused, though the secret is the token's.
    Disabled,
    /// The token's `notBeforeTime` has not come yet.
    NotYetValid,
    /// The request's client address is outside the token's allowed ranges,
    /// or inside an excepted one.
    AddressDenied,
    /// The token's request rate limit is reached at this gateway.
    RateLimited,
}

impl Denial {
    pub const ALL: [Denial; 15] = [
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
        Denial::Disabled,
        Denial::NotYetValid,
        Denial::AddressDenied,
        Denial::RateLimited,
    ];

    /// The position of this denial in [`Denial::ALL`], which tables indexed
    /// by denial (the local replies) rely on: checked when compiling (end of
    /// this file).
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
            Self::Disabled => "disabled",
            Self::NotYetValid => "not_yet_valid",
            Self::AddressDenied => "address_denied",
            Self::RateLimited => "rate_limited",
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
            Self::Disabled => "apitokens_disabled",
            Self::NotYetValid => "apitokens_not_yet_valid",
            Self::AddressDenied => "apitokens_address_denied",
            Self::RateLimited => "apitokens_rate_limited",
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
            Self::Disabled => Counter::Disabled,
            Self::NotYetValid => Counter::NotYetValid,
            Self::AddressDenied => Counter::AddressDenied,
            Self::RateLimited => Counter::RateLimited,
        }
    }
}

/// A refusal as the client is told of it: why, and for a role denial the
/// role the request needed, if one would have been admitted (the
/// `x-apitokens-required-role` header and the body's `requiredRole`), so
/// a user knows what to ask for without reading the permissions table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Refusal {
    pub denial: Denial,
    pub required: Option<Role>,
}

impl Refusal {
    /// A role denial: `required`, if some role would have been admitted.
    pub const fn role(required: Option<Role>) -> Self {
        Self {
            denial: Denial::RoleDenied,
            required,
        }
    }
}

impl From<Denial> for Refusal {
    fn from(denial: Denial) -> Self {
        Self { denial, required: None }
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
    /// Refused because the token is disabled: owners watch it before
    /// deleting a suspended token (clients that still try it).
    Disabled,
    /// Refused before the token's `notBeforeTime`.
    NotYetValid,
    /// Refused from a client address the token's conditions exclude.
    AddressDenied,
    /// Refused beyond the token's request rate limit.
    RateLimited,
}

impl Counter {
    pub const ALL: [Counter; 14] = [
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
        Counter::Disabled,
        Counter::NotYetValid,
        Counter::AddressDenied,
        Counter::RateLimited,
    ];

    /// The position in [`Counter::ALL`] (checked when compiling).
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
            Self::Disabled => "apitokens.disabled",
            Self::NotYetValid => "apitokens.not_yet_valid",
            Self::AddressDenied => "apitokens.address_denied",
            Self::RateLimited => "apitokens.rate_limited",
        }
    }
}

// `Denial::ALL` and `Counter::ALL` list every variant in declaration order, so
// that a table built by iterating one (the local replies, the filter's stats)
// and read by `index()` finds each variant's own entry. A variant listed out
// of order, or a new last variant left out, fails the build here.
#[allow(clippy::indexing_slicing)] // every index is below the length
const _: () = {
    let mut i = 0;
    while i < Denial::ALL.len() {
        assert!(Denial::ALL[i].index() == i, "Denial::ALL is out of declaration order");
        i += 1;
    }
    assert!(
        Denial::RateLimited.index() + 1 == Denial::ALL.len(),
        "Denial::ALL must end with the last variant"
    );
    let mut i = 0;
    while i < Counter::ALL.len() {
        assert!(Counter::ALL[i].index() == i, "Counter::ALL is out of declaration order");
        i += 1;
    }
    assert!(
        Counter::RateLimited.index() + 1 == Counter::ALL.len(),
        "Counter::ALL must end with the last variant"
    );
};
