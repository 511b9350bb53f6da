//! Inactive tokens: a token unused for a duration (by its last use, or since
//! its creation if it was never used) is disabled or deleted, as GitLab
//! revokes inactive tokens. Off by default. A namespace's owners pick its
//! policy (`apitokens:inactivity`, stored and audited); the operator may set
//! one for every namespace without one (`serve --inactive-tokens
//! DURATION:ACTION`) and one per namespace that wins over the owners'
//! (`NAMESPACE=DURATION:ACTION`, `NAMESPACE=off`). Each token acted on is a
//! write like an owner's (audited, so announced in `apitokens:events` and to
//! the webhooks), made by the tool `apitokens inactivity policy`.

use super::caller::{self, Actor};
use super::{Error, Service, Wait};
use crate::clock;
use crate::store::TokenRecord;
use apitokens_core::name::{is_dns_label, TokenName};
use apitokens_core::{Role, Timestamp};
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

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Disable => "disable",
            Action::Delete => "delete",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "disable" => Some(Action::Disable),
            "delete" => Some(Action::Delete),
            _ => None,
        }
    }
}

impl Policy {
    /// A duration of at least a day, with a unit (`90d`, `2160h`), at most
    /// 100 years.
    pub fn parse_after(text: &str) -> Option<Duration> {
        clock::parse_duration(text).filter(|d| d.as_secs() >= 86_400 && d.as_secs() <= 36_500 * 86_400)
    }

    /// `DURATION:ACTION` (`90d:disable`), as stored and written back.
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        let (duration, action) = text.split_once(':').ok_or(PolicyError::Syntax)?;
        let action = Action::parse(action).ok_or(PolicyError::Syntax)?;
        let after = Self::parse_after(duration).ok_or(PolicyError::Duration)?;
        Ok(Policy { after, action })
    }

    /// The duration in its largest whole unit (`90d`, `36h`, `90000s`).
    pub fn after_text(&self) -> String {
        let secs = self.after.as_secs();
        if secs.is_multiple_of(86_400) {
            format!("{}d", secs / 86_400)
        } else if secs.is_multiple_of(3600) {
            format!("{}h", secs / 3600)
        } else {
            format!("{secs}s")
        }
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.after_text(), self.action.as_str())
    }
}

/// Who set the policy a namespace has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetBy {
    /// Its owners (`apitokens:inactivity`).
    Namespace,
    /// The operator (`serve --inactive-tokens`).
    Operator,
}

/// The policies: one for every namespace, one per namespace (which wins,
/// `off` included).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policies {
    every: Option<Policy>,
    every_given: bool,
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
    #[error("given twice for the same namespaces")]
    Twice,
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
            Some(Policy::parse(rest)?)
        };
        match namespace {
            Some(ns) => {
                if self.namespaces.insert(ns.to_owned(), policy).is_some() {
                    return Err(PolicyError::Twice);
                }
            }
            None if self.every_given => return Err(PolicyError::Twice),
            None => {
                self.every = policy;
                self.every_given = true;
            }
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

    /// The policy `namespace` has with `own` (its owners' policy, if any),
    /// and who set it: the operator's for this namespace, else its
    /// owners', else the operator's for every namespace.
    pub fn effective(&self, namespace: &str, own: Option<Policy>) -> Option<(Policy, SetBy)> {
        match (self.namespaces.get(namespace), own) {
            (Some(operator), _) => operator.map(|p| (p, SetBy::Operator)),
            (None, Some(own)) => Some((own, SetBy::Namespace)),
            (None, None) => self.every.map(|p| (p, SetBy::Operator)),
        }
    }

    /// These policies with the owners' (`stored`: namespace and policy)
    /// where the operator named no policy of its own for the namespace.
    /// A stored policy that does not read back is skipped (and logged).
    pub fn with_owners(&self, stored: &[(String, String)]) -> Policies {
        let mut all = self.clone();
        for (namespace, text) in stored {
            match Policy::parse(text) {
                Ok(policy) => {
                    all.namespaces.entry(namespace.clone()).or_insert(Some(policy));
                }
                Err(e) => tracing::warn!(namespace, "inactivity policy: the stored policy does not read: {e}"),
            }
        }
        all
    }
}

/// What a sweep did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    pub disabled: Vec<String>,
    pub deleted: Vec<String>,
    /// Idle, and kept: the last enabled owner of its namespace.
    pub kept_last_owner: Vec<String>,
}

/// At most this many tokens acted on per sweep: the first sweep on a
/// deployment with years of idle tokens is a write (a revision, a push, an
/// event) per token; the rest wait for the next sweeps.
pub const BATCH: usize = 1000;

/// When `token` was last active: its last use (a gateway's report, or a call
/// the API authenticated itself), or its last change (created, regenerated,
/// enabled), whichever is later.
fn active_at(token: &TokenRecord) -> Timestamp {
    token
        .last_use
        .map_or(token.update_time, |used| used.max(token.update_time))
        .max(token.create_time)
}

/// Whether `token` is idle under `policy` at `now`, and not left to its
/// expiry; a disabled one only for a delete.
fn due(token: &TokenRecord, policy: Policy, now: Timestamp) -> bool {
    let expired = token.expire_time.is_some_and(|e| e <= now);
    let pending = match policy.action {
        Action::Disable => !token.disabled,
        Action::Delete => true,
    };
    pending && !token.retired && !expired && caller::plus(active_at(token), policy.after) <= now
}

/// Applies `policies` at `now`: every token idle for its namespace's
/// duration is disabled or deleted, at most [`BATCH`]. The namespace's last
/// enabled owner token is kept (a namespace locked out would need an
/// operator). A token is read again just before it is acted on (another
/// replica's sweep, an owner's enable may have come first). A failure is
/// logged and the sweep goes on with the next token.
pub async fn sweep(service: &Service, policies: &Policies, now: Timestamp) -> Swept {
    let mut swept = Swept::default();
    if policies.is_empty() {
        return swept;
    }
    let actor = Actor::tool(ACTOR);
    let mut acted = 0usize;
    // Every namespace only when a policy covers every namespace (a read of
    // every token); else the ones named.
    let namespaces = if policies.every.is_some() {
        match service.namespaces().await {
            Ok(all) => all,
            Err(e) => {
                tracing::warn!("inactivity policy: could not read the namespaces: {e}");
                return swept;
            }
        }
    } else {
        policies.namespaces.keys().cloned().collect()
    };
    for namespace in namespaces {
        let Some(policy) = policies.of(&namespace) else {
            continue;
        };
        let tokens = match service.list(&namespace).await {
            Ok(tokens) => tokens,
            Err(e) => {
                tracing::warn!(
                    namespace,
                    "inactivity policy: could not list the namespace's tokens: {e}"
                );
                continue;
            }
        };
        let live_owner = |t: &TokenRecord| {
            t.role == Role::Owner && !t.disabled && !t.retired && t.expire_time.is_none_or(|e| e > now)
        };
        let mut owners_left = tokens.iter().filter(|t| live_owner(t) && !due(t, policy, now)).count();
        for token in tokens.iter().filter(|t| due(t, policy, now)) {
            if acted >= BATCH {
                return swept;
            }
            let Ok(name) = TokenName::parse(&token.name) else {
                continue;
            };
            // Read again: still idle, and still the token that was listed?
            let current = match service.get(&namespace, name.token).await {
                Ok(t) if t.create_time == token.create_time && due(&t, policy, now) => t,
                Ok(_) | Err(Error::NotFound(_)) => continue,
                Err(e) => {
                    tracing::warn!(token = %token.name, "inactivity policy: could not read the token: {e}");
                    continue;
                }
            };
            if live_owner(&current) && owners_left == 0 {
                tracing::warn!(token = %current.name, "inactivity policy: kept, the last enabled owner of its namespace");
                swept.kept_last_owner.push(current.name.clone());
                owners_left += 1;
                continue;
            }
            let result = match policy.action {
                Action::Disable => service
                    .disable(&namespace, name.token, &actor, Wait::Published)
                    .await
                    .map(drop),
                Action::Delete => service
                    .delete(&namespace, name.token, &actor, Wait::Published)
                    .await
                    .map(drop),
            };
            match result {
                Ok(()) => {
                    acted += 1;
                    match policy.action {
                        Action::Disable => swept.disabled.push(current.name.clone()),
                        Action::Delete => swept.deleted.push(current.name.clone()),
                    }
                }
                // Gone meanwhile (another replica's sweep, an owner).
                Err(Error::NotFound(_)) => {}
                Err(e) => tracing::warn!(token = %current.name, "inactivity policy: could not act: {e}"),
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
    swept
}

/// Sweeps now and every `every` until `shutdown` changes, with the
/// operator's `policies` and the owners' as stored at each sweep. A failed
/// sweep (the store down) is tried again at the next one.
pub async fn run(
    service: std::sync::Arc<Service>,
    policies: Policies,
    every: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        match service.stored_inactivity_policies().await {
            Ok(stored) => {
                sweep(&service, &policies.with_owners(&stored), service.clock().now()).await;
            }
            Err(e) => tracing::warn!("inactivity policy: could not read the namespaces' policies: {e}"),
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
        // Twice for the same namespaces: which would win is a guess.
        assert_eq!(p.add("ci=10d:disable"), Err(PolicyError::Twice));
        assert_eq!(p.add("60d:disable"), Err(PolicyError::Twice));
        let mut off = Policies::default();
        off.add("off").unwrap();
        assert!(off.is_empty());
    }
}
