//! The token service: every operation on API tokens, with its rules.
//!
//! A write commits to the store, then (when this process publishes the
//! configuration, i.e. in `serve`) waits until the change is in a published
//! configuration and, unless the caller opted out, until every Envoy
//! connected to this control plane has applied that version (ACK) or
//! rejected it (NACK), within `apply_timeout`. That is what "the old secret
//! is invalid immediately" means: when the answer arrives, the gateways
//! already enforce it, or the answer says which ones do not.

use super::caller::{self, Actor, Lifetimes};
use super::evidence::{self, AccessSummary};
use super::inactivity::{Policy, SetBy};
use super::rate::{Buckets, Rate};
use super::secret::Secret;
use super::{audit, Error};
use crate::acks::{Rollout, Tracker};
use crate::clock::Clock;
use crate::config::{Publisher, Version};
use crate::metrics::ServiceMetrics;
use crate::store::{Action, AuditEvent, Evidence, NewDigest, Revision, Store, TokenRecord, Use, LAST_ADDRESSES};
use apitokens_core::conditions::{Conditions, Packed};
use apitokens_core::config::Config;
use apitokens_core::name::{is_dns_label, TokenName};
use apitokens_core::spec::{ClientAddressesSpec, PluginConfig, RateLimitSpec};
use apitokens_core::table::Digest;
use apitokens_core::{Access, Role, Timestamp};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

const DNS_LABEL: &str = "must be a DNS label (lower-case letters, digits and '-', at most 63 characters)";

/// The longest overlap a regeneration may give the previous secret.
pub const MAX_OVERLAP: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Clone, Debug)]
pub struct ServiceOptions {
    /// The most tokens a namespace may hold; creates beyond it are refused
    /// (`bootstrap` and `import`, operator tools, are exempt).
    pub quota: Option<u32>,
    /// The longest a write waits for its change to be published and applied.
    pub apply_timeout: Duration,
    /// The longest new tokens may live, per namespace.
    pub lifetimes: Lifetimes,
    /// How many writes a namespace may make (API callers only).
    pub write_rate: Rate,
    /// How many leak reports a client address may make (`leaks`).
    pub report_rate: Rate,
    /// What expiry, last use and retention are measured against.
    pub clock: Clock,
    /// The window of the evidence for least privilege, in days
    /// (`evidence`).
    pub evidence_days: u32,
    /// The operator's inactivity policies (`serve --inactive-tokens`);
    /// `None` where tokens' uses are not reported (no policy may be set:
    /// every token would look unused).
    pub inactivity: Option<super::inactivity::Policies>,
}

impl Default for ServiceOptions {
    fn default() -> Self {
        Self {
            quota: Some(1000),
            apply_timeout: Duration::from_secs(5),
            lifetimes: Lifetimes::default(),
            write_rate: Rate::default(),
            report_rate: super::rate::DEFAULT_REPORT_RATE,
            clock: Clock::system(),
            evidence_days: super::evidence::DEFAULT_DAYS,
            inactivity: None,
        }
    }
}

/// How long a write waits before it answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Until every connected Envoy applied (or rejected) the change.
    Envoys,
    /// Until the change is published; the Envoys get it moments later (bulk jobs).
    Published,
}

/// Where a committed change stands when the write answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// No configuration is published from this process (the command line):
    /// a running `serve` picks the change up within its poll interval.
    Stored,
    /// In published configuration `version`; the Envoys were not waited for.
    Published { version: Version },
    /// In published configuration `rollout.version`, and how far it got.
    Applied(Rollout),
    /// Committed, but not in a published configuration yet (the store could
    /// not be read back in time, say): the control plane publishes it as soon
    /// as it catches up, at the latest at its next poll. The answer still
    /// carries a new secret: the change cannot be taken back, and a secret
    /// shown only once must never be lost.
    NotPublished { reason: String },
}

impl Delivery {
    pub fn version(&self) -> Option<Version> {
        match self {
            Delivery::Stored | Delivery::NotPublished { .. } => None,
            Delivery::Published { version } => Some(*version),
            Delivery::Applied(rollout) => Some(rollout.version),
        }
    }
}

/// A token with its secret: the answer to a create or a regenerate, the only
/// time the secret exists outside the caller.
#[derive(Debug)]
pub struct Issued {
    pub token: TokenRecord,
    pub secret: Secret,
    pub delivery: Delivery,
}

/// A token after a disable or an enable, and where its state stands.
#[derive(Debug)]
pub struct Updated {
    pub token: TokenRecord,
    pub delivery: Delivery,
}

/// A change of a token's conditions (a JSON merge patch of them): `None`,
/// left out (it stays); `Some(None)`, `null` (removed); `Some(Some(v))`,
/// replaced.
#[derive(Clone, Debug, Default)]
pub struct ConditionsPatch {
    pub not_before_time: Option<Option<String>>,
    pub client_addresses: Option<Option<ClientAddressesSpec>>,
    pub rate_limit: Option<Option<RateLimitSpec>>,
}

/// A create request, as the caller wrote it.
#[derive(Clone, Debug)]
pub struct NewToken {
    /// `namespaces/{namespace}/apitokens/{token}`.
    pub name: String,
    pub role: String,
    /// RFC 3339, in the future.
    pub expire_time: Option<String>,
    /// RFC 3339: refused before it.
    pub not_before_time: Option<String>,
    /// The client addresses it may be used from.
    pub client_addresses: Option<ClientAddressesSpec>,
    /// At most this request rate at each gateway.
    pub rate_limit: Option<RateLimitSpec>,
}

/// A token about to be issued, validated: what its record takes from the
/// request.
struct Issuing {
    name: String,
    role: Role,
    expire_time: Option<Timestamp>,
    conditions: Option<Packed>,
}

struct Push {
    publisher: Arc<Publisher>,
    acks: Arc<Tracker>,
}

pub struct Service {
    store: Arc<dyn Store>,
    push: Option<Push>,
    opts: ServiceOptions,
    /// Last uses reported by the filters, not yet written to the store.
    /// The latest use of each token name, the digest it was made with, and
    /// everything its requests did since the last write.
    uses: std::sync::Mutex<std::collections::HashMap<String, (Digest, Timestamp, Access)>>,
    /// The minute last written for each token used lately, and what was
    /// written for it (what its requests did, where they came from): a use
    /// in the same minute that did nothing new, from nowhere new, is not
    /// written again (a busy token costs the store one write a minute,
    /// however many filters report it).
    written: std::sync::Mutex<std::collections::HashMap<String, Written>>,
    /// Client addresses the filters saw tokens used from, not yet written:
    /// each token name's digest and its latest distinct addresses.
    seen: std::sync::Mutex<std::collections::HashMap<String, (Digest, Vec<IpAddr>)>>,
    /// Each namespace's writes, for [`ServiceOptions::write_rate`].
    buckets: Buckets,
    /// Each client's leak reports, for [`ServiceOptions::report_rate`].
    report_buckets: Buckets,
    /// Usage reports taken and refused since this process started.
    /// What its writes and the usage reports did (`/metrics`, `/status`).
    pub metrics: ServiceMetrics,
    /// Counts the writes that recorded audit events, for whoever waits for
    /// new events (the webhooks).
    events_written: tokio::sync::watch::Sender<u64>,
}

/// A last use is kept to the minute.
/// Adds a use to those waiting for the store: the latest time, and
/// everything either did. The digest goes with the latest use, but in the
/// same minute a use of the current secret (`current`) wins: the store
/// records a use only while the token still has its secret, and a previous
/// secret's overlap may end before the write.
fn remember(
    uses: &mut std::collections::HashMap<String, (Digest, Timestamp, Access)>,
    name: &str,
    (digest, time, access): (Digest, Timestamp, Access),
    current: bool,
) {
    match uses.get_mut(name) {
        Some(kept) => {
            let did = kept.2.union(access);
            if kept.1 < time || (kept.1 == time && current) {
                *kept = (digest, time, did);
            } else {
                kept.2 = did;
            }
        }
        None => {
            uses.insert(name.to_owned(), (digest, time, access));
        }
    }
}

/// What was written for a token in a minute: the digest, the minute, what
/// its requests did, and the addresses.
type Written = (Digest, i64, Access, Vec<IpAddr>);

fn minute_of(t: Timestamp) -> i64 {
    t.unix_seconds().div_euclid(60)
}

fn check_namespace(namespace: &str) -> Result<(), Error> {
    if is_dns_label(namespace.as_bytes()) {
        Ok(())
    } else {
        Err(Error::invalid("namespace", DNS_LABEL))
    }
}

/// The fully qualified name of token `id` in `namespace`.
fn token_name(namespace: &str, id: &str) -> Result<String, Error> {
    check_namespace(namespace)?;
    if !is_dns_label(id.as_bytes()) {
        return Err(Error::invalid("token", DNS_LABEL));
    }
    Ok(TokenName { namespace, token: id }.to_string())
}

/// Checks the namespace and token id of a request path (before anything
/// else: a malformed path is a 400 naming the part).
pub fn check_path(namespace: &str, id: Option<&str>) -> Result<(), Error> {
    match id {
        Some(id) => token_name(namespace, id).map(drop),
        None => check_namespace(namespace),
    }
}

/// An optional expiry, which must be in the future: compared with `now` to
/// the nanosecond (a time a fraction of a second past is refused too).
fn expiry(text: Option<&str>, field: &str, now: Timestamp) -> Result<Option<Timestamp>, Error> {
    let Some(text) = text else {
        return Ok(None);
    };
    let t = Timestamp::parse_rfc3339(text).map_err(|e| Error::invalid(field, e.to_string()))?;
    if t <= now {
        return Err(Error::invalid(field, "must be in the future"));
    }
    Ok(Some(t))
}

/// An audit event of `actor` acting on `token` (or on the namespace).
pub(super) fn event(action: Action, namespace: &str, token: Option<&str>, actor: &Actor, now: Timestamp) -> AuditEvent {
    AuditEvent {
        conditions: None,
        policy: None,
        time: now,
        namespace: namespace.to_owned(),
        action,
        token: token.map(str::to_owned),
        actor: actor.name.clone(),
        role: None,
        expire_time: None,
        previous_until: None,
        client_address: actor.address.clone(),
        peer_address: actor.peer.clone(),
        credential: actor.credential(),
        count: None,
    }
}

impl Service {
    /// The clock the service's rules read.
    pub fn clock(&self) -> &Clock {
        &self.opts.clock
    }

    /// A service that only stores (the command line).
    pub fn new(store: Arc<dyn Store>, opts: ServiceOptions) -> Self {
        Self {
            store,
            push: None,
            opts,
            uses: std::sync::Mutex::default(),
            written: std::sync::Mutex::default(),
            seen: std::sync::Mutex::default(),
            buckets: Buckets::default(),
            report_buckets: Buckets::default(),
            metrics: ServiceMetrics::default(),
            events_written: tokio::sync::watch::Sender::new(0),
        }
    }

    /// A service whose writes are published by `publisher` and answer once
    /// the Envoys in `acks` applied them.
    pub fn with_push(
        store: Arc<dyn Store>,
        publisher: Arc<Publisher>,
        acks: Arc<Tracker>,
        opts: ServiceOptions,
    ) -> Self {
        Self {
            store,
            push: Some(Push { publisher, acks }),
            opts,
            uses: std::sync::Mutex::default(),
            written: std::sync::Mutex::default(),
            seen: std::sync::Mutex::default(),
            buckets: Buckets::default(),
            report_buckets: Buckets::default(),
            metrics: ServiceMetrics::default(),
            events_written: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Changes after every write this process makes (each records audit
    /// events).
    pub fn events_written(&self) -> tokio::sync::watch::Receiver<u64> {
        self.events_written.subscribe()
    }

    /// Says that audit events were written (by a write, or by another task
    /// of this process: the expiry warnings).
    pub fn tell_events_written(&self) {
        self.events_written.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub(super) fn options(&self) -> &ServiceOptions {
        &self.opts
    }

    pub(super) fn report_buckets(&self) -> &Buckets {
        &self.report_buckets
    }

    /// The configuration this process publishes (none from the command
    /// line).
    pub(super) fn published(&self) -> Option<Arc<crate::config::Snapshot>> {
        self.push.as_ref().map(|p| p.publisher.current())
    }

    /// A write by `actor` in `namespace`: allowed with a current secret and
    /// within the namespace's write rate (operator tools are not counted).
    fn admit(&self, namespace: &str, actor: &Actor) -> Result<(), Error> {
        actor.may_write()?;
        if actor.caller.is_none() {
            return Ok(());
        }
        self.buckets
            .take(self.opts.write_rate, namespace, Instant::now())
            .map_err(|retry_after| Error::TooManyWrites {
                namespace: namespace.to_owned(),
                retry_after,
            })
    }

    pub async fn create(&self, namespace: &str, new: NewToken, actor: &Actor, wait: Wait) -> Result<Issued, Error> {
        check_namespace(namespace)?;
        let name = TokenName::parse(&new.name).map_err(|e| Error::invalid("name", e.to_string()))?;
        if name.namespace != namespace {
            return Err(Error::invalid(
                "name",
                "names another namespace than the path: it must be namespaces/{the path's namespace}/apitokens/{token}",
            ));
        }
        let role = Role::parse(&new.role)
            .ok_or_else(|| Error::invalid("role", "unknown role; expected viewer, editor or owner"))?;
        let now = self.opts.clock.now_seconds();
        let requested = expiry(new.expire_time.as_deref(), "expireTime", self.opts.clock.now())?;
        let expire_time = caller::new_expiry(requested, actor, &self.opts.lifetimes, namespace, now)?;
        // The filter's own rules, against the expiry the token gets; then
        // within the caller's client addresses, if it is bound to some.
        let requested = Conditions::from_spec(
            new.not_before_time.as_deref(),
            expire_time,
            new.client_addresses.as_ref(),
            new.rate_limit.as_ref(),
            str::to_owned,
        )
        .map_err(|e| Error::invalid(e.field, e.problem))?;
        let conditions = caller::new_conditions(requested, actor)?.map(|c| Packed::new(&c));
        self.admit(namespace, actor)?;
        let (issued, revision) = self
            .issue(
                Issuing {
                    name: new.name,
                    role,
                    expire_time,
                    conditions,
                },
                now,
                self.opts.quota,
                actor,
            )
            .await?;
        tracing::info!(
            token = %issued.token.name,
            namespace,
            role = role.as_str(),
            revision = revision.0,
            "created {} (role {role}) at revision {revision}",
            issued.token.name
        );
        self.finish(issued, revision, wait).await
    }

    /// The first owner of a namespace, created directly in the store (no
    /// quota: an operator's tool).
    pub async fn bootstrap(&self, namespace: &str, id: &str, expire_time: Option<&str>) -> Result<Issued, Error> {
        let name = token_name(namespace, id)?;
        let now = self.opts.clock.now_seconds();
        let expire_time = expiry(expire_time, "expireTime", self.opts.clock.now())?;
        let actor = Actor::tool("apitokens bootstrap");
        let (issued, revision) = self
            .issue(
                Issuing {
                    name,
                    role: Role::Owner,
                    expire_time,
                    conditions: None,
                },
                now,
                None,
                &actor,
            )
            .await?;
        tracing::info!(
            token = %issued.token.name,
            namespace,
            revision = revision.0,
            "bootstrapped owner token {} at revision {revision}",
            issued.token.name
        );
        self.finish(issued, revision, Wait::Published).await
    }

    async fn issue(
        &self,
        new: Issuing,
        now: Timestamp,
        quota: Option<u32>,
        actor: &Actor,
    ) -> Result<(Issued, Revision), Error> {
        let secret = Secret::generate().map_err(Error::Random)?;
        let token = TokenRecord {
            last_addresses: Vec::new(),
            conditions: new.conditions,
            update_time: now,
            name: new.name,
            role: new.role,
            digest: secret.digest(),
            create_time: now,
            expire_time: new.expire_time,
            retired: false,
            created_by: Some(actor.name.clone()),
            previous: None,
            last_use: None,
            evidence: Evidence::default(),
            disabled: false,
        };
        let event = AuditEvent {
            role: Some(token.role),
            expire_time: token.expire_time,
            conditions: token
                .conditions
                .as_ref()
                .map(|c| audit::conditions_text(Some(&c.conditions()))),
            ..event(Action::Create, token.namespace(), Some(&token.name), actor, now)
        };
        // 2^-256: a taken digest means a broken random source, not bad luck.
        let revision = self
            .store
            .insert(vec![token.clone()], quota, vec![event.clone()])
            .await?;
        audit::log(&event);
        let issued = Issued {
            token,
            secret,
            delivery: Delivery::Stored,
        };
        Ok((issued, revision))
    }

    async fn finish(&self, mut issued: Issued, revision: Revision, wait: Wait) -> Result<Issued, Error> {
        issued.delivery = self.deliver(revision, wait).await?;
        Ok(issued)
    }

    pub async fn get(&self, namespace: &str, id: &str) -> Result<TokenRecord, Error> {
        let name = token_name(namespace, id)?;
        self.store.get(&name).await?.ok_or(Error::NotFound(name))
    }

    /// The calling token's own record (`apitokens:self`): `name` is what
    /// authenticated the call, so a token the store no longer has was
    /// deleted since (the table the call was checked against is older).
    pub async fn own(&self, name: &str) -> Result<TokenRecord, Error> {
        self.store
            .get(name)
            .await?
            .ok_or_else(|| Error::NotFound(name.to_owned()))
    }

    /// The namespace's tokens, ordered by name.
    pub async fn list(&self, namespace: &str) -> Result<Vec<TokenRecord>, Error> {
        check_namespace(namespace)?;
        Ok(self.store.list(namespace).await?)
    }

    /// Every namespace with a token (retired ones left out): a read of
    /// every token, for a sweep over every namespace.
    pub async fn namespaces(&self) -> Result<std::collections::BTreeSet<String>, Error> {
        let (_, records) = self.store.load().await?;
        Ok(records.iter().map(|r| r.namespace().to_owned()).collect())
    }

    /// A new secret for the same name, role and expiry. The old one stops
    /// working at once, or, with `overlap` (at most [`MAX_OVERLAP`]), when
    /// that has passed; a second regeneration during an overlap ends it.
    pub async fn regenerate(
        &self,
        namespace: &str,
        id: &str,
        overlap: Option<Duration>,
        actor: &Actor,
        wait: Wait,
    ) -> Result<Issued, Error> {
        let name = token_name(namespace, id)?;
        if overlap.is_some_and(|o| o > MAX_OVERLAP) {
            return Err(Error::invalid(
                "previousSecretTtl",
                format!("must be at most {}s (7 days)", MAX_OVERLAP.as_secs()),
            ));
        }
        self.admit(namespace, actor)?;
        if actor
            .caller
            .as_ref()
            .is_some_and(|c| c.expire.is_some() || c.addresses.is_some())
        {
            // (A token's expiry never changes; its conditions may, by
            // another owner's update between this read and the write: this
            // caller may then disable or enable a token that was just
            // taken out of its ranges, never create or widen one.)
            let target = self.store.get(&name).await?.ok_or(Error::NotFound(name.clone()))?;
            actor.may_change(&target)?;
        }
        let now = self.opts.clock.now();
        let until = overlap.filter(|o| !o.is_zero()).map(|o| caller::plus(now, o));
        let secret = Secret::generate().map_err(Error::Random)?;
        let event = AuditEvent {
            previous_until: until,
            ..event(Action::Regenerate, namespace, Some(&name), actor, now)
        };
        let (token, revision) = self
            .store
            .replace_digest(
                NewDigest {
                    name: name.clone(),
                    digest: secret.digest(),
                    previous_until: until,
                },
                event.clone(),
            )
            .await?
            .ok_or(Error::NotFound(name))?;
        audit::log(&AuditEvent {
            role: Some(token.role),
            expire_time: token.expire_time,
            ..event
        });
        tracing::info!(
            token = %token.name,
            namespace,
            revision = revision.0,
            "regenerated the secret of {} at revision {revision}",
            token.name
        );
        let issued = Issued {
            token,
            secret,
            delivery: Delivery::Stored,
        };
        self.finish(issued, revision, wait).await
    }

    /// Suspends a token: every Envoy refuses it (`disabled`), and it keeps
    /// its name, role, secrets, expiry, history and last use, to be enabled
    /// again with [`Service::enable`].
    pub async fn disable(&self, namespace: &str, id: &str, actor: &Actor, wait: Wait) -> Result<Updated, Error> {
        self.set_disabled(namespace, id, true, actor, wait).await
    }

    /// Changes a token's conditions, each given one whole: a condition left
    /// out stays, `null` removes it, a value replaces it (`clientAddresses`
    /// and `rateLimit` as a unit; validated as a create's, against the
    /// token's expiry; a caller bound to client addresses keeps the token
    /// within its own). The change is made only if the token and its
    /// conditions are still those this call read and checked (else a
    /// conflict); the same conditions again write nothing. Not activity
    /// (the inactivity policy's clock runs on). Audited as
    /// `apitoken.update` with the conditions.
    pub async fn update_conditions(
        &self,
        namespace: &str,
        id: &str,
        patch: ConditionsPatch,
        actor: &Actor,
        wait: Wait,
    ) -> Result<Updated, Error> {
        let name = token_name(namespace, id)?;
        self.admit(namespace, actor)?;
        let current = self.store.get(&name).await?.ok_or(Error::NotFound(name.clone()))?;
        actor.may_change(&current)?;
        let was = current.conditions.as_ref().map(Packed::conditions).unwrap_or_default();
        let not_before = patch
            .not_before_time
            .unwrap_or_else(|| was.not_before.map(|t| t.to_rfc3339()));
        let addresses = patch.client_addresses.unwrap_or_else(|| was.addresses_spec());
        let rate_limit = patch.rate_limit.unwrap_or_else(|| was.rate_limit.map(|l| l.spec()));
        let requested = Conditions::from_spec(
            not_before.as_deref(),
            current.expire_time,
            addresses.as_ref(),
            rate_limit.as_ref(),
            str::to_owned,
        )
        .map_err(|e| Error::invalid(e.field, e.problem))?;
        let requested = caller::new_conditions(requested, actor)?;
        let text = audit::conditions_text(requested.as_ref());
        let conditions = requested.map(|c| Packed::new(&c));
        let event = AuditEvent {
            role: Some(current.role),
            expire_time: current.expire_time,
            conditions: Some(text),
            ..event(Action::Update, namespace, Some(&name), actor, self.opts.clock.now())
        };
        let set = self
            .store
            .set_conditions(
                &name,
                current.create_time,
                current.conditions.clone(),
                conditions.clone(),
                event.clone(),
            )
            .await?
            .ok_or(Error::NotFound(name.clone()))?;
        if !set.changed && (set.token.conditions != conditions || set.token.create_time != current.create_time) {
            return Err(Error::Conflict(format!(
                "the conditions of {name} changed meanwhile: read the token again and retry"
            )));
        }
        let revision = set.revision;
        if set.changed {
            audit::log(&event);
            tracing::info!(token = %name, namespace, revision = revision.0, "conditions of {name} changed at revision {revision}");
        }
        let delivery = self.deliver(revision, wait).await?;
        Ok(Updated {
            token: set.token,
            delivery,
        })
    }

    /// Restores a disabled token, with the secrets it had.
    pub async fn enable(&self, namespace: &str, id: &str, actor: &Actor, wait: Wait) -> Result<Updated, Error> {
        self.set_disabled(namespace, id, false, actor, wait).await
    }

    /// A disable or an enable: a write like any other (a current secret, the
    /// namespace's write rate, no token that outlives the caller). A token
    /// already in that state is answered as it is, with no audit event and
    /// no revision; the answer still waits for the Envoys as a write's does,
    /// so it never promises a state the gateways do not enforce yet (another
    /// owner's disable of the same token may be in flight).
    async fn set_disabled(
        &self,
        namespace: &str,
        id: &str,
        disabled: bool,
        actor: &Actor,
        wait: Wait,
    ) -> Result<Updated, Error> {
        let name = token_name(namespace, id)?;
        self.admit(namespace, actor)?;
        if actor
            .caller
            .as_ref()
            .is_some_and(|c| c.expire.is_some() || c.addresses.is_some())
        {
            // (A token's expiry never changes; its conditions may, by
            // another owner's update between this read and the write: this
            // caller may then disable or enable a token that was just
            // taken out of its ranges, never create or widen one.)
            let target = self.store.get(&name).await?.ok_or(Error::NotFound(name.clone()))?;
            actor.may_change(&target)?;
        }
        let (action, done) = if disabled {
            (Action::Disable, "disabled")
        } else {
            (Action::Enable, "enabled")
        };
        let event = event(action, namespace, Some(&name), actor, self.opts.clock.now());
        let set = self
            .store
            .set_disabled(&name, disabled, event.clone())
            .await?
            .ok_or(Error::NotFound(name.clone()))?;
        let revision = set.revision;
        if set.changed {
            audit::log(&AuditEvent {
                role: Some(set.token.role),
                expire_time: set.token.expire_time,
                ..event
            });
            tracing::info!(token = %name, namespace, revision = revision.0, "{done} {name} at revision {revision}");
        } else {
            tracing::info!(token = %name, namespace, revision = revision.0, "{name} was {done} already: nothing written");
        }
        let delivery = self.deliver(revision, wait).await?;
        Ok(Updated {
            token: set.token,
            delivery,
        })
    }

    pub async fn delete(&self, namespace: &str, id: &str, actor: &Actor, wait: Wait) -> Result<Delivery, Error> {
        let name = token_name(namespace, id)?;
        self.admit(namespace, actor)?;
        let event = event(Action::Delete, namespace, Some(&name), actor, self.opts.clock.now());
        let revision = self
            .store
            .delete(&name, event.clone())
            .await?
            .ok_or(Error::NotFound(name.clone()))?;
        audit::log(&event);
        tracing::info!(token = %name, namespace, revision = revision.0, "deleted {name} at revision {revision}");
        self.deliver(revision, wait).await
    }

    /// Imports the tokens of a plugin configuration (name, role, digest,
    /// expiry), all or none, validated by the filter's own code; returns how
    /// many. Existing secrets migrate as digests and keep working.
    pub async fn import(&self, spec: &PluginConfig) -> Result<usize, Error> {
        Config::from_spec(spec).map_err(|e| Error::invalid(e.field, e.problem))?;
        let now = self.opts.clock.now_seconds();
        let mut records = Vec::with_capacity(spec.tokens.len());
        for (i, t) in spec.tokens.iter().enumerate() {
            let field = |f: &str| format!("tokens[{i}].{f}");
            let expire_time = t
                .expire_time
                .as_deref()
                .map(Timestamp::parse_rfc3339)
                .transpose()
                .map_err(|e| Error::invalid(field("expireTime"), e.to_string()))?;
            // Its conditions come with it: imported without them, it would
            // admit what its configuration refused.
            let conditions = Conditions::from_spec(
                t.not_before_time.as_deref(),
                expire_time,
                t.client_addresses.as_ref(),
                t.rate_limit.as_ref(),
                field,
            )
            .map_err(|e| Error::invalid(e.field, e.problem))?
            .map(|c| Packed::new(&c));
            records.push(TokenRecord {
                last_addresses: Vec::new(),
                conditions,
                update_time: now,
                name: t.name.clone(),
                role: Role::parse(&t.role).ok_or_else(|| Error::invalid(field("role"), "unknown role"))?,
                digest: Digest::from_hex(&t.secret_sha256)
                    .ok_or_else(|| Error::invalid(field("secretSha256"), "not a SHA-256 digest"))?,
                create_time: now,
                expire_time,
                retired: false,
                created_by: Some("apitokens import".to_owned()),
                previous: None,
                last_use: None,
                evidence: Evidence::default(),
                // A token rendered disabled (`apitokens render`) stays disabled.
                disabled: t.disabled,
            });
        }
        // A digest that is already a current or a previous secret of a
        // token would put one digest twice in the table every Envoy gets:
        // refused, naming the entry (the store refuses it too, without
        // saying which).
        let (_, existing) = self.store.load().await?;
        let mut taken: std::collections::HashMap<Digest, &str> = std::collections::HashMap::new();
        for r in &existing {
            taken.insert(r.digest, &r.name);
            if let Some(p) = &r.previous {
                taken.insert(p.digest, &r.name);
            }
        }
        for (i, r) in records.iter().enumerate() {
            if let Some(owner) = taken.get(&r.digest) {
                return Err(Error::invalid(
                    format!("tokens[{i}].secretSha256"),
                    format!(
                        "({}) is the digest of a secret of {owner} (its current or previous one); a digest belongs to one token",
                        r.name
                    ),
                ));
            }
        }
        let count = records.len();
        // One event per namespace, with the number of tokens.
        let mut per_namespace: std::collections::BTreeMap<&str, u32> = std::collections::BTreeMap::new();
        for r in &records {
            *per_namespace.entry(r.namespace()).or_default() += 1;
        }
        let events: Vec<AuditEvent> = per_namespace
            .into_iter()
            .map(|(namespace, n)| AuditEvent {
                count: Some(n),
                ..event(Action::Import, namespace, None, &Actor::tool("apitokens import"), now)
            })
            .collect();
        let revision = self.store.insert(records, None, events.clone()).await?;
        events.iter().for_each(audit::log);
        tracing::info!(
            count,
            revision = revision.0,
            "imported {count} tokens at revision {revision}"
        );
        self.deliver(revision, Wait::Published).await?;
        Ok(count)
    }

    /// What `token` did in the evidence window, and the narrowest role
    /// that would have admitted it (`evidence`).
    pub fn access_summary(&self, token: &TokenRecord) -> Option<AccessSummary> {
        evidence::summarize(&token.evidence, self.opts.clock.now(), self.opts.evidence_days)
    }

    /// A filter's usage report: the digests (32 bytes each) of secrets that
    /// authenticated requests since its last report, and for each what its
    /// requests did (`access`, one byte per digest; empty from filters
    /// older than it: used, nothing known). Remembered as used now; written
    /// to the store by [`Service::run_usage`]. A report about another
    /// store's tokens (`lineage`) is ignored.
    pub fn record_use(&self, lineage: &[u8], digests: &[u8], access: &[u8]) {
        let Some(push) = &self.push else {
            return;
        };
        self.metrics.usage_accepted.inc();
        self.metrics
            .usage_digests
            .inc_by(u64::try_from(digests.len() / 32).unwrap_or(u64::MAX));
        if lineage != self.store.lineage() {
            tracing::debug!("usage report for another store's tokens ignored");
            return;
        }
        let snapshot = push.publisher.current();
        // The receiving clock, to the minute: a report carries no time a
        // filter (or whoever forges one) could choose.
        let now = self.this_minute();
        let mut uses = self.uses.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for (i, chunk) in digests.chunks_exact(32).enumerate() {
            let Ok(bytes) = chunk.try_into() else {
                continue;
            };
            let digest = Digest(bytes);
            let did = access.get(i).map_or(Access::UNREPORTED, |b| Access::from_bits(*b));
            if let Some(token) = snapshot.token(&digest) {
                remember(&mut uses, token.name(), (digest, now, did), !token.is_previous());
            }
        }
    }

    /// A call this control plane's API authenticated itself (one that did not
    /// come through a gateway's filter, or did): a use of the token, for
    /// its last use (and the inactivity policy), with no evidence of what
    /// it did.
    pub fn record_api_use(&self, digest: Digest) {
        let Some(push) = &self.push else {
            return;
        };
        let snapshot = push.publisher.current();
        if let Some(token) = snapshot.token(&digest) {
            let mut uses = self.uses.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let now = self.this_minute();
            remember(
                &mut uses,
                token.name(),
                (digest, now, Access::USED),
                !token.is_previous(),
            );
        }
    }

    /// Where a filter saw secrets used from (`seen`: a digest and a client
    /// address, once per token per report interval at each filter VM), for
    /// each token's last addresses; written with the uses. A report about
    /// another store's tokens (`lineage`) is ignored.
    pub fn record_seen(&self, lineage: &[u8], seen: &[(Digest, IpAddr)]) {
        let Some(push) = &self.push else {
            return;
        };
        if seen.is_empty() || lineage != self.store.lineage() {
            return;
        }
        let snapshot = push.publisher.current();
        let mut kept = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for (digest, address) in seen {
            let Some(token) = snapshot.token(digest) else {
                continue;
            };
            let (d, addresses) = kept
                .entry(token.name().to_owned())
                .or_insert_with(|| (*digest, Vec::new()));
            *d = *digest;
            let address = address.to_canonical();
            addresses.retain(|a| *a != address);
            addresses.push(address);
            // The latest few: the store keeps five in all.
            if addresses.len() > LAST_ADDRESSES {
                addresses.remove(0);
            }
        }
    }

    /// The operator's inactivity policies; `None` where uses are not
    /// reported (no policy applies).
    pub fn inactivity_policies(&self) -> Option<&super::inactivity::Policies> {
        self.opts.inactivity.as_ref()
    }

    /// Every namespace's own inactivity policy, as its owners set it.
    pub async fn stored_inactivity_policies(&self) -> Result<Vec<(String, String)>, Error> {
        Ok(self.store.inactivity_policies().await?)
    }

    /// The inactivity policy `namespace` has, and who set it; `None`: off.
    pub async fn inactivity_policy(&self, namespace: &str) -> Result<Option<(Policy, SetBy)>, Error> {
        check_namespace(namespace)?;
        let Some(operator) = &self.opts.inactivity else {
            return Ok(None);
        };
        let stored = self.store.inactivity_policies().await?;
        let own = stored
            .iter()
            .find(|(ns, _)| ns == namespace)
            .and_then(|(_, text)| Policy::parse(text).ok());
        Ok(operator.effective(namespace, own))
    }

    /// Sets `namespace`'s own inactivity policy (`None`: removes it), by
    /// its owner `actor`, audited (`apitoken.inactivity`, with the policy,
    /// or `off`) unless nothing changed; the policy the namespace then has.
    pub async fn set_inactivity_policy(
        &self,
        namespace: &str,
        policy: Option<Policy>,
        actor: &Actor,
    ) -> Result<Option<(Policy, SetBy)>, Error> {
        check_namespace(namespace)?;
        // (A removal is always taken: a policy stored while uses were
        // reported would apply again once they are.)
        if policy.is_some() && self.opts.inactivity.is_none() {
            return Err(Error::Conflict(
                "this control plane receives no usage reports from the gateways: every token would look unused, so no inactivity policy may be set".to_owned(),
            ));
        }
        self.admit(namespace, actor)?;
        let text = policy.map(|p| p.to_string());
        let mut audit = event(Action::Inactivity, namespace, None, actor, self.opts.clock.now());
        audit.policy = Some(text.clone().unwrap_or_else(|| "off".to_owned()));
        let changed = self
            .store
            .set_inactivity_policy(namespace, text.as_deref(), audit.clone())
            .await?;
        if changed {
            audit::log(&audit);
            self.tell_events_written();
            tracing::info!(
                namespace,
                "inactivity policy of {namespace} set to {}",
                audit.policy.as_deref().unwrap_or("off")
            );
        }
        self.inactivity_policy(namespace).await
    }

    fn this_minute(&self) -> Timestamp {
        Timestamp::from_unix(minute_of(self.opts.clock.now()).saturating_mul(60), 0)
    }

    /// Writes the remembered uses to the store; kept for the next try if
    /// the store is unavailable.
    async fn flush_uses(&self) {
        let mut taken = std::mem::take(&mut *self.uses.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        let mut seen = std::mem::take(&mut *self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        // An address comes with a use of its token; one whose use was
        // written already is a use this minute, with nothing new done.
        let now = self.this_minute();
        for (name, (digest, _)) in &seen {
            taken.entry(name.clone()).or_insert((*digest, now, Access::USED));
        }
        let batch: Vec<Use> = {
            let written = self.written.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            taken
                .into_iter()
                .map(|(name, (digest, time, access))| {
                    let addresses = seen.remove(&name).map(|(_, a)| a).unwrap_or_default();
                    (name, (digest, time, access), addresses)
                })
                .filter(|(name, (digest, time, access), addresses)| {
                    written.get(name).is_none_or(|(d, minute, done, from)| {
                        (d, *minute) != (digest, minute_of(*time))
                            || done.union(*access) != *done
                            || addresses.iter().any(|a| !from.contains(a))
                    })
                })
                .map(|(name, (digest, time, access), addresses)| Use {
                    name,
                    digest,
                    time,
                    access,
                    addresses,
                })
                .collect()
        };
        if batch.is_empty() {
            return;
        }
        match self.store.record_usage(batch.clone()).await {
            Ok(()) => {
                let mut written = self.written.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                // Older minutes never match a new use again.
                let recent = minute_of(self.opts.clock.now()).saturating_sub(1);
                written.retain(|_, (_, minute, _, _)| *minute >= recent);
                for u in batch {
                    let minute = minute_of(u.time);
                    let (done, mut from) = match written.remove(&u.name) {
                        Some((d, m, done, from)) if (d, m) == (u.digest, minute) => (done.union(u.access), from),
                        _ => (u.access, Vec::new()),
                    };
                    for address in u.addresses {
                        if !from.contains(&address) {
                            from.push(address);
                        }
                    }
                    // (A token seen from more addresses in a minute is
                    // written again for the older ones: harmless.)
                    let excess = from.len().saturating_sub(LAST_ADDRESSES);
                    from.drain(..excess);
                    written.insert(u.name, (u.digest, minute, done, from));
                }
            }
            Err(e) => {
                tracing::warn!(
                    "could not record the last use of {} tokens (next try soon): {e}",
                    batch.len()
                );
                let mut uses = self.uses.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let mut seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                for u in batch {
                    remember(&mut uses, &u.name, (u.digest, u.time, u.access), false);
                    if !u.addresses.is_empty() {
                        // (Newer addresses, reported meanwhile, stay the latest.)
                        let (_, kept) = seen.entry(u.name).or_insert_with(|| (u.digest, Vec::new()));
                        let newer = std::mem::take(kept);
                        kept.extend(u.addresses.into_iter().filter(|a| !newer.contains(a)));
                        kept.extend(newer);
                        let excess = kept.len().saturating_sub(LAST_ADDRESSES);
                        kept.drain(..excess);
                    }
                }
            }
        }
    }

    /// Writes last uses to the store in batches, every `every`, until
    /// `shutdown` changes (and once more then).
    pub async fn run_usage(self: Arc<Self>, every: Duration, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => self.flush_uses().await,
                _ = shutdown.changed() => {
                    self.flush_uses().await;
                    return;
                }
            }
        }
    }

    /// Deletes audit events older than `keep`, now and every `every`, until
    /// `shutdown` changes: in batches, so that a large backlog never holds
    /// the store for long.
    pub async fn run_audit_retention(
        self: Arc<Self>,
        keep: Duration,
        every: Duration,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        const BATCH: u32 = 10_000;
        loop {
            let keep_seconds = i64::try_from(keep.as_secs()).unwrap_or(i64::MAX);
            let before = Timestamp::from_unix(self.opts.clock.now().unix_seconds().saturating_sub(keep_seconds), 0);
            let mut pruned = 0;
            loop {
                match self.store.prune_events(before, BATCH).await {
                    Ok(n) => {
                        pruned += n;
                        if n < u64::from(BATCH) {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!("could not delete old audit events (next try later): {e}");
                        break;
                    }
                }
            }
            if pruned > 0 {
                tracing::info!(pruned, before = %before, "deleted {pruned} audit events older than {before} (--audit-retention)");
            }
            if crate::clock::stopped_within(every, &mut shutdown).await {
                return;
            }
        }
    }

    /// The namespace's audit trail, newest first: a page of at most
    /// `page_size` events, from `page_token` (the previous page's `next`), and
    /// the token of the next page.
    pub async fn events(
        &self,
        namespace: &str,
        page_size: u32,
        page_token: Option<&str>,
    ) -> Result<(Vec<AuditEvent>, Option<String>), Error> {
        check_namespace(namespace)?;
        if !(1..=1000).contains(&page_size) {
            return Err(Error::invalid("pageSize", "must be from 1 to 1000"));
        }
        let before = page_token
            .map(|t| {
                t.parse::<u64>()
                    .map_err(|_| Error::invalid("pageToken", "is not a page token of this list"))
            })
            .transpose()?;
        let page = self.store.events(namespace, before, page_size).await?;
        let next = (page.len() == page_size as usize)
            .then(|| page.last().map(|(seq, _)| seq.to_string()))
            .flatten();
        Ok((page.into_iter().map(|(_, e)| e).collect(), next))
    }

    /// Publishes the change committed at `revision` and waits as asked.
    pub(super) async fn deliver(&self, revision: Revision, wait: Wait) -> Result<Delivery, Error> {
        self.tell_events_written();
        let Some(push) = &self.push else {
            return Ok(Delivery::Stored);
        };
        // Called as the write commits: the time to every ACK starts here.
        let committed = Instant::now();
        let deadline = committed + self.opts.apply_timeout;
        let snapshot = match push.publisher.publish(revision, deadline).await {
            Ok(snapshot) => snapshot,
            Err(e) => {
                tracing::warn!(
                    "revision {revision} is committed but not published yet (it will be at the next catch-up): {e}"
                );
                self.metrics.incomplete.inc();
                return Ok(Delivery::NotPublished { reason: e.to_string() });
            }
        };
        if wait == Wait::Published {
            return Ok(Delivery::Published {
                version: snapshot.version,
            });
        }
        let rollout = push.acks.wait(snapshot.version, deadline).await;
        let elapsed = committed.elapsed();
        if rollout.complete() {
            if rollout.envoys > 0 {
                self.metrics.apply_seconds.observe(elapsed.as_secs_f64());
            }
            tracing::debug!(
                revision = revision.0,
                envoys = rollout.envoys,
                duration_ms = elapsed.as_secs_f64() * 1000.0,
                "revision {revision} applied by every connected Envoy ({})",
                rollout.envoys
            );
        } else {
            self.metrics.incomplete.inc();
            let lagging: Vec<String> = rollout
                .lagging
                .iter()
                .map(|l| format!("{} ({:?})", l.who, l.lag))
                .collect();
            tracing::warn!(
                revision = revision.0,
                envoys = rollout.envoys,
                applied = rollout.applied,
                duration_ms = elapsed.as_secs_f64() * 1000.0,
                "version {} not applied everywhere: {} of {} Envoys applied it; lagging: {}",
                rollout.version,
                rollout.applied,
                rollout.envoys,
                lagging.join(", ")
            );
        }
        Ok(Delivery::Applied(rollout))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_expiry_a_fraction_of_a_second_past_is_refused() {
        let now = Timestamp::from_unix(1_800_000_000, 900_000_000);
        let past = "2027-01-15T08:00:00.400Z"; // 1_800_000_000 is 2027-01-15T08:00:00Z
        assert_eq!(
            Timestamp::parse_rfc3339(past).unwrap().unix_seconds(),
            now.unix_seconds()
        );
        let err = expiry(Some(past), "expireTime", now).unwrap_err();
        assert!(err.to_string().contains("in the future"), "{err}");
        let soon = "2027-01-15T08:00:00.950Z";
        assert!(expiry(Some(soon), "expireTime", now).unwrap().is_some());
    }
}
