//! Leak reports: a secret scanner (GitHub's, a CI log scanner, anyone) that
//! finds one of our secrets reports it, and the token it belongs to is
//! revoked at once. The `apt_` prefix and its checksum exist so that
//! scanners find our secrets; this is where they report them, in the shape
//! of GitHub's credential-revocation API (`POST credentials:revoke` with
//! `{"credentials": [...]}`, at most 1,000).
//!
//! Holding a secret is the proof: a report needs no authentication. So the
//! rules are about what a report must not give away or cost:
//!
//! - the answer is the same whether anything matched: it never says which
//!   (or whether) a secret belonged to a token, and it comes no earlier
//!   than [`ANSWER_AFTER`] after the report arrived, longer than a
//!   revocation takes, so that a match is not visible in the answer's time
//!   either (a report that did match answers once every Envoy applied the
//!   revocation, read-your-writes as any delete);
//! - reports are rate-limited per client address (IPv6 per /64, the block
//!   one client typically holds), before their body is read;
//! - a secret is never logged, stored or answered: the log and the audit
//!   trail name the revoked tokens and the reporter's address.
//!
//! A secret that matches a token's current secret, or its previous one
//! during a rotation's overlap, revokes the token (deleted, as `DELETE`
//! does: for good). A secret that no longer works (a previous secret whose
//! overlap ended, an expired token's), a malformed secret, one whose
//! checksum is broken, and an unknown one change nothing. A report runs to
//! its end even when its connection closes (the API spawns it), and a
//! failed deletion does not stop the others.

use super::caller::Actor;
use super::secret::{self, Shape};
use super::service::{Delivery, Service, Wait};
use super::{audit, Error};
use crate::store::{Action, AuditEvent};
use apitokens_core::table::Digest;
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// The most credentials in one report (as GitHub's API).
pub const MAX_CREDENTIALS: usize = 1000;

/// The earliest a report is answered after it arrived: well above what a
/// revocation takes to reach every Envoy (p99 about 20 ms with a million
/// tokens, `make bench-scale`), so that answers with and without a match
/// take the same time.
pub const ANSWER_AFTER: Duration = Duration::from_millis(250);

/// Who a revocation by leak report is audited as.
pub const REPORTER: &str = "reported leaked";

pub use super::rate::DEFAULT_REPORT_RATE;

/// What a report did, for the log and the metrics (never for the answer).
#[derive(Debug, Default)]
pub struct Outcome {
    /// Tokens revoked by this report.
    pub revoked: Vec<String>,
    /// Where the revocation stands (none revoked: `None`).
    pub delivery: Option<Delivery>,
}

/// The key a client's reports are counted under: its address, an IPv6
/// address by its /64.
fn client_key(address: Option<&str>) -> String {
    match address.and_then(|a| a.parse::<IpAddr>().ok()) {
        Some(IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_none() => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
        Some(IpAddr::V6(v6)) => v6.to_ipv4_mapped().map_or_else(String::new, |v4| v4.to_string()),
        Some(ip) => ip.to_string(),
        None => String::new(),
    }
}

impl Service {
    /// Counts a report from `reporter` against its client's rate, before
    /// its body is read: `Err` says how long until the next one is taken.
    pub fn admit_report(&self, reporter: &Actor) -> Result<(), Error> {
        self.report_buckets()
            .take(
                self.options().report_rate,
                &client_key(reporter.address.as_deref()),
                Instant::now(),
            )
            .map_err(|retry_after| {
                self.metrics.leak_reports_rate_limited.inc();
                Error::TooManyReports { retry_after }
            })
    }

    /// Revokes every token one of `credentials` is a secret of, audited as
    /// [`REPORTER`] from `reporter`'s address; answers no earlier than
    /// [`ANSWER_AFTER`] after `arrived`, whatever matched.
    pub async fn revoke_leaked(
        &self,
        credentials: &[&str],
        reporter: &Actor,
        arrived: Instant,
    ) -> Result<Outcome, Error> {
        if credentials.is_empty() {
            return Err(Error::invalid("credentials", "must list at least one credential"));
        }
        if credentials.len() > MAX_CREDENTIALS {
            return Err(Error::invalid(
                "credentials",
                format!("must list at most {MAX_CREDENTIALS} credentials"),
            ));
        }
        let result = self.revoke_matching(credentials, reporter).await;
        tokio::time::sleep_until((arrived + ANSWER_AFTER).into()).await;
        result
    }

    async fn revoke_matching(&self, credentials: &[&str], reporter: &Actor) -> Result<Outcome, Error> {
        // Every credential is hashed and looked up, well-formed or not
        // (the same work whatever matches); a broken checksum never
        // matches, as at the gateway.
        let now = self.clock().now();
        // Each token once: its name, and its namespace as the table has it.
        let names: BTreeSet<(String, String)> = {
            let Some(snapshot) = self.published() else {
                return Ok(Outcome::default());
            };
            credentials
                .iter()
                .filter_map(|c| {
                    let digest = Digest::of(c.as_bytes());
                    let token = snapshot.token(&digest)?;
                    // A secret that no longer works proves nothing and
                    // harms nothing: a previous secret whose overlap ended
                    // (kept in the table a while, refused) must not let
                    // whoever still holds it delete the live token.
                    let works = !token.is_expired(now);
                    (works && secret::shape(c.as_bytes()) != Shape::Corrupt)
                        .then(|| (token.name().to_owned(), token.namespace().to_owned()))
                })
                .collect()
        };
        self.metrics.leak_reports.inc();
        self.metrics
            .leak_report_credentials
            .inc_by(u64::try_from(credentials.len()).unwrap_or(u64::MAX));
        let mut outcome = Outcome::default();
        let mut last = None;
        // Every match is tried, whatever failed before it; what was deleted
        // is published and waited for, then the first failure answers.
        let mut failed = None;
        for (name, namespace) in names {
            let event = AuditEvent {
                actor: REPORTER.to_owned(),
                ..super::service::event(Action::Revoke, &namespace, Some(&name), reporter, self.clock().now())
            };
            let revision = match self.store().delete(&name, event.clone()).await {
                Ok(Some(revision)) => revision,
                // Deleted since the table was read: nothing left to revoke.
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!(token = %name, "could not revoke {name}, reported leaked: {e}");
                    failed.get_or_insert(e);
                    continue;
                }
            };
            audit::log(&event);
            tracing::warn!(
                token = %name,
                namespace,
                revision = revision.0,
                client = reporter.address.as_deref().unwrap_or("-"),
                "revoked {name}: its secret was reported leaked (credentials:revoke from {})",
                reporter.address.as_deref().unwrap_or("an unknown address")
            );
            self.metrics.leaked_tokens_revoked.inc();
            outcome.revoked.push(name);
            last = Some(revision);
        }
        if let Some(revision) = last {
            outcome.delivery = Some(self.deliver(revision, Wait::Envoys).await?);
        }
        match failed {
            Some(e) => Err(e.into()),
            None => Ok(outcome),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_are_counted_by_address_and_ipv6_by_its_64() {
        assert_eq!(client_key(Some("203.0.113.5")), "203.0.113.5");
        assert_eq!(client_key(Some("2001:db8:1:2:3:4:5:6")), "2001:db8:1:2::/64");
        assert_eq!(
            client_key(Some("2001:db8:1:2:ffff::1")),
            client_key(Some("2001:db8:1:2::9"))
        );
        assert_ne!(client_key(Some("2001:db8:1:3::1")), client_key(Some("2001:db8:1:2::1")));
        assert_eq!(client_key(Some("::ffff:203.0.113.5")), "203.0.113.5");
        assert_eq!(client_key(None), "");
    }
}
