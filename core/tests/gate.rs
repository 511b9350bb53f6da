//! The per-request flow through a recording host double: which headers are
//! set or removed, what reply is sent, what is counted and logged.
#![cfg(test)] // helpers are test code too, for clippy.toml's allow-*-in-tests
mod common;

use apitokens_core::access::{Access, Kind};
use apitokens_core::denial::{Counter, Denial};
use apitokens_core::gate::{self, Verdict};
use apitokens_core::reply::Reply;
use apitokens_core::role::Role;
use apitokens_core::Config;
use common::recorder::{Interleaved, Recorder, SharedStore};
use common::*;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

fn run(config: &Config, host: &mut Recorder) -> Verdict {
    gate::on_request_headers(host, config, None)
}

fn reply_header<'r>(reply: &'r Reply, name: &str) -> Option<&'r str> {
    reply.headers.iter().find(|(k, _)| *k == name).map(|(_, v)| &**v)
}

#[test]
fn allowed_requests_carry_identity_and_lose_the_authorization_header() {
    let config = fixture();
    let auth = bearer(EDITOR);
    let mut host = Recorder::request("POST", "/api/v1/namespaces/default/deployments", Some(&auth))
        .with_header("x-apitoken-role", "owner")
        .with_header("x-apitoken-name", "namespaces/default/apitokens/owner")
        .with_header("x-apitoken-namespace", "other");
    assert_eq!(run(&config, &mut host), Verdict::Continue);
    assert_eq!(
        host.header("x-apitoken-name").as_deref(),
        Some("namespaces/default/apitokens/editor")
    );
    assert_eq!(host.header("x-apitoken-namespace").as_deref(), Some("default"));
    assert_eq!(host.header("x-apitoken-role").as_deref(), Some("editor"));
    assert_eq!(host.header("authorization"), None);
    assert_eq!(host.counters, vec![Counter::Allowed]);
    assert!(host.reply.is_none());
    assert!(host.logs.is_empty());
}

#[test]
fn forward_authorization_keeps_the_header() {
    let config = Config::from_json(fixture_json(r#","forwardAuthorization":true"#).as_bytes()).unwrap();
    let auth = bearer(VIEWER);
    let mut host = Recorder::request("GET", "/api/v1/namespaces/default/jobs", Some(&auth));
    assert_eq!(run(&config, &mut host), Verdict::Continue);
    assert_eq!(
        host.header("authorization").as_deref(),
        Some(&*format!("Bearer {VIEWER}"))
    );
}

#[test]
fn custom_identity_header_names_are_used() {
    let config = Config::from_json(
        fixture_json(r#","identityHeaders":{"name":"x-token","namespace":"x-tenant","role":"x-role"}"#).as_bytes(),
    )
    .unwrap();
    let auth = bearer(OWNER);
    let mut host =
        Recorder::request("GET", "/api/v1/namespaces/default/jobs", Some(&auth)).with_header("x-apitoken-role", "x");
    assert_eq!(run(&config, &mut host), Verdict::Continue);
    assert_eq!(host.header("x-tenant").as_deref(), Some("default"));
    assert_eq!(host.header("x-role").as_deref(), Some("owner"));
    assert_eq!(
        host.header("x-token").as_deref(),
        Some("namespaces/default/apitokens/owner")
    );
}

#[test]
fn every_denial_sends_its_rfc_6750_reply_and_strips_forged_identity() {
    let config = fixture();
    let unknown = bearer("nope");
    let viewer = bearer(VIEWER);
    let expiring = bearer(EXPIRING);
    type Case<'a> = (Option<&'a [u8]>, &'a str, &'a str, Denial, u32, &'a str, Counter);
    let cases: Vec<Case> = vec![
        (
            None,
            "GET",
            "/api/v1/namespaces/default/jobs",
            Denial::Missing,
            401,
            r#"Bearer realm="apitokens""#,
            Counter::Missing,
        ),
        (
            Some(b"Basic eDp5"),
            "GET",
            "/api/v1/namespaces/default/jobs",
            Denial::NotBearer,
            401,
            r#"Bearer realm="apitokens""#,
            Counter::Malformed,
        ),
        (
            Some(b"Bearer  x"),
            "GET",
            "/api/v1/namespaces/default/jobs",
            Denial::Malformed,
            401,
            r#"Bearer realm="apitokens", error="invalid_token""#,
            Counter::Malformed,
        ),
        (
            Some(b"Bearer a,Bearer b"),
            "GET",
            "/api/v1/namespaces/default/jobs",
            Denial::MultipleCredentials,
            400,
            r#"Bearer realm="apitokens", error="invalid_request""#,
            Counter::Malformed,
        ),
        (
            Some(&unknown),
            "GET",
            "/api/v1/namespaces/default/jobs",
            Denial::Unknown,
            401,
            r#"Bearer realm="apitokens", error="invalid_token""#,
            Counter::Unknown,
        ),
        (
            Some(&viewer),
            "GET",
            "/api/v1/namespaces/other/jobs",
            Denial::NamespaceDenied,
            403,
            r#"Bearer realm="apitokens", error="insufficient_scope""#,
            Counter::NamespaceDenied,
        ),
        (
            Some(&viewer),
            "DELETE",
            "/api/v1/namespaces/default/jobs/j",
            Denial::RoleDenied,
            403,
            r#"Bearer realm="apitokens", error="insufficient_scope""#,
            Counter::RoleDenied,
        ),
    ];
    for (auth, method, path, denial, status, challenge, counter) in cases {
        let mut host = Recorder::request(method, path, auth).with_header("x-apitoken-role", "owner");
        assert_eq!(run(&config, &mut host), Verdict::Stop, "{denial:?}");
        let (sent, reply) = host.reply.clone().expect("a reply");
        assert_eq!(sent, denial);
        assert_eq!(reply.status, status, "{denial:?}");
        assert_eq!(reply_header(&reply, "www-authenticate"), Some(challenge), "{denial:?}");
        assert_eq!(reply_header(&reply, "content-type"), Some("application/json"));
        assert_eq!(reply.details(), format!("apitokens_{}", denial.reason()));
        let body = String::from_utf8(reply.body.to_vec()).unwrap();
        assert!(
            body.starts_with(&format!("{{\"code\":{status},\"message\":\"")),
            "{body}"
        );
        assert_eq!(
            host.header("x-apitoken-role"),
            None,
            "forged identity removed on {denial:?}"
        );
        assert_eq!(host.counters, vec![counter]);
        assert_eq!(host.logs.len(), 1);
        assert!(
            host.logs[0].contains(&format!("reason={}", denial.reason())),
            "{}",
            host.logs[0]
        );
    }
    let mut host = Recorder::request("GET", "/api/v1/namespaces/default/jobs", Some(&expiring));
    host.now = Some(at("2027-01-01T00:00:00Z"));
    assert_eq!(run(&config, &mut host), Verdict::Stop);
    assert_eq!(
        host.reply.as_ref().map(|(d, r)| (*d, r.status)),
        Some((Denial::Expired, 401))
    );
    assert_eq!(host.counters, vec![Counter::Expired]);
}

/// A configuration with a disabled token (`"disabled": true`), one in a
/// rotation's overlap, and one that has expired as well.
fn with_disabled() -> Config {
    let token = |name: &str, secret: &str, extra: &str| {
        format!(
            r#"{{"name":"namespaces/default/apitokens/{name}","role":"owner","secretSha256":"{}"{extra}}}"#,
            sha256_hex(secret)
        )
    };
    let tokens = [
        token("on", "on-secret", ""),
        token("off", "off-secret", r#","disabled":true"#),
        token(
            "rotated",
            "rotated-secret",
            &format!(
                r#","disabled":true,"previousSecretSha256":"{}","previousSecretExpireTime":"2030-01-01T00:00:00Z""#,
                sha256_hex("rotated-old-secret")
            ),
        ),
        token(
            "gone",
            "gone-secret",
            r#","disabled":true,"expireTime":"2026-01-01T00:00:00Z""#,
        ),
    ];
    Config::from_json(format!(r#"{{"tokens":[{}]}}"#, tokens.join(",")).as_bytes()).unwrap()
}

#[test]
fn a_disabled_token_is_refused_with_its_own_reason_and_counter() {
    let config = with_disabled();
    let enabled = bearer("on-secret");
    let mut host = Recorder::request("GET", "/api/v1/namespaces/default/jobs", Some(&enabled));
    assert_eq!(run(&config, &mut host), Verdict::Continue);
    // Every secret of a disabled token, the previous one of an overlap too.
    for secret in ["off-secret", "rotated-secret", "rotated-old-secret"] {
        let auth = bearer(secret);
        let mut host = Recorder::request("GET", "/api/v1/namespaces/default/jobs", Some(&auth))
            .with_header("x-apitoken-role", "owner");
        assert_eq!(run(&config, &mut host), Verdict::Stop, "{secret}");
        let (denial, reply) = host.reply.clone().unwrap();
        assert_eq!(denial, Denial::Disabled, "{secret}");
        assert_eq!(reply.status, 401);
        assert_eq!(reply.details(), "apitokens_disabled");
        // The client reads what an unknown or expired secret reads.
        let unknown = bearer("nobody-has-this");
        let mut other = Recorder::request("GET", "/api/v1/namespaces/default/jobs", Some(&unknown));
        run(&config, &mut other);
        let (_, unknown_reply) = other.reply.unwrap();
        assert_eq!(
            (&reply.headers, &reply.body),
            (&unknown_reply.headers, &unknown_reply.body)
        );
        assert_eq!(
            reply_header(&reply, "www-authenticate"),
            Some(r#"Bearer realm="apitokens", error="invalid_token""#)
        );
        assert_eq!(host.counters, vec![Counter::Disabled]);
        assert_eq!(host.header("x-apitoken-role"), None);
        assert!(
            host.logs[0].contains("reason=disabled token=namespaces/default/apitokens/"),
            "{}",
            host.logs[0]
        );
        // A refused secret is no use: its last use stays as it was.
        assert!(host.used.is_empty(), "{:?}", host.used);
    }
    // Expired and disabled: expired (the state an enable would not undo).
    let gone = bearer("gone-secret");
    let mut host = Recorder::request("GET", "/api/v1/namespaces/default/jobs", Some(&gone));
    assert_eq!(run(&config, &mut host), Verdict::Stop);
    assert_eq!(host.reply.map(|(d, _)| d), Some(Denial::Expired));
    assert_eq!(host.counters, vec![Counter::Expired]);
    // Not expired yet: disabled.
    let mut host = Recorder::request("GET", "/api/v1/namespaces/default/jobs", Some(&gone));
    host.now = Some(at("2025-06-01T00:00:00Z"));
    run(&config, &mut host);
    assert_eq!(host.reply.map(|(d, _)| d), Some(Denial::Disabled));
}

#[test]
fn disabled_is_false_unless_said_and_must_be_a_boolean() {
    let config = fixture();
    assert!(config.tokens().iter().all(|(_, t)| !t.is_disabled()));
    let bad = format!(
        r#"{{"tokens":[{{"name":"namespaces/a/apitokens/b","role":"owner","secretSha256":"{}","disabled":"yes"}}]}}"#,
        sha256_hex("x")
    );
    let err = Config::from_json(bad.as_bytes()).unwrap_err();
    assert_eq!(err.field, "tokens[0].disabled", "{err}");
}

#[test]
fn denial_logs_name_the_token_and_never_the_secret() {
    let config = fixture();
    let auth = bearer(VIEWER);
    let mut host = Recorder::request("DELETE", "/api/v1/namespaces/default/jobs/j", Some(&auth));
    run(&config, &mut host);
    assert!(
        host.logs[0].contains("token=namespaces/default/apitokens/viewer"),
        "{}",
        host.logs[0]
    );
    let unknown = bearer("a-secret-nobody-has");
    let mut host = Recorder::request("GET", "/api/v1/namespaces/default/jobs", Some(&unknown));
    run(&config, &mut host);
    for line in &host.logs {
        assert!(
            !line.contains(VIEWER) && !line.contains("a-secret-nobody-has"),
            "{line}"
        );
    }
    let (_, reply) = host.reply.unwrap();
    assert!(!String::from_utf8_lossy(&reply.body).contains("a-secret-nobody-has"));
}

#[test]
fn headers_are_read_once_and_a_refusal_writes_nothing_the_client_did_not_send() {
    let config = fixture();
    let auth = bearer("nope");
    let mut host = Recorder::request("GET", "/api/v1/namespaces/default/jobs", Some(&auth));
    run(&config, &mut host);
    assert_eq!(host.reads, 1);
    assert!(host.writes.is_empty(), "{:?}", host.writes);
}

#[test]
fn a_failing_host_fails_closed() {
    let config = fixture();
    let auth = bearer(OWNER);
    let mut host = Recorder::request("GET", "/api/v1/namespaces/default/jobs", Some(&auth));
    host.fail_writes = true;
    assert_eq!(run(&config, &mut host), Verdict::Stop);
    let (denial, reply) = host.reply.unwrap();
    assert_eq!((denial, reply.status), (Denial::Internal, 500));
    assert_eq!(host.counters, vec![Counter::InternalError]);
}

#[test]
fn the_realm_is_configurable() {
    let config = Config::from_json(fixture_json(r#","realm":"acme gateway""#).as_bytes()).unwrap();
    let mut host = Recorder::request("GET", "/", None);
    run(&config, &mut host);
    let (_, reply) = host.reply.unwrap();
    assert_eq!(
        reply_header(&reply, "www-authenticate"),
        Some(r#"Bearer realm="acme gateway""#)
    );
}

#[test]
fn no_built_in_rule_forwards_the_authorization_header() {
    // Behind envoy.yaml, Docker and Istio the token API's paths reach the
    // application's upstream: it must not receive an owner's secret.
    let config = fixture();
    let auth = bearer(OWNER);
    let mut host = Recorder::request("POST", "/apitokens/v1/namespaces/default/apitokens", Some(&auth));
    assert_eq!(run(&config, &mut host), Verdict::Continue);
    assert_eq!(host.header("authorization"), None);
    assert_eq!(host.header("x-apitoken-role").as_deref(), Some("owner"));
}

#[test]
fn forward_authorization_paths_keep_the_header_for_the_token_api() {
    // The ECDS setup (envoy/ecds-plugin-base.json): the token API is the
    // control plane, which checks the bearer token itself.
    let config = Config::from_json(
        fixture_json(
            r#","forwardAuthorizationPaths":["/apitokens/v1/namespaces/{namespace}/apitokens/**"],
               "forwardAuthorizationClusters":["apitokens_api"]"#,
        )
        .as_bytes(),
    )
    .unwrap();
    let auth = bearer(OWNER);
    for path in [
        "/apitokens/v1/namespaces/default/apitokens",
        "/apitokens/v1/namespaces/default/apitokens/t:regenerate",
        "/APITOKENS/v1/namespaces/default/apitokens.json",
    ] {
        let mut host = Recorder::request("POST", path, Some(&auth));
        host.cluster = Some("apitokens_api".into());
        assert_eq!(run(&config, &mut host), Verdict::Continue, "{path}");
        assert_eq!(
            host.header("authorization").as_deref(),
            Some(&*format!("Bearer {OWNER}")),
            "{path}"
        );
        // The same path routed to another upstream (or to none) loses it:
        // the exemption follows the route, not the path.
        for cluster in [Some("upstream"), Some("apitokens_api2"), None] {
            let mut host = Recorder::request("POST", path, Some(&auth));
            host.cluster = cluster.map(Into::into);
            assert_eq!(run(&config, &mut host), Verdict::Continue, "{path}");
            assert_eq!(host.header("authorization"), None, "{path} to {cluster:?}");
        }
    }
    // Every other path still loses it, without asking for the cluster; the
    // patterns grant nothing.
    let mut host = Recorder::request("GET", "/api/v1/namespaces/default/jobs", Some(&auth));
    host.cluster = Some("apitokens_api".into());
    assert_eq!(run(&config, &mut host), Verdict::Continue);
    assert_eq!(host.header("authorization"), None);
    assert!(!host.writes.iter().any(|w| w == "read cluster"));
    let editor = bearer(EDITOR);
    let mut host = Recorder::request("GET", "/apitokens/v1/namespaces/default/apitokens", Some(&editor));
    assert_eq!(run(&config, &mut host), Verdict::Stop);
    // A rule's own setting wins over the patterns.
    let config = Config::from_json(
        fixture_json(
            r#","forwardAuthorizationPaths":["/x/{namespace}/**"],"forwardAuthorizationClusters":["x"],
               "rules":[{"path":"/x/{namespace}/**","allow":{"owner":["*"]},"forwardAuthorization":false}]"#,
        )
        .as_bytes(),
    )
    .unwrap();
    let mut host = Recorder::request("GET", "/x/default/y", Some(&auth));
    assert_eq!(run(&config, &mut host), Verdict::Continue);
    assert_eq!(host.header("authorization"), None);
}

#[test]
fn a_rule_overrides_the_global_forward_authorization() {
    let config = Config::from_json(
        fixture_json(
            r#","forwardAuthorization":true,"rules":[
                {"path":"/private/{namespace}/**","allow":{"viewer":["*"]},"forwardAuthorization":false},
                {"path":"/public/{namespace}/**","allow":{"viewer":["*"]}}]"#,
        )
        .as_bytes(),
    )
    .unwrap();
    let auth = bearer(VIEWER);
    let mut host = Recorder::request("GET", "/private/default/x", Some(&auth));
    assert_eq!(run(&config, &mut host), Verdict::Continue);
    assert_eq!(host.header("authorization"), None);
    let mut host = Recorder::request("GET", "/public/default/x", Some(&auth));
    assert_eq!(run(&config, &mut host), Verdict::Continue);
    assert!(host.header("authorization").is_some());
}

#[test]
fn identity_headers_are_added_or_replace_client_copies() {
    let config = fixture();
    let auth = bearer(EDITOR);
    let mut host = Recorder::request("GET", "/api/v1/namespaces/default/jobs", Some(&auth));
    run(&config, &mut host);
    assert_eq!(
        host.writes,
        [
            "add x-apitoken-name",
            "add x-apitoken-namespace",
            "add x-apitoken-role",
            "remove authorization"
        ]
    );
    let mut host = Recorder::request("GET", "/api/v1/namespaces/default/jobs", Some(&auth))
        .with_header("x-apitoken-role", "owner");
    run(&config, &mut host);
    assert!(
        host.writes.contains(&"set x-apitoken-role".to_owned()),
        "{:?}",
        host.writes
    );
    assert_eq!(host.header("x-apitoken-role").as_deref(), Some("editor"));
}

#[test]
fn a_method_override_must_be_permitted_too() {
    let config = fixture();
    let viewer = bearer(VIEWER);
    let editor = bearer(EDITOR);
    for header in apitokens_core::overrides::METHOD_OVERRIDE_HEADERS {
        // A viewer's GET that an upstream would run as DELETE.
        let mut host = Recorder::request("GET", "/api/v1/namespaces/default/deployments/d1", Some(&viewer))
            .with_header(header, "DELETE");
        assert_eq!(run(&config, &mut host), Verdict::Stop, "{header}");
        assert_eq!(host.reply.as_ref().map(|(d, _)| *d), Some(Denial::RoleDenied));
        // An editor may delete: the override is permitted and goes upstream.
        let mut host = Recorder::request("GET", "/api/v1/namespaces/default/deployments/d1", Some(&editor))
            .with_header(header, "DELETE");
        assert_eq!(run(&config, &mut host), Verdict::Continue, "{header}");
        // An unknown or repeated override is refused.
        let mut host = Recorder::request("GET", "/api/v1/namespaces/default/deployments/d1", Some(&editor))
            .with_header(header, "PURGE");
        assert_eq!(run(&config, &mut host), Verdict::Stop, "{header}");
        let mut host = Recorder::request("GET", "/api/v1/namespaces/default/deployments/d1", Some(&editor))
            .with_header(header, "GET")
            .with_header(header, "GET");
        assert_eq!(run(&config, &mut host), Verdict::Stop, "{header}");
    }
}

#[test]
fn repeated_authorization_field_lines_are_multiple_credentials() {
    let config = fixture();
    let auth = bearer(EDITOR);
    let mut host = Recorder::request("GET", "/api/v1/namespaces/default/jobs", Some(&auth))
        .with_header("authorization", "Bearer x");
    assert_eq!(run(&config, &mut host), Verdict::Stop);
    assert_eq!(
        host.reply.map(|(d, r)| (d, r.status)),
        Some((Denial::MultipleCredentials, 400))
    );
}

#[test]
fn refusals_log_at_debug_level() {
    let config = fixture();
    let mut host = Recorder::request("GET", "/", None);
    run(&config, &mut host);
    assert_eq!(host.logs, ["Debug: denied reason=missing token=-"]);
}

#[test]
fn url_override_headers_are_refused_by_default() {
    let config = fixture();
    let auth = bearer(OWNER);
    for header in apitokens_core::overrides::URL_OVERRIDE_HEADERS {
        for auth in [Some(&auth[..]), None] {
            let mut host = Recorder::request("GET", "/api/v1/namespaces/default/jobs", auth)
                .with_header(header, "/api/v1/namespaces/default/secret-values");
            assert_eq!(run(&config, &mut host), Verdict::Stop, "{header}");
            let (denial, reply) = host.reply.clone().unwrap();
            assert_eq!((denial, reply.status), (Denial::UrlOverride, 400));
            assert_eq!(
                reply_header(&reply, "www-authenticate"),
                Some(r#"Bearer realm="apitokens", error="invalid_request""#)
            );
            assert_eq!(reply.details(), "apitokens_url_override");
            assert_eq!(host.counters, vec![Counter::Malformed]);
        }
    }
}

#[test]
fn url_override_headers_can_be_removed_or_forwarded() {
    let auth = bearer(VIEWER);
    for (mode, kept) in [("remove", false), ("forward", true)] {
        let config = Config::from_json(fixture_json(&format!(r#","urlOverrideHeaders":"{mode}""#)).as_bytes()).unwrap();
        let mut host = Recorder::request("GET", "/api/v1/namespaces/default/jobs", Some(&auth))
            .with_header("x-original-url", "/a")
            .with_header("x-rewrite-url", "/b");
        assert_eq!(run(&config, &mut host), Verdict::Continue, "{mode}");
        assert_eq!(host.header("x-original-url").is_some(), kept, "{mode}");
        assert_eq!(host.header("x-rewrite-url").is_some(), kept, "{mode}");
        // The decision is still on :path.
        let mut host = Recorder::request("GET", "/api/v1/namespaces/default/secret-values", Some(&auth))
            .with_header("x-original-url", "/api/v1/namespaces/default/jobs");
        assert_eq!(run(&config, &mut host), Verdict::Stop, "{mode}");
    }
    // Nothing to remove: no extra host call.
    let config = Config::from_json(fixture_json(r#","urlOverrideHeaders":"remove""#).as_bytes()).unwrap();
    let mut host = Recorder::request("GET", "/api/v1/namespaces/default/jobs", Some(&auth));
    run(&config, &mut host);
    assert!(!host.writes.iter().any(|w| w.contains("url")), "{:?}", host.writes);
}

#[test]
fn method_override_values_are_read_as_frameworks_read_them() {
    let config = fixture();
    let viewer = bearer(VIEWER);
    let editor = bearer(EDITOR);
    // Symfony, Rack and method-override upper-case the value: `delete` deletes.
    let mut host = Recorder::request("GET", "/api/v1/namespaces/default/deployments/d1", Some(&viewer))
        .with_header("x-http-method-override", "delete");
    assert_eq!(run(&config, &mut host), Verdict::Stop);
    let mut host = Recorder::request("GET", "/api/v1/namespaces/default/deployments/d1", Some(&editor))
        .with_header("x-http-method-override", "delete");
    assert_eq!(run(&config, &mut host), Verdict::Continue);
}

#[test]
fn a_method_override_in_the_query_must_be_permitted_too() {
    let config = fixture();
    let viewer = bearer(VIEWER);
    let editor = bearer(EDITOR);
    let item = "/api/v1/namespaces/default/deployments/d1";
    for query in [
        "_method=DELETE",
        "_method=delete",
        "x=1&_method=PUT",
        "%5Fmethod=DELETE",
        "_method=%44ELETE",
        ".method=PATCH",
        "_method[]=DELETE",
        "_method=GET&_method=DELETE",
        "_method=PURGE",
        "_method",
    ] {
        let path = format!("{item}?{query}");
        let mut host = Recorder::request("GET", &path, Some(&viewer));
        assert_eq!(run(&config, &mut host), Verdict::Stop, "{query}");
        assert_eq!(
            host.reply.as_ref().map(|(d, _)| *d),
            Some(Denial::RoleDenied),
            "{query}"
        );
    }
    for query in ["_method=DELETE", "_method=patch", "method=DELETE", "x_method=DELETE"] {
        let path = format!("{item}?{query}");
        let mut host = Recorder::request("GET", &path, Some(&editor));
        assert_eq!(run(&config, &mut host), Verdict::Continue, "{query}");
    }
    for query in ["method=DELETE", "x_method=DELETE", "_method=GET", "_methods=DELETE"] {
        let path = format!("{item}?{query}");
        let mut host = Recorder::request("GET", &path, Some(&viewer));
        assert_eq!(run(&config, &mut host), Verdict::Continue, "{query}");
    }
}

#[test]
fn a_post_with_a_body_must_be_permitted_for_what_a_body_override_could_make_it() {
    // Custom rules where editors may create orders but not delete them: a
    // body's `_method=DELETE` would delete. (The built-in rules never allow
    // create without the other verbs.)
    let config = Config::from_json(
        fixture_json(
            r#","rules":[
                {"path":"/shop/{namespace}/orders/**","allow":{"editor":["create","get","list"],"owner":["*"]}},
                {"path":"/shop/{namespace}/**","allow":{"viewer":["*"]}}]"#,
        )
        .as_bytes(),
    )
    .unwrap();
    let editor = bearer(EDITOR);
    let owner = bearer(OWNER);
    let viewer = bearer(VIEWER);
    let orders = "/shop/default/orders";
    let mut host = Recorder::request("POST", orders, Some(&editor));
    assert_eq!(run(&config, &mut host), Verdict::Continue, "a POST without a body");
    let mut host = Recorder::request("POST", orders, Some(&editor));
    host.body = true;
    assert_eq!(run(&config, &mut host), Verdict::Stop, "a POST with a body");
    assert_eq!(host.reply.as_ref().map(|(d, _)| *d), Some(Denial::RoleDenied));
    // An empty body announced by its length (an HTTP/2 client's empty DATA
    // frame) is no body.
    let mut host = Recorder::request("POST", orders, Some(&editor)).with_header("content-length", "0");
    host.body = true;
    assert_eq!(run(&config, &mut host), Verdict::Continue, "content-length: 0");
    let mut host = Recorder::request("POST", orders, Some(&editor)).with_header("content-length", "2");
    host.body = true;
    assert_eq!(run(&config, &mut host), Verdict::Stop, "content-length: 2");
    let mut host = Recorder::request("POST", orders, Some(&owner));
    host.body = true;
    assert_eq!(run(&config, &mut host), Verdict::Continue);
    let mut host = Recorder::request("POST", "/shop/default/carts", Some(&viewer));
    host.body = true;
    assert_eq!(run(&config, &mut host), Verdict::Continue);
    // Only POST: frameworks take a body override on POST only.
    let mut host = Recorder::request("GET", orders, Some(&editor));
    host.body = true;
    assert_eq!(run(&config, &mut host), Verdict::Continue);
    // With the built-in rules a body changes nothing for anyone.
    let config = fixture();
    for (secret, path, allowed) in [
        (VIEWER, "/artifacts/v1/namespaces/default/artifacts:list", true),
        (VIEWER, "/api/v1/namespaces/default/deployments", false),
        (EDITOR, "/api/v1/namespaces/default/deployments", true),
        (EDITOR, "/api/v1/namespaces/default/deployment-targets", false),
        (OWNER, "/apitokens/v1/namespaces/default/apitokens", true),
        (OWNER, "/namespaces/v1/namespaces/default/members", false),
    ] {
        let auth = bearer(secret);
        for body in [false, true] {
            let mut host = Recorder::request("POST", path, Some(&auth));
            host.body = body;
            let want = if allowed { Verdict::Continue } else { Verdict::Stop };
            assert_eq!(run(&config, &mut host), want, "{secret} {path} body={body}");
        }
    }
}

#[test]
fn a_vm_catching_up_refuses_what_it_would_admit_and_nothing_else() {
    let config = fixture();
    let auth = bearer(EDITOR);
    let mut host = Recorder::request("GET", "/api/v1/namespaces/default/deployments", Some(&auth));
    host.catching_up = true;
    assert_eq!(run(&config, &mut host), Verdict::Stop);
    let (denial, reply) = host.reply.clone().unwrap();
    assert_eq!((denial, reply.status), (Denial::CatchingUp, 503));
    assert_eq!(reply_header(&reply, "retry-after"), Some("1"));
    assert_eq!(host.counters, vec![Counter::CatchingUp]);
    // A request its table refuses gets the usual answer, not a 503.
    let mut host = Recorder::request("GET", "/api/v1/namespaces/default/deployments", None);
    host.catching_up = true;
    assert_eq!(run(&config, &mut host), Verdict::Stop);
    assert_eq!(host.reply.as_ref().unwrap().0, Denial::Missing);
}

/// What each request did, as its use reports it: the kinds of access, and
/// the narrowest role that would have admitted it.
fn evidence(config: &Config, mut host: Recorder) -> (Verdict, Access) {
    let verdict = run(config, &mut host);
    assert_eq!(host.used.len(), 1, "one use per authenticated request");
    (verdict, host.used[0].1)
}

#[test]
fn an_admitted_request_reports_what_it_did_and_the_narrowest_role_for_it() {
    let config = fixture();
    let owner = bearer(OWNER);
    let editor = bearer(EDITOR);
    let viewer = bearer(VIEWER);
    let ns = "/api/v1/namespaces/default";
    let cases: [(Recorder, &[Kind], Role); 9] = [
        (
            Recorder::request("GET", &format!("{ns}/deployments"), Some(&owner)),
            &[Kind::Read],
            Role::Viewer,
        ),
        (
            Recorder::request("GET", &format!("{ns}/jobs/j1"), Some(&viewer)),
            &[Kind::Read],
            Role::Viewer,
        ),
        (
            Recorder::request("DELETE", &format!("{ns}/jobs/j1"), Some(&owner)),
            &[Kind::Write],
            Role::Editor,
        ),
        // Secret values: only editors and owners may even read them.
        (
            Recorder::request("GET", &format!("{ns}/secret-values"), Some(&editor)),
            &[Kind::Read],
            Role::Editor,
        ),
        // A POST with a body could be a PUT, PATCH or DELETE upstream.
        (
            {
                let mut r = Recorder::request("POST", &format!("{ns}/deployments"), Some(&editor));
                r.body = true;
                r
            },
            &[Kind::Write],
            Role::Editor,
        ),
        // A GET that an override turns into a DELETE: which one ran is the
        // upstream's choice, both count.
        (
            Recorder::request("GET", &format!("{ns}/jobs/j1"), Some(&owner))
                .with_header("x-http-method-override", "DELETE"),
            &[Kind::Read, Kind::Write],
            Role::Editor,
        ),
        (
            Recorder::request("GET", "/apitokens/v1/namespaces/default/apitokens", Some(&owner)),
            &[Kind::Tokens],
            Role::Owner,
        ),
        // Asking who it is: any role may, a read.
        (
            Recorder::request("GET", "/apitokens/v1/namespaces/default/apitokens:self", Some(&owner)),
            &[Kind::Read],
            Role::Viewer,
        ),
        (
            Recorder::request("PATCH", "/namespaces/v1/namespaces/default", Some(&owner)),
            &[Kind::Write],
            Role::Owner,
        ),
    ];
    for (host, kind, narrowest) in cases {
        let what = format!("{:?}", host.headers);
        let (verdict, access) = evidence(&config, host);
        assert_eq!(verdict, Verdict::Continue, "{what}");
        assert!(access.is_used(), "{what}");
        assert_eq!(
            Kind::ALL.into_iter().filter(|k| access.has(*k)).collect::<Vec<_>>(),
            kind,
            "{what}"
        );
        assert_eq!(access.narrowest_role(), Some(narrowest), "{what}");
    }
}

#[test]
fn a_refused_request_is_a_use_but_no_evidence() {
    let config = fixture();
    let viewer = bearer(VIEWER);
    let owner = bearer(OWNER);
    for host in [
        Recorder::request("POST", "/api/v1/namespaces/default/deployments", Some(&viewer)),
        Recorder::request("GET", "/api/v1/namespaces/other/deployments", Some(&owner)),
        Recorder::request("GET", "/api/v1/namespaces/default/jobs/j1", Some(&viewer))
            .with_header("x-http-method-override", "DELETE"),
    ] {
        let what = format!("{:?}", host.headers);
        let (verdict, access) = evidence(&config, host);
        assert_eq!(verdict, Verdict::Stop, "{what}");
        assert_eq!(access, Access::USED, "{what}");
        assert_eq!(access.narrowest_role(), None, "{what}");
    }
}

/// The role a refused request needed, as the client reads it: the header,
/// which the body's `requiredRole` must repeat.
fn required_role(host: &Recorder) -> Option<String> {
    let (_, reply) = host.reply.as_ref().expect("a reply");
    let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    let header = reply_header(reply, "x-apitokens-required-role").map(str::to_owned);
    let field = body.get("requiredRole").and_then(|r| r.as_str()).map(str::to_owned);
    assert_eq!(header, field, "the header and the body disagree");
    header
}

#[test]
fn a_role_denial_names_the_role_the_request_needed() {
    let config = fixture();
    let (viewer, editor, owner) = (bearer(VIEWER), bearer(EDITOR), bearer(OWNER));
    let tokens_api = "/apitokens/v1/namespaces/default/apitokens";
    let cases: [(Recorder, Option<&str>); 6] = [
        // A viewer's write: editor.
        (
            Recorder::request("POST", "/api/v1/namespaces/default/deployments", Some(&viewer)),
            Some("editor"),
        ),
        // Listing tokens: owner, whether the caller is a viewer or an editor.
        (Recorder::request("GET", tokens_api, Some(&viewer)), Some("owner")),
        (Recorder::request("GET", tokens_api, Some(&editor)), Some("owner")),
        // A viewer's read overridden to a delete: what the override needs.
        (
            Recorder::request("GET", "/api/v1/namespaces/default/deployments/d1", Some(&viewer))
                .with_header("x-http-method-override", "DELETE"),
            Some("editor"),
        ),
        // No role may delete a namespace: nothing to ask for.
        (
            Recorder::request("DELETE", "/namespaces/v1/namespaces/default", Some(&owner)),
            None,
        ),
        // Another namespace: no role of this token's would do.
        (
            Recorder::request("GET", "/api/v1/namespaces/other/deployments", Some(&owner)),
            None,
        ),
    ];
    for (i, (mut host, want)) in cases.into_iter().enumerate() {
        assert_eq!(run(&config, &mut host), Verdict::Stop, "case {i}");
        assert_eq!(host.reply.as_ref().map(|(_, r)| r.status), Some(403), "case {i}");
        assert_eq!(required_role(&host).as_deref(), want, "case {i}");
    }
    // The counter and the response details are the role denial's, whatever
    // the role.
    let mut host = Recorder::request("POST", "/api/v1/namespaces/default/deployments", Some(&viewer));
    run(&config, &mut host);
    assert_eq!(host.counters, vec![Counter::RoleDenied]);
    assert_eq!(host.reply.unwrap().1.details(), "apitokens_role_denied");
}

/// A configuration with one token carrying `conditions` (JSON members of
/// the token, after its secret): an editor in `default`.
fn conditioned(conditions: &str) -> Config {
    let json = format!(
        r#"{{"tokens":[{{"name":"namespaces/default/apitokens/bound","role":"editor","secretSha256":"{}",{conditions}}},{}]}}"#,
        sha256_hex("bound-secret"),
        token_json("namespaces/default/apitokens/viewer", "viewer", VIEWER, None),
    );
    Config::from_json(json.as_bytes()).unwrap()
}

const BOUND: &str = "bound-secret";
const JOBS: &str = "/api/v1/namespaces/default/jobs";

#[test]
fn a_token_is_refused_before_its_not_before_time_and_admitted_from_it_on() {
    let config = conditioned(r#""notBeforeTime":"2026-06-01T00:00:00Z""#);
    let auth = bearer(BOUND);
    for (now, admitted) in [
        ("2026-05-31T23:59:59.999999999Z", false),
        ("2026-06-01T00:00:00Z", true),
        ("2026-06-01T00:00:00.000000001Z", true),
    ] {
        let mut host = Recorder::request("GET", JOBS, Some(&auth));
        host.now = Some(at(now));
        let verdict = run(&config, &mut host);
        assert_eq!(verdict == Verdict::Continue, admitted, "{now}");
        if !admitted {
            let (denial, reply) = host.reply.clone().unwrap();
            assert_eq!(denial, Denial::NotYetValid);
            assert_eq!(host.counters, vec![Counter::NotYetValid]);
            // The client reads it as any invalid token (no oracle); the
            // details and the counter tell.
            assert_eq!(reply.status, 401);
            assert_eq!(reply.details(), "apitokens_not_yet_valid");
            let unknown = config.replies().get(Denial::Unknown.into()).unwrap();
            assert_eq!((&reply.headers, &reply.body), (&unknown.headers, &unknown.body));
        }
        // No address condition: the address is never asked.
        assert_eq!(host.client_reads, 0);
    }
    // Without a clock the time cannot be checked: refused.
    let mut host = Recorder::request("GET", JOBS, Some(&auth));
    host.now = None;
    assert_eq!(run(&config, &mut host), Verdict::Stop);
    assert_eq!(host.reply.unwrap().0, Denial::NotYetValid);
    // Not yet valid and disabled: not yet valid (an enable would not admit it).
    let disabled = conditioned(r#""notBeforeTime":"2026-06-02T00:00:00Z","disabled":true"#);
    let mut host = Recorder::request("GET", JOBS, Some(&auth));
    run(&disabled, &mut host);
    assert_eq!(host.reply.unwrap().0, Denial::NotYetValid);
}

#[test]
fn a_token_bound_to_addresses_is_refused_from_elsewhere() {
    let config = conditioned(
        r#""clientAddresses":{"allow":["10.0.0.0/8","2001:db8::/32"],"except":["10.1.0.0/16","2001:db8:bad::/48"]}"#,
    );
    let auth = bearer(BOUND);
    for (from, admitted) in [
        (Some("10.2.0.1"), true),
        (Some("2001:db8:1::1"), true),
        (Some("::ffff:10.2.0.1"), true),
        (Some("10.1.0.1"), false),
        (Some("2001:db8:bad::1"), false),
        (Some("192.0.2.1"), false),
        (Some("::1"), false),
        // No address (a pipe): nothing shows it is allowed.
        (None, false),
    ] {
        let mut host = Recorder::request("POST", "/api/v1/namespaces/default/deployments", Some(&auth));
        host.client = from.map(|a| a.parse().unwrap());
        let verdict = run(&config, &mut host);
        assert_eq!(verdict == Verdict::Continue, admitted, "{from:?}");
        assert_eq!(host.client_reads, 1, "asked once");
        if admitted {
            assert!(host.used[0].1.has(Kind::Write));
        } else {
            let (denial, reply) = host.reply.clone().unwrap();
            assert_eq!(denial, Denial::AddressDenied, "{from:?}");
            assert_eq!(reply.status, 403);
            assert_eq!(host.counters, vec![Counter::AddressDenied]);
            assert_eq!(reply_header(&reply, "x-apitokens-required-role"), None);
            // An attempt from elsewhere is a use (its last use, evidence
            // of nothing).
            assert_eq!(
                host.used,
                vec![("namespaces/default/apitokens/bound".to_owned(), Access::USED)]
            );
        }
    }
    // Where before what: a request the role would refuse, from elsewhere,
    // is an address denial.
    let mut host =
        Recorder::request("DELETE", "/namespaces/v1/namespaces/default", Some(&auth)).with_client("192.0.2.1");
    run(&config, &mut host);
    assert_eq!(host.reply.unwrap().0, Denial::AddressDenied);
    // A token without conditions never asks for the address.
    let mut host = Recorder::request("GET", JOBS, Some(&bearer(VIEWER))).with_client("192.0.2.1");
    assert_eq!(run(&config, &mut host), Verdict::Continue);
    assert_eq!(host.client_reads, 0);
}

#[test]
fn conditions_that_are_not_valid_name_their_field() {
    for (conditions, field) in [
        (r#""notBeforeTime":"tomorrow""#, "tokens[0].notBeforeTime"),
        (
            r#""notBeforeTime":"2030-01-01T00:00:00Z","expireTime":"2029-01-01T00:00:00Z""#,
            "tokens[0].notBeforeTime",
        ),
        (
            r#""clientAddresses":{"allow":["10.0.0.0/8","10.0.0.1/8"]}"#,
            "tokens[0].clientAddresses.allow[1]",
        ),
        (
            r#""clientAddresses":{"except":["300.0.0.0/8"]}"#,
            "tokens[0].clientAddresses.except[0]",
        ),
        (
            r#""clientAddresses":{"allow":["::/129"]}"#,
            "tokens[0].clientAddresses.allow[0]",
        ),
        (
            r#""clientAddresses":{"deny":["10.0.0.0/8"]}"#,
            "tokens[0].clientAddresses",
        ),
        // An object, not an array (serde would read a struct from one).
        (r#""clientAddresses":[["10.0.0.0/8"]]"#, "tokens[0].clientAddresses"),
        // Empty would read as "from anywhere": refused.
        (r#""clientAddresses":{}"#, "tokens[0].clientAddresses"),
        (r#""clientAddresses":{"allow":[]}"#, "tokens[0].clientAddresses.allow"),
        (
            r#""clientAddresses":{"allow":["10.0.0.0/8"],"except":[]}"#,
            "tokens[0].clientAddresses.except",
        ),
        // A mapped range would hold nobody (mapped clients are IPv4).
        (
            r#""clientAddresses":{"except":["::ffff:10.0.0.0/104"]}"#,
            "tokens[0].clientAddresses.except[0]",
        ),
        (
            r#""rateLimit":{"requests":0,"per":"second"}"#,
            "tokens[0].rateLimit.requests",
        ),
        (r#""rateLimit":{"requests":10,"per":"hour"}"#, "tokens[0].rateLimit.per"),
        (
            r#""rateLimit":{"requests":10,"per":"second","burst":0}"#,
            "tokens[0].rateLimit.burst",
        ),
        (r#""rateLimit":{"requests":10}"#, "tokens[0].rateLimit"),
        (r#""rateLimit":[10,"second"]"#, "tokens[0].rateLimit"),
        (r#""rateLimit":{"requests":-1,"per":"second"}"#, "tokens[0].rateLimit"),
    ] {
        let json = format!(
            r#"{{"tokens":[{{"name":"namespaces/default/apitokens/bound","role":"editor","secretSha256":"{}",{conditions}}}]}}"#,
            sha256_hex("bound-secret"),
        );
        let e = Config::from_json(json.as_bytes()).unwrap_err();
        assert_eq!(e.field, field, "{conditions}: {e}");
    }
    let many = (0..33)
        .map(|i| format!("\"10.{i}.0.0/16\""))
        .collect::<Vec<_>>()
        .join(",");
    let json = format!(
        r#"{{"tokens":[{{"name":"namespaces/default/apitokens/bound","role":"editor","secretSha256":"{}","clientAddresses":{{"allow":[{many}]}}}}]}}"#,
        sha256_hex("bound-secret"),
    );
    assert_eq!(
        Config::from_json(json.as_bytes()).unwrap_err().field,
        "tokens[0].clientAddresses.allow"
    );
    // Fields are checked in the order given: a wrong digest before wrong
    // conditions, the first token before the second.
    let json = format!(
        r#"{{"tokens":[{{"name":"namespaces/default/apitokens/a","role":"editor","secretSha256":"00","clientAddresses":{{}}}},{{"name":"namespaces/default/apitokens/b","role":"editor","secretSha256":"{}","notBeforeTime":"x"}}]}}"#,
        sha256_hex("b"),
    );
    assert_eq!(
        Config::from_json(json.as_bytes()).unwrap_err().field,
        "tokens[0].secretSha256"
    );
}

#[test]
fn conditions_bind_a_previous_secret_and_a_token_from_the_delta_channel() {
    use apitokens_core::compact::Stamp;
    use apitokens_core::conditions::{Cidr, Conditions, Encoded};
    use apitokens_core::table::{Change, Digest, Entry, Overlay, TokenEntries};
    let json = format!(
        r#"{{"tokens":[{{"name":"namespaces/default/apitokens/bound","role":"editor","secretSha256":"{}","previousSecretSha256":"{}","previousSecretExpireTime":"2030-01-01T00:00:00Z","clientAddresses":{{"allow":["10.0.0.0/8"]}}}}]}}"#,
        sha256_hex("bound-new"),
        sha256_hex("bound-old"),
    );
    let config = Config::from_json(json.as_bytes()).unwrap();
    // The previous secret, during the overlap, is bound as the token is.
    let old = bearer("bound-old");
    let mut host = Recorder::request("GET", JOBS, Some(&old)).with_client("192.0.2.1");
    run(&config, &mut host);
    assert_eq!(host.reply.unwrap().0, Denial::AddressDenied);
    let mut host = Recorder::request("GET", JOBS, Some(&old)).with_client("10.0.0.1");
    assert_eq!(run(&config, &mut host), Verdict::Continue);
    assert_eq!(host.counters, vec![Counter::AllowedPreviousSecret]);

    // A token changed over the delta channel carries its conditions.
    let bytes = Conditions {
        allow: vec![Cidr::parse("10.0.0.0/8").unwrap()],
        ..Conditions::default()
    }
    .encode();
    let mut overlay = Overlay::default();
    overlay.apply(
        Stamp {
            epoch: 1,
            generation: 2,
        },
        &[Change::Put(TokenEntries {
            current: Entry {
                name: "namespaces/default/apitokens/viewer",
                role: Role::Viewer,
                digest: Digest::of(b"viewer-regenerated"),
                expire: None,
                previous: false,
                disabled: false,
                conditions: Some(Encoded::new(&bytes).unwrap()),
            },
            previous: None,
        })],
    );
    let config = fixture();
    let secret = bearer("viewer-regenerated");
    let mut host = Recorder::request("GET", JOBS, Some(&secret)).with_client("192.0.2.1");
    gate::on_request_headers(&mut host, &config, Some(&overlay));
    assert_eq!(host.reply.unwrap().0, Denial::AddressDenied);
    let mut host = Recorder::request("GET", JOBS, Some(&secret)).with_client("10.9.9.9");
    assert_eq!(
        gate::on_request_headers(&mut host, &config, Some(&overlay)),
        Verdict::Continue
    );
}

/// The `rateLimit` token's requests at `now`: how many of `n` pass, with
/// the host's shared data `store`.
fn requests_at(config: &Config, store: &SharedStore, now: &str, n: usize) -> (usize, Recorder) {
    let mut passed = 0;
    let mut last = None;
    for _ in 0..n {
        let mut host = Recorder::request("GET", JOBS, Some(&bearer(BOUND)));
        host.now = Some(at(now));
        host.shared = store.clone();
        if run(config, &mut host) == Verdict::Continue {
            passed += 1;
        }
        last = Some(host);
    }
    (passed, last.unwrap())
}

#[test]
fn a_token_over_its_rate_is_answered_429_with_when_to_retry() {
    let config = conditioned(r#""rateLimit":{"requests":2,"per":"minute","burst":3}"#);
    let store = SharedStore::default();
    // The burst at once, then nothing until the rate allows (30 s each).
    let (passed, host) = requests_at(&config, &store, "2026-06-01T00:00:00Z", 5);
    assert_eq!(passed, 3);
    let (denial, reply) = host.reply.clone().unwrap();
    assert_eq!((denial, reply.status), (Denial::RateLimited, 429));
    assert_eq!(host.counters, vec![Counter::RateLimited]);
    assert_eq!(
        reply_header(&reply, "www-authenticate"),
        None,
        "not an authentication failure"
    );
    assert_eq!(
        host.reply_extra,
        [
            ("retry-after", "30"),
            ("ratelimit-policy", "\"token\";q=2;w=60"),
            ("ratelimit", "\"token\";r=0;t=30"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
    );
    // A refused request is a use, no evidence (it did nothing).
    assert_eq!(
        host.used,
        vec![("namespaces/default/apitokens/bound".to_owned(), Access::USED)]
    );
    let (passed, host) = requests_at(&config, &store, "2026-06-01T00:00:20Z", 1);
    assert_eq!(passed, 0);
    assert_eq!(host.reply_extra[0].1, "10", "rounded up to whole seconds");
    assert_eq!(requests_at(&config, &store, "2026-06-01T00:00:30Z", 3).0, 1);
    assert_eq!(requests_at(&config, &store, "2026-06-01T00:01:30Z", 3).0, 2);
    // Other tokens have their own (the viewer, none at all).
    let mut host = Recorder::request("GET", JOBS, Some(&bearer(VIEWER)));
    host.shared = store.clone();
    assert_eq!(run(&config, &mut host), Verdict::Continue);
    // Only what the rules admit counts: a refused request takes nothing.
    let store = SharedStore::default();
    for _ in 0..5 {
        let mut host = Recorder::request("DELETE", "/namespaces/v1/namespaces/default", Some(&bearer(BOUND)));
        host.shared = store.clone();
        run(&config, &mut host);
        assert_eq!(host.reply.unwrap().0, Denial::RoleDenied);
    }
    assert_eq!(requests_at(&config, &store, "2026-06-01T00:00:00Z", 4).0, 3);
}

#[test]
fn workers_sharing_the_data_share_the_limit_exactly() {
    let config = conditioned(r#""rateLimit":{"requests":10,"per":"second","burst":10}"#);
    let store = SharedStore::default();
    // Another worker admits a request between this one's read and swap,
    // twice: this one reads again each time, and counts after them.
    let mut host = Recorder::request("GET", JOBS, Some(&bearer(BOUND)));
    host.shared = store.clone();
    let other_request = |store: &SharedStore, key: &str| {
        let (value, version) = store.get(key).unwrap();
        let tat = u64::from_le_bytes(value.try_into().unwrap());
        let now = 1_780_272_000 * 1_000_000_000u64; // 2026-06-01T00:00:00Z
        assert!(store.set(key, &(tat.max(now) + 100_000_000).to_le_bytes(), version));
    };
    host.interleaved = vec![Box::new(other_request), Box::new(other_request)];
    assert_eq!(run(&config, &mut host), Verdict::Continue);
    assert!(host.interleaved.is_empty());
    // 3 of the burst of 10 taken: 7 left.
    assert_eq!(requests_at(&config, &store, "2026-06-01T00:00:00Z", 10).0, 7);
    // Workers that keep swapping first, 16 times in a row: refused, never
    // admitted uncounted.
    let store = SharedStore::default();
    let mut host = Recorder::request("GET", JOBS, Some(&bearer(BOUND)));
    host.shared = store.clone();
    host.interleaved = (0..16).map(|_| Box::new(other_request) as Interleaved).collect();
    run(&config, &mut host);
    assert_eq!(host.reply.unwrap().0, Denial::RateLimited);
    // Shared data failing fails closed.
    let mut host = Recorder::request("GET", JOBS, Some(&bearer(BOUND)));
    host.shared_fails = true;
    run(&config, &mut host);
    assert_eq!(host.reply.unwrap().0, Denial::Internal);
    // A TAT an hour ahead (stored under a lower limit, or before the clock
    // stepped back) is cut back to what this limit allows, and stored.
    let store = SharedStore::default();
    let key = "apitokens.rate.namespaces/default/apitokens/bound";
    let now = 1_780_272_000 * 1_000_000_000u64;
    assert!(store.set(key, &(now + 3_600 * 1_000_000_000).to_le_bytes(), 0));
    assert_eq!(requests_at(&config, &store, "2026-06-01T00:00:00Z", 1).0, 0);
    let (value, _) = store.get(key).unwrap();
    assert_eq!(u64::from_le_bytes(value.try_into().unwrap()), now + 1_000_000_000);
    assert_eq!(requests_at(&config, &store, "2026-06-01T00:00:00.1Z", 2).0, 1);
}

#[test]
fn a_request_that_does_not_go_upstream_spends_no_budget() {
    let config = conditioned(r#""rateLimit":{"requests":2,"per":"minute","burst":3}"#);
    let store = SharedStore::default();
    // A VM catching up answers 503: nothing is counted.
    for _ in 0..5 {
        let mut host = Recorder::request("GET", JOBS, Some(&bearer(BOUND)));
        host.shared = store.clone();
        host.catching_up = true;
        run(&config, &mut host);
        assert_eq!(host.reply.unwrap().0, Denial::CatchingUp);
        assert!(store.get("apitokens.rate.namespaces/default/apitokens/bound").is_none());
    }
    assert_eq!(requests_at(&config, &store, "2026-06-01T00:00:00Z", 5).0, 3);
}
