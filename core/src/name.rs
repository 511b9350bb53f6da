//! Names: namespaces are DNS labels (RFC 1123), tokens are fully qualified as
//! `namespaces/{namespace}/apitokens/{token}`.

use std::fmt;

/// `^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`, at most 63 bytes (RFC 1123 label, the
/// Kubernetes namespace rule the product uses).
pub fn is_dns_label(label: &[u8]) -> bool {
    let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    match label {
        [] => false,
        [first, .., last] | [first @ last] => {
            label.len() <= 63 && alnum(first) && alnum(last) && label.iter().all(|c| alnum(c) || *c == b'-')
        }
    }
}

/// Whether `name` is `namespaces/{DNS label}/apitokens/{DNS label}`: the
/// check [`TokenName::parse`] makes, in one pass over the bytes, for tables of
/// a million names.
pub fn is_token_name(name: &[u8]) -> bool {
    let Some(rest) = name.strip_prefix(b"namespaces/") else {
        return false;
    };
    let Some(slash) = rest.iter().position(|c| *c == b'/') else {
        return false;
    };
    let (namespace, rest) = rest.split_at(slash);
    match rest.strip_prefix(b"/apitokens/") {
        Some(token) => is_dns_label(namespace) && is_dns_label(token),
        None => false,
    }
}

/// A fully qualified token name split into its parts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenName<'a> {
    pub namespace: &'a str,
    pub token: &'a str,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameError {
    NotQualified,
    BadNamespace,
    BadTokenId,
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotQualified => "must be fully qualified: namespaces/{namespace}/apitokens/{token}",
            Self::BadNamespace => {
                "namespace must be a DNS label (lower-case letters, digits and '-', at most 63 characters)"
            }
            Self::BadTokenId => {
                "token id must be a DNS label (lower-case letters, digits and '-', at most 63 characters)"
            }
        })
    }
}

impl<'a> TokenName<'a> {
    pub fn parse(name: &'a str) -> Result<Self, NameError> {
        let mut parts = name.split('/');
        match (parts.next(), parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("namespaces"), Some(namespace), Some("apitokens"), Some(token), None) => {
                if !is_dns_label(namespace.as_bytes()) {
                    Err(NameError::BadNamespace)
                } else if !is_dns_label(token.as_bytes()) {
                    Err(NameError::BadTokenId)
                } else {
                    Ok(Self { namespace, token })
                }
            }
            _ => Err(NameError::NotQualified),
        }
    }
}

impl fmt::Display for TokenName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "namespaces/{}/apitokens/{}", self.namespace, self.token)
    }
}
