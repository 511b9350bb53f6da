//! rustls for the database connections: the server's certificate verified
//! against `sslrootcert` (or the system's roots) and its host name, and a
//! client certificate when the URL names one (`sslcert`, `sslkey`).

use super::url::TlsParams;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_postgres_rustls::MakeRustlsConnect;

/// A TLS file the URL names that cannot be used, or TLS itself.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} {}: {error}", path.display())]
    Unreadable {
        what: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{what} {}: {error}", path.display())]
    Pem {
        what: &'static str,
        path: PathBuf,
        error: rustls_pki_types::pem::Error,
    },
    #[error("sslrootcert {}: {error}", path.display())]
    Root { path: PathBuf, error: rustls::Error },
    #[error("sslrootcert {}: no certificate in it", .0.display())]
    NoRoot(PathBuf),
    #[error("sslcert/sslkey: {0}")]
    ClientCertificate(rustls::Error),
    #[error("TLS: {0}")]
    Setup(rustls::Error),
}

fn read_pem(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Unreadable {
        what,
        path: path.to_owned(),
        error,
    })
}

fn pem_error<'p>(what: &'static str, path: &'p Path) -> impl Fn(rustls_pki_types::pem::Error) -> TlsError + 'p {
    move |error| TlsError::Pem {
        what,
        path: path.to_owned(),
        error,
    }
}

pub(super) fn connector(params: &TlsParams) -> Result<MakeRustlsConnect, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    match &params.root_cert {
        Some(path) => {
            let pem = read_pem("sslrootcert", path)?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(pem_error("sslrootcert", path))?;
                roots.add(cert).map_err(|error| TlsError::Root {
                    path: path.clone(),
                    error,
                })?;
            }
            if roots.is_empty() {
                return Err(TlsError::NoRoot(path.clone()));
            }
        }
        None => {
            // Unreadable system certificates only matter if TLS is used.
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Setup)?
        .with_root_certificates(roots);
    let config = match (&params.client_cert, &params.client_key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_slice_iter(&read_pem("sslcert", cert)?)
                .collect::<Result<Vec<_>, _>>()
                .map_err(pem_error("sslcert", cert))?;
            let key = PrivateKeyDer::from_pem_slice(&read_pem("sslkey", key)?).map_err(pem_error("sslkey", key))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(TlsError::ClientCertificate)?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(MakeRustlsConnect::new(config))
}
