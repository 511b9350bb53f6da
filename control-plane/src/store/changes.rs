//! The change log's rules, the same in both backends. Every write records
//! the names it changed under the revision it commits, so that a process at
//! revision R reads only what changed since ([`Store::changes_since`]). The
//! log is bounded: it keeps the last [`CHANGES_KEPT`] revisions, and a write
//! of more than [`CHANGES_PER_WRITE`] tokens restarts it; whoever is behind
//! what it reaches back to loads everything.
//!
//! [`Store::changes_since`]: super::Store::changes_since

use super::{Changes, Head, Revision};

/// Revisions the change log keeps: a replica further behind loads everything.
pub(super) const CHANGES_KEPT: u64 = 10_000;
/// A write that changes more tokens than this (a bulk import) restarts the
/// change log instead of listing them: whoever is behind loads everything.
pub(super) const CHANGES_PER_WRITE: usize = 10_000;
/// The log is cut every this many revisions (not at every write: a delete
/// of old rows per write would double the cost of a write).
const PRUNE_EVERY: i64 = 1000;

/// Whether a write that changes `count` tokens restarts the log (from its
/// own revision) instead of listing them.
pub(super) fn restarts(count: usize) -> bool {
    count > CHANGES_PER_WRITE
}

/// After a write at `revision`: the revision through which the log is cut
/// (its entries deleted, and the log then starts there), if it is cut now.
pub(super) fn cut_through(revision: i64) -> Option<i64> {
    let kept = i64::try_from(CHANGES_KEPT).unwrap_or(i64::MAX);
    (revision % PRUNE_EVERY == 0 && revision > kept).then(|| revision - kept)
}

/// What `changes_since(since)` answers without reading the log, given where
/// the log starts and where the store is: everything (the log does not
/// reach back that far), or nothing (`since` is at or past the head). `None`:
/// read the names logged after `since`.
pub(super) fn answer_unread(since: Revision, log_from: Revision, head: Head) -> Option<Changes> {
    if since < log_from {
        return Some(Changes::TooOld);
    }
    (since >= head.at.revision).then(|| Changes::Since {
        head,
        changed: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Epoch, Position};

    #[test]
    fn the_log_is_cut_every_thousand_revisions_keeping_the_last_ten_thousand() {
        assert_eq!(cut_through(999), None);
        assert_eq!(cut_through(10_000), None, "nothing older than what is kept yet");
        assert_eq!(cut_through(11_000), Some(1_000));
        assert_eq!(cut_through(11_001), None);
        assert_eq!(cut_through(11_500), None, "only every thousandth revision");
        assert!(!restarts(CHANGES_PER_WRITE) && restarts(CHANGES_PER_WRITE + 1));
    }

    #[test]
    fn what_is_answered_without_reading_the_log() {
        let head = Head {
            at: Position::new(Epoch(1), Revision(7)),
            behind: None,
        };
        assert_eq!(answer_unread(Revision(2), Revision(3), head), Some(Changes::TooOld));
        let nothing = Some(Changes::Since {
            head,
            changed: Vec::new(),
        });
        assert_eq!(answer_unread(Revision(7), Revision(3), head), nothing);
        assert_eq!(answer_unread(Revision(9), Revision(3), head), nothing);
        assert_eq!(answer_unread(Revision(3), Revision(3), head), None);
    }
}
