//! The file variant of ECDS for a single host without gRPC: the discovery
//! response is written to a file that Envoy watches (`path_config_source`),
//! replaced by an atomic rename so Envoy never reads half a file.
//!
//! The file holds a binary protobuf `DiscoveryResponse` (Envoy reads `.pb`
//! files as binary; binary parses faster than JSON for large token tables).

use crate::clock;
use crate::ecds::Snapshot;
use crate::engine::Engine;
use prost::Message;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::watch;

/// Checks the path before serving: Envoy needs the `.pb` extension to read
/// binary protobuf, and the directory must exist.
pub fn check_path(path: &Path) -> Result<(), String> {
    if path.extension().and_then(|e| e.to_str()) != Some("pb") {
        return Err(format!(
            "--ecds-file {}: the file name must end in .pb (Envoy reads it as a binary DiscoveryResponse)",
            path.display()
        ));
    }
    let dir = parent(path);
    if !dir.is_dir() {
        return Err(format!(
            "--ecds-file {}: directory {} does not exist",
            path.display(),
            dir.display()
        ));
    }
    Ok(())
}

fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Writes `snapshot` to `path` atomically and durably: a temporary file in the
/// same directory, fsync, rename over `path`, fsync the directory.
pub fn write(path: &Path, snapshot: &Snapshot) -> std::io::Result<()> {
    let bytes = snapshot.discovery_response(String::new(), true).encode_to_vec();
    let dir = parent(path);
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("ecds.pb");
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(&dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn write_and_record(engine: &Engine, path: &Path, snapshot: &Snapshot) {
    let shown = path.display().to_string();
    match write(path, snapshot) {
        Ok(()) => {
            log::info!("ecds file {shown}: wrote version {}", snapshot.version);
            engine.status.file_written(&shown, Ok(snapshot.version), clock::now());
        }
        Err(e) => {
            log::error!("ecds file {shown}: could not write version {}: {e}", snapshot.version);
            engine.status.file_written(&shown, Err(e.to_string()), clock::now());
        }
    }
}

/// Writes the current snapshot now (Envoy needs the file at startup).
pub fn write_current(engine: &Engine, path: &Path) -> Result<(), String> {
    let snapshot = engine.current();
    write(path, &snapshot).map_err(|e| format!("--ecds-file {}: {e}", path.display()))?;
    engine
        .status
        .file_written(&path.display().to_string(), Ok(snapshot.version), clock::now());
    log::info!("ecds file {}: wrote version {}", path.display(), snapshot.version);
    Ok(())
}

/// Rewrites the file on every new snapshot until `shutdown` changes.
pub async fn run(engine: Arc<Engine>, path: PathBuf, mut shutdown: watch::Receiver<bool>) {
    let mut snapshots = engine.subscribe();
    snapshots.borrow_and_update();
    loop {
        tokio::select! {
            changed = snapshots.changed() => {
                if changed.is_err() {
                    return;
                }
                let snapshot = Arc::clone(&snapshots.borrow_and_update());
                let (engine, path) = (Arc::clone(&engine), path.clone());
                let _ = tokio::task::spawn_blocking(move || write_and_record(&engine, &path, &snapshot)).await;
            }
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::ecds::{resource, FilterParams, Payload, TYPE_URL};
    use crate::testutil::TempDir;
    use apitokens_core::timestamp::Timestamp;
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;

    #[test]
    fn writes_a_discovery_response_atomically() {
        let dir = TempDir::new("ecds-file");
        let path = dir.path().join("apitokens.pb");
        for version in [1, 2] {
            let snap = Snapshot {
                version,
                config_json: "{}".into(),
                resource: resource(&FilterParams::default(), Payload::Json("{}")),
                tokens: 0,
                published_at: Timestamp::from_unix(0, 0),
            };
            write(&path, &snap).unwrap();
            let r = DiscoveryResponse::decode(std::fs::read(&path).unwrap().as_slice()).unwrap();
            assert_eq!(r.version_info, version.to_string());
            assert_eq!(r.type_url, TYPE_URL);
            assert_eq!(r.resources.len(), 1);
        }
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file left behind");
    }

    #[test]
    fn path_checks() {
        let dir = TempDir::new("ecds-check");
        assert!(check_path(&dir.path().join("x.pb")).is_ok());
        assert!(check_path(&dir.path().join("x.json")).unwrap_err().contains(".pb"));
        assert!(check_path(&dir.path().join("missing/x.pb"))
            .unwrap_err()
            .contains("does not exist"));
    }
}
