//! rustls for the database connections: the server's certificate verified
//! against `sslrootcert` (or the system's roots) and its host name, and a
//! client certificate when the URL names one (`sslcert`, `sslkey`).

use super::url::TlsParams;
use crate::trust::RootsError;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
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
    let roots = crate::trust::roots(params.root_cert.as_deref()).map_err(|e| {
        let path = params.root_cert.clone().unwrap_or_default();
        match e {
            RootsError::Read(error) => TlsError::Unreadable {
                what: "sslrootcert",
                path,
                error,
            },
            RootsError::Pem(error) => TlsError::Pem {
                what: "sslrootcert",
                path,
                error,
            },
            RootsError::Add(error) => TlsError::Root { path, error },
            RootsError::Empty => TlsError::NoRoot(path),
        }
    })?;
    let builder = crate::trust::client_builder(roots).map_err(TlsError::Setup)?;
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
