//! The `--store` URL: what tokio-postgres reads, the TLS files it names
//! (tokio-postgres knows neither `sslrootcert` nor the `verify-*` modes), and
//! the connection's defaults (TLS beyond this machine, keepalives, a
//! statement timeout). Errors name the parameter, never the URL (it may hold
//! a password).

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;
use tokio_postgres::config::{Host, SslMode};

/// The longest a statement may run unless the URL says otherwise: far above
/// any request's statements (milliseconds) and an import of 100k tokens in
/// one statement (about a second), far below "forever".
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// A `--store` URL that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    #[error("{0}: not a valid URL value")]
    BadValue(String),
    #[error("sslmode must be disable, prefer, require, verify-ca or verify-full")]
    SslMode,
    #[error("sslcert and sslkey go together")]
    HalfClientCertificate,
    /// tokio-postgres's words name what is wrong, not the URL.
    #[error("not a usable PostgreSQL URL: {0}")]
    Unusable(tokio_postgres::Error),
}

/// What the URL asked of TLS, taken out before tokio-postgres reads the rest.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct TlsParams {
    pub(super) root_cert: Option<PathBuf>,
    pub(super) client_cert: Option<PathBuf>,
    pub(super) client_key: Option<PathBuf>,
    /// A warning for the log: TLS that a man in the middle can turn off,
    /// to a server beyond this host.
    pub(super) downgradable: Option<String>,
}

/// Whether every host of the URL is on this machine: a Unix socket,
/// `localhost`, or a loopback address.
fn local_only(config: &tokio_postgres::Config) -> bool {
    config.get_hosts().iter().all(|host| match host {
        Host::Tcp(name) => {
            name == "localhost"
                || name
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        #[cfg(unix)]
        Host::Unix(_) => true,
    })
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Splits a `postgres://` URL into what tokio-postgres reads and the TLS
/// parameters.
pub(super) fn parse(url: &str) -> Result<(tokio_postgres::Config, TlsParams), UrlError> {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut tls = TlsParams::default();
    let mut kept = Vec::new();
    let mut sslmode = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let decoded = || percent_decode(value).ok_or_else(|| UrlError::BadValue(key.to_owned()));
        match key {
            "sslrootcert" => tls.root_cert = Some(PathBuf::from(decoded()?)),
            "sslcert" => tls.client_cert = Some(PathBuf::from(decoded()?)),
            "sslkey" => tls.client_key = Some(PathBuf::from(decoded()?)),
            // The certificate is always verified, host name included, so
            // libpq's strictest modes are what `require` does here.
            "sslmode" => match value {
                "disable" | "prefer" | "require" => {
                    sslmode = Some(value);
                    kept.push(pair.to_owned());
                }
                "verify-ca" | "verify-full" => {
                    sslmode = Some(value);
                    kept.push("sslmode=require".to_owned());
                }
                _ => return Err(UrlError::SslMode),
            },
            _ => kept.push(pair.to_owned()),
        }
    }
    if tls.client_cert.is_some() != tls.client_key.is_some() {
        return Err(UrlError::HalfClientCertificate);
    }
    let rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    let mut config = tokio_postgres::Config::from_str(&rest).map_err(UrlError::Unusable)?;
    // libpq's default, `prefer`, takes whatever the network answers: a man
    // in the middle says "no TLS" and reads or writes the store (an owner's
    // digest inserted is a namespace taken over). Beyond this machine, TLS
    // is required unless the URL says otherwise, and saying otherwise is
    // logged as the risk it is.
    if !local_only(&config) {
        match sslmode {
            None => {
                config.ssl_mode(SslMode::Require);
            }
            Some(mode @ ("disable" | "prefer")) => {
                tls.downgradable = Some(format!(
                    "--store: sslmode={mode} to a server beyond this machine: whoever sits on the network between \
                     can read and change every token (remove sslmode to require TLS, the default)"
                ));
            }
            Some(_) => {}
        }
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(5));
    }
    config.application_name("apitokens");
    // A dead peer (a failed-over server, a cut network) is noticed within
    // seconds, not after the kernel's two hours of keepalive or its quarter
    // of an hour of retransmissions: idle 10 s + 3 probes 5 s apart, and
    // unacknowledged data gives up after 30 s.
    config.keepalives_idle(Duration::from_secs(10));
    config.keepalives_interval(Duration::from_secs(5));
    config.keepalives_retries(3);
    config.tcp_user_timeout(Duration::from_secs(30));
    // A database that is up but does not answer (a lock held by somebody's
    // session, an overloaded server) holds a request for at most this long,
    // then the request answers 503; the server rolls the statement back, so
    // nothing half-done is left. Set in the URL to change it
    // (`options=-c%20statement_timeout%3D60s`, 0 for none).
    let options = config.get_options().unwrap_or_default();
    if !options.contains("statement_timeout") {
        let joined = format!("{options} -c statement_timeout={}", STATEMENT_TIMEOUT.as_millis());
        config.options(joined.trim_start());
    }
    Ok((config, tls))
}

/// `user@host:port/dbname`: the server without the password.
pub(super) fn describe(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "localhost".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgres://{}@{host}:{port}/{}",
        config.get_user().unwrap_or("-"),
        config.get_dbname().unwrap_or("-")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_is_required_beyond_this_machine_unless_the_url_says_otherwise() {
        // The mode tokio-postgres is told, and whether the log warns of a
        // connection a man in the middle can downgrade.
        let mode = |url: &str| {
            let (config, tls) = parse(url).unwrap();
            (config.get_ssl_mode(), tls.downgradable.is_some())
        };
        // Beyond this machine (one remote host among several is enough).
        for host in ["db.example", "10.0.0.5:5432", "[2001:db8::1]", "127.0.0.1,db.example"] {
            assert_eq!(
                mode(&format!("postgres://u@{host}/t")),
                (SslMode::Require, false),
                "{host}"
            );
        }
        // Said otherwise: as said, with a warning; verify-* is require.
        let remote = |query: &str| mode(&format!("postgres://u@db.example/t?{query}"));
        assert_eq!(remote("sslmode=prefer"), (SslMode::Prefer, true));
        assert_eq!(remote("sslmode=disable"), (SslMode::Disable, true));
        assert_eq!(remote("sslmode=verify-full"), (SslMode::Require, false));
        // This machine: libpq's default, or as said without a warning.
        for host in ["127.0.0.1:5432", "localhost", "[::1]", "%2Frun%2Fpostgresql"] {
            assert_eq!(
                mode(&format!("postgres://u@{host}/t")),
                (SslMode::Prefer, false),
                "{host}"
            );
        }
        assert_eq!(
            mode("postgres://u@127.0.0.1/t?sslmode=disable"),
            (SslMode::Disable, false)
        );
    }

    #[test]
    fn urls_keep_tls_parameters_for_rustls_and_never_echo_the_url() {
        let (config, tls) = parse(
            "postgres://u:pw@db.example:6432/tokens?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=x",
        )
        .unwrap();
        assert_eq!(tls.root_cert, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(config.get_ssl_mode(), SslMode::Require);
        assert_eq!(describe(&config), "postgres://u@db.example:6432/tokens");
        let err = parse("postgres://u:hunter2@h/d?sslmode=sometimes")
            .unwrap_err()
            .to_string();
        assert!(err.contains("sslmode") && !err.contains("hunter2"), "{err}");
        let err = parse("postgres://u:hunter2@h/d?sslcert=/c.pem")
            .unwrap_err()
            .to_string();
        assert!(err.contains("sslkey") && !err.contains("hunter2"), "{err}");
        let err = parse("postgres://u:hunter2@h:notaport/d").unwrap_err().to_string();
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn a_statement_timeout_unless_the_url_sets_one() {
        let (config, _) = parse("postgres://u@h/d").unwrap();
        assert_eq!(config.get_options(), Some("-c statement_timeout=30000"));
        let (config, _) = parse("postgres://u@h/d?options=-csearch_path%3Dx").unwrap();
        assert_eq!(config.get_options(), Some("-csearch_path=x -c statement_timeout=30000"));
        let (config, _) = parse("postgres://u@h/d?options=-c%20statement_timeout%3D0").unwrap();
        assert_eq!(config.get_options(), Some("-c statement_timeout=0"));
    }
}
