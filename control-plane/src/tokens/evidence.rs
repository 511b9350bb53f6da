//! Least privilege from evidence: what a token's admitted requests did in
//! the last days (the filters report it with each use, `apitokens_core::access`),
//! and the narrowest role that would have admitted all of it. A suggestion,
//! never an action: the evidence starts when the filters first reported it,
//! a token idle in the window has none, and while a use from an older
//! filter (which reports uses only) is in the window no role is suggested.

use crate::store::Evidence;
use apitokens_core::access::Kind;
use apitokens_core::{Role, Timestamp};

/// The window by default, in days.
pub const DEFAULT_DAYS: u32 = 30;

/// What a token did in the window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessSummary {
    /// The window's length.
    pub days: u32,
    /// The kinds of access seen, in [`Kind::ALL`] order; never empty.
    pub kinds: Vec<Kind>,
    /// Every use in the window said what it did: `false` when some came
    /// from filters older than the access byte.
    pub complete: bool,
    /// The narrowest role that would have admitted every request seen;
    /// `None` if the evidence is incomplete (the unreported uses may have
    /// needed more), or no role would have (custom rules that no single
    /// role satisfies).
    pub narrowest: Option<Role>,
}

/// What `evidence` shows in the `days` before `now`; `None` without any.
pub fn summarize(evidence: &Evidence, now: Timestamp, days: u32) -> Option<AccessSummary> {
    let since = Timestamp::from_unix(now.unix_seconds().saturating_sub(i64::from(days) * 86_400), 0);
    let seen = evidence.since(since);
    let kinds: Vec<Kind> = Kind::ALL.into_iter().filter(|k| seen.has(*k)).collect();
    if kinds.is_empty() {
        return None;
    }
    let complete = !seen.is_unreported();
    Some(AccessSummary {
        days,
        kinds,
        complete,
        narrowest: seen.narrowest_role().filter(|_| complete),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use apitokens_core::access::Access;
    use apitokens_core::role::RoleSet;

    const DAY: i64 = 86_400;

    fn at(day: i64) -> Timestamp {
        Timestamp::from_unix(1_800_000_000 + day * DAY, 0)
    }

    #[test]
    fn the_window_keeps_what_is_recent_and_forgets_the_rest() {
        let editors = RoleSet::NONE.with(Role::Editor).with(Role::Owner);
        // A write 40 days ago, reads since.
        let mut evidence = Evidence::of_use(at(0), Access::admitted(Kind::Write, editors));
        let read = Evidence::of_use(at(35), Access::admitted(Kind::Read, RoleSet::ALL));
        evidence.kinds[0] = read.kinds[0];
        let now = at(40);
        let month = summarize(&evidence, now, 30).unwrap();
        assert_eq!(month.kinds, [Kind::Read]);
        assert_eq!(month.narrowest, Some(Role::Viewer));
        // Over 60 days the write counts: an editor would be needed.
        let two = summarize(&evidence, now, 60).unwrap();
        assert_eq!(two.kinds, [Kind::Read, Kind::Write]);
        assert_eq!(two.narrowest, Some(Role::Editor));
        // Nothing in the last 2 days: no claim at all.
        assert_eq!(summarize(&evidence, now, 2), None);
        assert_eq!(summarize(&Evidence::default(), now, 30), None);
        // The window's first second is in it.
        assert!(summarize(&evidence, at(65), 30).is_some());
        assert_eq!(
            summarize(&evidence, Timestamp::from_unix(at(65).unix_seconds() + 1, 0), 30),
            None
        );
        // A use through an older filter in the window: what it did is
        // unknown, so no role is suggested until it leaves the window.
        evidence.unreported = Some(at(20));
        let mixed = summarize(&evidence, now, 30).unwrap();
        assert_eq!(
            (mixed.kinds, mixed.complete, mixed.narrowest),
            (vec![Kind::Read], false, None)
        );
        let later = summarize(&evidence, at(52), 30).unwrap();
        assert_eq!((later.complete, later.narrowest), (true, Some(Role::Viewer)));
    }
}
