//! Every row of the built-in permission table, for every role.
#![cfg(test)] // helpers are test code too, for clippy.toml's allow-*-in-tests
mod common;

use apitokens_core::denial::{Denial, Refusal};
use apitokens_core::role::Role;
use common::*;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

/// Expected outcome for one role.
#[derive(Clone, Copy, Debug, PartialEq)]
enum E {
    /// Allowed.
    A,
    /// 403 role_denied.
    R,
    /// 403 namespace_denied.
    N,
}
use E::*;

/// (method, path, [viewer, editor, owner]) for tokens of namespace `default`.
const TABLE: &[(&str, &str, [E; 3])] = &[
    // ApiToken: owner only, every verb.
    ("GET", "/apitokens/v1/namespaces/default/apitokens", [R, R, A]),
    ("POST", "/apitokens/v1/namespaces/default/apitokens", [R, R, A]),
    ("GET", "/apitokens/v1/namespaces/default/apitokens/ci-token", [R, R, A]),
    (
        "DELETE",
        "/apitokens/v1/namespaces/default/apitokens/ci-token",
        [R, R, A],
    ),
    (
        "POST",
        "/apitokens/v1/namespaces/default/apitokens/ci-token:regenerate",
        [R, R, A],
    ),
    ("GET", "/apitokens/v1/namespaces/default/apitokens:batchGet", [R, R, A]),
    // A token reads itself: every role, GET only (an owner too: the
    // control plane has no other method there), this spelling only.
    ("GET", "/apitokens/v1/namespaces/default/apitokens:self", [A, A, A]),
    ("GET", "/apitokens/v1/namespaces/default/apitokens:SELF", [A, A, A]),
    ("POST", "/apitokens/v1/namespaces/default/apitokens:self", [R, R, R]),
    ("DELETE", "/apitokens/v1/namespaces/default/apitokens:self", [R, R, R]),
    ("GET", "/apitokens/v1/namespaces/default/apitokens:selfish", [R, R, A]),
    ("GET", "/apitokens/v1/namespaces/default/apitokens:self/x", [R, R, A]),
    ("GET", "/apitokens/v1/namespaces/other/apitokens:self", [N, N, N]),
    // Namespace: owner get and update only, on the whole subtree (reading a
    // sub-collection is list).
    ("GET", "/namespaces/v1/namespaces/default", [R, R, A]),
    ("GET", "/namespaces/v1/namespaces/default/", [R, R, A]),
    ("PUT", "/namespaces/v1/namespaces/default", [R, R, A]),
    ("PATCH", "/namespaces/v1/namespaces/default", [R, R, A]),
    ("DELETE", "/namespaces/v1/namespaces/default", [R, R, R]),
    ("POST", "/namespaces/v1/namespaces/default", [R, R, R]),
    ("GET", "/namespaces/v1/namespaces/default/members", [R, R, A]),
    ("GET", "/namespaces/v1/namespaces/default/members/m", [R, R, A]),
    ("PUT", "/namespaces/v1/namespaces/default/members/m", [R, R, A]),
    ("POST", "/namespaces/v1/namespaces/default/members", [R, R, R]),
    ("DELETE", "/namespaces/v1/namespaces/default/members/m", [R, R, R]),
    // SecretValue: editor and owner, every verb.
    ("GET", "/api/v1/namespaces/default/secret-values", [R, A, A]),
    ("GET", "/api/v1/namespaces/default/secret-values/db", [R, A, A]),
    ("POST", "/api/v1/namespaces/default/secret-values", [R, A, A]),
    ("PUT", "/api/v1/namespaces/default/secret-values/db", [R, A, A]),
    ("PATCH", "/api/v1/namespaces/default/secret-values/db", [R, A, A]),
    ("DELETE", "/api/v1/namespaces/default/secret-values/db", [R, A, A]),
    // DeploymentDefaults and DeploymentTarget: get/list, owner all.
    ("GET", "/api/v1/namespaces/default/deployment-defaults", [A, A, A]),
    ("GET", "/api/v1/namespaces/default/deployment-defaults/d", [A, A, A]),
    ("POST", "/api/v1/namespaces/default/deployment-defaults", [R, R, A]),
    ("PUT", "/api/v1/namespaces/default/deployment-defaults/d", [R, R, A]),
    ("PATCH", "/api/v1/namespaces/default/deployment-defaults/d", [R, R, A]),
    ("DELETE", "/api/v1/namespaces/default/deployment-defaults/d", [R, R, A]),
    ("GET", "/api/v1/namespaces/default/deployment-targets", [A, A, A]),
    ("GET", "/api/v1/namespaces/default/deployment-targets/k8s", [A, A, A]),
    ("POST", "/api/v1/namespaces/default/deployment-targets", [R, R, A]),
    ("PUT", "/api/v1/namespaces/default/deployment-targets/k8s", [R, R, A]),
    ("PATCH", "/api/v1/namespaces/default/deployment-targets/k8s", [R, R, A]),
    ("DELETE", "/api/v1/namespaces/default/deployment-targets/k8s", [R, R, A]),
    // Artifacts: list and getMetadata for everyone, other actions editor+.
    ("GET", "/artifacts/v1/namespaces/default/artifacts:list", [A, A, A]),
    (
        "GET",
        "/artifacts/v1/namespaces/default/artifacts:getMetadata",
        [A, A, A],
    ),
    (
        "GET",
        "/artifacts/v1/namespaces/default/artifacts:getMetadata?filename=a.jar",
        [A, A, A],
    ),
    ("POST", "/artifacts/v1/namespaces/default/artifacts:upload", [R, A, A]),
    ("POST", "/artifacts/v1/namespaces/default/artifacts:delete", [R, A, A]),
    ("GET", "/artifacts/v1/namespaces/default/artifacts:download", [R, A, A]),
    // Everything else under a namespace: viewer get/list, editor and owner all.
    ("GET", "/api/v1/namespaces/default/deployments", [A, A, A]),
    ("GET", "/api/v1/namespaces/default/deployments/d1", [A, A, A]),
    ("POST", "/api/v1/namespaces/default/deployments", [R, A, A]),
    ("PUT", "/api/v1/namespaces/default/deployments/d1", [R, A, A]),
    ("PATCH", "/api/v1/namespaces/default/deployments/d1", [R, A, A]),
    ("DELETE", "/api/v1/namespaces/default/deployments/d1", [R, A, A]),
    ("GET", "/api/v1/namespaces/default/jobs?pageSize=10", [A, A, A]),
    ("POST", "/sql/v1beta1/namespaces/default/sqlscripts:validate", [R, A, A]),
    (
        "GET",
        "/catalog/v1beta2/namespaces/default/catalogs/c/databases",
        [A, A, A],
    ),
    // Without a namespace, or with an unknown method: nobody.
    ("GET", "/healthz", [R, R, R]),
    ("GET", "/", [R, R, R]),
    ("GET", "/namespaces/v1/namespaces", [R, R, R]),
    ("POST", "/namespaces/v1/namespaces", [R, R, R]),
    ("GET", "/api/v1/namespaces", [R, R, R]),
    ("HEAD", "/api/v1/namespaces/default/deployments", [R, R, R]),
    ("OPTIONS", "/api/v1/namespaces/default/deployments", [R, R, R]),
    ("TRACE", "/api/v1/namespaces/default/deployments", [R, R, R]),
    ("CONNECT", "/api/v1/namespaces/default/deployments", [R, R, R]),
    ("get", "/api/v1/namespaces/default/deployments", [R, R, R]),
    ("", "/api/v1/namespaces/default/deployments", [R, R, R]),
    // Another namespace, or a namespace that merely starts like ours.
    ("GET", "/api/v1/namespaces/other/deployments", [N, N, N]),
    ("GET", "/api/v1/namespaces/default-2/deployments", [N, N, N]),
    ("GET", "/api/v1/namespaces/defaul/deployments", [N, N, N]),
    ("GET", "/apitokens/v1/namespaces/other/apitokens", [N, N, N]),
    // The query string never decides.
    (
        "GET",
        "/api/v1/namespaces/other/deployments?namespace=default",
        [N, N, N],
    ),
    (
        "GET",
        "/api/v1/namespaces/default/deployments?x=/namespaces/other/",
        [A, A, A],
    ),
    ("GET", "/healthz?namespace=default", [R, R, R]),
    // Spellings upstream routers send to the same handler are decided by the
    // rule for that handler: ASCII case, a `.` suffix (format, trailing dot),
    // in the group, the version and the resource segments alike.
    ("GET", "/api/v1/namespaces/default/Secret-Values", [R, A, A]),
    ("GET", "/api/v1/namespaces/default/SECRET-VALUES/db", [R, A, A]),
    ("GET", "/api/v1/namespaces/default/secret-values.json", [R, A, A]),
    ("GET", "/api/v1/namespaces/default/secret-values.", [R, A, A]),
    ("GET", "/api/v1/namespaces/default/secret-values.json/db", [R, A, A]),
    ("GET", "/API/V1/namespaces/default/secret-values", [R, A, A]),
    ("GET", "/api/v1/NAMESPACES/default/secret-values", [R, A, A]),
    ("GET", "/api/v1/namespaces/default/secret-values:list", [R, A, A]),
    ("DELETE", "/api/v1/namespaces/default/Deployment-Targets/k8s", [R, R, A]),
    ("POST", "/api/v1/namespaces/default/deployment-defaults.xml", [R, R, A]),
    ("GET", "/apitokens/v1/namespaces/default/APITOKENS", [R, R, A]),
    ("POST", "/apitokens/v1/namespaces/default/ApiTokens.json", [R, R, A]),
    (
        "POST",
        "/apitokens/v1/namespaces/default/apitokens.:batchGet",
        [R, R, A],
    ),
    ("GET", "/Apitokens/v1/namespaces/default/apitokens", [R, R, A]),
    ("GET", "/apitokens/V1/namespaces/default/apitokens/t", [R, R, A]),
    ("GET", "/Namespaces/v1/namespaces/default", [R, R, A]),
    ("GET", "/namespaces/v1/Namespaces/default/members", [R, R, A]),
    ("GET", "/namespaces./v1/namespaces/default", [R, R, A]),
    ("POST", "/artifacts/v1/namespaces/default/ARTIFACTS:upload", [R, A, A]),
    ("POST", "/artifacts/v1/namespaces/default/Artifacts:Upload", [R, A, A]),
    ("POST", "/artifacts/v1/namespaces/default/artifacts:LIST", [A, A, A]),
    (
        "POST",
        "/artifacts/v1/namespaces/default/artifacts:list.json",
        [A, A, A],
    ),
    ("POST", "/artifacts/v1/namespaces/default/artifacts:listAll", [R, A, A]),
    (
        "POST",
        "/artifacts/v1/namespaces/default/artifacts.json:upload",
        [R, A, A],
    ),
    // A different name is a different resource, not a spelling.
    ("GET", "/api/v1/namespaces/default/secret-values2", [A, A, A]),
    ("GET", "/api/v1/namespaces/default/secret-valuesx.json", [A, A, A]),
    ("GET", "/api/v1/namespaces/default/secret", [A, A, A]),
    // Spellings an upstream might read differently match no rule.
    // The namespace stays an exact DNS label: no case, no suffix.
    ("GET", "/api/v1/namespaces/DEFAULT/deployments", [R, R, R]),
    ("GET", "/api/v1/namespaces/Default/secret-values", [R, R, R]),
    ("GET", "/api/v1/namespaces/default./deployments", [R, R, R]),
    ("GET", "/api/v1/namespaces/default.json/deployments", [R, R, R]),
    ("GET", "/namespaces/v1/namespaces/default.json", [R, R, R]),
    ("GET", "/namespaces/v1/namespaces/default:get", [R, R, R]),
    ("GET", "/api/v1/namespaces/default%20/deployments", [R, R, R]),
    ("GET", "/api/v1/namespaces//deployments", [R, R, R]),
    ("GET", "/api/v1/namespaces/default/secret%2Dvalues", [R, R, R]),
    ("GET", "/api/v1/namespaces/default/secret-values;x=y", [R, R, R]),
    ("GET", "/api/v1/namespaces/default/deployments;jsessionid=1", [R, R, R]),
    ("GET", "/api/v1/namespaces/default/./secret-values", [R, R, R]),
    ("GET", "/api/v1/namespaces/other/../default/deployments", [R, R, R]),
    ("GET", "/api/v1/namespaces/default\\secret-values", [R, R, R]),
    ("GET", "/api/v1/namespaces/default/deployments#frag", [R, R, R]),
    ("GET", "api/v1/namespaces/default/deployments", [R, R, R]),
    ("GET", "", [R, R, R]),
];

fn secret(role: usize) -> &'static str {
    [VIEWER, EDITOR, OWNER][role]
}

#[test]
fn every_row_for_every_role() {
    let config = fixture();
    let mut failures = Vec::new();
    for (method, path, expected) in TABLE {
        for (role, want) in expected.iter().enumerate() {
            let auth = bearer(secret(role));
            let token = config.authenticate(None, Some(&auth), no_clock).unwrap();
            let result = config.authorize(token, method.as_bytes(), path.as_bytes());
            let got = match result {
                Ok(_) => A,
                Err(Refusal {
                    denial: Denial::RoleDenied,
                    ..
                }) => R,
                Err(Refusal {
                    denial: Denial::NamespaceDenied,
                    ..
                }) => N,
                Err(other) => panic!("{method} {path}: unexpected {other:?}"),
            };
            // A role denial names the narrowest broader role the row
            // admits; a namespace denial, a row no role passes, none.
            let required = result.err().and_then(|r| r.required);
            let admitted_above = (role + 1..3).find(|r| expected[*r] == A).map(|r| Role::ALL[r]);
            if got == R && required != admitted_above {
                failures.push(format!(
                    "{method} {path} as role {role}: required {required:?}, want {admitted_above:?}"
                ));
            }
            if got != *want {
                failures.push(format!(
                    "{method} {path} as {}: want {want:?}, got {got:?}",
                    ["viewer", "editor", "owner"][role]
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn token_of_another_namespace_is_denied_ours_and_allowed_its_own() {
    let config = fixture();
    let auth = bearer(OTHER_OWNER);
    let token = config.authenticate(None, Some(&auth), no_clock).unwrap();
    assert_eq!(
        config
            .authorize(token, b"GET", b"/api/v1/namespaces/default/deployments")
            .map(drop),
        Err(Denial::NamespaceDenied.into())
    );
    assert_eq!(
        config
            .authorize(token, b"DELETE", b"/apitokens/v1/namespaces/other/apitokens/t")
            .map(drop),
        Ok(())
    );
}

#[test]
fn custom_rules_replace_the_builtin_table() {
    // A non-VVP API: tenants instead of namespaces, read-only invoices for viewers.
    let rules = r#","rules":[
        {"path":"/billing/v2/tenants/{namespace}/invoices/**","allow":{"viewer":["get","list"],"owner":["*"]}},
        {"path":"/billing/v2/tenants/{namespace}/**","allow":{"editor":["*"],"owner":["*"]}}
    ]"#;
    let config = apitokens_core::Config::from_json(fixture_json(rules).as_bytes()).unwrap();
    let check = |secret: &str, method: &str, path: &str| {
        let auth = bearer(secret);
        let token = config.authenticate(None, Some(&auth), no_clock).unwrap();
        config.authorize(token, method.as_bytes(), path.as_bytes()).map(drop)
    };
    assert_eq!(check(VIEWER, "GET", "/billing/v2/tenants/default/invoices"), Ok(()));
    assert_eq!(check(VIEWER, "GET", "/billing/v2/tenants/default/invoices/7"), Ok(()));
    // The role to ask for: the narrowest broader one the rule admits, else
    // (these rules are not ordered) the narrowest it admits.
    assert_eq!(
        check(VIEWER, "POST", "/billing/v2/tenants/default/invoices"),
        Err(Refusal::role(Some(Role::Owner)))
    );
    assert_eq!(
        check(EDITOR, "GET", "/billing/v2/tenants/default/invoices"),
        Err(Refusal::role(Some(Role::Owner)))
    );
    assert_eq!(
        check(VIEWER, "PUT", "/billing/v2/tenants/default/payments/1"),
        Err(Refusal::role(Some(Role::Editor)))
    );
    assert_eq!(check(EDITOR, "POST", "/billing/v2/tenants/default/payments"), Ok(()));
    assert_eq!(check(OWNER, "DELETE", "/billing/v2/tenants/default/invoices/7"), Ok(()));
    assert_eq!(
        check(OWNER, "GET", "/billing/v2/tenants/other/invoices"),
        Err(Denial::NamespaceDenied.into())
    );
    // The built-in table no longer applies.
    assert_eq!(
        check(OWNER, "GET", "/api/v1/namespaces/default/deployments"),
        Err(Refusal::role(None))
    );
}

#[test]
fn get_means_list_on_collections_and_get_on_items() {
    let rules = r#","rules":[
        {"path":"/v1/{namespace}/**","allow":{"viewer":["list"],"editor":["get"]}}
    ]"#;
    let config = apitokens_core::Config::from_json(fixture_json(rules).as_bytes()).unwrap();
    let check = |secret: &str, path: &str| {
        let auth = bearer(secret);
        let token = config.authenticate(None, Some(&auth), no_clock).unwrap();
        config.authorize(token, b"GET", path.as_bytes()).is_ok()
    };
    assert!(check(VIEWER, "/v1/default/orders"));
    assert!(!check(VIEWER, "/v1/default/orders/1"));
    assert!(check(VIEWER, "/v1/default/orders/1/lines"));
    assert!(!check(VIEWER, "/v1/default"));
    assert!(!check(EDITOR, "/v1/default/orders"));
    assert!(check(EDITOR, "/v1/default/orders/1"));
    assert!(check(EDITOR, "/v1/default"));
}
