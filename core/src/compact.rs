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
//! "APTK" u8 version (2) 3 x u8 zero
//! 16 bytes lineage (version 2 only): who made the table, see below
//! u64 generation (version 2 only): the configuration version it carries
//! u32 S, then S bytes of JSON: the configuration without `tokens`
//! the token table section (see `table`)
//! ```
//!
//! The generation makes every version's bytes unique. Envoy reuses a plugin
//! whose configuration bytes equal a still-loaded earlier one, without
//! calling `on_configure`; a revocation that restores an earlier token set
//! (create, then delete) would otherwise revive that earlier plugin, whose
//! table this filter may already have replaced.
//!
//! The lineage identifies the token store the table was built from (the same
//! for every control-plane replica on one store, different for another
//! store). A filter VM lets a compact configuration supersede only an earlier
//! one of the same plugin name *and* lineage: two control planes feeding two
//! listeners of one Envoy under the same resource name keep their own tables.
//! Version 1 (no lineage) is still read.

use crate::config::{Config, ConfigError, PluginConfig};
use crate::table::{encode_specs, TokenTable};

pub const MAGIC: &[u8; 4] = b"APTK";
pub const VERSION: u8 = 2;
/// Bytes of lineage in a version 2 header.
pub const LINEAGE_LEN: usize = 16;
/// Bytes up to and including the lineage: what a filter reads to decide
/// whether a configuration supersedes another.
pub const LINEAGE_END: usize = 8 + LINEAGE_LEN;
/// Bytes up to and including the generation.
pub const GENERATION_END: usize = LINEAGE_END + 8;

pub type Lineage = [u8; LINEAGE_LEN];

/// Whether a plugin configuration is in the compact encoding (JSON never
/// starts with these bytes).
pub fn is_compact(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC)
}

/// The lineage of a compact configuration (from its first
/// [`LINEAGE_END`] bytes); `None` for JSON and for version 1.
pub fn lineage(head: &[u8]) -> Option<&[u8]> {
    if !is_compact(head) || head.get(4) != Some(&VERSION) {
        return None;
    }
    head.get(8..LINEAGE_END)
}

/// The generation of a compact configuration (from its first
/// [`GENERATION_END`] bytes); `None` for JSON and for version 1.
pub fn generation(head: &[u8]) -> Option<u64> {
    lineage(head)?;
    Some(u64::from_le_bytes(
        head.get(LINEAGE_END..GENERATION_END)?.try_into().ok()?,
    ))
}

/// Sets the generation of a header made by [`header`].
pub fn set_generation(header: &mut [u8], generation: u64) {
    if let Some(field) = header.get_mut(LINEAGE_END..GENERATION_END) {
        field.copy_from_slice(&generation.to_le_bytes());
    }
}

/// The header and settings of a compact configuration: `settings` (its
/// `tokens` must be empty) checked with the filter's own validation, so the
/// encoder never emits what the filter would refuse. The table section
/// follows it. The generation is 0 until [`set_generation`].
pub fn header(settings: &PluginConfig, lineage: &Lineage) -> Result<Vec<u8>, ConfigError> {
    if !settings.tokens.is_empty() {
        return Err(ConfigError::new(
            "tokens",
            "belong in the table section of the compact encoding",
        ));
    }
    Config::from_spec(settings)?;
    let json = settings.to_json();
    let json_len = u32::try_from(json.len()).map_err(|_| ConfigError::new("configuration", "settings too large"))?;
    let mut out = Vec::with_capacity(GENERATION_END + 4 + json.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[VERSION, 0, 0, 0]);
    out.extend_from_slice(lineage);
    out.extend_from_slice(&0u64.to_le_bytes());
    out.extend_from_slice(&json_len.to_le_bytes());
    out.extend_from_slice(json.as_bytes());
    Ok(out)
}

/// Validates `spec` as [`Config::from_spec`] does and encodes it.
pub fn encode(spec: &PluginConfig, lineage: &Lineage) -> Result<Vec<u8>, ConfigError> {
    let settings = PluginConfig {
        tokens: Vec::new(),
        ..spec.clone()
    };
    let mut out = header(&settings, lineage)?;
    out.reserve(8 + spec.tokens.len() * 100);
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
        let settings_at = match bytes.get(4..8) {
            Some([1, 0, 0, 0]) => 8,
            Some([VERSION, 0, 0, 0]) => GENERATION_END,
            _ => return Err(header("unsupported version of the compact encoding")),
        };
        let truncated = || header("the compact encoding is truncated");
        let settings_len = bytes
            .get(settings_at..settings_at + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(truncated)?;
        let settings_end = (settings_at + 4).checked_add(settings_len).ok_or_else(truncated)?;
        let settings = bytes.get(settings_at + 4..settings_end).ok_or_else(truncated)?;
        let settings = PluginConfig::from_json(settings)?;
        if !settings.tokens.is_empty() {
            return Err(ConfigError::new(
                "tokens",
                "belong in the table section of the compact encoding",
            ));
        }
        let tokens = TokenTable::from_buffer(bytes, settings_end)?;
        Self::with_table(&settings, tokens)
    }
}
