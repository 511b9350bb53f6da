//! Wall-clock time as the core's [`Timestamp`], and the [`Clock`] that every
//! time-dependent rule reads (expiry, last use by the minute, retention), so
//! that tests move time by hand instead of sleeping.

use apitokens_core::timestamp::Timestamp;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Where the rules read the time: the system's wall clock, or (in unit
/// tests) a clock the test sets and advances.
#[derive(Clone, Debug, Default)]
pub struct Clock {
    #[cfg(test)]
    manual: Option<std::sync::Arc<std::sync::Mutex<Timestamp>>>,
}

impl Clock {
    /// The system's wall clock.
    pub fn system() -> Self {
        Self::default()
    }

    pub fn now(&self) -> Timestamp {
        #[cfg(test)]
        if let Some(manual) = &self.manual {
            return *manual.lock().unwrap();
        }
        now()
    }

    /// [`Clock::now`] truncated to whole seconds.
    pub fn now_seconds(&self) -> Timestamp {
        Timestamp::from_unix(self.now().unix_seconds(), 0)
    }

    /// A clock that stands at `at` until advanced (every copy moves with it).
    #[cfg(test)]
    pub fn manual(at: Timestamp) -> Self {
        Self {
            manual: Some(std::sync::Arc::new(std::sync::Mutex::new(at))),
        }
    }

    #[cfg(test)]
    pub fn advance(&self, by: Duration) {
        if let Some(manual) = &self.manual {
            let mut t = manual.lock().unwrap();
            let nanos =
                i128::from(t.unix_seconds()) * 1_000_000_000 + i128::from(t.subsec_nanos()) + by.as_nanos() as i128;
            *t = Timestamp::from_unix((nanos / 1_000_000_000) as i64, (nanos % 1_000_000_000) as u32);
        }
    }
}

/// The system's wall clock, for what only shows the time (status pages,
/// logs); rules read a [`Clock`].
pub fn now() -> Timestamp {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => Timestamp::from_unix(i64::try_from(d.as_secs()).unwrap_or(i64::MAX), d.subsec_nanos()),
        Err(_) => Timestamp::from_unix(0, 0),
    }
}

/// How long from `now` until `t` (zero if `t` has passed).
pub fn until(t: Timestamp, now: Timestamp) -> Duration {
    let secs = t.unix_seconds().saturating_sub(now.unix_seconds());
    let nanos = i64::from(t.subsec_nanos()) - i64::from(now.subsec_nanos());
    let total = i128::from(secs) * 1_000_000_000 + i128::from(nanos);
    if total <= 0 {
        Duration::ZERO
    } else {
        Duration::from_nanos(u64::try_from(total).unwrap_or(u64::MAX))
    }
}

/// Waits `every`, or until `shutdown` changes; whether it changed (time
/// for a background task to stop).
pub async fn stopped_within(every: Duration, shutdown: &mut tokio::sync::watch::Receiver<bool>) -> bool {
    tokio::select! {
        () = tokio::time::sleep(every) => false,
        _ = shutdown.changed() => true,
    }
}

/// `90d`, `12h`, `30m`, `3600s`: a positive whole number and a unit.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let unit = text.len().checked_sub(1)?;
    let (digits, unit) = (text.get(..unit)?, text.get(unit..)?);
    if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    let seconds = match unit {
        "s" => Some(n),
        "m" => n.checked_mul(60),
        "h" => n.checked_mul(3600),
        "d" => n.checked_mul(86_400),
        _ => None,
    }?;
    (seconds > 0).then(|| Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn until_handles_past_and_future() {
        let now = Timestamp::from_unix(100, 900_000_000);
        assert_eq!(
            until(Timestamp::from_unix(101, 100_000_000), now),
            Duration::from_millis(200)
        );
        assert_eq!(until(Timestamp::from_unix(100, 0), now), Duration::ZERO);
        assert!(Clock::system().now_seconds().subsec_nanos() == 0);
    }

    #[test]
    fn a_manual_clock_moves_only_when_advanced_and_every_copy_with_it() {
        let clock = Clock::manual(Timestamp::from_unix(100, 900_000_000));
        let copy = clock.clone();
        clock.advance(Duration::from_millis(250));
        assert_eq!(copy.now(), Timestamp::from_unix(101, 150_000_000));
        assert_eq!(copy.now_seconds(), Timestamp::from_unix(101, 0));
    }

    #[test]
    fn durations_with_a_unit() {
        assert_eq!(parse_duration("90d"), Some(Duration::from_secs(90 * 86_400)));
        assert_eq!(parse_duration("12h"), Some(Duration::from_secs(12 * 3600)));
        assert_eq!(parse_duration("30m"), Some(Duration::from_secs(1800)));
        assert_eq!(parse_duration("3600s"), Some(Duration::from_secs(3600)));
        for bad in ["", "90", "d", "0d", "-1d", "1w", "1.5h", "99999999999999999999d"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }
}
