//! What the control plane pushes: the plugin configuration built from the
//! store's tokens, wrapped as the Envoy ECDS resource (a `TypedExtensionConfig`
//! holding the Wasm filter configuration), and versioned snapshots of it.

use crate::store::TokenRecord;
use apitokens_core::config::{Config, ConfigError, PluginConfig, TokenSpec};
use apitokens_core::timestamp::Timestamp;
use envoy_types::pb::envoy::config::core::v3::{
    async_data_source, data_source, AsyncDataSource, DataSource, TypedExtensionConfig,
};
use envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm;
use envoy_types::pb::envoy::extensions::wasm::v3::{
    plugin_config, FailurePolicy, PluginConfig as WasmPluginConfig, VmConfig,
};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use envoy_types::pb::google::protobuf::{Any, BytesValue, StringValue};
use envoy_types::util::pack_any;

/// The type of the ECDS resources (`TypedExtensionConfig`).
pub const TYPE_URL: &str = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";
/// The type Envoy's `config_discovery` expects inside them.
pub const WASM_TYPE_URL: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";

pub const DEFAULT_RESOURCE_NAME: &str = "apitokens";
pub const DEFAULT_MODULE: &str = "target/wasm32-wasip1/release/apitokens_filter.wasm";

/// How the Wasm filter is described to Envoy. Only the plugin configuration
/// changes from one version to the next, so Envoy reuses its VMs (a new
/// `vm_config` would rebuild them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilterParams {
    /// The `TypedExtensionConfig` name; equals the HTTP filter's name in Envoy.
    pub resource_name: String,
    /// Path of the module as Envoy sees it (relative paths are relative to
    /// Envoy's working directory).
    pub module: String,
    pub vm_id: String,
    pub root_id: String,
}

impl Default for FilterParams {
    fn default() -> Self {
        Self {
            resource_name: DEFAULT_RESOURCE_NAME.to_owned(),
            module: DEFAULT_MODULE.to_owned(),
            vm_id: "apitokens".to_owned(),
            root_id: "apitokens".to_owned(),
        }
    }
}

/// The plugin configuration as it travels to Envoy. Envoy hands both wrappers'
/// contents to the filter unchanged; the filter tells them apart by the
/// compact encoding's magic bytes.
#[derive(Clone, Copy, Debug)]
pub enum Payload<'a> {
    /// JSON, as people and Istio write it (`google.protobuf.StringValue`).
    Json(&'a str),
    /// `apitokens_core::compact` (`google.protobuf.BytesValue`): what `serve`
    /// pushes, so that each VM keeps the bytes as its table instead of parsing.
    Compact(&'a [u8]),
}

impl Payload<'_> {
    fn pack(self) -> Any {
        match self {
            Payload::Json(json) => pack_any(StringValue { value: json.to_owned() }),
            Payload::Compact(bytes) => pack_any(BytesValue { value: bytes.to_vec() }),
        }
    }
}

/// The Wasm HTTP filter configuration carrying `configuration`.
pub fn wasm_filter(params: &FilterParams, configuration: Payload<'_>) -> Wasm {
    Wasm {
        config: Some(WasmPluginConfig {
            name: params.resource_name.clone(),
            root_id: params.root_id.clone(),
            vm: Some(plugin_config::Vm::VmConfig(VmConfig {
                vm_id: params.vm_id.clone(),
                runtime: "envoy.wasm.runtime.v8".to_owned(),
                code: Some(AsyncDataSource {
                    specifier: Some(async_data_source::Specifier::Local(DataSource {
                        specifier: Some(data_source::Specifier::Filename(params.module.clone())),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            })),
            configuration: Some(configuration.pack()),
            // Explicit: a runtime flag can change the default, and fail-open
            // would be a bypass for an authorization filter.
            failure_policy: FailurePolicy::FailClosed as i32,
            ..Default::default()
        }),
    }
}

/// The ECDS resource: `TypedExtensionConfig { name, typed_config: Wasm }`.
pub fn resource(params: &FilterParams, configuration: Payload<'_>) -> Any {
    pack_any(TypedExtensionConfig {
        name: params.resource_name.clone(),
        typed_config: Some(pack_any(wasm_filter(params, configuration))),
    })
}

/// The plugin configuration for `records` at `now`: `base` (realm, rules,
/// identity headers, ...) plus every token that has not expired, ordered by
/// name. Also returns the earliest expiry among them: the next time the
/// configuration must be rebuilt.
pub fn plugin_config(
    base: &PluginConfig,
    records: &[TokenRecord],
    now: Timestamp,
) -> (PluginConfig, Option<Timestamp>) {
    let mut next_expiry: Option<Timestamp> = None;
    let mut tokens: Vec<TokenSpec> = Vec::with_capacity(records.len());
    for r in records {
        if let Some(expire) = r.expire_time {
            if expire <= now {
                continue;
            }
            next_expiry = Some(next_expiry.map_or(expire, |n| n.min(expire)));
        }
        tokens.push(TokenSpec {
            name: r.name.clone(),
            role: r.role.as_str().to_owned(),
            secret_sha256: r.secret_sha256.clone(),
            expire_time: r.expire_time.map(|t| t.to_rfc3339()),
        });
    }
    tokens.sort_by(|a, b| a.name.cmp(&b.name));
    let mut spec = base.clone();
    spec.tokens = tokens;
    (spec, next_expiry)
}

/// Reads a base plugin configuration (everything but the tokens) and checks
/// it with the filter's own validation.
pub fn base_config(json: &[u8]) -> Result<PluginConfig, ConfigError> {
    let base = PluginConfig::from_json(json)?;
    if !base.tokens.is_empty() {
        return Err(ConfigError::new(
            "tokens",
            "must be empty in the base configuration: the control plane manages tokens (use `apitokens import` to migrate existing ones)",
        ));
    }
    Config::from_spec(&base)?;
    Ok(base)
}

/// One published configuration.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// Strictly increasing, also across restarts.
    pub version: u64,
    /// The plugin configuration JSON (digests only).
    pub config_json: String,
    /// The ECDS resource carrying it.
    pub resource: Any,
    pub tokens: usize,
    pub published_at: Timestamp,
}

impl Snapshot {
    pub fn version_info(&self) -> String {
        self.version.to_string()
    }

    /// A state-of-the-world response: the resource when `include` (the client
    /// subscribed to it), otherwise no resources.
    pub fn discovery_response(&self, nonce: String, include: bool) -> DiscoveryResponse {
        DiscoveryResponse {
            version_info: self.version_info(),
            resources: if include {
                vec![self.resource.clone()]
            } else {
                Vec::new()
            },
            type_url: TYPE_URL.to_owned(),
            nonce,
            ..Default::default()
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use apitokens_core::role::Role;
    use prost::Message;

    fn rec(name: &str, expire: Option<i64>) -> TokenRecord {
        TokenRecord {
            name: name.into(),
            role: Role::Viewer,
            secret_sha256: format!("{:0>64}", name.len()),
            create_time: Timestamp::from_unix(0, 0),
            expire_time: expire.map(|s| Timestamp::from_unix(s, 0)),
        }
    }

    #[test]
    fn expired_tokens_are_left_out_and_next_expiry_is_reported() {
        let now = Timestamp::from_unix(1000, 0);
        let records = [
            rec("namespaces/a/apitokens/zz", None),
            rec("namespaces/a/apitokens/expired", Some(999)),
            rec("namespaces/a/apitokens/now", Some(1000)),
            rec("namespaces/a/apitokens/later", Some(2000)),
            rec("namespaces/a/apitokens/soon", Some(1001)),
        ];
        let (spec, next) = plugin_config(&PluginConfig::default(), &records, now);
        let names: Vec<_> = spec.tokens.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "namespaces/a/apitokens/later",
                "namespaces/a/apitokens/soon",
                "namespaces/a/apitokens/zz"
            ]
        );
        assert_eq!(next, Some(Timestamp::from_unix(1001, 0)));
        assert_eq!(spec.tokens[1].expire_time.as_deref(), Some("1970-01-01T00:16:41Z"));
        Config::from_spec(&spec).unwrap();
    }

    #[test]
    fn base_settings_are_kept() {
        let base = base_config(br#"{"realm": "corp", "forwardAuthorization": true}"#).unwrap();
        let (spec, _) = plugin_config(
            &base,
            &[rec("namespaces/a/apitokens/t", None)],
            Timestamp::from_unix(0, 0),
        );
        assert_eq!(spec.realm.as_deref(), Some("corp"));
        assert!(spec.forward_authorization);
        assert_eq!(spec.tokens.len(), 1);
    }

    #[test]
    fn base_config_is_validated() {
        assert_eq!(base_config(br#"{"realm": ""}"#).unwrap_err().field, "realm");
        assert_eq!(base_config(br#"{"nope": 1}"#).unwrap_err().field, "nope");
        let with_tokens = br#"{"tokens": [{"name": "namespaces/a/apitokens/t", "role": "owner", "secretSha256": "0000000000000000000000000000000000000000000000000000000000000000"}]}"#;
        assert_eq!(base_config(with_tokens).unwrap_err().field, "tokens");
        assert_eq!(base_config(b"").unwrap(), PluginConfig::default());
    }

    #[test]
    fn compact_payloads_travel_as_bytes_the_filter_accepts() {
        let (spec, _) = plugin_config(
            &PluginConfig::default(),
            &[rec("namespaces/a/apitokens/t", None)],
            Timestamp::from_unix(0, 0),
        );
        let bytes = apitokens_core::compact::encode(&spec).unwrap();
        let any = resource(&FilterParams::default(), Payload::Compact(&bytes));
        let tec = TypedExtensionConfig::decode(any.value.as_slice()).unwrap();
        let wasm = Wasm::decode(tec.typed_config.unwrap().value.as_slice()).unwrap();
        let conf = wasm.config.unwrap().configuration.unwrap();
        assert_eq!(conf.type_url, "type.googleapis.com/google.protobuf.BytesValue");
        let value = BytesValue::decode(conf.value.as_slice()).unwrap().value;
        assert_eq!(value, bytes);
        assert_eq!(Config::from_plugin_configuration(value).unwrap().token_count(), 1);
    }

    #[test]
    fn resource_is_a_fail_closed_wasm_filter_with_the_json() {
        let params = FilterParams::default();
        let any = resource(&params, Payload::Json(r#"{"tokens":[]}"#));
        assert_eq!(any.type_url, TYPE_URL);
        let tec = TypedExtensionConfig::decode(any.value.as_slice()).unwrap();
        assert_eq!(tec.name, "apitokens");
        let inner = tec.typed_config.unwrap();
        assert_eq!(inner.type_url, WASM_TYPE_URL);
        let wasm = Wasm::decode(inner.value.as_slice()).unwrap();
        let cfg = wasm.config.unwrap();
        assert_eq!(cfg.failure_policy, FailurePolicy::FailClosed as i32);
        let conf = cfg.configuration.unwrap();
        assert_eq!(conf.type_url, "type.googleapis.com/google.protobuf.StringValue");
        assert_eq!(
            StringValue::decode(conf.value.as_slice()).unwrap().value,
            r#"{"tokens":[]}"#
        );
        let Some(plugin_config::Vm::VmConfig(vm)) = cfg.vm else {
            panic!("no vm_config")
        };
        assert_eq!(vm.runtime, "envoy.wasm.runtime.v8");
        let Some(async_data_source::Specifier::Local(DataSource {
            specifier: Some(data_source::Specifier::Filename(f)),
            ..
        })) = vm.code.unwrap().specifier
        else {
            panic!("no local file")
        };
        assert_eq!(f, DEFAULT_MODULE);
    }

    #[test]
    fn discovery_response_carries_version_and_nonce() {
        let snap = Snapshot {
            version: 7,
            config_json: "{}".into(),
            resource: resource(&FilterParams::default(), Payload::Json("{}")),
            tokens: 0,
            published_at: Timestamp::from_unix(0, 0),
        };
        let r = snap.discovery_response("n1".into(), true);
        assert_eq!(
            (r.version_info.as_str(), r.nonce.as_str(), r.type_url.as_str()),
            ("7", "n1", TYPE_URL)
        );
        assert_eq!(r.resources.len(), 1);
        assert!(snap.discovery_response("n2".into(), false).resources.is_empty());
    }
}
