//! Configuration validation: every error names its field and never the value.
#![cfg(test)] // helpers are test code too, for clippy.toml's allow-*-in-tests
mod common;

use apitokens_core::error::ConfigError;
use apitokens_core::overrides::UrlOverrides;
use apitokens_core::spec::PluginConfig;
use apitokens_core::Config;
use common::*;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

const DIGEST: &str = "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b";

fn token(name: &str, role: &str, digest: &str) -> String {
    format!(r#"{{"name":"{name}","role":"{role}","secretSha256":"{digest}"}}"#)
}

fn rejects(json: &str) -> ConfigError {
    match Config::from_json(json.as_bytes()) {
        Ok(_) => panic!("accepted: {json}"),
        Err(e) => e,
    }
}

/// The error names `field`, says something containing `problem`, and does not
/// quote `secret_value` (a value that must never be echoed).
fn assert_rejected(json: &str, field: &str, problem: &str, secret_value: &str) {
    let e = rejects(json);
    assert_eq!(e.field, field, "{json}\n=> {e}");
    assert!(e.problem.contains(problem), "{json}\n=> {e}");
    if !secret_value.is_empty() {
        assert!(!e.to_string().contains(secret_value), "echoes the value: {e}");
    }
}

#[test]
fn accepts_the_documented_example() {
    let json = r#"{
      "tokens": [
        { "name": "namespaces/default/apitokens/ci-token",
          "role": "editor",
          "secretSha256": "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b",
          "expireTime": "2027-01-01T00:00:00Z" }
      ]
    }"#;
    let config = Config::from_json(json.as_bytes()).unwrap();
    assert_eq!(config.token_count(), 1);
    assert!(!config.forward_authorization());
    assert_eq!(&*config.identity_headers().name, "x-apitoken-name");
    assert_eq!(&*config.identity_headers().namespace, "x-apitoken-namespace");
    assert_eq!(&*config.identity_headers().role, "x-apitoken-role");
}

#[test]
fn accepts_every_optional_field() {
    let json = format!(
        r#"{{"tokens":[{}],"realm":"gateway","identityHeaders":{{"name":"x-user","namespace":"x-ns","role":"x-r"}},
            "forwardAuthorization":true,
            "forwardAuthorizationPaths":["/tokens/{{namespace}}/**"],
            "forwardAuthorizationClusters":["tokens_api"],
            "urlOverrideHeaders":"remove",
            "rules":[{{"path":"/v1/{{namespace}}/**","allow":{{"viewer":["get","list"],"editor":["*"]}}}}]}}"#,
        token("namespaces/a/apitokens/b", "owner", DIGEST)
    );
    let config = Config::from_json(json.as_bytes()).unwrap();
    assert!(config.forward_authorization());
    assert!(config.forwards_to(b"tokens_api") && !config.forwards_to(b"tokens_ap"));
    assert_eq!(config.url_overrides(), UrlOverrides::Remove);
    assert_eq!(&*config.identity_headers().name, "x-user");
    assert_eq!(config.rules().len(), 1);
}

#[test]
fn empty_configuration_has_no_tokens() {
    for json in ["", "  \n", "{}", r#"{"tokens":[]}"#] {
        assert_eq!(Config::from_json(json.as_bytes()).unwrap().token_count(), 0, "{json:?}");
    }
}

#[test]
fn unknown_fields_are_errors() {
    let e = rejects(r#"{"tokens":[],"tokenz":[]}"#);
    assert!(e.problem.contains("unknown field `tokenz`"), "{e}");
    let e = rejects(&format!(
        r#"{{"tokens":[{{"name":"namespaces/a/apitokens/b","role":"owner","secretSha256":"{DIGEST}","secret":"hunter2"}}]}}"#
    ));
    assert!(e.field.starts_with("tokens[0]"), "{e}");
    assert!(e.problem.contains("unknown field `secret`"), "{e}");
    assert!(!e.to_string().contains("hunter2"), "{e}");
    // An empty field name (found by fuzzing) still names where it is.
    let e = rejects(r#"{"":1}"#);
    assert_eq!(e.field, "configuration", "{e}");
    let e = rejects(r#"{"identityHeaders":{"user":"x"}}"#);
    assert!(e.field.starts_with("identityHeaders"), "{e}");
    let e = rejects(r#"{"rules":[{"path":"/v1/{namespace}","allow":{"admin":["*"]}}]}"#);
    assert!(e.field.starts_with("rules[0].allow"), "{e}");
}

#[test]
fn malformed_names_are_errors() {
    for name in [
        "ci-token",
        "default/ci-token",
        "namespaces/default/apitokens",
        "namespaces/default/apitokens/",
        "namespaces//apitokens/ci",
        "namespaces/default/tokens/ci",
        "namespaces/default/apitokens/ci/extra",
        "/namespaces/default/apitokens/ci",
        "namespaces/Default/apitokens/ci",
        "namespaces/default/apitokens/CI",
        "namespaces/-default/apitokens/ci",
        "namespaces/default-/apitokens/ci",
        "namespaces/de_fault/apitokens/ci",
        "namespaces/default/apitokens/ci.token",
    ] {
        assert_rejected(
            &format!(r#"{{"tokens":[{}]}}"#, token(name, "owner", DIGEST)),
            "tokens[0].name",
            "",
            "",
        );
    }
    let long = "a".repeat(64);
    assert_rejected(
        &format!(
            r#"{{"tokens":[{}]}}"#,
            token(&format!("namespaces/{long}/apitokens/ci"), "owner", DIGEST)
        ),
        "tokens[0].name",
        "namespace",
        "",
    );
    let max = "a".repeat(63);
    assert!(Config::from_json(
        format!(
            r#"{{"tokens":[{}]}}"#,
            token(&format!("namespaces/{max}/apitokens/{max}"), "owner", DIGEST)
        )
        .as_bytes()
    )
    .is_ok());
}

#[test]
fn unknown_roles_are_errors() {
    for role in ["admin", "Owner", "OWNER", "", "viewer "] {
        assert_rejected(
            &format!(r#"{{"tokens":[{}]}}"#, token("namespaces/a/apitokens/b", role, DIGEST)),
            "tokens[0].role",
            "unknown role",
            "",
        );
    }
    assert_rejected(
        &format!(r#"{{"tokens":[{{"name":"namespaces/a/apitokens/b","role":3,"secretSha256":"{DIGEST}"}}]}}"#),
        "tokens[0].role",
        "wrong type",
        "",
    );
}

#[test]
fn digests_must_be_64_lowercase_hex() {
    let upper = DIGEST.to_uppercase();
    let short = &DIGEST[..63];
    let long = format!("{DIGEST}0");
    let nonhex = format!("{}g", &DIGEST[..63]);
    let plain_secret = "my-plain-text-secret-value";
    for digest in [upper.as_str(), short, long.as_str(), nonhex.as_str(), plain_secret, ""] {
        assert_rejected(
            &format!(
                r#"{{"tokens":[{}]}}"#,
                token("namespaces/a/apitokens/b", "owner", digest)
            ),
            "tokens[0].secretSha256",
            "64 lower-case hex",
            plain_secret,
        );
    }
}

#[test]
fn duplicates_are_errors() {
    let other = sha256_hex("another");
    assert_rejected(
        &format!(
            r#"{{"tokens":[{},{},{}]}}"#,
            token("namespaces/a/apitokens/b", "owner", DIGEST),
            token("namespaces/a/apitokens/c", "owner", &other),
            token("namespaces/a/apitokens/d", "viewer", DIGEST)
        ),
        "tokens[2].secretSha256",
        "duplicate of tokens[0]",
        "",
    );
    assert_rejected(
        &format!(
            r#"{{"tokens":[{},{}]}}"#,
            token("namespaces/a/apitokens/b", "owner", DIGEST),
            token("namespaces/a/apitokens/b", "viewer", &other)
        ),
        "tokens[1].name",
        "duplicate of tokens[0]",
        "",
    );
}

#[test]
fn bad_timestamps_are_errors() {
    for ts in [
        "2027-01-01",
        "2027-01-01T00:00:00",
        "2027-01-01 00:00:00Z",
        "2027-13-01T00:00:00Z",
        "2027-02-29T00:00:00Z",
        "2027-04-31T00:00:00Z",
        "2027-01-01T24:00:00Z",
        "2027-01-01T00:60:00Z",
        "2027-01-01T00:00:00.Z",
        "2027-01-01T00:00:00+2:00",
        "2027-01-01T00:00:00+24:00",
        "1735689600",
        "tomorrow",
        "",
    ] {
        assert_rejected(
            &format!(
                r#"{{"tokens":[{{"name":"namespaces/a/apitokens/b","role":"owner","secretSha256":"{DIGEST}","expireTime":"{ts}"}}]}}"#
            ),
            "tokens[0].expireTime",
            "RFC 3339",
            "",
        );
    }
}

#[test]
fn timestamps_past_year_9999_are_errors_that_name_the_field() {
    let config = |ts: &str| {
        format!(
            r#"{{"tokens":[{{"name":"namespaces/a/apitokens/b","role":"owner","secretSha256":"{DIGEST}","expireTime":"{ts}"}}]}}"#
        )
    };
    // Year 9999 on the clock, year 10000 in UTC once the offset is applied.
    for ts in [
        "9999-12-31T23:59:59-23:59",
        "9999-12-31T23:59:59-00:01",
        "9999-12-31T23:59:59.000000001Z",
        "0000-01-01T00:00:00+00:01",
    ] {
        assert_rejected(&config(ts), "tokens[0].expireTime", "9999-12-31T23:59:59Z", ts);
    }
    for ts in [
        "9999-12-31T23:59:59Z",
        "9999-12-31T23:59:59+00:00",
        "9999-12-31T23:59:58.999999999Z",
        "9999-12-31T23:59:59+23:59",
    ] {
        assert!(Config::from_json(config(ts).as_bytes()).is_ok(), "{ts}");
    }
}

#[test]
fn invalid_json_is_an_error_that_points_at_the_position() {
    let e = rejects(r#"{"tokens": [}"#);
    assert!(
        e.problem.contains("not valid JSON") && e.problem.contains("line 1"),
        "{e}"
    );
    let e = rejects(r#"{"tokens": []} trailing"#);
    assert!(e.problem.contains("line 1"), "{e}");
    let e = rejects(r#"["tokens"]"#);
    assert_eq!(e.field, "configuration", "{e}");
}

#[test]
fn realm_and_identity_headers_are_validated() {
    assert_rejected(r#"{"realm":"a\"b"}"#, "realm", "printable", "");
    assert_rejected(r#"{"realm":""}"#, "realm", "printable", "");
    assert_rejected(
        r#"{"identityHeaders":{"name":"X-User"}}"#,
        "identityHeaders.name",
        "header name",
        "",
    );
    assert_rejected(
        r#"{"identityHeaders":{"role":":path"}}"#,
        "identityHeaders.role",
        "header name",
        "",
    );
    assert_rejected(
        r#"{"identityHeaders":{"namespace":"authorization"}}"#,
        "identityHeaders.namespace",
        "must not",
        "",
    );
    assert_rejected(
        r#"{"identityHeaders":{"name":"x-a","role":"x-a"}}"#,
        "identityHeaders",
        "differ",
        "",
    );
    // `_` reads as `-` upstream (CGI, PHP): a client's x-apitoken-role would
    // arrive as the identity header, which the filter never replaced.
    for name in ["x_apitoken_role", "_", "x-role-", "-x-role"] {
        assert_rejected(
            &format!(r#"{{"identityHeaders":{{"role":"{name}"}}}}"#),
            "identityHeaders.role",
            "header name",
            "",
        );
    }
    for name in [
        "authorization",
        "proxy-authorization",
        "cookie",
        "host",
        "content-type",
        "transfer-encoding",
        "te",
        "forwarded",
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
        "x-original-url",
        "x-rewrite-url",
        "x-forwarded-for",
        "x-forwarded-user",
        "x-envoy-original-path",
        "x-request-id",
    ] {
        assert_rejected(
            &format!(r#"{{"identityHeaders":{{"name":"{name}"}}}}"#),
            "identityHeaders.name",
            "must not",
            "",
        );
    }
    assert!(
        Config::from_json(br#"{"identityHeaders":{"name":"x-user-2","namespace":"tenant","role":"role"}}"#).is_ok()
    );
}

#[test]
fn url_override_modes_and_forwarding_paths_are_validated() {
    assert_eq!(Config::from_json(b"{}").unwrap().url_overrides(), UrlOverrides::Reject);
    for (mode, want) in [
        ("reject", UrlOverrides::Reject),
        ("remove", UrlOverrides::Remove),
        ("forward", UrlOverrides::Forward),
    ] {
        let json = format!(r#"{{"urlOverrideHeaders":"{mode}"}}"#);
        assert_eq!(Config::from_json(json.as_bytes()).unwrap().url_overrides(), want);
    }
    for mode in [r#""allow""#, r#""Reject""#, r#""""#] {
        assert_rejected(
            &format!(r#"{{"urlOverrideHeaders":{mode}}}"#),
            "urlOverrideHeaders",
            "\"reject\", \"remove\" or \"forward\"",
            "",
        );
    }
    assert_rejected(r#"{"urlOverrideHeaders":true}"#, "urlOverrideHeaders", "wrong type", "");
    assert_rejected(
        r#"{"forwardAuthorizationPaths":["/a/{namespace}/**","/b/**"]}"#,
        "forwardAuthorizationPaths[1]",
        "{namespace}",
        "",
    );
    assert_rejected(
        r#"{"forwardAuthorizationPaths":["a/{namespace}"]}"#,
        "forwardAuthorizationPaths[0]",
        "start with '/'",
        "",
    );
    // The paths keep the header only for routes to named clusters.
    assert_rejected(
        r#"{"forwardAuthorizationPaths":["/a/{namespace}/**"]}"#,
        "forwardAuthorizationClusters",
        "required with forwardAuthorizationPaths",
        "",
    );
    assert_rejected(
        r#"{"forwardAuthorizationClusters":["api"]}"#,
        "forwardAuthorizationClusters",
        "no effect without",
        "",
    );
    assert_rejected(
        r#"{"forwardAuthorizationPaths":["/a/{namespace}/**"],"forwardAuthorizationClusters":["api",""]}"#,
        "forwardAuthorizationClusters[1]",
        "cluster name",
        "",
    );
}

#[test]
fn rules_are_validated() {
    let cases = [
        (r#"{"path":"v1/{namespace}"}"#, "rules[0].path", "start with '/'"),
        (r#"{"path":"/v1/orders/**"}"#, "rules[0].path", "{namespace}"),
        (
            r#"{"path":"/v1/{namespace}/{namespace}"}"#,
            "rules[0].path",
            "only once",
        ),
        (r#"{"path":"/v1/**/{namespace}"}"#, "rules[0].path", "last segment"),
        (r#"{"path":"/v1//{namespace}"}"#, "rules[0].path", "empty segment"),
        (r#"{"path":"/v1/../{namespace}"}"#, "rules[0].path", "dot segment"),
        (r#"{"path":"/v1/a%2Fb/{namespace}"}"#, "rules[0].path", "segments are"),
        (
            r#"{"path":"/v1/{namespace}","allow":{"viewer":["read"]}}"#,
            "rules[0].allow.viewer[0]",
            "unknown verb",
        ),
        (
            r#"{"path":"/v1/{namespace}","allow":{"owner":["get","Delete"]}}"#,
            "rules[0].allow.owner[1]",
            "unknown verb",
        ),
    ];
    for (rule, field, problem) in cases {
        assert_rejected(&format!(r#"{{"rules":[{rule}]}}"#), field, problem, "");
    }
}

#[test]
fn schema_round_trips_through_json() {
    let spec = PluginConfig::from_json(fixture_json(r#","realm":"r""#).as_bytes()).unwrap();
    let again = PluginConfig::from_json(spec.to_json().as_bytes()).unwrap();
    assert_eq!(spec, again);
    assert!(!spec.to_json().contains("forwardAuthorization"), "defaults are omitted");
    assert!(!spec.to_json().contains("urlOverrideHeaders"), "defaults are omitted");
}
