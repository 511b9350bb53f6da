//! Shared fixtures: a configuration with one token per role in `default`, one
//! in `other`, and one that expires.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use apitokens_core::{Config, Timestamp};

pub mod recorder;
use sha2::{Digest, Sha256};

pub const VIEWER: &str = "viewer-secret-0001";
pub const EDITOR: &str = "editor-secret-0002";
pub const OWNER: &str = "owner-secret-0003";
pub const OTHER_OWNER: &str = "other-owner-secret-0004";
pub const EXPIRING: &str = "expiring-secret-0005";
/// `expireTime` of the EXPIRING token.
pub const EXPIRE_TIME: &str = "2027-01-01T00:00:00Z";

pub fn sha256_hex(secret: &str) -> String {
    Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub fn token_json(name: &str, role: &str, secret: &str, expire: Option<&str>) -> String {
    let expire = expire.map_or(String::new(), |e| format!(r#","expireTime":"{e}""#));
    format!(
        r#"{{"name":"{name}","role":"{role}","secretSha256":"{}"{expire}}}"#,
        sha256_hex(secret)
    )
}

pub fn fixture_json(extra: &str) -> String {
    let tokens = [
        token_json("namespaces/default/apitokens/viewer", "viewer", VIEWER, None),
        token_json("namespaces/default/apitokens/editor", "editor", EDITOR, None),
        token_json("namespaces/default/apitokens/owner", "owner", OWNER, None),
        token_json("namespaces/other/apitokens/owner", "owner", OTHER_OWNER, None),
        token_json(
            "namespaces/default/apitokens/expiring",
            "editor",
            EXPIRING,
            Some(EXPIRE_TIME),
        ),
    ]
    .join(",");
    format!(r#"{{"tokens":[{tokens}]{extra}}}"#)
}

pub fn fixture() -> Config {
    Config::from_json(fixture_json("").as_bytes()).expect("fixture is valid")
}

pub fn bearer(secret: &str) -> Vec<u8> {
    format!("Bearer {secret}").into_bytes()
}

pub fn at(rfc3339: &str) -> Timestamp {
    Timestamp::parse_rfc3339(rfc3339).expect("valid timestamp")
}

/// A clock that fails the test when read.
pub fn no_clock() -> Option<Timestamp> {
    panic!("the clock must not be read for a token without expireTime")
}
