//! Usage reports: which tokens this VM saw used, sent to the control plane on
//! the tick (`apitokens_core::usage`), never on the request path. A control
//! plane that is down or slow costs requests nothing: a report that fails is
//! kept (bounded) and sent again with the next one.

use crate::abi;
use crate::pairs;
use apitokens_core::usage::{self, Pending, Seen, Use, MAX_DIGESTS_PER_REPORT, METHOD, SERVICE};
use std::cell::RefCell;

/// Digests kept per destination while reports fail (a control plane down
/// for long), each once (`Pending`): beyond it new marks are dropped, not
/// memory.
const MAX_PENDING: usize = 1 << 20;
const TIMEOUT_MS: u32 = 5000;

/// Where a report goes: the cluster, and the lineage of the tables whose
/// marks it carries.
type Destination = (Box<str>, Vec<u8>);

/// A handful of destinations and reports at most: plain vectors.
#[derive(Default)]
struct Reporter {
    last_ms: u64,
    pending: Vec<(Destination, Pending)>,
    in_flight: Vec<(u32, Destination, Vec<Use>, Vec<Seen>)>,
}

thread_local! {
    static REPORTER: RefCell<Reporter> = RefCell::new(Reporter::default());
}

/// Adds marks drained from a table, and where tokens were seen from, to
/// what is due for `destination`.
pub fn queue(destination: Destination, uses: Vec<Use>, seen: Vec<Seen>) {
    if uses.is_empty() && seen.is_empty() {
        return;
    }
    REPORTER.with(|r| {
        let mut r = r.borrow_mut();
        let at = match r.pending.iter().position(|(d, _)| *d == destination) {
            Some(at) => at,
            None => {
                r.pending.push((destination, Pending::new(MAX_PENDING)));
                r.pending.len() - 1
            }
        };
        if let Some((_, pending)) = r.pending.get_mut(at) {
            pending.add(uses);
            pending.add_seen(seen);
        }
    });
}

/// Whether a report is due (every `interval_ms`); if so, the clock restarts.
pub fn due(now_ms: u64, interval_ms: u64) -> bool {
    REPORTER.with(|r| {
        let mut r = r.borrow_mut();
        if now_ms.saturating_sub(r.last_ms) < interval_ms {
            return false;
        }
        r.last_ms = now_ms;
        true
    })
}

/// Sends everything pending, in reports of at most
/// [`MAX_DIGESTS_PER_REPORT`] digests. A report the host refuses to start
/// stays pending.
pub fn send() {
    let pending = REPORTER.with(|r| std::mem::take(&mut r.borrow_mut().pending));
    let metadata = pairs::serialize(&[]);
    // (Each digest once per destination: the control plane takes the
    // latest use of each.)
    for ((cluster, lineage), mut pending) in pending {
        let digests = pending.take();
        // The addresses (at most MAX_SEEN_PER_REPORT) go with the first
        // report.
        let mut seen = pending.take_seen();
        let upstream = usage::grpc_service(&cluster);
        let mut chunks: Vec<&[Use]> = digests.chunks(MAX_DIGESTS_PER_REPORT).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        for chunk in chunks {
            let seen = std::mem::take(&mut seen);
            let message = usage::report(&lineage, chunk, &seen);
            let destination = (cluster.clone(), lineage.clone());
            match abi::grpc_call(&upstream, SERVICE, METHOD, &metadata, &message, TIMEOUT_MS) {
                Ok(token) => REPORTER.with(|r| {
                    r.borrow_mut()
                        .in_flight
                        .push((token, destination, chunk.to_vec(), seen));
                }),
                Err(_) => queue(destination, chunk.to_vec(), seen),
            }
        }
    }
}

fn take(token: u32) -> Option<(Destination, Vec<Use>, Vec<Seen>)> {
    REPORTER.with(|r| {
        let mut r = r.borrow_mut();
        let at = r.in_flight.iter().position(|(t, _, _, _)| *t == token)?;
        let (_, destination, digests, seen) = r.in_flight.swap_remove(at);
        Some((destination, digests, seen))
    })
}

/// The control plane answered a report: done.
pub fn delivered(token: u32) {
    take(token);
}

/// A report failed: its digests go with the next one.
pub fn failed(token: u32) {
    if let Some((destination, uses, seen)) = take(token) {
        queue(destination, uses, seen);
    }
}
