//! Who acts, and what that bounds beyond the role. A role says which calls a
//! token may make; these rules say that no token it makes outlives or
//! outranks it:
//!
//! - a token created by a caller expires no later than the caller's own
//!   token, and no later than the namespace's maximum lifetime
//!   (`--max-token-lifetime`): an `expireTime` beyond that is a 400 naming
//!   `expireTime`; none at all gets the bound (returned in the answer);
//! - a caller cannot regenerate, disable or enable a token that outlives its
//!   own (a short-lived owner would otherwise take over the long-lived
//!   `admin` token by regenerating it, lock its holders out by disabling it,
//!   or bring back a long-lived token an owner suspended by enabling it);
//! - a caller bound to client addresses creates tokens bound within them (a
//!   create without ranges gets the caller's; ranges outside them are a 400
//!   naming `clientAddresses`), and cannot regenerate, disable or enable a
//!   token that is not bound within them (whoever holds a bound secret from
//!   outside its ranges would otherwise mint, or take over, one that is not);
//! - a previous secret (a rotation's overlap) may read, never write: the
//!   owner who rotates a leaked secret must not be out-rotated by whoever
//!   holds the old one.
//!
//! Operator tools (`bootstrap`, `import`) have no caller and no bounds.

use super::Error;
use crate::clock;
use crate::store::{Credential, TokenRecord};
use apitokens_core::conditions::{Conditions, Packed, MAX_RANGES};
use apitokens_core::Timestamp;
use std::collections::BTreeMap;
use std::time::Duration;

/// Who asks for a change, for the rules above and the audit trail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Actor {
    /// The caller's token name, or the operator tool.
    pub name: String,
    /// The client address: the `X-Forwarded-For` hop a trusted proxy
    /// appended, else the connection's peer.
    pub address: Option<String>,
    /// The connection's peer.
    pub peer: Option<String>,
    /// The token that calls; none for an operator tool.
    pub caller: Option<Caller>,
}

/// The calling token, as the table the API enforces has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub credential: Credential,
    /// The token's own expiry (never the overlap of a previous secret).
    pub expire: Option<Timestamp>,
    /// The client addresses the token is bound to, if any.
    pub addresses: Option<Conditions>,
}

impl Actor {
    /// An operator tool on the control plane's host.
    pub fn tool(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            address: None,
            peer: None,
            caller: None,
        }
    }

    pub fn credential(&self) -> Option<Credential> {
        self.caller.as_ref().map(|c| c.credential)
    }

    /// The client addresses the caller is bound to, if any.
    fn addresses(&self) -> Option<&Conditions> {
        self.caller.as_ref().and_then(|c| c.addresses.as_ref())
    }

    /// Creates, regenerates, disables, enables and deletes are made with a
    /// current secret.
    pub(crate) fn may_write(&self) -> Result<(), Error> {
        match self.credential() {
            Some(Credential::Previous) => Err(Error::Forbidden(
                "this is the token's previous secret, which during a rotation's overlap may only read: \
                 create, regenerate, disable, enable and delete tokens with its current secret"
                    .to_owned(),
            )),
            _ => Ok(()),
        }
    }

    /// A regeneration, a disable or an enable of `target`: refused when it
    /// outlives the caller.
    pub(crate) fn may_change(&self, target: &TokenRecord) -> Result<(), Error> {
        self.may_write()?;
        if let Some(mine) = self.addresses() {
            let theirs = target.conditions.as_ref().map(Packed::conditions).unwrap_or_default();
            if !theirs.addresses_within(mine) {
                return Err(Error::Forbidden(format!(
                    "{} is not bound within the calling token's client addresses: a token bound to client addresses may regenerate, disable or enable only tokens bound within them",
                    target.name
                )));
            }
        }
        let Some(Caller { expire: Some(mine), .. }) = self.caller else {
            return Ok(());
        };
        match target.expire_time {
            Some(theirs) if theirs <= mine => Ok(()),
            theirs => Err(Error::Forbidden(format!(
                "{} {} and the calling token expires at {}: a token may regenerate, disable or enable only tokens that expire no later than itself",
                target.name,
                theirs.map_or_else(|| "never expires".to_owned(), |t| format!("expires at {t}")),
                mine
            ))),
        }
    }
}

/// A new token's address conditions under a caller bound to addresses:
/// without ranges of its own, the caller's; with some, each inside the
/// caller's allowed ranges, and the caller's excepted ranges excepted too.
pub(crate) fn new_conditions(requested: Option<Conditions>, actor: &Actor) -> Result<Option<Conditions>, Error> {
    let Some(mine) = actor.addresses() else {
        return Ok(requested);
    };
    let mut new = requested.unwrap_or_default();
    if new.allow.is_empty() {
        new.allow = mine.allow.clone();
    }
    for e in &mine.except {
        if !new.except.contains(e) {
            new.except.push(*e);
        }
    }
    if new.except.len() > MAX_RANGES {
        return Err(Error::invalid(
            "clientAddresses.except",
            format!("with the calling token's excepted ranges, more than {MAX_RANGES}"),
        ));
    }
    if !new.addresses_within(mine) {
        return Err(Error::invalid(
            "clientAddresses.allow",
            "must lie within the calling token's allowed client addresses (it is bound to them)",
        ));
    }
    Ok(Some(new))
}

/// The longest a new token may live, for every namespace or for one
/// (`--max-token-lifetime [NAMESPACE=]DURATION`; default none).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Lifetimes {
    every: Option<Duration>,
    namespaces: BTreeMap<String, Duration>,
}

/// Why a `--max-token-lifetime` cannot be read.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum LifetimeError {
    #[error("expected [NAMESPACE=]DURATION with a unit, such as 90d, 12h, 30m or 3600s (at most 36500d)")]
    Duration,
    #[error("the namespace must be a DNS label")]
    Namespace,
}

impl Lifetimes {
    /// Adds one `[NAMESPACE=]DURATION` (`90d`, `12h`, `30m`, `3600s`); a
    /// namespace's own wins over the one for every namespace.
    pub fn add(&mut self, text: &str) -> Result<(), LifetimeError> {
        let (namespace, duration) = match text.split_once('=') {
            Some((ns, d)) => (Some(ns), d),
            None => (None, text),
        };
        let duration = clock::parse_duration(duration)
            .filter(|d| d.as_secs() <= 100 * 365 * 86_400)
            .ok_or(LifetimeError::Duration)?;
        match namespace {
            Some(ns) if apitokens_core::name::is_dns_label(ns.as_bytes()) => {
                self.namespaces.insert(ns.to_owned(), duration);
            }
            Some(_) => return Err(LifetimeError::Namespace),
            None => self.every = Some(duration),
        }
        Ok(())
    }

    pub fn of(&self, namespace: &str) -> Option<Duration> {
        self.namespaces.get(namespace).copied().or(self.every)
    }
}

pub(crate) fn plus(t: Timestamp, d: Duration) -> Timestamp {
    let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
    Timestamp::from_unix(
        t.unix_seconds().saturating_add(secs),
        t.subsec_nanos().saturating_add(d.subsec_nanos()),
    )
}

/// The expiry of a new token in `namespace`: `requested` when within the
/// bounds (the caller's own expiry, the namespace's maximum lifetime from
/// `now`), the tightest bound when none was requested; a request beyond a
/// bound is a 400 naming `expireTime` and the bound.
pub(crate) fn new_expiry(
    requested: Option<Timestamp>,
    actor: &Actor,
    lifetimes: &Lifetimes,
    namespace: &str,
    now: Timestamp,
) -> Result<Option<Timestamp>, Error> {
    let mut bound: Option<(Timestamp, String)> = None;
    let mut tighten = |at: Timestamp, why: String| {
        if bound.as_ref().is_none_or(|(b, _)| at < *b) {
            bound = Some((at, why));
        }
    };
    if let Some(max) = lifetimes.of(namespace) {
        let at = plus(now, max);
        tighten(
            at,
            format!(
                "namespace {namespace} allows new tokens to live at most {}s, until {at}",
                max.as_secs()
            ),
        );
    }
    if let Some(Caller { expire: Some(mine), .. }) = actor.caller {
        tighten(
            mine,
            format!("the calling token expires at {mine}, and a token it creates may not outlive it"),
        );
    }
    match (requested, bound) {
        (requested, None) => Ok(requested),
        (None, Some((at, _))) => Ok(Some(at)),
        (Some(t), Some((at, _))) if t <= at => Ok(Some(t)),
        (Some(_), Some((_, why))) => Err(Error::invalid(
            "expireTime",
            format!("must be no later than that: {why}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::contract::record;
    use apitokens_core::Role;

    const NOW: Timestamp = Timestamp::from_unix(1_800_000_000, 0);

    fn caller(credential: Credential, expire: Option<i64>) -> Actor {
        Actor {
            name: "namespaces/a/apitokens/ci".into(),
            address: None,
            peer: None,
            caller: Some(Caller {
                credential,
                expire: expire.map(|s| Timestamp::from_unix(s, 0)),
                addresses: None,
            }),
        }
    }

    fn token(expire: Option<i64>) -> TokenRecord {
        TokenRecord {
            expire_time: expire.map(|s| Timestamp::from_unix(s, 0)),
            ..record("namespaces/a/apitokens/admin", Role::Owner, 1)
        }
    }

    #[test]
    fn a_new_token_never_outlives_its_creator() {
        let short = caller(Credential::Current, Some(NOW.unix_seconds() + 60));
        let none = Lifetimes::default();
        // None asked: the caller's expiry.
        let got = new_expiry(None, &short, &none, "a", NOW).unwrap();
        assert_eq!(got, Some(Timestamp::from_unix(NOW.unix_seconds() + 60, 0)));
        // More asked: refused, naming the field.
        let later = Some(Timestamp::from_unix(NOW.unix_seconds() + 61, 0));
        match new_expiry(later, &short, &none, "a", NOW).unwrap_err() {
            Error::Invalid { field, problem } => {
                assert_eq!(field, "expireTime");
                assert!(problem.contains("calling token expires"), "{problem}");
            }
            other => panic!("{other:?}"),
        }
        // Less asked: as asked.
        let sooner = Some(Timestamp::from_unix(NOW.unix_seconds() + 30, 0));
        assert_eq!(new_expiry(sooner, &short, &none, "a", NOW).unwrap(), sooner);
        // A caller that never expires and tools: no bound.
        let forever = caller(Credential::Current, None);
        assert_eq!(new_expiry(None, &forever, &none, "a", NOW).unwrap(), None);
        assert_eq!(new_expiry(None, &Actor::tool("t"), &none, "a", NOW).unwrap(), None);
    }

    #[test]
    fn the_tightest_lifetime_wins() {
        let mut lifetimes = Lifetimes::default();
        lifetimes.add("90d").unwrap();
        lifetimes.add("team=1h").unwrap();
        assert_eq!(lifetimes.of("other"), Some(Duration::from_secs(90 * 86_400)));
        assert_eq!(lifetimes.of("team"), Some(Duration::from_secs(3600)));
        let forever = caller(Credential::Current, None);
        let got = new_expiry(None, &forever, &lifetimes, "team", NOW).unwrap();
        assert_eq!(got, Some(Timestamp::from_unix(NOW.unix_seconds() + 3600, 0)));
        let two_hours = Some(Timestamp::from_unix(NOW.unix_seconds() + 7200, 0));
        let err = new_expiry(two_hours, &forever, &lifetimes, "team", NOW).unwrap_err();
        assert!(err.to_string().contains("at most 3600s"), "{err}");
        // The caller's own expiry, when sooner, is the bound.
        let short = caller(Credential::Current, Some(NOW.unix_seconds() + 60));
        let got = new_expiry(None, &short, &lifetimes, "team", NOW).unwrap();
        assert_eq!(got, Some(Timestamp::from_unix(NOW.unix_seconds() + 60, 0)));
        for bad in ["", "90", "d", "0d", "-1d", "1w", "a_b=1d", "Team=1d", "1.5h"] {
            assert!(Lifetimes::default().add(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_short_lived_caller_cannot_change_a_longer_lived_token() {
        let short = caller(Credential::Current, Some(NOW.unix_seconds() + 60));
        let Err(Error::Forbidden(why)) = short.may_change(&token(None)) else {
            panic!("a short-lived caller changed a token that never expires");
        };
        assert!(
            why.contains("never expires") && why.contains("regenerate, disable or enable"),
            "{why}"
        );
        assert!(matches!(
            short.may_change(&token(Some(NOW.unix_seconds() + 61))),
            Err(Error::Forbidden(_))
        ));
        assert!(short.may_change(&token(Some(NOW.unix_seconds() + 60))).is_ok());
        assert!(caller(Credential::Current, None).may_change(&token(None)).is_ok());
    }

    #[test]
    fn a_previous_secret_never_writes() {
        let previous = caller(Credential::Previous, None);
        let Err(Error::Forbidden(why)) = previous.may_write() else {
            panic!("a previous secret wrote");
        };
        assert!(why.contains("previous secret"), "{why}");
        assert!(matches!(previous.may_change(&token(None)), Err(Error::Forbidden(_))));
        assert!(caller(Credential::Current, None).may_write().is_ok());
        assert!(Actor::tool("t").may_write().is_ok());
    }
}
