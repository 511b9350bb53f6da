//! `apitokens render`: the current plugin configuration as the filter reads
//! it (JSON), or wrapped in an Istio `WasmPlugin`, for static Envoy and Istio
//! setups that do not use ECDS.

use apitokens_core::config::PluginConfig;

#[derive(Clone, Debug)]
pub struct WasmPluginOptions {
    pub name: String,
    pub namespace: String,
    pub url: String,
    pub selector: Vec<(String, String)>,
}

impl Default for WasmPluginOptions {
    fn default() -> Self {
        Self {
            name: "apitokens".into(),
            namespace: "istio-system".into(),
            url: "file:///var/local/lib/wasm/apitokens_filter.wasm".into(),
            selector: vec![("istio".into(), "ingressgateway".into())],
        }
    }
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
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use apitokens_core::config::TokenSpec;

    fn spec() -> PluginConfig {
        PluginConfig {
            tokens: vec![TokenSpec {
                name: "namespaces/default/apitokens/ci".into(),
                role: "editor".into(),
                secret_sha256: "ab".repeat(32),
                expire_time: Some("2030-01-01T00:00:00Z".into()),
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
