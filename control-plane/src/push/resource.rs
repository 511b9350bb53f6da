//! What the control plane pushes: the plugin configuration (the compact
//! encoding) wrapped as the Envoy ECDS resource, a `TypedExtensionConfig`
//! holding the Wasm filter configuration, inside a `DiscoveryResponse`.
//!
//! The configuration of a million tokens is about 90 MB, and the protobuf
//! wrappers around it are a few hundred bytes, so the response is encoded as
//! those bytes before and after the payload ([`Frame`]), never as a message
//! holding a copy of it: every Envoy's stream and the ECDS file write the
//! same shared payload. The bytes are exactly prost's encoding of the whole
//! message (the tests compare them).

use crate::config::{Encoded, Version};
use envoy_types::pb::envoy::config::core::v3::{
    async_data_source, data_source, AsyncDataSource, DataSource, TypedExtensionConfig,
};
use envoy_types::pb::envoy::extensions::wasm::v3::{
    plugin_config, FailurePolicy, PluginConfig as WasmPluginConfig, VmConfig,
};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use std::sync::Arc;

/// The type of the ECDS resources (`TypedExtensionConfig`).
pub const TYPE_URL: &str = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";
/// The type Envoy's `config_discovery` expects inside them.
pub const WASM_TYPE_URL: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
/// The wrapper of the compact encoding, which Envoy hands to the filter as is.
pub const BYTES_TYPE_URL: &str = "type.googleapis.com/google.protobuf.BytesValue";

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

/// An encoded message around a shared payload: `head`, then the payload,
/// then `tail`.
#[derive(Clone, Debug)]
pub struct Frame {
    pub head: Vec<u8>,
    pub payload: Arc<Vec<u8>>,
    pub tail: Vec<u8>,
}

impl Frame {
    pub fn len(&self) -> usize {
        self.head.len() + self.payload.len() + self.tail.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn parts(&self) -> [&[u8]; 3] {
        [&self.head, &self.payload, &self.tail]
    }
}

/// Bytes around an inner value of known length.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Around {
    head: Vec<u8>,
    tail: Vec<u8>,
}

impl Around {
    /// The wrapped value as field `field` (length-delimited) of a message
    /// whose other fields encode to `before` (lower field numbers) and
    /// `after` (higher ones), as prost orders them.
    fn wrap(self, inner_len: usize, before: &[u8], field: u32, after: &[u8]) -> Self {
        let len = self.head.len() + inner_len + self.tail.len();
        let mut head = Vec::with_capacity(before.len() + 16 + self.head.len());
        head.extend_from_slice(before);
        prost::encoding::encode_key(field, prost::encoding::WireType::LengthDelimited, &mut head);
        prost::encoding::encode_varint(len as u64, &mut head);
        head.extend_from_slice(&self.head);
        let mut tail = self.tail;
        tail.extend_from_slice(after);
        Self { head, tail }
    }
}

fn any_type_url(type_url: &str) -> Vec<u8> {
    Any {
        type_url: type_url.to_owned(),
        value: Vec::new(),
    }
    .encode_to_vec()
}

/// The ECDS resource for one filter: the fixed parts of the wrappers,
/// encoded once.
#[derive(Clone, Debug)]
pub struct EcdsResource {
    params: FilterParams,
    /// `PluginConfig` fields before `configuration` (name, root_id, vm) and after (failure_policy).
    plugin_before: Vec<u8>,
    plugin_after: Vec<u8>,
}

impl EcdsResource {
    pub fn new(params: FilterParams) -> Self {
        let plugin_before = WasmPluginConfig {
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
            ..Default::default()
        }
        .encode_to_vec();
        let plugin_after = WasmPluginConfig {
            // Explicit: a runtime flag can change the default, and fail-open
            // would be a bypass for an authorization filter.
            failure_policy: FailurePolicy::FailClosed as i32,
            ..Default::default()
        }
        .encode_to_vec();
        Self {
            params,
            plugin_before,
            plugin_after,
        }
    }

    pub fn params(&self) -> &FilterParams {
        &self.params
    }

    /// The resource (an `Any` holding the `TypedExtensionConfig`) around a
    /// payload of `payload_len` bytes.
    fn resource(&self, payload_len: usize) -> Around {
        let bytes_value = Around::default().wrap(payload_len, &[], 1, &[]);
        let configuration = bytes_value.wrap(payload_len, &any_type_url(BYTES_TYPE_URL), 2, &[]);
        let plugin = configuration.wrap(payload_len, &self.plugin_before, 4, &self.plugin_after);
        let wasm = plugin.wrap(payload_len, &[], 1, &[]);
        let wasm_any = wasm.wrap(payload_len, &any_type_url(WASM_TYPE_URL), 2, &[]);
        let tec_name = TypedExtensionConfig {
            name: self.params.resource_name.clone(),
            typed_config: None,
        }
        .encode_to_vec();
        let tec = wasm_any.wrap(payload_len, &tec_name, 2, &[]);
        tec.wrap(payload_len, &any_type_url(TYPE_URL), 2, &[])
    }

    /// A state-of-the-world response carrying `encoded` when `include` (the
    /// client subscribed to the resource), otherwise no resources.
    pub fn response(&self, encoded: &Encoded, nonce: &str, include: bool) -> Frame {
        self.response_for(encoded.version, &encoded.payload, nonce, include)
    }

    fn response_for(&self, version: Version, payload: &Arc<Vec<u8>>, nonce: &str, include: bool) -> Frame {
        let before = DiscoveryResponse {
            version_info: version.xds(),
            ..Default::default()
        }
        .encode_to_vec();
        let after = DiscoveryResponse {
            type_url: TYPE_URL.to_owned(),
            nonce: nonce.to_owned(),
            ..Default::default()
        }
        .encode_to_vec();
        if !include {
            let mut head = before;
            head.extend_from_slice(&after);
            return Frame {
                head,
                payload: Arc::new(Vec::new()),
                tail: Vec::new(),
            };
        }
        let framed = self.resource(payload.len()).wrap(payload.len(), &before, 2, &after);
        Frame {
            head: framed.head,
            payload: Arc::clone(payload),
            tail: framed.tail,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Epoch, Revision};
    use envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm;
    use envoy_types::pb::google::protobuf::BytesValue;
    use envoy_types::util::pack_any;

    /// The Wasm filter configuration around a payload, as a message.
    fn wasm_filter(params: &FilterParams, payload: Vec<u8>) -> Wasm {
        let resource = EcdsResource::new(params.clone());
        let config = WasmPluginConfig::decode(resource.plugin_before.as_slice())
            .ok()
            .map(|mut c| {
                c.configuration = Some(Any {
                    type_url: BYTES_TYPE_URL.to_owned(),
                    value: BytesValue { value: payload }.encode_to_vec(),
                });
                c.failure_policy = FailurePolicy::FailClosed as i32;
                c
            });
        Wasm { config }
    }

    fn concat(frame: &Frame) -> Vec<u8> {
        frame.parts().concat()
    }

    /// The same response built the ordinary way, as a message.
    fn reference(params: &FilterParams, version: Version, payload: &[u8], nonce: &str) -> Vec<u8> {
        let tec = TypedExtensionConfig {
            name: params.resource_name.clone(),
            typed_config: Some(pack_any(wasm_filter(params, payload.to_vec()))),
        };
        DiscoveryResponse {
            version_info: version.xds(),
            resources: vec![pack_any(tec)],
            type_url: TYPE_URL.to_owned(),
            nonce: nonce.to_owned(),
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn frames_are_byte_for_byte_prosts_encoding() {
        let params = FilterParams {
            module: "/opt/m.wasm".into(),
            ..FilterParams::default()
        };
        let resource = EcdsResource::new(params.clone());
        // Lengths on both sides of every varint boundary. (An empty payload,
        // which the compact encoding never is, would differ: prost leaves
        // empty fields out.)
        for len in [1usize, 100, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152] {
            let payload = Arc::new((0..len).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
            let version = Version::new(Epoch(1_733_500_000_000), Revision(42));
            let frame = resource.response_for(version, &payload, "7", true);
            assert_eq!(
                concat(&frame),
                reference(&params, version, &payload, "7"),
                "payload of {len} bytes"
            );
            assert_eq!(frame.len(), concat(&frame).len());
        }
    }

    /// The response of version 9.`revision`, as Envoy decodes it.
    fn decoded(revision: Revision, payload: &Arc<Vec<u8>>, nonce: &str, include: bool) -> DiscoveryResponse {
        let frame = EcdsResource::new(FilterParams::default()).response_for(
            Version::new(Epoch(9), revision),
            payload,
            nonce,
            include,
        );
        DiscoveryResponse::decode(concat(&frame).as_slice()).unwrap()
    }

    #[test]
    fn the_resource_is_a_fail_closed_wasm_filter_carrying_the_bytes() {
        let payload = Arc::new(b"APTK payload".to_vec());
        let r = decoded(Revision(3), &payload, "n1", true);
        assert_eq!(
            (r.version_info.as_str(), r.nonce.as_str(), r.type_url.as_str()),
            ("9.3", "n1", TYPE_URL)
        );
        let any = &r.resources[0];
        assert_eq!(any.type_url, TYPE_URL);
        let tec = TypedExtensionConfig::decode(any.value.as_slice()).unwrap();
        assert_eq!(tec.name, "apitokens");
        let inner = tec.typed_config.unwrap();
        assert_eq!(inner.type_url, WASM_TYPE_URL);
        let cfg = Wasm::decode(inner.value.as_slice()).unwrap().config.unwrap();
        assert_eq!(cfg.failure_policy, FailurePolicy::FailClosed as i32);
        let conf = cfg.configuration.unwrap();
        assert_eq!(conf.type_url, BYTES_TYPE_URL);
        assert_eq!(BytesValue::decode(conf.value.as_slice()).unwrap().value, *payload);
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
    fn a_response_without_the_resource() {
        let payload = Arc::new(vec![1, 2, 3]);
        let r = decoded(Revision(5), &payload, "2", false);
        assert!(r.resources.is_empty());
        assert_eq!((r.version_info.as_str(), r.nonce.as_str()), ("9.5", "2"));
    }
}
