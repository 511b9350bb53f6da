//! The `Authorization: Bearer <token>` header (RFC 6750 section 2.1).

/// Why an Authorization value does not carry exactly one bearer token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BearerError {
    /// Empty value: no credentials at all.
    Empty,
    /// Another scheme (`Basic`, `Token`, ...): no bearer token presented.
    NotBearer,
    /// The `Bearer` scheme with something other than one space and a b64token.
    Malformed,
    /// A comma: more than one credential. Envoy joins repeated Authorization
    /// headers with a comma, so this also catches duplicated headers.
    Multiple,
}

/// Extracts the token from an Authorization value. The scheme is matched
/// case-insensitively (RFC 9110 11.1); it is followed by exactly one space and
/// a b64token: `1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="`.
pub fn parse(value: &[u8]) -> Result<&[u8], BearerError> {
    // Whitespace around a field value is not part of it (RFC 9110 5.5).
    // HTTP/1.1 codecs strip it; HTTP/2 hands it over as sent.
    let value = trim_ows(value);
    if value.is_empty() {
        return Err(BearerError::Empty);
    }
    if value.contains(&b',') {
        return Err(BearerError::Multiple);
    }
    let (scheme, rest) = match value.iter().position(|c| *c == b' ') {
        Some(space) => value.split_at(space),
        None => (value, &b""[..]),
    };
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return Err(BearerError::NotBearer);
    }
    let token = rest.strip_prefix(b" ").unwrap_or(rest);
    if is_b64token(token) {
        Ok(token)
    } else {
        Err(BearerError::Malformed)
    }
}

fn trim_ows(mut value: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = value {
        value = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = value {
        value = rest;
    }
    value
}

fn is_b64token(token: &[u8]) -> bool {
    let body_len = token
        .iter()
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~' | b'+' | b'/'))
        .count();
    body_len > 0 && token.iter().skip(body_len).all(|c| *c == b'=')
}
