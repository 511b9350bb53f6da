//! `apitokens render`: the current plugin configuration as the filter reads
//! it (JSON), or wrapped in an Istio `WasmPlugin`, for static Envoy and Istio
//! setups that do not use ECDS.

use crate::store::TokenRecord;
use apitokens_core::conditions::Packed;
use apitokens_core::spec::{PluginConfig, TokenSpec};
use apitokens_core::Timestamp;

#[derive(Clone, Debug)]
pub struct WasmPluginOptions {
    pub name: String,
    pub namespace: String,
    pub url: String,
    /// The module's SHA-256 (hex), pinned in the WasmPlugin.
    pub sha256: Option<String>,
    pub selector: Vec<(String, String)>,
}

impl Default for WasmPluginOptions {
    fn default() -> Self {
        Self {
            name: "apitokens".into(),
            namespace: "istio-system".into(),
            url: "file:///var/local/lib/wasm/apitokens_filter.wasm".into(),
            sha256: None,
            selector: vec![("istio".into(), "ingressgateway".into())],
        }
    }
}

/// The plugin configuration for `records` at `now`: `base` (realm, rules,
/// identity headers, ...) plus every token that has not expired, ordered by
/// name. A static configuration cannot be updated when a token expires, so
/// expired tokens are left out (the filter would refuse them anyway).
pub fn plugin_config(base: &PluginConfig, records: &[TokenRecord], now: Timestamp) -> PluginConfig {
    let mut tokens: Vec<TokenSpec> = records
        .iter()
        .filter(|r| !r.retired && r.expire_time.is_none_or(|t| t > now))
        .map(|r| {
            // An overlap that ended already is left out, like an expired token.
            let previous = r.previous.filter(|p| p.until > now);
            let conditions = r.conditions.as_ref().map(Packed::conditions).unwrap_or_default();
            TokenSpec {
                name: r.name.clone(),
                role: r.role.as_str().to_owned(),
                secret_sha256: r.digest.to_hex(),
                expire_time: r.expire_time.map(|t| t.to_rfc3339()),
                previous_secret_sha256: previous.map(|p| p.digest.to_hex()),
                previous_secret_expire_time: previous.map(|p| p.until.to_rfc3339()),
                disabled: r.disabled,
                not_before_time: conditions.not_before.map(|t| t.to_rfc3339()),
                client_addresses: conditions.addresses_spec(),
                rate_limit: conditions.rate_limit.map(|l| l.spec()),
            }
        })
        .collect();
    tokens.sort_by(|a, b| a.name.cmp(&b.name));
    PluginConfig { tokens, ..base.clone() }
}

pub fn json(spec: &PluginConfig) -> String {
    serde_json::to_string_pretty(spec).unwrap_or_else(|_| spec.to_json())
}

fn yaml_string(s: &str) -> String {
    // A JSON string is a valid YAML double-quoted scalar.
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// An Istio `WasmPlugin` (extensions.istio.io/v1alpha1) carrying `spec` as
/// `pluginConfig`. The plugin configuration is embedded as a JSON flow
/// mapping, which is valid YAML.
pub fn wasm_plugin(spec: &PluginConfig, opts: &WasmPluginOptions) -> String {
    let mut out = String::new();
    out.push_str("apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata:\n");
    out.push_str(&format!("  name: {}\n", yaml_string(&opts.name)));
    out.push_str(&format!("  namespace: {}\n", yaml_string(&opts.namespace)));
    out.push_str("spec:\n");
    if !opts.selector.is_empty() {
        out.push_str("  selector:\n    matchLabels:\n");
        for (k, v) in &opts.selector {
            out.push_str(&format!("      {}: {}\n", yaml_string(k), yaml_string(v)));
        }
    }
    out.push_str(&format!("  url: {}\n", yaml_string(&opts.url)));
    if let Some(sha256) = &opts.sha256 {
        out.push_str("  # Istio refuses a module with another digest.\n");
        out.push_str(&format!("  sha256: {}\n", yaml_string(sha256)));
    }
    out.push_str("  phase: AUTHN\n");
    out.push_str("  # An authorization filter must fail closed.\n");
    out.push_str("  failStrategy: FAIL_CLOSE\n");
    out.push_str("  pluginConfig:\n");
    for line in json(spec).lines() {
        out.push_str("    ");
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use apitokens_core::config::Config;
    use apitokens_core::table::Digest;
    use apitokens_core::Role;

    fn rec(name: &str, expire: Option<i64>) -> TokenRecord {
        TokenRecord {
            last_addresses: Vec::new(),
            update_time: Timestamp::from_unix(0, 0),
            conditions: None,
            name: name.into(),
            role: Role::Viewer,
            digest: Digest::of(name.as_bytes()),
            create_time: Timestamp::from_unix(0, 0),
            expire_time: expire.map(|s| Timestamp::from_unix(s, 0)),
            retired: false,
            created_by: None,
            previous: None,
            last_use: None,
            evidence: Default::default(),
            disabled: false,
        }
    }

    #[test]
    fn expired_tokens_are_left_out_and_base_settings_kept() {
        let now = Timestamp::from_unix(1000, 0);
        let records = [
            rec("namespaces/a/apitokens/zz", None),
            rec("namespaces/a/apitokens/expired", Some(999)),
            rec("namespaces/a/apitokens/now", Some(1000)),
            rec("namespaces/a/apitokens/later", Some(2000)),
        ];
        let base = crate::cli::base_config(br#"{"realm": "corp", "forwardAuthorization": true}"#).unwrap();
        let spec = plugin_config(&base, &records, now);
        let names: Vec<_> = spec.tokens.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["namespaces/a/apitokens/later", "namespaces/a/apitokens/zz"]);
        assert_eq!(spec.tokens[0].expire_time.as_deref(), Some("1970-01-01T00:33:20Z"));
        assert_eq!(spec.realm.as_deref(), Some("corp"));
        assert!(spec.forward_authorization);
        Config::from_spec(&spec).unwrap();
    }

    #[test]
    fn conditions_are_rendered_as_the_filter_reads_them() {
        use apitokens_core::conditions::{Cidr, Conditions, Packed};
        let conditions = Packed::new(&Conditions {
            not_before: Some(Timestamp::from_unix(1500, 0)),
            rate_limit: Some(apitokens_core::ratelimit::RateLimit {
                requests: 3,
                per: apitokens_core::ratelimit::Per::Second,
                burst: 1,
            }),
            allow: vec![Cidr::parse("10.0.0.0/8").unwrap()],
            except: vec![Cidr::parse("10.1.0.0/16").unwrap()],
        });
        let records = [TokenRecord {
            conditions: Some(conditions),
            ..rec("namespaces/a/apitokens/bound", None)
        }];
        let spec = plugin_config(&PluginConfig::default(), &records, Timestamp::from_unix(1000, 0));
        let text = json(&spec);
        assert!(text.contains("\"notBeforeTime\": \"1970-01-01T00:25:00Z\""), "{text}");
        assert!(text.contains("\"rateLimit\": {"), "{text}");
        let config = Config::from_spec(&spec).unwrap();
        let bound = config
            .tokens()
            .get(&Digest::of(b"namespaces/a/apitokens/bound"))
            .unwrap();
        let read = bound.conditions().unwrap();
        assert_eq!(read.not_before(), Some(Timestamp::from_unix(1500, 0)));
        assert_eq!(read.rate_limit().map(|l| (l.requests, l.burst)), Some((3, 1)));
        assert!(read.admits("10.2.0.1".parse().unwrap()) && !read.admits("10.1.0.1".parse().unwrap()));
    }

    #[test]
    fn a_disabled_token_is_rendered_disabled() {
        let now = Timestamp::from_unix(1000, 0);
        let records = [
            TokenRecord {
                disabled: true,
                ..rec("namespaces/a/apitokens/off", None)
            },
            rec("namespaces/a/apitokens/on", None),
        ];
        let spec = plugin_config(&PluginConfig::default(), &records, now);
        let disabled: Vec<_> = spec.tokens.iter().map(|t| (t.name.as_str(), t.disabled)).collect();
        assert_eq!(
            disabled,
            [
                ("namespaces/a/apitokens/off", true),
                ("namespaces/a/apitokens/on", false)
            ]
        );
        // Written as "disabled": true, and the filter refuses it.
        assert_eq!(json(&spec).matches("\"disabled\": true").count(), 1);
        let config = Config::from_spec(&spec).unwrap();
        let off = config.tokens().get(&Digest::of(b"namespaces/a/apitokens/off")).unwrap();
        assert!(off.is_disabled());
    }

    #[test]
    fn base_config_is_validated() {
        use crate::cli::base_config;
        assert_eq!(base_config(br#"{"realm": ""}"#).unwrap_err().field, "realm");
        assert_eq!(base_config(br#"{"nope": 1}"#).unwrap_err().field, "nope");
        let with_tokens = br#"{"tokens": [{"name": "namespaces/a/apitokens/t", "role": "owner", "secretSha256": "0000000000000000000000000000000000000000000000000000000000000000"}]}"#;
        assert_eq!(base_config(with_tokens).unwrap_err().field, "tokens");
        assert_eq!(base_config(b"").unwrap(), PluginConfig::default());
    }

    fn spec() -> PluginConfig {
        PluginConfig {
            tokens: vec![TokenSpec {
                name: "namespaces/default/apitokens/ci".into(),
                role: "editor".into(),
                secret_sha256: "ab".repeat(32),
                expire_time: Some("2030-01-01T00:00:00Z".into()),
                previous_secret_sha256: None,
                previous_secret_expire_time: None,
                disabled: false,
                not_before_time: None,
                client_addresses: None,
                rate_limit: None,
            }],
            ..PluginConfig::default()
        }
    }

    #[test]
    fn json_round_trips_through_the_filter_schema() {
        let text = json(&spec());
        assert_eq!(PluginConfig::from_json(text.as_bytes()).unwrap(), spec());
    }

    #[test]
    fn wasm_plugin_embeds_the_configuration() {
        let text = wasm_plugin(&spec(), &WasmPluginOptions::default());
        assert!(text.starts_with("apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\n"));
        assert!(text.contains("  failStrategy: FAIL_CLOSE\n"));
        assert!(text.contains("      \"istio\": \"ingressgateway\"\n"));
        // The embedded JSON is the configuration, line for line.
        let embedded: String = text
            .split("  pluginConfig:\n")
            .nth(1)
            .unwrap()
            .lines()
            .map(|l| l.strip_prefix("    ").unwrap())
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(PluginConfig::from_json(embedded.as_bytes()).unwrap(), spec());
    }
}
