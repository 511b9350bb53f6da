//! The schema: versioned migrations (`control-plane/migrations/postgres/`),
//! applied in one transaction under an advisory lock when a process opens
//! the store, and the store's lineage, made by the first process that opened
//! it.

use super::PostgresStore;
use crate::store::{Cause, Epoch, Result};
use apitokens_core::compact::{Lineage, LINEAGE_LEN};

/// The migrations, in order; version N is the N-th.
const MIGRATIONS: &[(&str, &str)] = &[
    (
        "0001_tokens",
        include_str!("../../../migrations/postgres/0001_tokens.sql"),
    ),
    (
        "0002_replicas",
        include_str!("../../../migrations/postgres/0002_replicas.sql"),
    ),
    (
        "0003_rotation_usage_audit",
        include_str!("../../../migrations/postgres/0003_rotation_usage_audit.sql"),
    ),
    (
        "0004_epochs_and_digests",
        include_str!("../../../migrations/postgres/0004_epochs_and_digests.sql"),
    ),
    (
        "0005_audit_credential_peer",
        include_str!("../../../migrations/postgres/0005_audit_credential_peer.sql"),
    ),
    (
        "0006_disabled_tokens",
        include_str!("../../../migrations/postgres/0006_disabled_tokens.sql"),
    ),
    (
        "0007_webhooks",
        include_str!("../../../migrations/postgres/0007_webhooks.sql"),
    ),
    (
        "0008_access_evidence",
        include_str!("../../../migrations/postgres/0008_access_evidence.sql"),
    ),
    (
        "0009_token_conditions",
        include_str!("../../../migrations/postgres/0009_token_conditions.sql"),
    ),
    (
        "0010_last_addresses",
        include_str!("../../../migrations/postgres/0010_last_addresses.sql"),
    ),
    (
        "0011_inactivity_policies",
        include_str!("../../../migrations/postgres/0011_inactivity_policies.sql"),
    ),
    (
        "0012_event_conditions",
        include_str!("../../../migrations/postgres/0012_event_conditions.sql"),
    ),
];

/// Serialises schema changes between processes opening the store at once
/// (an arbitrary constant: "apitoken" in ASCII).
const MIGRATION_LOCK: i64 = 0x6170_6974_6f6b_656e;

/// Applies the migrations this database lacks; returns the store's lineage.
/// A database migrated by a newer apitokens is refused.
pub(super) async fn migrate(store: &PostgresStore) -> Result<Lineage> {
    let mut conn = store.conn().await?;
    let tx = conn.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS apitokens_migrations (
             version    integer PRIMARY KEY,
             name       text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await?;
    let applied: i32 = tx
        .query_one("SELECT coalesce(max(version), 0) FROM apitokens_migrations", &[])
        .await?
        .try_get(0)?;
    let known = i32::try_from(MIGRATIONS.len()).unwrap_or(i32::MAX);
    if applied > known {
        return Err(Cause::NewerSchema {
            found: applied.into(),
            known: known.into(),
        }
        .into());
    }
    for (version, (name, sql)) in (1..).zip(MIGRATIONS).skip(usize::try_from(applied).unwrap_or(0)) {
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO apitokens_migrations (version, name) VALUES ($1, $2)",
            &[&version, name],
        )
        .await?;
        tracing::info!("store: applied migration {name}");
    }
    let mut lineage = [0u8; LINEAGE_LEN];
    getrandom::fill(&mut lineage).map_err(Cause::Random)?;
    tx.execute(
        "INSERT INTO store_state (id, revision, changes_from, lineage, epoch) VALUES (1, 0, 0, $1, $2)
         ON CONFLICT (id) DO NOTHING",
        &[&&lineage[..], &Epoch::after(Epoch(0)).to_i64()],
    )
    .await?;
    let stored: Vec<u8> = tx
        .query_one("SELECT lineage FROM store_state WHERE id = 1", &[])
        .await?
        .try_get(0)?;
    tx.commit().await?;
    Ok(stored.try_into().map_err(|_| Cause::BadLineage)?)
}
