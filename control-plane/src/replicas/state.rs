//! The rules of one replica among several on one PostgreSQL database, as a
//! plain state machine: heartbeat answers (with the database's clock), the
//! rows read and the time go in; what to do, whether this replica is live,
//! which other replicas count and what to write come out. No database and no
//! clock here: the [`Coordinator`](super::Coordinator) calls the store and
//! passes `now`.
//!
//! Each replica, through the [`Coordinator`](super::Coordinator):
//! - registers itself in `replicas` (a random id per start, and its
//!   `--replica-name`), and heartbeats there every quarter of
//!   `--replica-timeout-ms`;
//! - records its connected Envoy streams in `envoy_streams` whenever one
//!   connects, ACKs, NACKs or goes (one transaction), and `NOTIFY
//!   apitokens_envoys`; its filter VMs' delta streams too (rows of the same
//!   table, told apart by their status's `vm`, numbered with the Envoy
//!   streams), so that a write on any replica waits for a VM connected to
//!   any other, and an ECDS stream on one replica sends its node a snapshot
//!   at once when a VM of that node, connected to another, awaits one;
//! - reads the other replicas' streams at each such notification and at each
//!   heartbeat, and hands them to its ACK tracker, where waiting writes
//!   count them like its own.
//!
//! A replica whose heartbeat is older than the timeout (killed, or cut off
//! from the database) is shown as not live, and no write waits for its
//! Envoys any more: they reconnect to another replica, where they count
//! again. A replica that has not reached the database for the timeout
//! knows it is such a replica ([`State::live`]): it stops serving xDS
//! (streams closed, port closed), so that its Envoys move to a live replica
//! instead of waiting on one that cannot see the writes. After a database
//! outage every heartbeat is old: for one timeout after it is back, a
//! replica still counts the others that were alive when it last reached the
//! database (their heartbeats were at most a timeout older than its own last
//! one), so nobody alive is dropped by mistake and nobody dead before the
//! outage comes back. A restarted replica is a new one (same name, new id):
//! its predecessor's row stops beating and stops counting like any other.
//! Rows of replicas silent for [`FORGET_AFTER`] are deleted (not right after
//! an outage, when every heartbeat is old); a clean shutdown deletes its own
//! at once.

use crate::store::{DbTime, ReplicaRow, Stale, StreamRow, StreamsWrite};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// How long the rows of a replica that stopped heartbeating stay (shown on
/// `/status` as not live) before any replica deletes them.
pub const FORGET_AFTER: Duration = Duration::from_secs(60);

/// The shortest timeout: heartbeats every 50 ms at most.
const MIN_TIMEOUT: Duration = Duration::from_millis(200);

/// A heartbeat's answer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Beat {
    /// The database stamped this replica's row, at this time of its clock.
    Stamped(DbTime),
    /// This replica's row is gone: the others forgot it (silent for
    /// [`FORGET_AFTER`]).
    Forgotten,
    /// No answer: an error, or none in time.
    Failed,
}

/// What the coordinator does after a heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// Nothing new.
    Steady,
    /// Register again, then tell [`State::on_registered`].
    Register,
    /// The first failed heartbeat since the database last answered (said
    /// once an outage).
    Lost,
    /// The database answers again after an outage.
    Back,
}

/// One replica's standing with the database, and what it last wrote there.
#[derive(Debug)]
pub(crate) struct State {
    timeout: Duration,
    /// Since when the database answers (`None`: it does not).
    ok_since: Option<Instant>,
    /// The last heartbeat the database answered.
    last_ok: Instant,
    /// The database's clock at this replica's last heartbeat.
    last_beat: Option<DbTime>,
    /// During an outage and for a timeout after it: `last_beat` when the
    /// outage began.
    outage_from: Option<DbTime>,
    /// This replica's streams as last written (their status as JSON).
    written: BTreeMap<u64, String>,
    /// Everything must be written again, whatever changed: what the
    /// database holds is not known (at the start, after a failed write or
    /// an outage, once registered again).
    rewrite: bool,
}

impl State {
    /// The timeout `--replica-timeout-ms` asks for, within what heartbeats
    /// can keep.
    pub(crate) fn timeout(asked: Duration) -> Duration {
        asked.max(MIN_TIMEOUT)
    }

    /// A replica that registered at `now`.
    pub(crate) fn new(timeout: Duration, now: Instant) -> Self {
        Self {
            timeout,
            ok_since: Some(now),
            last_ok: now,
            last_beat: None,
            outage_from: None,
            written: BTreeMap::new(),
            rewrite: true,
        }
    }

    /// Whether this replica reached the database within the timeout: while
    /// not, it serves no xDS.
    pub(crate) fn live(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last_ok) < self.timeout
    }

    /// Whether the database answers: only then are streams shared and read
    /// at a heartbeat.
    pub(crate) fn answering(&self) -> bool {
        self.ok_since.is_some()
    }

    /// The next heartbeat deletes the rows of replicas silent for longer
    /// than this; `None`: not now (during an outage and for a timeout after
    /// it, every heartbeat is old).
    pub(crate) fn forget_after(&self) -> Option<Duration> {
        (self.outage_from.is_none() && self.ok_since.is_some()).then_some(FORGET_AFTER)
    }

    pub(crate) fn on_heartbeat(&mut self, beat: Beat, now: Instant) -> Action {
        let stamped = match beat {
            Beat::Failed => {
                if self.outage_from.is_none() {
                    self.outage_from = self.last_beat;
                }
                self.rewrite = true;
                return if self.ok_since.take().is_some() {
                    Action::Lost
                } else {
                    Action::Steady
                };
            }
            Beat::Stamped(at) => Some(at),
            Beat::Forgotten => None,
        };
        self.last_ok = now;
        if stamped.is_some() {
            self.last_beat = stamped;
        }
        if self
            .ok_since
            .is_some_and(|since| now.saturating_duration_since(since) >= self.timeout)
        {
            self.outage_from = None;
        }
        match stamped {
            Some(_) => self.answered(now),
            None => Action::Register,
        }
    }

    /// Registered again after [`Action::Register`]: its streams are gone
    /// from the database.
    pub(crate) fn on_registered(&mut self, now: Instant) -> Action {
        self.written.clear();
        self.rewrite = true;
        self.answered(now)
    }

    fn answered(&mut self, now: Instant) -> Action {
        if self.ok_since.is_some() {
            return Action::Steady;
        }
        self.ok_since = Some(now);
        self.rewrite = true;
        Action::Back
    }

    /// Whether `replica`'s Envoys count for writes (and it shows as live).
    /// `this`: it is this replica, which counts while it runs.
    pub(crate) fn counts(&self, replica: &ReplicaRow, this: bool) -> bool {
        // Right after an outage: alive when this replica last reached the
        // database.
        let spared = || {
            self.outage_from
                .is_some_and(|from| replica.beat >= from.minus(self.timeout))
        };
        this || replica.silent_for < self.timeout || spared()
    }

    /// Whether the next heartbeat writes this replica's streams whatever
    /// changed.
    pub(crate) fn must_rewrite(&self) -> bool {
        self.rewrite
    }

    /// What to write so that the database holds `current`, this replica's
    /// streams by number; `None`: it does already.
    pub(crate) fn to_write(&self, current: &BTreeMap<u64, StreamRow>) -> Option<StreamsWrite> {
        if self.rewrite {
            return Some(StreamsWrite {
                stale: Stale::AllBut(current.keys().copied().collect()),
                rows: current.values().cloned().collect(),
            });
        }
        let changed: Vec<StreamRow> = current
            .iter()
            .filter(|(n, row)| self.written.get(n) != Some(&row.status))
            .map(|(_, row)| row.clone())
            .collect();
        let gone: Vec<u64> = self
            .written
            .keys()
            .filter(|n| !current.contains_key(n))
            .copied()
            .collect();
        (!changed.is_empty() || !gone.is_empty()).then_some(StreamsWrite {
            stale: Stale::These(gone),
            rows: changed,
        })
    }

    /// The write of `current` committed.
    pub(crate) fn on_written(&mut self, current: BTreeMap<u64, StreamRow>) {
        self.written = current.into_iter().map(|(n, row)| (n, row.status)).collect();
        self.rewrite = false;
    }

    /// A write failed: whatever it held may or may not be there.
    pub(crate) fn on_write_failed(&mut self) {
        self.rewrite = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_millis(1000);

    /// A fake clock: `ms` milliseconds after a start.
    struct Clock(Instant);

    impl Clock {
        fn at(&self, ms: u64) -> Instant {
            self.0 + Duration::from_millis(ms)
        }
    }

    /// The database's clock at `ms` of the fake clock (the two need not
    /// agree: only differences on each count).
    fn db(ms: u64) -> DbTime {
        DbTime(1_000_000.0 + ms as f64 / 1000.0)
    }

    /// Whether `s` counts another replica, `id`, whose last beat was at
    /// `beat_ms`, as read at `now_ms`.
    fn counts(s: &State, id: &str, beat_ms: u64, now_ms: u64) -> bool {
        let row = ReplicaRow {
            id: id.into(),
            name: "r".into(),
            silent_for: Duration::from_millis(now_ms - beat_ms),
            beat: db(beat_ms),
            streams: Vec::new(),
        };
        s.counts(&row, false)
    }

    fn stream(n: u64, status: &str) -> (u64, StreamRow) {
        let row = StreamRow {
            stream: n,
            acked: None,
            nacked: None,
            status: status.into(),
        };
        (n, row)
    }

    /// A replica started at 0 that beat every quarter timeout until `ms`.
    fn beating_until(ms: u64) -> (Clock, State) {
        let clock = Clock(Instant::now());
        let mut s = State::new(TIMEOUT, clock.at(0));
        for t in (250..=ms).step_by(250) {
            let action = s.on_heartbeat(Beat::Stamped(db(t)), clock.at(t));
            assert_eq!(action, Action::Steady, "at {t}");
        }
        (clock, s)
    }

    #[test]
    fn heartbeats_keep_this_replica_live_and_the_others_counting() {
        let (clock, s) = beating_until(2000);
        assert!(s.live(clock.at(2000)) && s.answering());
        assert!(s.live(clock.at(2999)), "between two beats");
        assert_eq!(s.forget_after(), Some(FORGET_AFTER));
        assert!(counts(&s, "b1", 1900, 2000));
        assert_eq!(State::timeout(Duration::from_millis(10)), MIN_TIMEOUT);
        assert_eq!(State::timeout(TIMEOUT), TIMEOUT);
    }

    #[test]
    fn a_replica_whose_heartbeat_is_older_than_the_timeout_stops_counting() {
        let (_, s) = beating_until(5000);
        let by_last_beat = [4001, 4000, 0].map(|beat| counts(&s, "b1", beat, 5000));
        assert_eq!(by_last_beat, [true, false, false]);
        // This replica counts while it runs, whatever its row says.
        let this = ReplicaRow {
            id: "a1".into(),
            name: "a".into(),
            silent_for: Duration::from_secs(5),
            beat: db(0),
            streams: Vec::new(),
        };
        assert!(s.counts(&this, true));
    }

    #[test]
    fn an_outage_of_our_own_stops_xds_and_spares_only_those_alive_at_our_last_beat() {
        let (clock, mut s) = beating_until(10_000);
        // b beat just before our last beat; c died more than a timeout
        // before it.
        let (b, c) = (9_900, 8_900);
        assert_eq!(s.on_heartbeat(Beat::Failed, clock.at(10_250)), Action::Lost);
        let again = s.on_heartbeat(Beat::Failed, clock.at(10_500));
        assert_eq!(again, Action::Steady, "said once");
        assert!(!s.answering());
        assert_eq!(s.forget_after(), None, "every heartbeat is old");
        assert!(s.live(clock.at(10_999)), "within a timeout of the last answer");
        assert!(!s.live(clock.at(11_000)), "a timeout without an answer: no xDS");
        for t in (10_750..=20_000).step_by(250) {
            s.on_heartbeat(Beat::Failed, clock.at(t));
        }
        assert!(!s.live(clock.at(20_000)));
        // Whatever is read meanwhile: b counts, c does not.
        assert_eq!(
            (counts(&s, "b1", b, 20_000), counts(&s, "c1", c, 20_000)),
            (true, false)
        );

        // The database is back.
        let back = s.on_heartbeat(Beat::Stamped(db(20_250)), clock.at(20_250));
        assert_eq!(back, Action::Back);
        assert!(s.live(clock.at(20_250)) && s.answering() && s.must_rewrite());
        assert_eq!(s.forget_after(), None, "not for a timeout after the outage");
        // For one timeout after it is back, b (silent since, its heartbeats
        // as old as ours were) still counts; c still not.
        s.on_heartbeat(Beat::Stamped(db(20_500)), clock.at(20_500));
        assert_eq!(
            (counts(&s, "b1", b, 20_500), counts(&s, "c1", c, 20_500)),
            (true, false)
        );
        // A timeout after: as always, by the age of their heartbeats.
        s.on_heartbeat(Beat::Stamped(db(21_250)), clock.at(21_250));
        assert!(!counts(&s, "b1", b, 21_250));
        assert!(counts(&s, "b1", 21_000, 21_250), "b beats again");
        assert_eq!(s.forget_after(), Some(FORGET_AFTER));
    }

    #[test]
    fn an_outage_before_any_beat_spares_nobody() {
        // No beat yet: nothing to measure the others by.
        let clock = Clock(Instant::now());
        let mut s = State::new(TIMEOUT, clock.at(0));
        assert_eq!(s.on_heartbeat(Beat::Failed, clock.at(250)), Action::Lost);
        assert!(!counts(&s, "b1", 0, 5_000));
    }

    #[test]
    fn a_restarted_replica_replaces_its_predecessor() {
        // r3 was killed at 7000 and started again, a new id, at 9500 (its
        // last beat 9750).
        let (clock, mut s) = beating_until(10_000);
        let (old, new) = (7_000, 9_750);
        assert_eq!(
            (counts(&s, "old", old, 10_000), counts(&s, "new", new, 10_000)),
            (false, true)
        );
        // The same during an outage of ours: the predecessor, dead more than
        // a timeout before our last beat, is not spared; its successor,
        // alive at our last beat, is.
        s.on_heartbeat(Beat::Failed, clock.at(10_250));
        assert_eq!(
            (counts(&s, "old", old, 12_000), counts(&s, "new", new, 12_000)),
            (false, true)
        );
    }

    #[test]
    fn rows_silent_for_long_are_forgotten_and_a_forgotten_replica_registers_again() {
        let (clock, mut s) = beating_until(1000);
        assert_eq!(s.forget_after(), Some(FORGET_AFTER));
        // The others forgot this replica (its row is gone): back in, and
        // its streams written whole.
        let current: BTreeMap<u64, StreamRow> = [stream(1, "a")].into();
        s.on_written(current.clone());
        assert_eq!(s.on_heartbeat(Beat::Forgotten, clock.at(1250)), Action::Register);
        assert!(s.live(clock.at(1250)));
        assert_eq!(s.on_registered(clock.at(1260)), Action::Steady);
        let write = s.to_write(&current).unwrap();
        assert_eq!(write.stale, Stale::AllBut(vec![1]));
        assert_eq!(write.rows.len(), 1);
    }

    #[test]
    fn only_what_changed_is_written_and_everything_after_a_failure() {
        let clock = Clock(Instant::now());
        let mut s = State::new(TIMEOUT, clock.at(0));
        let mut current: BTreeMap<u64, StreamRow> = [stream(1, "a"), stream(2, "b")].into();
        // At the start: everything, and every other stream of ours goes.
        let write = s.to_write(&current).unwrap();
        assert_eq!((write.stale, write.rows.len()), (Stale::AllBut(vec![1, 2]), 2));
        s.on_written(current.clone());
        assert_eq!(s.to_write(&current), None, "nothing changed");
        // Stream 2 changed, 3 came, 1 went.
        current.extend([stream(2, "b2"), stream(3, "c")]);
        current.remove(&1);
        let write = s.to_write(&current).unwrap();
        assert_eq!(write.stale, Stale::These(vec![1]));
        assert_eq!(write.rows.iter().map(|r| r.stream).collect::<Vec<_>>(), [2, 3]);
        // The write failed: the next one is whole.
        s.on_write_failed();
        assert_eq!(s.to_write(&current).unwrap().stale, Stale::AllBut(vec![2, 3]));
        s.on_written(current.clone());
        // A failed heartbeat: whole again, once the database answers.
        s.on_heartbeat(Beat::Failed, clock.at(250));
        assert!(s.must_rewrite());
        s.on_heartbeat(Beat::Stamped(db(500)), clock.at(500));
        assert_eq!(s.to_write(&current).unwrap().stale, Stale::AllBut(vec![2, 3]));
        s.on_written(current.clone());
        assert!(!s.must_rewrite());
    }
}
