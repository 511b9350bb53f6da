//! Who may hold the xDS port, and how much of it: at most so many
//! connections per peer address ([`PeerLimits`]), and under mutual TLS only
//! client certificates that name an allowed identity ([`Identities`]), not
//! merely any certificate the CA ever signed. An admitted connection can be
//! cut ([`Counted`]): a graceful end waits for every stream, and a client
//! that never reads would hold one open for ever.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};
use tonic::Status;
use x509_cert::der::Decode;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::SubjectAltName;

/// Open connections per peer address, bounded.
pub struct PeerLimits {
    per_peer: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
    /// When a refusal was last logged (one line per interval, not per try).
    logged: Mutex<Option<Instant>>,
}

impl PeerLimits {
    pub fn new(per_peer: usize) -> Arc<Self> {
        Arc::new(Self {
            per_peer: per_peer.max(1),
            open: Mutex::default(),
            logged: Mutex::default(),
        })
    }

    /// The connection counted, or `None` (to be closed) when its peer holds
    /// the most already. Once `cut` is cancelled, its reads and writes fail.
    pub fn admit(self: &Arc<Self>, tcp: TcpStream, cut: &CancellationToken) -> Option<Counted> {
        let peer = tcp.peer_addr().ok()?.ip();
        {
            let mut open = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let n = open.entry(peer).or_default();
            if *n >= self.per_peer {
                drop(open);
                self.refused(peer);
                return None;
            }
            *n += 1;
        }
        Some(Counted {
            tcp,
            cut: Box::pin(cut.clone().cancelled_owned()),
            _slot: Slot {
                limits: Arc::clone(self),
                peer,
            },
        })
    }

    fn refused(&self, peer: IpAddr) {
        let mut logged = self.logged.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            *logged = Some(Instant::now());
            tracing::warn!(
                "xds: refused a connection from {peer}: it holds {} already (--xds-max-connections-per-peer)",
                self.per_peer
            );
        }
    }

    #[cfg(test)]
    fn open(&self, peer: IpAddr) -> usize {
        self.open
            .lock()
            .map(|o| o.get(&peer).copied().unwrap_or(0))
            .unwrap_or(0)
    }
}

/// A connection's place in its peer's count, given back when it closes.
struct Slot {
    limits: Arc<PeerLimits>,
    peer: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self
            .limits
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.peer);
            }
        }
    }
}

/// An admitted connection.
pub struct Counted {
    tcp: TcpStream,
    cut: Pin<Box<WaitForCancellationFutureOwned>>,
    /// Held for its `Drop`: the peer's count goes down when this closes.
    _slot: Slot,
}

impl Counted {
    /// An error once the connection is cut (the poll also wakes this
    /// connection's task when that happens).
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.cut.as_mut().poll(cx) {
            Poll::Ready(()) => Err(io::Error::new(io::ErrorKind::ConnectionAborted, "xds: connection cut")),
            Poll::Pending => Ok(()),
        }
    }
}

impl Connected for Counted {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.tcp.connect_info()
    }
}

impl AsyncRead for Counted {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Err(e) = this.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Err(e) = this.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.tcp).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Err(e) = this.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Err(e) = this.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }
}

/// The client identities allowed on the xDS port under mutual TLS
/// (`--xds-client-san`): DNS names or URIs (a SPIFFE id) of the client
/// certificate's subject alternative names. Empty: any certificate the CA
/// signed.
#[derive(Clone, Debug, Default)]
pub struct Identities {
    allowed: Arc<Vec<String>>,
}

impl Identities {
    pub fn new(allowed: Vec<String>) -> Self {
        Self {
            allowed: Arc::new(allowed),
        }
    }

    /// Whether the connection a request came on may use the xDS port.
    pub fn check(&self, extensions: &tonic::codegen::http::Extensions) -> Result<(), Status> {
        if self.allowed.is_empty() {
            return Ok(());
        }
        let names = extensions
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(TlsConnectInfo::peer_certs)
            .and_then(|certs| certs.first().map(|c| subject_alt_names(c.as_ref())))
            .unwrap_or_default();
        if names.iter().any(|n| self.allowed.contains(n)) {
            Ok(())
        } else {
            Err(Status::permission_denied(
                "the client certificate names none of the identities this control plane serves (--xds-client-san)",
            ))
        }
    }
}

/// The DNS names and URIs among a certificate's subject alternative names
/// (none if it cannot be read).
pub fn subject_alt_names(der: &[u8]) -> Vec<String> {
    let Ok(cert) = x509_cert::Certificate::from_der(der) else {
        return Vec::new();
    };
    let Ok(Some((_, san))) = cert.tbs_certificate.get::<SubjectAltName>() else {
        return Vec::new();
    };
    san.0
        .iter()
        .filter_map(|name| match name {
            GeneralName::DnsName(n) => Some(n.to_string()),
            GeneralName::UniformResourceIdentifier(u) => Some(u.to_string()),
            _ => None,
        })
        .collect()
}

/// The peer address of a request on the xDS port, for logs and `/status`.
pub fn peer_of(extensions: &tonic::codegen::http::Extensions) -> Option<SocketAddr> {
    extensions
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|t| t.get_ref().remote_addr())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connections_per_peer_are_bounded_and_given_back() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = PeerLimits::new(2);
        let cut = CancellationToken::new();
        let mut kept = Vec::new();
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(TcpStream::connect(addr).await.unwrap());
            let (tcp, _) = listener.accept().await.unwrap();
            kept.push(limits.admit(tcp, &cut));
        }
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(kept[0].is_some() && kept[1].is_some() && kept[2].is_none());
        assert_eq!(limits.open(local), 2);
        kept.remove(0);
        assert_eq!(limits.open(local), 1, "a closed connection frees its place");
        clients.push(TcpStream::connect(addr).await.unwrap());
        let (tcp, _) = listener.accept().await.unwrap();
        assert!(limits.admit(tcp, &cut).is_some());
    }

    #[tokio::test]
    async fn a_cut_connection_fails_its_pending_read() {
        use tokio::io::AsyncReadExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        let cut = CancellationToken::new();
        let mut conn = PeerLimits::new(1).admit(tcp, &cut).unwrap();
        let reading = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            conn.read(&mut buf).await
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!reading.is_finished(), "the client sent nothing");
        cut.cancel();
        let err = reading.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
    }

    #[test]
    fn without_an_allow_list_any_connection_is_fine() {
        let ext = tonic::codegen::http::Extensions::new();
        assert!(Identities::default().check(&ext).is_ok());
        let err = Identities::new(vec!["gateway.example".into()]).check(&ext).unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
    }
}
