//! A stored token row and audit event as both backends read them, and their
//! decoding: one place for what a readable row is, so SQLite and PostgreSQL
//! refuse the same damaged rows with the same words.

use super::{Action, AuditEvent, Credential, Evidence, PreviousSecret, Result, StoreError, TokenRecord, Use};
use apitokens_core::conditions::Packed;
use apitokens_core::name::TokenName;
use apitokens_core::table::Digest;
use apitokens_core::{Role, Timestamp};
use std::net::IpAddr;

pub(super) const COLUMNS: &str =
    "t.name, t.role, t.secret_sha256, t.create_seconds, t.create_nanos, t.expire_seconds, \
     t.expire_nanos, t.retired, t.created_by, t.previous_sha256, t.previous_until_seconds, t.previous_until_nanos, \
     t.disabled, t.conditions, t.update_seconds";
/// The columns an insert of a token writes, in this order.
pub(super) const INSERTED: &str = "name, namespace, role, secret_sha256, create_seconds, create_nanos, \
     expire_seconds, expire_nanos, update_seconds, retired, created_by, previous_sha256, previous_until_seconds, \
     previous_until_nanos, disabled, conditions";
/// An audit event's columns but its sequence number (the database numbers
/// events) and its namespace (reads select by it), in the order of
/// [`EventRow`].
pub(super) const EVENT_FIELDS: &str = "time_seconds, time_nanos, action, token, actor, role, expire_seconds, \
     expire_nanos, previous_until_seconds, previous_until_nanos, client_address, count, peer_address, credential, \
     policy, conditions";
/// `COLUMNS` and the last use, for the API's reads.
pub(super) const WITH_USE: &str = "LEFT JOIN usage u ON u.name = t.name";
/// The `usage` columns a read selects after `COLUMNS`: the last use, then
/// the evidence in [`Evidence::times`] order.
pub(super) const USE_COLUMNS: &str = "u.last_use_seconds, u.read_seconds, u.write_seconds, u.tokens_seconds, \
     u.past_viewer_seconds, u.past_editor_seconds, u.past_owner_seconds, u.unreported_seconds, u.addresses";
/// The evidence columns of `usage`, in [`Evidence::times`] order.
pub(super) const EVIDENCE: [&str; 7] = [
    "read_seconds",
    "write_seconds",
    "tokens_seconds",
    "past_viewer_seconds",
    "past_editor_seconds",
    "past_owner_seconds",
    "unreported_seconds",
];

/// What a use writes to the evidence columns (`EVIDENCE` order): its time,
/// in seconds, where it did that, else NULL.
pub(super) fn evidence_of(u: &Use) -> [Option<i64>; 7] {
    Evidence::of_use(u.time, u.access)
        .times()
        .map(|t| t.map(|t| t.unix_seconds()))
}

/// A value both backends read from a column.
pub(super) trait Stored: rusqlite::types::FromSql + for<'a> tokio_postgres::types::FromSql<'a> {}

impl<T: rusqlite::types::FromSql + for<'a> tokio_postgres::types::FromSql<'a>> Stored for T {}

/// A row as the backends' drivers give it, read by column number: the
/// positions of the columns are this module's.
pub(super) trait Columns {
    fn width(&self) -> usize;
    fn at<T: Stored>(&self, column: usize) -> Result<T>;
}

/// A row as read: the columns of `COLUMNS`, then the last use if selected.
pub(super) struct Row {
    pub(super) name: String,
    pub(super) role: String,
    pub(super) digest: String,
    pub(super) create: (i64, i64),
    pub(super) expire: (Option<i64>, Option<i64>),
    pub(super) retired: bool,
    pub(super) created_by: Option<String>,
    pub(super) previous: (Option<String>, Option<i64>, Option<i64>),
    pub(super) disabled: bool,
    /// The encoded conditions (`apitokens_core::conditions`).
    pub(super) conditions: Option<Vec<u8>>,
    pub(super) updated: i64,
    pub(super) last_use: Option<i64>,
    pub(super) evidence: [Option<i64>; 7],
    /// The last client addresses ([`merge_addresses`]).
    pub(super) addresses: Option<String>,
}

impl Row {
    /// The columns of `COLUMNS` from column `at` on, then the last use and
    /// the evidence when the query selected them (`USE_COLUMNS`).
    pub(super) fn read(r: &impl Columns, at: usize) -> Result<Self> {
        Ok(Self {
            name: r.at(at)?,
            role: r.at(at + 1)?,
            digest: r.at(at + 2)?,
            create: (r.at(at + 3)?, r.at(at + 4)?),
            expire: (r.at(at + 5)?, r.at(at + 6)?),
            retired: r.at(at + 7)?,
            created_by: r.at(at + 8)?,
            previous: (r.at(at + 9)?, r.at(at + 10)?, r.at(at + 11)?),
            disabled: r.at(at + 12)?,
            conditions: r.at(at + 13)?,
            updated: r.at(at + 14)?,
            last_use: if r.width() > at + 15 { r.at(at + 15)? } else { None },
            evidence: if r.width() > at + 22 {
                [
                    r.at(at + 16)?,
                    r.at(at + 17)?,
                    r.at(at + 18)?,
                    r.at(at + 19)?,
                    r.at(at + 20)?,
                    r.at(at + 21)?,
                    r.at(at + 22)?,
                ]
            } else {
                [None; 7]
            },
            addresses: if r.width() > at + 23 { r.at(at + 23)? } else { None },
        })
    }
}

/// At most this many last client addresses per token.
pub const LAST_ADDRESSES: usize = 5;

/// The last client addresses as stored (`address@unix_seconds`, the
/// latest first, joined by commas), with `seen` at `at` merged in: each
/// address once, at its latest time, at most [`LAST_ADDRESSES`]. What does
/// not read back (a hand edit) is dropped, never an error: the list is a
/// hint, not a record.
pub(super) fn merge_addresses(stored: Option<&str>, seen: &[IpAddr], at: i64) -> String {
    let mut all = read_addresses(stored);
    for address in seen {
        let address = address.to_canonical();
        match all.iter_mut().find(|(a, _)| *a == address) {
            Some((_, t)) => *t = (*t).max(at),
            None => all.push((address, at)),
        }
    }
    // The latest first; at the same second, in address order (stable
    // whatever order the reports came in).
    all.sort_by(|(a, t), (b, u)| u.cmp(t).then(a.cmp(b)));
    all.truncate(LAST_ADDRESSES);
    all.iter()
        .map(|(a, t)| format!("{a}@{t}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn read_addresses(stored: Option<&str>) -> Vec<(IpAddr, i64)> {
    stored
        .unwrap_or_default()
        .split(',')
        .filter_map(|item| {
            let (address, time) = item.split_once('@')?;
            Some((address.parse().ok()?, time.parse().ok()?))
        })
        .collect()
}

pub(super) fn time(secs: i64, nanos: i64) -> Option<Timestamp> {
    u32::try_from(nanos)
        .ok()
        .filter(|n| *n < 1_000_000_000)
        .map(|n| Timestamp::from_unix(secs, n))
}

pub(super) fn optional_time(pair: (Option<i64>, Option<i64>)) -> Result<Option<Timestamp>, ()> {
    match pair {
        (None, None) => Ok(None),
        (Some(s), Some(n)) => time(s, n).map(Some).ok_or(()),
        _ => Err(()),
    }
}

/// A row as a record; a row that does not decode is an error naming it.
pub(super) fn decode(row: Row) -> Result<TokenRecord, StoreError> {
    let name = row.name;
    let corrupt = |problem: &str| StoreError::Corrupt {
        name: name.clone(),
        problem: problem.to_owned(),
    };
    TokenName::parse(&name).map_err(|_| corrupt("not a token name"))?;
    let previous = match row.previous {
        (None, None, None) => None,
        (Some(digest), s, n) => Some(PreviousSecret {
            digest: Digest::from_hex(&digest).ok_or_else(|| corrupt("previous_sha256 is not a digest"))?,
            until: optional_time((s, n))
                .ok()
                .flatten()
                .ok_or_else(|| corrupt("bad previous_until time"))?,
        }),
        _ => return Err(corrupt("bad previous_until time")),
    };
    Ok(TokenRecord {
        conditions: row
            .conditions
            .map(Packed::from_bytes)
            .transpose()
            .map_err(|_| corrupt("conditions do not decode"))?,
        role: Role::parse(&row.role).ok_or_else(|| corrupt("unknown role"))?,
        digest: Digest::from_hex(&row.digest).ok_or_else(|| corrupt("secret_sha256 is not a digest"))?,
        create_time: time(row.create.0, row.create.1).ok_or_else(|| corrupt("bad create time"))?,
        expire_time: optional_time(row.expire).map_err(|()| corrupt("bad expire time"))?,
        retired: row.retired,
        created_by: row.created_by,
        previous,
        last_use: row.last_use.map(|s| Timestamp::from_unix(s, 0)),
        last_addresses: read_addresses(row.addresses.as_deref())
            .into_iter()
            .take(LAST_ADDRESSES)
            .map(|(a, t)| (a, Timestamp::from_unix(t, 0)))
            .collect(),
        update_time: Timestamp::from_unix(row.updated, 0),
        evidence: Evidence::from_times(row.evidence.map(|t| t.map(|s| Timestamp::from_unix(s, 0)))),
        disabled: row.disabled,
        name: name.clone(),
    })
}

pub(super) fn split(t: Option<Timestamp>) -> (Option<i64>, Option<u32>) {
    (t.map(|t| t.unix_seconds()), t.map(|t| t.subsec_nanos()))
}

/// An audit event as read: its sequence number, then the columns of the
/// `events` table.
pub(super) struct EventRow {
    pub(super) seq: i64,
    pub(super) time: (i64, i64),
    pub(super) action: String,
    pub(super) token: Option<String>,
    pub(super) actor: String,
    pub(super) role: Option<String>,
    pub(super) expire: (Option<i64>, Option<i64>),
    pub(super) until: (Option<i64>, Option<i64>),
    pub(super) client_address: Option<String>,
    pub(super) count: Option<u32>,
    pub(super) peer_address: Option<String>,
    pub(super) credential: Option<String>,
    pub(super) policy: Option<String>,
    pub(super) conditions: Option<String>,
}

impl EventRow {
    /// `seq`, then the columns of [`EVENT_FIELDS`].
    pub(super) fn read(r: &impl Columns) -> Result<Self> {
        let count: Option<i64> = r.at(12)?;
        Ok(Self {
            seq: r.at(0)?,
            time: (r.at(1)?, r.at(2)?),
            action: r.at(3)?,
            token: r.at(4)?,
            actor: r.at(5)?,
            role: r.at(6)?,
            expire: (r.at(7)?, r.at(8)?),
            until: (r.at(9)?, r.at(10)?),
            client_address: r.at(11)?,
            count: count.and_then(|c| u32::try_from(c).ok()),
            peer_address: r.at(13)?,
            credential: r.at(14)?,
            policy: r.at(15)?,
            conditions: r.at(16)?,
        })
    }
}

/// An optional column that must parse when present.
fn parse_optional<T>(text: Option<&str>, parse: impl Fn(&str) -> Option<T>) -> Result<Option<T>, ()> {
    text.map(|t| parse(t).ok_or(())).transpose()
}

/// An event row of `namespace` as an event; one that does not decode is an
/// error naming it.
pub(super) fn decode_event(row: EventRow, namespace: &str) -> Result<(u64, AuditEvent), StoreError> {
    let seq = row.seq;
    let corrupt = |problem: &str| StoreError::Corrupt {
        name: format!("audit event {seq}"),
        problem: problem.to_owned(),
    };
    let event = AuditEvent {
        time: time(row.time.0, row.time.1).ok_or_else(|| corrupt("bad time"))?,
        namespace: namespace.to_owned(),
        action: Action::parse(&row.action).ok_or_else(|| corrupt("unknown action"))?,
        token: row.token,
        actor: row.actor,
        role: parse_optional(row.role.as_deref(), Role::parse).map_err(|()| corrupt("unknown role"))?,
        expire_time: optional_time(row.expire).map_err(|()| corrupt("bad expire time"))?,
        previous_until: optional_time(row.until).map_err(|()| corrupt("bad previous_until time"))?,
        client_address: row.client_address,
        peer_address: row.peer_address,
        credential: parse_optional(row.credential.as_deref(), Credential::parse)
            .map_err(|()| corrupt("unknown credential"))?,
        count: row.count,
        policy: row.policy,
        conditions: row.conditions,
    };
    Ok((u64::try_from(seq).unwrap_or(0), event))
}
