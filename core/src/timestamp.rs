//! RFC 3339 timestamps, parsed without a date library: the filter must stay
//! small and `expireTime` is the only time value in the configuration.

use std::fmt;

/// A point in time as seconds and nanoseconds since the Unix epoch (UTC).
/// Ordering is chronological, so expiry checks are plain comparisons.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp {
    secs: i64,
    nanos: u32,
}

/// Why a string is not an accepted timestamp. Deliberately carries no part of
/// the input, so error messages never echo configuration values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimestampError {
    /// Not RFC 3339.
    Syntax,
    /// RFC 3339, but outside [`Timestamp::MIN`]..=[`Timestamp::MAX`] once
    /// its offset is applied.
    OutOfRange,
}

impl fmt::Display for TimestampError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Syntax => "must be an RFC 3339 timestamp such as 2027-01-01T00:00:00Z",
            Self::OutOfRange => {
                "must lie between 0000-01-01T00:00:00Z and 9999-12-31T23:59:59Z (after its offset is applied)"
            }
        })
    }
}

const NANOS_PER_SEC: u32 = 1_000_000_000;

impl Timestamp {
    /// `0000-01-01T00:00:00Z`, the earliest instant accepted anywhere.
    pub const MIN: Self = Self {
        secs: -62_167_219_200,
        nanos: 0,
    };

    /// `9999-12-31T23:59:59Z`, the latest instant accepted anywhere (in the
    /// configuration, the compact encoding, the control plane's API and
    /// store): every accepted timestamp is written back in UTC with a
    /// four-digit year, so what one component accepts every other can read.
    /// An offset can move a wall-clock time past either end
    /// (`9999-12-31T23:59:59-23:59` is in year 10000): parsing checks the
    /// instant, not the digits.
    pub const MAX: Self = Self {
        secs: 253_402_300_799,
        nanos: 0,
    };

    /// Whether this instant lies within [`Self::MIN`]..=[`Self::MAX`].
    pub fn in_range(&self) -> bool {
        (Self::MIN..=Self::MAX).contains(self)
    }

    /// `nanos` beyond one second carry into `secs`.
    pub const fn from_unix(secs: i64, nanos: u32) -> Self {
        Self {
            secs: secs.saturating_add((nanos / NANOS_PER_SEC) as i64),
            nanos: nanos % NANOS_PER_SEC,
        }
    }

    pub const fn unix_seconds(&self) -> i64 {
        self.secs
    }

    pub const fn subsec_nanos(&self) -> u32 {
        self.nanos
    }

    /// Parses `YYYY-MM-DDTHH:MM:SS[.fraction](Z|+HH:MM|-HH:MM)` (RFC 3339
    /// section 5.6; `t` and `z` accepted in lower case as the RFC allows).
    /// A leap second (`:60`) is read as the first second of the next minute.
    /// Fractions beyond nanoseconds are truncated. The instant must lie
    /// within [`Self::MIN`]..=[`Self::MAX`].
    pub fn parse_rfc3339(input: &str) -> Result<Self, TimestampError> {
        let b = input.as_bytes();
        let (date_time, rest) = match b {
            [y0, y1, y2, y3, b'-', m0, m1, b'-', d0, d1, b'T' | b't', h0, h1, b':', i0, i1, b':', s0, s1, rest @ ..] => {
                (
                    [*y0, *y1, *y2, *y3, *m0, *m1, *d0, *d1, *h0, *h1, *i0, *i1, *s0, *s1],
                    rest,
                )
            }
            _ => return Err(TimestampError::Syntax),
        };
        let num = |hi: u8, lo: u8| -> Result<u32, TimestampError> {
            if hi.is_ascii_digit() && lo.is_ascii_digit() {
                Ok(u32::from(hi - b'0') * 10 + u32::from(lo - b'0'))
            } else {
                Err(TimestampError::Syntax)
            }
        };
        let [y0, y1, y2, y3, m0, m1, d0, d1, h0, h1, i0, i1, s0, s1] = date_time;
        let year = i64::from(num(y0, y1)? * 100 + num(y2, y3)?);
        let month = num(m0, m1)?;
        let day = num(d0, d1)?;
        let hour = num(h0, h1)?;
        let minute = num(i0, i1)?;
        let second = num(s0, s1)?;
        if !(1..=12).contains(&month)
            || day == 0
            || day > days_in_month(year, month)
            || hour > 23
            || minute > 59
            || second > 60
        {
            return Err(TimestampError::Syntax);
        }

        let (nanos, rest) = match rest {
            [b'.', frac @ ..] => {
                let digits = frac.iter().take_while(|c| c.is_ascii_digit()).count();
                if digits == 0 {
                    return Err(TimestampError::Syntax);
                }
                let (frac_digits, rest) = frac.split_at(digits);
                let mut nanos = 0u32;
                for i in 0..9 {
                    let d = frac_digits.get(i).map_or(0, |c| u32::from(c - b'0'));
                    nanos = nanos * 10 + d;
                }
                (nanos, rest)
            }
            _ => (0, rest),
        };

        let offset_secs: i64 = match rest {
            [b'Z' | b'z'] => 0,
            [sign @ (b'+' | b'-'), oh0, oh1, b':', om0, om1] => {
                let oh = num(*oh0, *oh1)?;
                let om = num(*om0, *om1)?;
                if oh > 23 || om > 59 {
                    return Err(TimestampError::Syntax);
                }
                let off = i64::from(oh * 3600 + om * 60);
                if *sign == b'-' {
                    -off
                } else {
                    off
                }
            }
            _ => return Err(TimestampError::Syntax),
        };

        let days = days_from_civil(year, month, day);
        let secs = days * 86_400 + i64::from(hour * 3600 + minute * 60 + second) - offset_secs;
        let parsed = Self { secs, nanos };
        if parsed.in_range() {
            Ok(parsed)
        } else {
            Err(TimestampError::OutOfRange)
        }
    }

    /// Formats as RFC 3339 in UTC (`Z`), with a fraction only when there is one.
    pub fn to_rfc3339(&self) -> String {
        let days = self.secs.div_euclid(86_400);
        let sod = self.secs.rem_euclid(86_400);
        let (y, m, d) = civil_from_days(days);
        let (hh, mm, ss) = (sod / 3600, (sod / 60) % 60, sod % 60);
        if self.nanos == 0 {
            format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}Z")
        } else {
            let frac = format!("{:09}", self.nanos);
            let frac = frac.trim_end_matches('0');
            format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}.{frac}Z")
        }
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

// Howard Hinnant's days_from_civil / civil_from_days (proleptic Gregorian).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((month + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}
