//! Wall-clock time as the core's [`Timestamp`].

use apitokens_core::timestamp::Timestamp;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub fn now() -> Timestamp {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => Timestamp::from_unix(i64::try_from(d.as_secs()).unwrap_or(i64::MAX), d.subsec_nanos()),
        Err(_) => Timestamp::from_unix(0, 0),
    }
}

/// `now` truncated to whole seconds (API times read better without fractions).
pub fn now_seconds() -> Timestamp {
    Timestamp::from_unix(now().unix_seconds(), 0)
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
        assert!(now_seconds().subsec_nanos() == 0);
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
