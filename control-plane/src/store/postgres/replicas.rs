//! What `serve` replicas on one database share beyond the tokens, as
//! statements: each replica's row in `replicas` (registered at start,
//! heartbeat, deleted when it leaves or by another replica once silent for
//! long), and its Envoy and filter VM streams in `envoy_streams`. A change of
//! either is notified on [`ENVOYS_CHANNEL`]. The rules (when to beat, who
//! counts) are `crate::replicas`'s; this is only what the database holds.

use super::listen::ENVOYS_CHANNEL;
use super::PostgresStore;
use crate::store::{Epoch, Position, Result, Revision};
use std::time::Duration;

/// The database's clock (seconds since the Unix epoch): heartbeats are
/// compared on it, so that the replicas' own clocks never matter.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
pub(crate) struct DbTime(pub f64);

impl DbTime {
    pub(crate) fn minus(self, d: Duration) -> Self {
        Self(self.0 - d.as_secs_f64())
    }
}

/// One stream of a replica as stored: an Envoy's ECDS stream, or a filter
/// VM's delta stream (its status has a `vm`), numbered by the replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct StreamRow {
    pub stream: u64,
    pub acked: Option<Position>,
    pub nacked: Option<(Position, String)>,
    /// The stream as `/status` shows it, as JSON.
    pub status: String,
}

/// A replica as stored, with its streams.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ReplicaRow {
    /// Random, new at every start.
    pub id: String,
    /// `--replica-name`.
    pub name: String,
    /// How long ago it last beat, by the database's clock.
    pub silent_for: Duration,
    /// When it last beat.
    pub beat: DbTime,
    pub streams: Vec<StreamRow>,
}

/// Which stored streams of a replica a write deletes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Stale {
    /// Every one but these: what the database holds is not known (after an
    /// outage, or once registered again).
    AllBut(Vec<u64>),
    /// These, gone since the last write.
    These(Vec<u64>),
}

/// One write of a replica's streams.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct StreamsWrite {
    pub stale: Stale,
    /// Written whole, new or changed.
    pub rows: Vec<StreamRow>,
}

fn number(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn numbers(ns: &[u64]) -> Vec<i64> {
    ns.iter().filter_map(|n| i64::try_from(*n).ok()).collect()
}

/// A stored version: none without a revision (an epoch alone is none).
fn version(epoch: Option<i64>, revision: Option<i64>) -> Option<Position> {
    let revision = u64::try_from(revision?).ok()?;
    Some(Position::new(
        Epoch(epoch.and_then(|e| u64::try_from(e).ok()).unwrap_or(0)),
        Revision(revision),
    ))
}

impl PostgresStore {
    /// Registers the replica `id` (or, registered already, beats).
    pub(crate) async fn register_replica(&self, id: &str, name: &str) -> Result<()> {
        self.conn()
            .await?
            .execute(
                "INSERT INTO replicas (id, name) VALUES ($1, $2)
                 ON CONFLICT (id) DO UPDATE SET heartbeat_at = now()",
                &[&id, &name],
            )
            .await?;
        Ok(())
    }

    /// Stamps the replica's row with the database's clock and returns it;
    /// `None`: the row is gone (forgotten by the others). With
    /// `forget_after`, deletes the rows of the replicas silent for longer
    /// (their streams go with them).
    pub(crate) async fn heartbeat(&self, id: &str, forget_after: Option<Duration>) -> Result<Option<DbTime>> {
        let conn = self.conn().await?;
        let beat = conn
            .query_opt(
                "UPDATE replicas SET heartbeat_at = now() WHERE id = $1
                 RETURNING extract(epoch FROM heartbeat_at)::float8",
                &[&id],
            )
            .await?
            .map(|row| row.try_get(0).map(DbTime))
            .transpose()?;
        if let Some(after) = forget_after {
            conn.execute(
                "DELETE FROM replicas WHERE heartbeat_at < now() - $1 * interval '1 millisecond'",
                &[&(after.as_secs_f64() * 1000.0)],
            )
            .await?;
        }
        Ok(beat)
    }

    /// Writes the replica's streams in one transaction, and tells the other
    /// replicas.
    pub(crate) async fn write_streams(&self, id: &str, write: &StreamsWrite) -> Result<()> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        match &write.stale {
            Stale::AllBut(kept) => {
                tx.execute(
                    "DELETE FROM envoy_streams WHERE replica_id = $1 AND NOT (stream = ANY($2))",
                    &[&id, &numbers(kept)],
                )
                .await?;
            }
            Stale::These(gone) if !gone.is_empty() => {
                tx.execute(
                    "DELETE FROM envoy_streams WHERE replica_id = $1 AND stream = ANY($2)",
                    &[&id, &numbers(gone)],
                )
                .await?;
            }
            Stale::These(_) => {}
        }
        for row in &write.rows {
            let (acked, nacked) = (row.acked, row.nacked.as_ref());
            tx.execute(
                "INSERT INTO envoy_streams (replica_id, stream, acked_version, nacked_version, nack_error, status,
                                            acked_epoch, nacked_epoch)
                 VALUES ($1, $2, $3, $4, $5, $6::text::jsonb, $7, $8)
                 ON CONFLICT (replica_id, stream) DO UPDATE SET acked_version = $3, nacked_version = $4,
                     nack_error = $5, status = $6::text::jsonb, acked_epoch = $7, nacked_epoch = $8",
                &[
                    &id,
                    &number(row.stream),
                    &acked.map(|v| v.revision.to_i64()),
                    &nacked.map(|(v, _)| v.revision.to_i64()),
                    &nacked.map(|(_, e)| e.as_str()),
                    &row.status,
                    &acked.map(|v| v.epoch.to_i64()),
                    &nacked.map(|(v, _)| v.epoch.to_i64()),
                ],
            )
            .await?;
        }
        tx.execute("SELECT pg_notify($1, $2)", &[&ENVOYS_CHANNEL, &id]).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Every replica with its streams, ordered by name, then id, then
    /// stream.
    pub(crate) async fn read_replicas(&self) -> Result<Vec<ReplicaRow>> {
        let rows = self
            .conn()
            .await?
            .query(
                "SELECT r.id, r.name, (extract(epoch FROM now() - r.heartbeat_at) * 1000)::bigint,
                        extract(epoch FROM r.heartbeat_at)::float8, s.stream, s.status::text,
                        s.acked_epoch, s.acked_version, s.nacked_epoch, s.nacked_version, s.nack_error
                 FROM replicas r LEFT JOIN envoy_streams s ON s.replica_id = r.id
                 ORDER BY r.name, r.id, s.stream",
                &[],
            )
            .await?;
        let mut replicas: Vec<ReplicaRow> = Vec::new();
        for row in rows {
            let id: String = row.try_get(0)?;
            if replicas.last().is_none_or(|r| r.id != id) {
                let silent_ms: i64 = row.try_get(2)?;
                replicas.push(ReplicaRow {
                    id,
                    name: row.try_get(1)?,
                    silent_for: Duration::from_millis(u64::try_from(silent_ms).unwrap_or(0)),
                    beat: DbTime(row.try_get(3)?),
                    streams: Vec::new(),
                });
            }
            // Without a stream, the join's stream columns are NULL.
            let (Some(stream), Some(status)) = (row.try_get::<_, Option<i64>>(4)?, row.try_get(5)?) else {
                continue;
            };
            let nacked = version(row.try_get(8)?, row.try_get(9)?);
            let error: Option<String> = row.try_get(10)?;
            if let Some(replica) = replicas.last_mut() {
                replica.streams.push(StreamRow {
                    stream: u64::try_from(stream).unwrap_or(0),
                    acked: version(row.try_get(6)?, row.try_get(7)?),
                    nacked: nacked.map(|v| (v, error.unwrap_or_default())),
                    status,
                });
            }
        }
        Ok(replicas)
    }

    /// Deletes the replica's row (its streams go with it), and tells the
    /// other replicas.
    pub(crate) async fn leave_replicas(&self, id: &str) -> Result<()> {
        let conn = self.conn().await?;
        conn.execute("DELETE FROM replicas WHERE id = $1", &[&id]).await?;
        conn.execute("SELECT pg_notify($1, $2)", &[&ENVOYS_CHANNEL, &id])
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_url;
    use super::*;

    fn stream(n: u64, acked: Option<u64>, status: &str) -> StreamRow {
        StreamRow {
            stream: n,
            acked: acked.map(|r| Position::new(Epoch(7), Revision(r))),
            nacked: None,
            status: status.into(),
        }
    }

    #[tokio::test]
    async fn replicas_beat_share_their_streams_and_leave() {
        let Some(url) = test_url().await else { return };
        let store = PostgresStore::connect(&url).await.unwrap();
        store.register_replica("a1", "a").await.unwrap();
        store.register_replica("b1", "b").await.unwrap();
        let before = store.read_replicas().await.unwrap();
        let beat = store.heartbeat("a1", None).await.unwrap().expect("registered");
        assert!(beat >= before[0].beat, "{beat:?} {:?}", before[0].beat);

        let first = StreamsWrite {
            stale: Stale::AllBut(vec![1, 2]),
            rows: vec![
                stream(1, Some(3), r#"{"node": "gw-1"}"#),
                StreamRow {
                    nacked: Some((Position::new(Epoch(7), Revision(4)), "bad".into())),
                    ..stream(2, None, r#"{"vm": "1"}"#)
                },
            ],
        };
        store.write_streams("a1", &first).await.unwrap();
        let read = store.read_replicas().await.unwrap();
        assert_eq!(
            read.iter()
                .map(|r| (r.name.as_str(), r.streams.len()))
                .collect::<Vec<_>>(),
            [("a", 2), ("b", 0)]
        );
        assert_eq!(read[0].streams[0].acked, Some(Position::new(Epoch(7), Revision(3))));
        assert_eq!(read[0].streams[1], first.rows[1], "a NACK with its version and error");
        assert!(read[0].silent_for < Duration::from_secs(5));

        // A stream gone, another changed; then a whole set again.
        let changes = StreamsWrite {
            stale: Stale::These(vec![1]),
            rows: vec![stream(2, Some(5), r#"{"vm": "1"}"#)],
        };
        store.write_streams("a1", &changes).await.unwrap();
        let read = store.read_replicas().await.unwrap();
        assert_eq!(read[0].streams, changes.rows);
        let whole = StreamsWrite {
            stale: Stale::AllBut(vec![9]),
            rows: vec![stream(9, None, "{}")],
        };
        store.write_streams("a1", &whole).await.unwrap();
        assert_eq!(store.read_replicas().await.unwrap()[0].streams, whole.rows);

        // b has been silent for two minutes: a beat that forgets rows
        // silent for one deletes it; b's next beat finds its row gone.
        store
            .conn()
            .await
            .unwrap()
            .execute(
                "UPDATE replicas SET heartbeat_at = now() - interval '2 minutes' WHERE id = 'b1'",
                &[],
            )
            .await
            .unwrap();
        store.heartbeat("a1", None).await.unwrap();
        assert_eq!(
            store.read_replicas().await.unwrap().len(),
            2,
            "not without forget_after"
        );
        store.heartbeat("a1", Some(Duration::from_secs(60))).await.unwrap();
        let read = store.read_replicas().await.unwrap();
        assert_eq!(read.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["a1"]);
        assert_eq!(store.heartbeat("b1", None).await.unwrap(), None);

        // Leaving deletes the row and its streams, and is notified.
        let mut feed = store.envoy_feed().unwrap();
        tokio::time::timeout(Duration::from_secs(5), feed.changed())
            .await
            .unwrap()
            .unwrap();
        store.leave_replicas("a1").await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), feed.changed())
            .await
            .expect("a replica leaving is notified")
            .unwrap();
        assert!(store.read_replicas().await.unwrap().is_empty());
        let left: i64 = store
            .conn()
            .await
            .unwrap()
            .query_one("SELECT count(*) FROM envoy_streams", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(left, 0);
    }
}
