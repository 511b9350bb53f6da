//! Helpers for unit tests.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// A directory removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "apitokens-cp-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A control plane's core for the push tests: a SQLite store in a fresh
/// directory, its publisher, and an ACK tracker that puts VMs on the delta
/// channel at once.
pub struct Core {
    /// Holds the store's directory until the test ends.
    pub _dir: TempDir,
    pub store: std::sync::Arc<dyn crate::store::Store>,
    pub publisher: std::sync::Arc<crate::config::Publisher>,
    pub acks: std::sync::Arc<crate::acks::Tracker>,
}

impl Core {
    pub async fn open(tag: &str) -> Self {
        let dir = TempDir::new(tag);
        let store: std::sync::Arc<dyn crate::store::Store> =
            std::sync::Arc::new(crate::store::SqliteStore::open(&dir.path().join("store.db")).unwrap());
        let publisher = crate::config::Publisher::open(std::sync::Arc::clone(&store), Default::default())
            .await
            .unwrap();
        let acks = std::sync::Arc::new(crate::acks::Tracker::new().with_settle(std::time::Duration::ZERO));
        Self {
            _dir: dir,
            store,
            publisher,
            acks,
        }
    }
}

/// Serves one gRPC service on a loopback port for the test's lifetime.
pub async fn serve_grpc<R: crate::push::grpc::Route + Sync>(route: R) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(crate::push::grpc::Grpc(route))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    addr
}

/// A gRPC client of a service [`serve_grpc`] serves.
pub async fn grpc_client(addr: std::net::SocketAddr) -> tonic::client::Grpc<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    grpc
}
