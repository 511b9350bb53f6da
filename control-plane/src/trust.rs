//! What an outgoing TLS connection trusts (the database's server, a webhook
//! endpoint): the CA certificates of a PEM file the operator names, or the
//! system's roots; and the rustls client configuration over them.

use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::CertificateDer;
use std::path::Path;
use std::sync::Arc;

/// Why a CA file cannot be used (its path is the caller's to name).
#[derive(Debug, thiserror::Error)]
pub enum RootsError {
    #[error("{0}")]
    Read(std::io::Error),
    #[error("{0}")]
    Pem(rustls_pki_types::pem::Error),
    #[error("{0}")]
    Add(rustls::Error),
    #[error("no certificate in it")]
    Empty,
}

/// The certificates of `ca` (PEM, at least one), or without it the
/// system's (unreadable ones skipped: they only matter if TLS is used).
pub fn roots(ca: Option<&Path>) -> Result<rustls::RootCertStore, RootsError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let pem = std::fs::read(path).map_err(RootsError::Read)?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                roots.add(cert.map_err(RootsError::Pem)?).map_err(RootsError::Add)?;
            }
            if roots.is_empty() {
                return Err(RootsError::Empty);
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    Ok(roots)
}

/// A client configuration over `roots` (ring, the safe default protocol
/// versions), its client certificate still to choose.
pub fn client_builder(
    roots: rustls::RootCertStore,
) -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots))
}
