//! One HTTP/1.1 POST to a webhook endpoint, over TCP or TLS (the system's
//! roots, or `--webhook-ca`), within a deadline. A delivery is acknowledged
//! by a 2xx answer only: anything else (a redirect included: a receiver's
//! address is the operator's to change) is retried.

use axum::http::{header, HeaderValue, Method, Request, Uri};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

/// Where a webhook is delivered: `http://` or `https://` host, port, path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    tls: bool,
    host: String,
    port: u16,
    /// `Host:`.
    authority: String,
    /// Path and query.
    path: String,
}

/// Why a webhook URL cannot be used.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("is not an absolute URL")]
    NotAbsolute,
    #[error("must start with http:// or https://")]
    Scheme,
    #[error("must not carry a user or password (the requests are signed instead)")]
    UserInfo,
}

impl Target {
    pub fn parse(text: &str) -> Result<Self, TargetError> {
        let uri: Uri = text.parse().map_err(|_| TargetError::NotAbsolute)?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            Some(_) => return Err(TargetError::Scheme),
            None => return Err(TargetError::NotAbsolute),
        };
        let authority = uri.authority().ok_or(TargetError::NotAbsolute)?;
        if authority.as_str().contains('@') {
            return Err(TargetError::UserInfo);
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        Ok(Self {
            tls,
            port: authority.port_u16().unwrap_or(if tls { 443 } else { 80 }),
            authority: authority.as_str().to_owned(),
            host,
            path: uri.path_and_query().map_or("/", |p| p.as_str()).to_owned(),
        })
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Without the query, which may carry a receiver's own credential.
        let scheme = if self.tls { "https" } else { "http" };
        let path = self.path.split_once('?').map_or(self.path.as_str(), |(p, _)| p);
        write!(f, "{scheme}://{}{path}", self.authority)
    }
}

/// Why a delivery did not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("TLS: {0}")]
    Tls(std::io::Error),
    #[error("the host is not a valid TLS server name")]
    ServerName,
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("the request could not be built: {0}")]
    Request(#[from] axum::http::Error),
}

/// Why `--webhook-ca` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error(transparent)]
    Roots(#[from] crate::trust::RootsError),
    #[error("{0}")]
    Tls(#[from] rustls::Error),
}

/// Sends webhook requests.
#[derive(Clone)]
pub struct Client {
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
}

impl Client {
    /// A client trusting `ca` (PEM), or the system's roots without one.
    pub fn new(ca: Option<&Path>, timeout: Duration) -> Result<Self, CaError> {
        let config = crate::trust::client_builder(crate::trust::roots(ca)?)?.with_no_client_auth();
        Ok(Self {
            tls: Arc::new(config),
            timeout,
        })
    }

    /// POSTs `body` with `headers`; the answer's status.
    pub async fn post(
        &self,
        target: &Target,
        headers: &[(&'static str, String)],
        body: Vec<u8>,
    ) -> Result<u16, SendError> {
        let mut request = Request::builder().method(Method::POST).uri(target.path.as_str());
        for (name, value) in headers {
            request = request.header(*name, value.as_str());
        }
        let request = request
            .header(header::HOST, target.authority.as_str())
            .header(header::USER_AGENT, HeaderValue::from_static("apitokens-webhooks"))
            .body(Full::new(Bytes::from(body)))?;
        tokio::time::timeout(self.timeout, self.send(target, request))
            .await
            .map_err(|_| SendError::Timeout(self.timeout))?
    }

    async fn send(&self, target: &Target, request: Request<Full<Bytes>>) -> Result<u16, SendError> {
        let tcp = TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(SendError::Connect)?;
        let _ = tcp.set_nodelay(true);
        if !target.tls {
            return exchange(TokioIo::new(tcp), request).await;
        }
        let name = ServerName::try_from(target.host.clone()).map_err(|_| SendError::ServerName)?;
        let stream = tokio_rustls::TlsConnector::from(Arc::clone(&self.tls))
            .connect(name, tcp)
            .await
            .map_err(SendError::Tls)?;
        exchange(TokioIo::new(stream), request).await
    }
}

/// One request on a new connection; the answer's body is read (at most
/// 64 KiB) and dropped, then the connection closed.
async fn exchange<IO>(io: IO, request: Request<Full<Bytes>>) -> Result<u16, SendError>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
    let driver = tokio::spawn(connection);
    let result = async {
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        let mut body = response.into_body();
        let mut read = 0usize;
        while let Some(frame) = body.frame().await {
            read += frame?.data_ref().map_or(0, Bytes::len);
            if read > 64 * 1024 {
                break;
            }
        }
        Ok(status)
    }
    .await;
    driver.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let t = Target::parse("https://hooks.example.com/apitokens?x=1").unwrap();
        assert_eq!(
            (t.tls, t.host.as_str(), t.port, t.path.as_str()),
            (true, "hooks.example.com", 443, "/apitokens?x=1")
        );
        assert_eq!(t.to_string(), "https://hooks.example.com/apitokens");
        let t = Target::parse("http://127.0.0.1:8099").unwrap();
        assert_eq!((t.tls, t.port, t.path.as_str()), (false, 8099, "/"));
        let t = Target::parse("http://[::1]:9/h").unwrap();
        assert_eq!((t.host.as_str(), t.authority.as_str()), ("::1", "[::1]:9"));
        assert_eq!(t.to_string(), "http://[::1]:9/h");
        assert_eq!(Target::parse("ftp://x/").unwrap_err(), TargetError::Scheme);
        assert_eq!(Target::parse("/relative").unwrap_err(), TargetError::NotAbsolute);
        assert_eq!(Target::parse("https://u:p@x/").unwrap_err(), TargetError::UserInfo);
    }
}
