//! A token's request rate limit, enforced by each gateway exactly, across
//! all of its Envoy's workers.
//!
//! The algorithm is GCRA (the generic cell rate algorithm of ATM traffic
//! policing, as in redis-cell and Stripe's limiter): a token's whole state
//! is one instant, its *theoretical arrival time* (TAT). A request at `now`
//! is admitted when `TAT - now` is at most the burst's tolerance, and moves
//! the TAT one interval (`period / requests`) further. So at most `burst`
//! requests pass at once, and `requests` per period after that: over a
//! time `t`, at most `burst + t × requests / period`.
//!
//! One instant is small enough to keep in proxy-wasm shared data (one
//! store per Envoy process and `vm_id`, every worker's VM sees it) and to
//! update with compare-and-swap: read the TAT and its version, decide, and
//! store the new TAT only if no other worker stored one in between, else
//! read again (the loop is the request flow's, `gate`, against its host).
//! Each admitted request is one successful swap, so the limit holds
//! exactly whatever the number of workers; it is not shared across
//! gateways (for that, Envoy's global rate-limit filter, see
//! `envoy/envoy-global-ratelimit.yaml`).
//!
//! Only requests that go on to the upstream are counted: one the token's
//! rules refuse never reaches the upstream the limit protects.

use crate::error::ConfigError;
use crate::spec::RateLimitSpec;
use crate::timestamp::Timestamp;

/// The most requests per period a limit may state (one per microsecond).
pub const MAX_REQUESTS: u32 = 1_000_000;

pub(crate) const NANOS_PER_SECOND: u64 = 1_000_000_000;

/// The period a limit's requests are counted over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Per {
    Second,
    Minute,
}

impl Per {
    pub const fn seconds(self) -> u32 {
        match self {
            Self::Second => 1,
            Self::Minute => 60,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Second => "second",
            Self::Minute => "minute",
        }
    }

    fn from_seconds(seconds: u8) -> Option<Self> {
        match seconds {
            1 => Some(Self::Second),
            60 => Some(Self::Minute),
            _ => None,
        }
    }
}

/// A request rate: `requests` per `per`, and at most `burst` at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RateLimit {
    pub requests: u32,
    pub per: Per,
    pub burst: u32,
}

/// The encoding's length, after the tag: u32 requests, u8 period in
/// seconds, u32 burst (little-endian).
pub(crate) const ENCODED_LEN: usize = 9;

impl RateLimit {
    /// A limit as written (`rateLimit`), validated; errors name the field
    /// (`field("rateLimit.burst")`).
    pub fn from_spec(spec: &RateLimitSpec, field: impl Fn(&str) -> String) -> Result<Self, ConfigError> {
        let range = |name: &str, n: u32| {
            if (1..=MAX_REQUESTS).contains(&n) {
                Ok(n)
            } else {
                Err(ConfigError::new(
                    field(&format!("rateLimit.{name}")),
                    format!("must be from 1 to {MAX_REQUESTS}"),
                ))
            }
        };
        let per = match spec.per.as_str() {
            "second" => Per::Second,
            "minute" => Per::Minute,
            _ => return Err(ConfigError::new(field("rateLimit.per"), "must be `second` or `minute`")),
        };
        let requests = range("requests", spec.requests)?;
        Ok(Self {
            requests,
            per,
            // A period's worth at once, unless said otherwise.
            burst: spec.burst.map_or(Ok(requests), |b| range("burst", b))?,
        })
    }

    /// The limit as written.
    pub fn spec(&self) -> RateLimitSpec {
        RateLimitSpec {
            requests: self.requests,
            per: self.per.as_str().to_owned(),
            burst: Some(self.burst),
        }
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.requests.to_le_bytes());
        out.push(self.per.seconds() as u8);
        out.extend_from_slice(&self.burst.to_le_bytes());
    }

    /// Reads [`ENCODED_LEN`] bytes back; `None` if they are not a valid
    /// limit.
    pub(crate) fn decode(fields: &[u8]) -> Option<Self> {
        let u32_at = |at: usize| Some(u32::from_le_bytes(fields.get(at..at + 4)?.try_into().ok()?));
        let limit = Self {
            requests: u32_at(0)?,
            per: Per::from_seconds(*fields.get(4)?)?,
            burst: u32_at(5)?,
        };
        let valid = |n| (1..=MAX_REQUESTS).contains(&n);
        (valid(limit.requests) && valid(limit.burst)).then_some(limit)
    }

    /// Nanoseconds between two requests at the limit's rate (at least
    /// 1,000: [`MAX_REQUESTS`] per second).
    pub(crate) fn interval(&self) -> u64 {
        u64::from(self.per.seconds()) * NANOS_PER_SECOND / u64::from(self.requests.max(1))
    }

    /// How far ahead of now the TAT may be for a request to pass.
    fn tolerance(&self) -> u64 {
        self.interval() * u64::from(self.burst.saturating_sub(1))
    }

    /// A stored TAT as this limit reads it at `now`: never further ahead
    /// than the limit itself could have put it. A TAT stored under a lower
    /// limit (the token's limit changed, or a token of the same name was
    /// deleted and made again), or before the clock stepped back, would
    /// otherwise refuse the token for as long. A TAT cut back must be
    /// stored (refusals store nothing else), or the next request would
    /// find it as far ahead again.
    pub fn cap(&self, tat: u64, now: u64) -> u64 {
        tat.min(now.saturating_add(self.tolerance() + self.interval()))
    }

    /// GCRA's decision for a request at `now` (nanoseconds since the Unix
    /// epoch) given the TAT ([`RateLimit::cap`]ped; 0: never used).
    pub fn decide(&self, tat: u64, now: u64) -> Decision {
        let tat = tat.max(now);
        let earliest = tat.saturating_sub(self.tolerance());
        if now < earliest {
            Decision::Refuse(Throttled {
                limit: *self,
                wait_nanos: earliest - now,
            })
        } else {
            Decision::Admit(tat.saturating_add(self.interval()))
        }
    }
}

/// What GCRA decides for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Admitted: the new TAT to store.
    Admit(u64),
    Refuse(Throttled),
}

/// A request refused for its token's rate limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Throttled {
    pub limit: RateLimit,
    /// How long until a request would pass.
    pub wait_nanos: u64,
}

impl Throttled {
    /// The wait in whole seconds, rounded up, at least 1 (`Retry-After`
    /// takes seconds; 0 would invite an immediate retry that fails).
    pub fn retry_after_seconds(&self) -> u64 {
        self.wait_nanos.div_ceil(NANOS_PER_SECOND).max(1)
    }

    /// The response's extra fields: `Retry-After` (RFC 9110 10.2.3) and the
    /// IETF RateLimit fields (draft-ietf-httpapi-ratelimit-headers-10: the
    /// policy, `q` requests per `w` seconds; what remains, `r`, and when
    /// it resets, `t`), written into `out` (cleared first) as the values
    /// of [`Throttled::HEADERS`], in order.
    pub fn header_values(&self, out: &mut [String; 3]) {
        use std::fmt::Write;
        let seconds = self.retry_after_seconds();
        for value in out.iter_mut() {
            value.clear();
        }
        let [retry, policy, state] = out;
        let _ = write!(retry, "{seconds}");
        let _ = write!(
            policy,
            "\"token\";q={};w={}",
            self.limit.requests,
            self.limit.per.seconds()
        );
        let _ = write!(state, "\"token\";r=0;t={seconds}");
    }

    /// The names of [`Throttled::header_values`]'s fields.
    pub const HEADERS: [&'static str; 3] = ["retry-after", "ratelimit-policy", "ratelimit"];
}

/// `t` in nanoseconds since the Unix epoch; `None` before it or past u64.
pub(crate) fn nanos(t: Timestamp) -> Option<u64> {
    let secs = u64::try_from(t.unix_seconds()).ok()?;
    secs.checked_mul(NANOS_PER_SECOND)?
        .checked_add(u64::from(t.subsec_nanos()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = NANOS_PER_SECOND;

    fn limit(requests: u32, per: Per, burst: u32) -> RateLimit {
        RateLimit { requests, per, burst }
    }

    /// Admits requests at `now` while it may, storing each TAT.
    fn burst_at(limit: &RateLimit, tat: &mut u64, now: u64) -> u32 {
        *tat = limit.cap(*tat, now);
        let mut admitted = 0;
        while let Decision::Admit(next) = limit.decide(*tat, now) {
            *tat = next;
            admitted += 1;
        }
        admitted
    }

    #[test]
    fn a_burst_passes_at_once_then_the_rate() {
        let l = limit(10, Per::Second, 5);
        let mut tat = 0;
        let start = 1_000 * SECOND;
        assert_eq!(burst_at(&l, &mut tat, start), 5);
        // One interval (100 ms) later, one more; none in between.
        assert_eq!(burst_at(&l, &mut tat, start + SECOND / 10 - 1), 0);
        assert_eq!(burst_at(&l, &mut tat, start + SECOND / 10), 1);
        // Over 10 s at most burst + 10 × rate.
        let mut admitted = 5 + 1;
        let mut now = start + SECOND / 10;
        while now <= start + 10 * SECOND {
            now += SECOND / 1000;
            admitted += burst_at(&l, &mut tat, now);
        }
        assert_eq!(admitted, 5 + 100);
    }

    #[test]
    fn a_tat_further_ahead_than_the_limit_allows_is_cut_back() {
        let now = 1_000 * SECOND;
        // Stored under 10 a minute with a burst of 600 (an hour ahead),
        // read under 100 a second: the token waits no more than this
        // limit's own worst case, one interval.
        let l = limit(100, Per::Second, 100);
        let mut tat = now + 3_600 * SECOND;
        assert_eq!(burst_at(&l, &mut tat, now), 0);
        assert_eq!(burst_at(&l, &mut tat, now + SECOND / 100), 1);
        // The clock stepped back an hour: the same.
        let l = limit(1, Per::Second, 1);
        let mut tat = now + 3_600 * SECOND;
        assert_eq!(burst_at(&l, &mut tat, now), 0);
        assert_eq!(burst_at(&l, &mut tat, now + SECOND), 1);
        // A stored value of u64::MAX neither overflows nor locks it out.
        let mut tat = u64::MAX;
        assert_eq!(burst_at(&l, &mut tat, now), 0);
        assert_eq!(burst_at(&l, &mut tat, now + SECOND), 1);
    }

    #[test]
    fn a_refusal_says_how_long_to_wait() {
        let l = limit(2, Per::Minute, 1);
        let now = 5_000 * SECOND;
        let Decision::Admit(tat) = l.decide(0, now) else {
            panic!("the first request passes");
        };
        let Decision::Refuse(t) = l.decide(tat, now + SECOND) else {
            panic!("the second, a second later, waits");
        };
        assert_eq!(t.wait_nanos, 29 * SECOND);
        assert_eq!(t.retry_after_seconds(), 29);
        let mut values = Default::default();
        t.header_values(&mut values);
        assert_eq!(
            values,
            ["29", "\"token\";q=2;w=60", "\"token\";r=0;t=29"].map(String::from)
        );
        // Less than a second still says 1.
        let t = Throttled {
            limit: l,
            wait_nanos: 3,
        };
        assert_eq!(t.retry_after_seconds(), 1);
    }

    #[test]
    fn specs_are_validated_by_field() {
        let spec = |requests, per: &str, burst| RateLimitSpec {
            requests,
            per: per.into(),
            burst,
        };
        let field = |f: &str| f.to_owned();
        let l = RateLimit::from_spec(&spec(100, "minute", None), field).unwrap();
        assert_eq!(l, limit(100, Per::Minute, 100));
        assert_eq!(RateLimit::from_spec(&l.spec(), field).unwrap(), l);
        for (bad, named) in [
            (spec(0, "second", None), "rateLimit.requests"),
            (spec(MAX_REQUESTS + 1, "second", None), "rateLimit.requests"),
            (spec(5, "hour", None), "rateLimit.per"),
            (spec(5, "second", Some(0)), "rateLimit.burst"),
        ] {
            assert_eq!(RateLimit::from_spec(&bad, field).unwrap_err().field, named);
        }
    }

    #[test]
    fn the_encoding_round_trips_and_refuses_nonsense() {
        let l = limit(MAX_REQUESTS, Per::Second, 7);
        let mut out = Vec::new();
        l.encode(&mut out);
        assert_eq!(out.len(), ENCODED_LEN);
        assert_eq!(RateLimit::decode(&out), Some(l));
        let mut bad_period = out.clone();
        bad_period[4] = 2;
        assert_eq!(RateLimit::decode(&bad_period), None);
        let mut zero = out.clone();
        zero[..4].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(RateLimit::decode(&zero), None);
        assert_eq!(RateLimit::decode(&out[..8]), None);
    }
}
