//! Inactive tokens (`serve --inactive-tokens [NAMESPACE=]DURATION:ACTION`):
//! a token unused for that long (by its last use, or since its creation if
//! it was never used) is disabled or deleted, as GitLab revokes inactive
//! tokens. Off by default. Each one is a write like an owner's (audited, so
//! announced in `apitokens:events` and to the webhooks), made by the tool
//! `apitokens inactivity policy`.

use super::caller::{self, Actor};
use super::{Error, Service, Wait};
use crate::clock;
use apitokens_core::name::{is_dns_label, TokenName};
use apitokens_core::Timestamp;
use std::collections::BTreeMap;
use std::time::Duration;

/// Who the policy's writes are audited as.
pub const ACTOR: &str = "apitokens inactivity policy";

/// What becomes of an inactive token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Suspended: refused by every Envoy, kept, to be enabled again.
    Disable,
    /// Gone for good.
    Delete,
}

/// Unused for `after`: `action`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    pub after: Duration,
    pub action: Action,
}

/// The policies: one for every namespace, one per namespace (which wins,
/// `off` included).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policies {
    every: Option<Policy>,
    namespaces: BTreeMap<String, Option<Policy>>,
}

/// Why an `--inactive-tokens` cannot be read.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("expected [NAMESPACE=]DURATION:disable or [NAMESPACE=]DURATION:delete (90d:disable, ci=30d:delete), or NAMESPACE=off")]
    Syntax,
    #[error("the duration must be at least one day, with a unit (90d, 2160h), at most 36500d")]
    Duration,
    #[error("the namespace must be a DNS label")]
    Namespace,
}

impl Policies {
    /// Adds one `[NAMESPACE=]DURATION:ACTION`, or `NAMESPACE=off`.
    pub fn add(&mut self, text: &str) -> Result<(), PolicyError> {
        let (namespace, rest) = match text.split_once('=') {
            Some((ns, rest)) => (Some(ns), rest),
            None => (None, text),
        };
        if namespace.is_some_and(|ns| !is_dns_label(ns.as_bytes())) {
            return Err(PolicyError::Namespace);
        }
        let policy = if rest == "off" {
            None
        } else {
            let (duration, action) = rest.split_once(':').ok_or(PolicyError::Syntax)?;
            let action = match action {
                "disable" => Action::Disable,
                "delete" => Action::Delete,
                _ => return Err(PolicyError::Syntax),
            };
            let after = clock::parse_duration(duration)
                .filter(|d| d.as_secs() >= 86_400 && d.as_secs() <= 36_500 * 86_400)
                .ok_or(PolicyError::Duration)?;
            Some(Policy { after, action })
        };
        match namespace {
            Some(ns) => {
                self.namespaces.insert(ns.to_owned(), policy);
            }
            None => self.every = policy,
        }
        Ok(())
    }

    /// The policy of `namespace`, if any.
    pub fn of(&self, namespace: &str) -> Option<Policy> {
        match self.namespaces.get(namespace) {
            Some(own) => *own,
            None => self.every,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.every.is_none() && self.namespaces.values().all(Option::is_none)
    }
}

/// What a sweep did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    pub disabled: Vec<String>,
    pub deleted: Vec<String>,
}

/// Applies `policies` at `now`: every token idle for its namespace's
/// duration (since its last use, else its creation) is disabled or deleted.
/// An expired token is left to its expiry; a disabled one is not disabled
/// again (a delete policy deletes it).
pub async fn sweep(service: &Service, policies: &Policies, now: Timestamp) -> Result<Swept, Error> {
    let mut swept = Swept::default();
    if policies.is_empty() {
        return Ok(swept);
    }
    let actor = Actor::tool(ACTOR);
    for namespace in service.namespaces().await? {
        let Some(policy) = policies.of(&namespace) else {
            continue;
        };
        for token in service.list(&namespace).await? {
            let idle_since = token.last_use.unwrap_or(token.create_time);
            let expired = token.expire_time.is_some_and(|e| e <= now);
            if expired || caller::plus(idle_since, policy.after) > now {
                continue;
            }
            let Ok(name) = TokenName::parse(&token.name) else {
                continue;
            };
            match policy.action {
                Action::Disable if !token.disabled => {
                    service.disable(&namespace, name.token, &actor, Wait::Published).await?;
                    swept.disabled.push(token.name.clone());
                }
                Action::Disable => {}
                Action::Delete => {
                    match service.delete(&namespace, name.token, &actor, Wait::Published).await {
                        // Another replica's sweep came first.
                        Ok(_) | Err(Error::NotFound(_)) => swept.deleted.push(token.name.clone()),
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    }
    if !swept.disabled.is_empty() || !swept.deleted.is_empty() {
        tracing::info!(
            disabled = swept.disabled.len(),
            deleted = swept.deleted.len(),
            "inactivity policy: {} disabled, {} deleted",
            swept.disabled.len(),
            swept.deleted.len()
        );
    }
    Ok(swept)
}

/// Sweeps now and every `every` until `shutdown` changes. A failed sweep
/// (the store down) is tried again at the next one.
pub async fn run(
    service: std::sync::Arc<Service>,
    policies: Policies,
    every: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        if let Err(e) = sweep(&service, &policies, service.clock().now()).await {
            tracing::warn!("inactivity policy: could not finish the sweep (next try later): {e}");
        }
        if crate::clock::stopped_within(every, &mut shutdown).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_are_read_per_namespace_with_every_namespace_behind() {
        let mut p = Policies::default();
        assert!(p.is_empty());
        p.add("90d:disable").unwrap();
        p.add("ci=30d:delete").unwrap();
        p.add("legacy=off").unwrap();
        let day = Duration::from_secs(86_400);
        assert_eq!(
            p.of("default"),
            Some(Policy {
                after: 90 * day,
                action: Action::Disable
            })
        );
        assert_eq!(
            p.of("ci"),
            Some(Policy {
                after: 30 * day,
                action: Action::Delete
            })
        );
        assert_eq!(p.of("legacy"), None);
        for (bad, error) in [
            ("90d", PolicyError::Syntax),
            ("90d:revoke", PolicyError::Syntax),
            ("12h:disable", PolicyError::Duration),
            ("90:disable", PolicyError::Duration),
            ("Bad_NS=90d:disable", PolicyError::Namespace),
        ] {
            assert_eq!(Policies::default().add(bad), Err(error), "{bad}");
        }
        // `off` for every namespace turns the default off again.
        p.add("off").unwrap();
        assert_eq!(p.of("default"), None);
    }
}
