//! Webhooks: the audit trail and the expiry warnings, delivered to the
//! operator's endpoints (`--webhook NAME=URL`) as CloudEvents over HTTP
//! POST, signed as Standard Webhooks specifies (`cloudevent`, `sign`),
//! retried with backoff, at least once, in order, from a durable outbox:
//! the audit trail itself, each endpoint with a cursor and a lease in the
//! store (`deliver`). Never a secret or a digest: an event carries what
//! `apitokens:events` shows.

pub mod client;
pub mod cloudevent;
pub mod deliver;
pub mod expiry;
pub mod sign;

pub use deliver::{Endpoint, Settings};

/// Why a `--webhook` cannot be used.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    #[error("expected NAME=URL, NAME a DNS label (its cursor's name in the store)")]
    Shape,
    #[error("the URL {0}")]
    Url(#[from] client::TargetError),
}

impl Endpoint {
    /// `NAME=URL`.
    pub fn parse(text: &str) -> Result<Self, EndpointError> {
        let (name, url) = text.split_once('=').ok_or(EndpointError::Shape)?;
        if !apitokens_core::name::is_dns_label(name.as_bytes()) {
            return Err(EndpointError::Shape);
        }
        Ok(Self {
            name: name.to_owned(),
            target: client::Target::parse(url)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let e = Endpoint::parse("audit=https://hooks.example.com/apitokens").unwrap();
        assert_eq!(e.name, "audit");
        assert_eq!(e.target.to_string(), "https://hooks.example.com/apitokens");
        assert_eq!(Endpoint::parse("https://x/").unwrap_err(), EndpointError::Shape);
        assert_eq!(
            Endpoint::parse("Bad_Name=https://x/").unwrap_err(),
            EndpointError::Shape
        );
        assert!(matches!(Endpoint::parse("a=ftp://x/"), Err(EndpointError::Url(_))));
    }
}
