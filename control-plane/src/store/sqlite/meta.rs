//! The `meta` table: where the store stands (its epoch and revision, what
//! it is behind), where its change log starts, and its lineage, one integer
//! per key.

use crate::store::{Cause, Epoch, Head, Position, Result, Revision};
use apitokens_core::compact::{Lineage, LINEAGE_LEN};
use rusqlite::{params, OptionalExtension, Transaction};

pub(super) fn set_meta(tx: &Transaction<'_>, key: &str, value: i64) -> Result<()> {
    tx.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![key, value],
    )?;
    Ok(())
}

pub(super) fn meta(tx: &Transaction<'_>, key: &str) -> Result<i64> {
    Ok(tx.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))?)
}

pub(super) fn meta_opt(tx: &Transaction<'_>, key: &str) -> Result<Option<i64>> {
    Ok(tx
        .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()?)
}

/// Where the store stands: epoch, revision, and what it is behind.
pub(super) fn head(tx: &Transaction<'_>) -> Result<Head> {
    let at = |e: i64, r: i64| Position::new(Epoch::from_i64(e), Revision::from_i64(r));
    let behind = match (meta_opt(tx, "behind_epoch")?, meta_opt(tx, "behind_revision")?) {
        (Some(e), Some(r)) => Some(at(e, r)),
        _ => None,
    };
    let at = at(meta(tx, "epoch")?, meta(tx, "revision")?);
    Ok(Head { at, behind })
}

pub(super) fn new_lineage(tx: &Transaction<'_>) -> Result<()> {
    let mut bytes = [0u8; LINEAGE_LEN];
    getrandom::fill(&mut bytes).map_err(Cause::Random)?;
    let (hi, lo) = bytes.split_at(8);
    let word = |b: &[u8]| i64::from_le_bytes(b.try_into().unwrap_or_default());
    set_meta(tx, "lineage_hi", word(hi))?;
    set_meta(tx, "lineage_lo", word(lo))
}

pub(super) fn lineage_of(tx: &Transaction<'_>) -> Result<Lineage> {
    let mut out = [0u8; LINEAGE_LEN];
    let (hi, lo) = out.split_at_mut(8);
    hi.copy_from_slice(&meta(tx, "lineage_hi")?.to_le_bytes());
    lo.copy_from_slice(&meta(tx, "lineage_lo")?.to_le_bytes());
    Ok(out)
}
