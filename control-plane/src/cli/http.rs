//! The HTTP listeners (the API and console, and the operator endpoints when
//! they have their own): HTTP/1.1 over TCP or TLS (rustls, as the xDS port),
//! at most `max_connections` connections at once (more wait in the kernel's
//! backlog), a deadline for the TLS handshake and for each request's headers
//! (a client that opens connections and sends nothing, or a byte a minute,
//! holds none for long), and a graceful end.

use super::error::Error;
use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tower::ServiceExt as _;

/// How a listener serves its connections.
#[derive(Clone)]
pub(super) struct HttpOptions {
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// The most time for a TLS handshake, and for a request's headers (also
    /// the most a kept-alive connection waits for its next request).
    pub header_read_timeout: Duration,
    pub max_connections: usize,
}

/// A TLS server configuration from PEM files: the certificate chain and
/// its private key (`flag` names the options in errors).
pub(super) fn tls_acceptor(cert: &Path, key: &Path, flag: &str) -> Result<tokio_rustls::TlsAcceptor, Error> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let named = |what: &str, path: &Path| format!("--{flag}-{what} {}", path.display());
    let read = |what: &str, path: &Path| std::fs::read(path).map_err(|e| Error::input(named(what, path), e));
    let chain = CertificateDer::pem_slice_iter(&read("cert", cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::input(named("cert", cert), e))?;
    if chain.is_empty() {
        return Err(Error::input(named("cert", cert), "no certificate in it"));
    }
    let key = PrivateKeyDer::from_pem_slice(&read("key", key)?).map_err(|e| Error::input(named("key", key), e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::input(format!("--{flag}-cert"), e))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| Error::input(format!("--{flag}-cert/--{flag}-key"), e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Serves `app` on `listener` until `stop`, then lets open connections
/// finish their requests (at most `grace`).
pub(super) async fn serve(
    listener: TcpListener,
    app: Router,
    options: HttpOptions,
    stop: impl Future<Output = ()>,
    grace: Duration,
) {
    let max = options.max_connections.max(1);
    let permits = Arc::new(Semaphore::new(max));
    let (ending, ended) = watch::channel(false);
    let mut logged_full = false;
    tokio::pin!(stop);
    loop {
        // A place first: at the bound, new connections wait in the backlog.
        let permit = match Arc::clone(&permits).try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if !logged_full {
                    tracing::warn!(
                        "http: {max} connections open on {} (--max-connections): new ones wait",
                        listener.local_addr().map_or_else(|_| "?".into(), |a| a.to_string())
                    );
                    logged_full = true;
                }
                tokio::select! {
                    p = Arc::clone(&permits).acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                    () = &mut stop => break,
                }
            }
        };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, say: wait a little, go on.
                    tracing::warn!("http: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        if permits.available_permits() > max / 10 {
            logged_full = false;
        }
        // No Nagle: a small answer must not wait for the peer's delayed ACK.
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        let options = options.clone();
        let ended = ended.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match &options.tls {
                Some(tls) => match tokio::time::timeout(options.header_read_timeout, tls.accept(tcp)).await {
                    Ok(Ok(stream)) => connection(TokioIo::new(stream), peer, app, &options, ended).await,
                    Ok(Err(e)) => tracing::debug!("http: TLS handshake with {peer} failed: {e}"),
                    Err(_) => tracing::debug!("http: TLS handshake with {peer} timed out"),
                },
                None => connection(TokioIo::new(tcp), peer, app, &options, ended).await,
            }
        });
    }
    let _ = ending.send(true);
    // Every connection gives its place back when it closes.
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    if tokio::time::timeout(grace, permits.acquire_many(all)).await.is_err() {
        tracing::warn!("http: some connections did not close within {} s", grace.as_secs());
    }
}

async fn connection<I>(io: I, peer: SocketAddr, app: Router, options: &HttpOptions, mut ended: watch::Receiver<bool>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        // What `into_make_service_with_connect_info` would add: the client
        // address (audit events, logs).
        req.extensions_mut().insert(ConnectInfo(peer));
        app.clone().oneshot(req.map(axum::body::Body::new))
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!("http: connection from {peer}: {e}");
            }
        }
        () = async { drop(ended.wait_for(|e| *e).await) } => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    async fn started(options: HttpOptions) -> (SocketAddr, watch::Sender<bool>, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route(
            "/who",
            axum::routing::get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.ip().to_string() }),
        );
        let (stop_tx, mut stop_rx) = watch::channel(false);
        let stop = async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        };
        let task = tokio::spawn(serve(listener, app, options, stop, Duration::from_secs(2)));
        (addr, stop_tx, task)
    }

    fn plain(max_connections: usize) -> HttpOptions {
        HttpOptions {
            tls: None,
            header_read_timeout: Duration::from_millis(300),
            max_connections,
        }
    }

    async fn get(addr: SocketAddr) -> String {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET /who HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        tcp.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn answers_with_the_client_address() {
        let (addr, stop, task) = started(plain(4)).await;
        let answer = get(addr).await;
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("127.0.0.1"),
            "{answer}"
        );
        stop.send(true).unwrap();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_client_that_sends_nothing_at_all_is_closed() {
        let (addr, stop, task) = started(plain(4)).await;
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(3), silent.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "still open after 3 s with a 300 ms deadline");
        stop.send(true).unwrap();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_client_that_sends_no_headers_is_closed_and_frees_its_place() {
        let (addr, stop, task) = started(plain(1)).await;
        // The only place, taken by a client that sends half a request line.
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        silent.write_all(b"GET /who HT").await.unwrap();
        let started = std::time::Instant::now();
        // The next client waits for the place, then is served.
        let answer = get(addr).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "served before the silent one left"
        );
        let mut rest = Vec::new();
        let n = silent.read_to_end(&mut rest).await.unwrap_or(0);
        assert!(n == 0 || String::from_utf8_lossy(&rest).contains("408"), "{rest:?}");
        stop.send(true).unwrap();
        task.await.unwrap();
    }
}
