//! A namespace's writes per second. Every create, regenerate and delete
//! reconfigures every gateway, for every namespace: one owner looping
//! writes would keep them all busy. Each namespace has a bucket of `burst`
//! writes that refills at `per_second`; a write that finds it empty is
//! refused (429 with `Retry-After`), before anything is stored. Counted per
//! control-plane process (with replicas, each one has its own buckets).
//! Operator tools (`bootstrap`, `import`) are not counted.
//!
//! The same buckets, keyed by client address, bound the unauthenticated
//! leak reports (`credentials:revoke`, see `leaks`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Buckets kept at most: beyond it, full ones are forgotten (a full bucket
/// is the same as none), and a new key waits while none is.
const KEPT: usize = 10_000;

/// A sustained rate and a burst, for one key (a namespace, a client).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    /// Calls per second a key may sustain (0: no limit).
    pub per_second: f64,
    /// Calls a key may make at once.
    pub burst: f64,
}

impl Default for Rate {
    fn default() -> Self {
        Self {
            per_second: 10.0,
            burst: 100.0,
        }
    }
}

/// The default rate of leak reports per client address (`leaks`): one a
/// second after a burst of ten (each may carry 1,000 credentials).
pub const DEFAULT_REPORT_RATE: Rate = Rate {
    per_second: 1.0,
    burst: 10.0,
};

/// A wait in whole seconds, rounded up, at least one: a client that waits
/// as told (`Retry-After`) finds a write in the bucket.
pub fn whole_seconds(wait: Duration) -> u64 {
    wait.as_secs().saturating_add(u64::from(wait.subsec_nanos() > 0)).max(1)
}

#[derive(Debug, Default)]
pub(crate) struct Buckets {
    levels: Mutex<HashMap<String, (f64, Instant)>>,
}

impl Buckets {
    /// Takes one call from `key`'s bucket, or says how long until one is
    /// there.
    pub(crate) fn take(&self, rate: Rate, key: &str, now: Instant) -> Result<(), Duration> {
        if rate.per_second <= 0.0 {
            return Ok(());
        }
        let burst = rate.burst.max(1.0);
        let mut levels = self.levels.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let refill = |(level, at): (f64, Instant)| {
            (level + now.saturating_duration_since(at).as_secs_f64() * rate.per_second).min(burst)
        };
        if levels.len() >= KEPT && !levels.contains_key(key) {
            levels.retain(|_, bucket| refill(*bucket) < burst);
            // Still this many keys busy at once (a flood from a whole
            // address block): a new one waits for room rather than grow
            // the map (and each sweep) without bound.
            if levels.len() >= KEPT {
                return Err(Duration::from_secs(1));
            }
        }
        let level = levels.get(key).map_or(burst, |bucket| refill(*bucket));
        if level >= 1.0 {
            levels.insert(key.to_owned(), (level - 1.0, now));
            Ok(())
        } else {
            Err(Duration::try_from_secs_f64((1.0 - level) / rate.per_second).unwrap_or(Duration::MAX))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let rate = Rate {
            per_second: 2.0,
            burst: 3.0,
        };
        let b = Buckets::default();
        let t0 = Instant::now();
        for _ in 0..3 {
            b.take(rate, "a", t0).unwrap();
        }
        let wait = b.take(rate, "a", t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        // Another namespace has its own bucket.
        b.take(rate, "b", t0).unwrap();
        // Half a second later, one more write.
        b.take(rate, "a", t0 + Duration::from_millis(500)).unwrap();
        assert!(b.take(rate, "a", t0 + Duration::from_millis(500)).is_err());
        // At most KEPT keys busy at once: one more waits (and the sweep runs
        // only when a new key finds the map full).
        let crowd = Buckets::default();
        for i in 0..KEPT {
            crowd.take(rate, &i.to_string(), t0).unwrap();
        }
        assert_eq!(crowd.take(rate, "one more", t0), Err(Duration::from_secs(1)));
        crowd.take(rate, "0", t0).unwrap();
        // Once their buckets are full again, they are forgotten.
        crowd.take(rate, "one more", t0 + Duration::from_secs(2)).unwrap();
        // No limit.
        let none = Rate {
            per_second: 0.0,
            burst: 0.0,
        };
        for _ in 0..1000 {
            b.take(none, "a", t0).unwrap();
        }
    }
}
