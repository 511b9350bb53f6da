//! `apitokens health`: the container image's health check. The image has no
//! shell and no curl, so the binary checks itself: `GET /healthz` over plain
//! HTTP/1.1 on loopback, exit 0 on a 200. (With HTTPS on the status port,
//! use the orchestrator's own probes, as the Kubernetes manifests do.)

use super::error::Error;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Calls `url` (`http://HOST:PORT/PATH`) within `timeout`: Ok on 200.
pub(super) fn check(url: &str, timeout: Duration) -> Result<(), Error> {
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        Error::input(
            "--url",
            "only http:// URLs (the health check runs next to the server, on loopback)",
        )
    })?;
    let (authority, path) = rest
        .find('/')
        .and_then(|i| rest.split_at_checked(i))
        .unwrap_or((rest, "/"));
    let addr = authority
        .to_socket_addrs()
        .map_err(|e| Error::input(format!("--url: {authority}"), e))?
        .next()
        .ok_or_else(|| Error::input(format!("--url: {authority}"), "no address"))?;
    let failed = |e: std::io::Error| Error::input(url, e);
    let mut tcp = TcpStream::connect_timeout(&addr, timeout).map_err(failed)?;
    tcp.set_read_timeout(Some(timeout)).map_err(failed)?;
    tcp.set_write_timeout(Some(timeout)).map_err(failed)?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).map_err(failed)?;
    // The status line, however the server's bytes arrive.
    let mut head = Vec::with_capacity(64);
    let mut chunk = [0u8; 64];
    while head.len() < 256 && !head.windows(2).any(|w| w == b"\r\n") {
        match tcp.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => head.extend_from_slice(chunk.get(..n).unwrap_or_default()),
            Err(e) => return Err(failed(e)),
        }
    }
    // A TLS record (an alert, 0x15) answers plain HTTP on a --tls-cert port.
    if head.first() == Some(&0x15) {
        return Err(Error::input(
            url,
            "the server speaks TLS there (--tls-cert): check it with an HTTPS probe",
        ));
    }
    let line = String::from_utf8_lossy(&head).into_owned();
    let line = line.lines().next().unwrap_or("nothing");
    if line.split(' ').nth(1) == Some("200") {
        Ok(())
    } else {
        Err(Error::input(url, format!("answered {line}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A server answering one request with `pieces`, written apart.
    fn server(pieces: &'static [&'static str]) -> (String, std::thread::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/healthz", listener.local_addr().unwrap());
        let handle = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = [0u8; 512];
            let n = conn.read(&mut buf).unwrap();
            for piece in pieces {
                conn.write_all(piece.as_bytes()).unwrap();
                conn.flush().unwrap();
                std::thread::sleep(Duration::from_millis(20));
            }
            String::from_utf8_lossy(&buf[..n]).into_owned()
        });
        (url, handle)
    }

    #[test]
    fn a_status_line_in_pieces_is_read_whole() {
        let (url, h) = server(&["HTTP/1.", "1 200 OK\r\ncontent-length: 0\r\n\r\n"]);
        check(&url, Duration::from_secs(2)).unwrap();
        h.join().unwrap();
    }

    #[test]
    fn a_200_is_healthy_anything_else_is_not() {
        let (url, h) = server(&["HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"]);
        check(&url, Duration::from_secs(2)).unwrap();
        assert!(h.join().unwrap().starts_with("GET /healthz HTTP/1.1\r\n"));
        let (url, h) = server(&["HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n"]);
        let err = check(&url, Duration::from_secs(2)).unwrap_err();
        assert!(err.to_string().contains("503"), "{err}");
        h.join().unwrap();
        // A TLS port answers plain HTTP with an alert record.
        let (url, h) = server(&["\u{15}\u{3}\u{3}\u{0}\u{2}\u{2}\u{32}"]);
        let err = check(&url, Duration::from_secs(2)).unwrap_err();
        assert!(err.to_string().contains("speaks TLS"), "{err}");
        h.join().unwrap();
        assert!(check("https://127.0.0.1:1/healthz", Duration::from_secs(1)).is_err());
        // Nobody listening.
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        assert!(check(&format!("http://127.0.0.1:{port}/healthz"), Duration::from_secs(1)).is_err());
    }
}
