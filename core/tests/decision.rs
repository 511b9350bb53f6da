//! Authentication: the Authorization header, the token lookup and expiry.
#![cfg(test)] // helpers are test code too, for clippy.toml's allow-*-in-tests
mod common;

use apitokens_core::bearer::{self, BearerError};
use apitokens_core::denial::Denial;
use apitokens_core::{Config, Timestamp};
use common::*;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

fn authn(config: &Config, value: &[u8]) -> Result<String, Denial> {
    config
        .authenticate(None, Some(value), || Some(at("2026-06-01T00:00:00Z")))
        .map(|t| t.name().to_owned())
        .map_err(|(d, _)| d)
}

#[test]
fn bearer_scheme_is_case_insensitive_with_exactly_one_space() {
    let config = fixture();
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let value = format!("{scheme} {EDITOR}");
        assert_eq!(
            authn(&config, value.as_bytes()),
            Ok("namespaces/default/apitokens/editor".into()),
            "{value}"
        );
    }
    // Whitespace around the value is not part of it (HTTP/2 does not strip it).
    for value in [
        format!("  Bearer {EDITOR}"),
        format!("Bearer {EDITOR} \t"),
        format!("\tBearer {EDITOR}\t"),
    ] {
        assert_eq!(
            authn(&config, value.as_bytes()),
            Ok("namespaces/default/apitokens/editor".into()),
            "{value:?}"
        );
    }
}

#[test]
fn authorization_values_map_to_the_documented_denials() {
    let config = fixture();
    let cases: &[(&[u8], Denial)] = &[
        (b"", Denial::Missing),
        (b" \t ", Denial::Missing),
        (b"Basic dXNlcjpwYXNz", Denial::NotBearer),
        (b"Token abc", Denial::NotBearer),
        (b"Bearerabc", Denial::NotBearer),
        (b"Bearer\tabc", Denial::NotBearer),
        (b"Bearer", Denial::Malformed),
        (b"Bearer ", Denial::Malformed),
        (b"Bearer  abc", Denial::Malformed),
        (b"Bearer abc def", Denial::Malformed),
        (b"Bearer \"abc\"", Denial::Malformed),
        (b"Bearer abc\xff\xfe", Denial::Malformed),
        (b"Bearer ab\x01c", Denial::Malformed),
        (b"Bearer ab=c", Denial::Malformed),
        (b"Bearer abc,Bearer def", Denial::MultipleCredentials),
        (b"Bearer abc, Basic x", Denial::MultipleCredentials),
        (b",", Denial::MultipleCredentials),
        (b"Bearer unknown-secret", Denial::Unknown),
        (b"Bearer abc==", Denial::Unknown),
        (b"Bearer a-b.c_d~e+f/g", Denial::Unknown),
    ];
    for (value, want) in cases {
        assert_eq!(authn(&config, value), Err(*want), "{}", String::from_utf8_lossy(value));
    }
    assert_eq!(
        config.authenticate(None, None, no_clock).map_err(|(d, _)| d),
        Err(Denial::Missing)
    );
}

#[test]
fn a_secret_one_character_off_is_unknown() {
    let config = fixture();
    let mut flipped = EDITOR.as_bytes().to_vec();
    flipped[3] ^= 0x01;
    let truncated = &EDITOR[..EDITOR.len() - 1];
    let extended = format!("{EDITOR}x");
    for secret in [
        String::from_utf8(flipped).unwrap(),
        truncated.to_owned(),
        extended,
        EDITOR.to_uppercase(),
    ] {
        assert_eq!(
            authn(&config, format!("Bearer {secret}").as_bytes()),
            Err(Denial::Unknown),
            "{secret}"
        );
    }
}

#[test]
fn bearer_parser_returns_the_token_bytes() {
    assert_eq!(bearer::parse(b"Bearer abc=="), Ok(&b"abc=="[..]));
    assert_eq!(bearer::parse(b"bearer x"), Ok(&b"x"[..]));
    assert_eq!(bearer::parse(b"Bearer a,b"), Err(BearerError::Multiple));
    let big = format!("Bearer {}", "A".repeat(60 * 1024));
    assert_eq!(bearer::parse(big.as_bytes()).map(<[u8]>::len), Ok(60 * 1024));
}

#[test]
fn expiry_is_inclusive_to_the_nanosecond() {
    let config = fixture();
    let auth = bearer(EXPIRING);
    let expire = at(EXPIRE_TIME);
    let check = |now: Timestamp| {
        config
            .authenticate(None, Some(&auth), || Some(now))
            .map(|_| ())
            .map_err(|(d, _)| d)
    };
    let before = Timestamp::from_unix(expire.unix_seconds() - 1, 999_999_999);
    assert_eq!(check(before), Ok(()));
    assert_eq!(check(expire), Err(Denial::Expired), "expireTime == now is expired");
    assert_eq!(
        check(Timestamp::from_unix(expire.unix_seconds(), 1)),
        Err(Denial::Expired)
    );
    assert_eq!(check(at("2027-01-01T00:00:01Z")), Err(Denial::Expired));
    assert_eq!(check(at("2026-12-31T23:59:59Z")), Ok(()));
}

#[test]
fn an_expired_token_is_named_in_the_denial() {
    let config = fixture();
    let auth = bearer(EXPIRING);
    match config.authenticate(None, Some(&auth), || Some(at("2030-01-01T00:00:00Z"))) {
        Err((Denial::Expired, Some(token))) => assert_eq!(token.name(), "namespaces/default/apitokens/expiring"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_unreadable_clock_fails_closed() {
    let config = fixture();
    let auth = bearer(EXPIRING);
    assert_eq!(
        config
            .authenticate(None, Some(&auth), || None)
            .map(|_| ())
            .map_err(|(d, _)| d),
        Err(Denial::Expired)
    );
}

#[test]
fn tokens_without_expiry_never_read_the_clock() {
    let config = fixture();
    let auth = bearer(OWNER);
    assert!(config.authenticate(None, Some(&auth), no_clock).is_ok());
}

#[test]
fn the_empty_configuration_refuses_everything() {
    let config = Config::deny_all();
    let auth = bearer(OWNER);
    assert_eq!(authn(&config, &auth), Err(Denial::Unknown));
}
