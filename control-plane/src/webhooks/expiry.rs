//! Expiry warnings (`--expiry-warning 7d,1d`): once per lead time and per
//! token, an `apitoken.expiring` event in the audit trail (so in its
//! namespace's `apitokens:events`, and to the webhooks, like any event)
//! when the token's expiry comes within that lead time. A token already
//! within a shorter lead gets only that one's warning: a token created to
//! expire in an hour is warned once, not once per lead time. The warnings
//! given are kept in the store, so a restart or another replica never gives
//! one twice.

use crate::clock::Clock;
use crate::store::{ExpiryScan, Store};
use crate::tokens::audit;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Who the warnings are audited as.
pub const ACTOR: &str = "apitokens serve";

/// Tokens warned per lead time and scan (more wait for the next scan).
const BATCH: u32 = 1000;

/// Parses `--expiry-warning`: durations (`7d,1d`, `12h`, `30m`, `3600s`),
/// returned shortest first, without repeats.
pub fn parse_leads(text: &str) -> Option<Vec<Duration>> {
    let mut leads = text
        .split(',')
        .map(|d| crate::clock::parse_duration(d.trim()).filter(|d| !d.is_zero()))
        .collect::<Option<Vec<_>>>()?;
    leads.sort();
    leads.dedup();
    Some(leads)
}

/// Gives the warnings that are due, now and every `every`, until
/// `shutdown` changes; `written` is told after each batch.
pub async fn run(
    store: Arc<dyn Store>,
    leads: Vec<Duration>,
    clock: Clock,
    every: Duration,
    written: impl Fn() + Send + 'static,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let now = clock.now();
        for (i, lead) in leads.iter().enumerate() {
            let shorter = i.checked_sub(1).and_then(|j| leads.get(j)).copied();
            let scan = ExpiryScan {
                now,
                lead: *lead,
                shorter,
                actor: ACTOR,
                limit: BATCH,
            };
            match store.warn_expiring(scan).await {
                Ok(events) if !events.is_empty() => {
                    events.iter().for_each(audit::log);
                    tracing::info!(
                        warned = events.len(),
                        lead_seconds = lead.as_secs(),
                        "{} tokens expire within {lead:?} (--expiry-warning)",
                        events.len()
                    );
                    written();
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("could not give expiry warnings (next try later): {e}"),
            }
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
    fn lead_times() {
        let day = Duration::from_secs(86_400);
        assert_eq!(parse_leads("7d,1d"), Some(vec![day, day * 7]));
        assert_eq!(parse_leads("1d, 1d,12h"), Some(vec![day / 2, day]));
        assert_eq!(parse_leads("7d,soon"), None);
        assert_eq!(parse_leads("0s"), None);
    }
}
