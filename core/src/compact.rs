//! The compact encoding of a plugin configuration, for pushes of many tokens.
//!
//! JSON stays the human- and Istio-facing format. The control plane pushes
//! this instead (as a `google.protobuf.BytesValue`, which Envoy hands to the
//! filter unchanged): a VM then keeps the bytes it receives as its token table
//! (see `table`) after one validating pass, instead of parsing JSON into
//! objects and building a table from them. A revocation among 100k tokens
//! costs each VM a copy and a scan of about 9 MB rather than the parse of
//! 14 MB of JSON.
//!
//! ```text
//! "APTK" u8 version (1) 3 x u8 zero
//! u32 S, then S bytes of JSON: the configuration without `tokens`
//! the token table section (see `table`)
//! ```

use crate::config::{Config, ConfigError, PluginConfig};
use crate::table::{encode_specs, TokenTable};

pub const MAGIC: &[u8; 4] = b"APTK";
pub const VERSION: u8 = 1;

/// Whether a plugin configuration is in the compact encoding (JSON never
/// starts with these bytes).
pub fn is_compact(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC)
}

/// Validates `spec` as [`Config::from_spec`] does and encodes it.
pub fn encode(spec: &PluginConfig) -> Result<Vec<u8>, ConfigError> {
    let settings = PluginConfig {
        tokens: Vec::new(),
        ..spec.clone()
    };
    // The settings are checked here so the encoder never emits what the
    // filter would refuse.
    Config::from_spec(&settings)?;
    let settings = settings.to_json();
    let settings_len =
        u32::try_from(settings.len()).map_err(|_| ConfigError::new("configuration", "settings too large"))?;
    let mut out = Vec::with_capacity(16 + settings.len() + spec.tokens.len() * 100);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[VERSION, 0, 0, 0]);
    out.extend_from_slice(&settings_len.to_le_bytes());
    out.extend_from_slice(settings.as_bytes());
    encode_specs(&spec.tokens, &mut out)?;
    Ok(out)
}

impl Config {
    /// The plugin configuration as the filter receives it: JSON, or the
    /// compact encoding (taken over as the token table, without a copy).
    pub fn from_plugin_configuration(bytes: Vec<u8>) -> Result<Self, ConfigError> {
        if !is_compact(&bytes) {
            return Self::from_json(&bytes);
        }
        let header = |problem: &str| ConfigError::new("configuration", problem.to_owned());
        if bytes.get(4..8) != Some(&[VERSION, 0, 0, 0][..]) {
            return Err(header("unsupported version of the compact encoding"));
        }
        let settings_len = bytes
            .get(8..12)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| header("the compact encoding is truncated"))?;
        let settings_end = 12usize
            .checked_add(settings_len)
            .ok_or_else(|| header("the compact encoding is truncated"))?;
        let settings = bytes
            .get(12..settings_end)
            .ok_or_else(|| header("the compact encoding is truncated"))?;
        let settings = PluginConfig::from_json(settings)?;
        if !settings.tokens.is_empty() {
            return Err(ConfigError::new(
                "tokens",
                "belong in the table section of the compact encoding",
            ));
        }
        let tokens = TokenTable::from_buffer(bytes, settings_end)?;
        Self::with_tokens(&settings, tokens)
    }
}
