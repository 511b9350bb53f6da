//! The file variant of ECDS for a single host without gRPC: the discovery
//! response is written to a file that Envoy watches (`path_config_source`),
//! replaced by an atomic rename so Envoy never reads half a file.
//!
//! The file holds a binary protobuf `DiscoveryResponse` (Envoy reads `.pb`
//! files as binary; binary parses faster than JSON for large token tables).

use super::resource::EcdsResource;
use crate::acks::Tracker;
use crate::config::{Encoded, Publisher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::watch;

/// Why a path cannot be the ECDS file.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    #[error("the file name must end in .pb (Envoy reads it as a binary DiscoveryResponse)")]
    Extension,
    #[error("directory {0} does not exist")]
    NoDirectory(PathBuf),
}

/// Checks the path before serving: Envoy needs the `.pb` extension to read
/// binary protobuf, and the directory must exist.
pub fn check_path(path: &Path) -> Result<(), PathError> {
    if path.extension().and_then(|e| e.to_str()) != Some("pb") {
        return Err(PathError::Extension);
    }
    let dir = parent(path);
    if !dir.is_dir() {
        return Err(PathError::NoDirectory(dir));
    }
    Ok(())
}

fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Writes `snapshot` to `path` atomically and durably: a new temporary file
/// in the same directory (never one that already exists, readable by the
/// owner only), fsync, rename over `path`, fsync the directory.
pub fn write(path: &Path, resource: &EcdsResource, snapshot: &Encoded) -> std::io::Result<()> {
    let frame = resource.response(snapshot, "", true);
    let dir = parent(path);
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("ecds.pb");
    let tmp = dir.join(format!(".{name}.tmp-{}-{}", std::process::id(), snapshot.version));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let result = (|| {
        let mut f = options.open(&tmp)?;
        for part in frame.parts() {
            f.write_all(part)?;
        }
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

fn write_and_record(acks: &Tracker, resource: &EcdsResource, path: &Path, snapshot: &Encoded) {
    let shown = path.display().to_string();
    match write(path, resource, snapshot) {
        Ok(()) => {
            tracing::info!(path = %shown, revision = snapshot.version.revision.0, "ecds file {shown}: wrote version {}", snapshot.version);
            acks.file_written(&shown, Ok(snapshot.version));
        }
        Err(e) => {
            tracing::error!(path = %shown, revision = snapshot.version.revision.0, error = %e, "ecds file {shown}: could not write version {}: {e}", snapshot.version);
            acks.file_written(&shown, Err(&e));
        }
    }
}

/// Writes the current snapshot now (Envoy needs the file at startup).
pub fn write_current(
    publisher: &Publisher,
    acks: &Tracker,
    resource: &EcdsResource,
    path: &Path,
) -> std::io::Result<()> {
    let snapshot = publisher.latest_encoded();
    write(path, resource, &snapshot)?;
    acks.file_written(&path.display().to_string(), Ok(snapshot.version));
    tracing::info!("ecds file {}: wrote version {}", path.display(), snapshot.version);
    Ok(())
}

/// Rewrites the file on every new snapshot until `shutdown` changes.
pub async fn run(
    publisher: Arc<Publisher>,
    acks: Arc<Tracker>,
    resource: EcdsResource,
    path: PathBuf,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut published = publisher.subscribe();
    let mut written = published.borrow_and_update().encoded.version;
    let resource = Arc::new(resource);
    loop {
        tokio::select! {
            changed = published.changed() => {
                if changed.is_err() {
                    return;
                }
                if published.borrow_and_update().snapshot.version == written {
                    continue;
                }
                // The file has every version: the table is written for it.
                let snapshot = publisher.encoded().await;
                if snapshot.version == written {
                    continue;
                }
                written = snapshot.version;
                let (acks, resource, path) = (Arc::clone(&acks), Arc::clone(&resource), path.clone());
                let _ = tokio::task::spawn_blocking(move || write_and_record(&acks, &resource, &path, &snapshot)).await;
            }
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Version;
    use crate::push::resource::{FilterParams, TYPE_URL};
    use crate::testutil::TempDir;
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
    use prost::Message;

    #[test]
    fn writes_a_private_discovery_response_atomically() {
        let dir = TempDir::new("ecds-file");
        let path = dir.path().join("apitokens.pb");
        let resource = EcdsResource::new(FilterParams::default());
        for version in [1, 2] {
            let snap = Encoded {
                version: Version::new(crate::store::Epoch(1), crate::store::Revision(version)),
                payload: Arc::new(b"APTK".to_vec()),
                tokens: 0,
            };
            write(&path, &resource, &snap).unwrap();
            let r = DiscoveryResponse::decode(std::fs::read(&path).unwrap().as_slice()).unwrap();
            assert_eq!(r.version_info, format!("1.{version}"));
            assert_eq!(r.type_url, TYPE_URL);
            assert_eq!(r.resources.len(), 1);
        }
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file left behind");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "the file is the owner's only");
        }
    }

    #[test]
    fn path_checks() {
        let dir = TempDir::new("ecds-check");
        assert!(check_path(&dir.path().join("x.pb")).is_ok());
        assert!(matches!(
            check_path(&dir.path().join("x.json")),
            Err(PathError::Extension)
        ));
        assert!(matches!(
            check_path(&dir.path().join("missing/x.pb")),
            Err(PathError::NoDirectory(_))
        ));
    }
}
