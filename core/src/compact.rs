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
//! "APTK" u8 version (3) 3 x u8 zero
//! 16 bytes lineage (versions 2 and 3): who made the table, see below
//! u64 epoch (version 3 only): the store history the table belongs to
//! u64 generation (versions 2 and 3): the configuration version it carries
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
//!
//! The [`Stamp`] (epoch, then generation) orders the tables of one lineage:
//! a filter never replaces a table by an older one ([`arrival`]), so no
//! control plane serving an older copy of the store (a replica cut off from
//! its database, a restored backup) can bring back a revoked token. The
//! epoch is the store's history: a store restored from a backup keeps its
//! epoch and is refused until an operator starts a new, later one
//! (`apitokens new-epoch`). Versions 1 (no lineage) and 2 (no epoch: epoch 0)
//! are still read.

use crate::config::Config;
use crate::error::ConfigError;
use crate::spec::PluginConfig;
use crate::table::{encode_specs, TokenTable};

pub const MAGIC: &[u8; 4] = b"APTK";
pub const VERSION: u8 = 3;
/// The version before epochs: lineage, then generation.
const VERSION_2: u8 = 2;
/// Bytes of lineage in a version 2 or 3 header.
pub const LINEAGE_LEN: usize = 16;
/// Bytes up to and including the lineage: what a filter reads to decide
/// whether a configuration supersedes another.
pub const LINEAGE_END: usize = 8 + LINEAGE_LEN;
/// Bytes up to and including the epoch and the generation: what a filter
/// reads to decide whether a configuration is older than the one it has.
pub const STAMP_END: usize = LINEAGE_END + 16;

pub type Lineage = [u8; LINEAGE_LEN];

/// Where a table stands in the history of its store: the store's epoch, then
/// the configuration version (generation). Ordered: a later epoch supersedes
/// every generation of an earlier one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Stamp {
    pub epoch: u64,
    pub generation: u64,
}

impl Stamp {
    /// The 16 bytes a header carries (epoch, then generation, little-endian).
    pub fn to_bytes(self) -> [u8; 16] {
        let mut out = [0u8; 16];
        let (epoch, generation) = out.split_at_mut(8);
        epoch.copy_from_slice(&self.epoch.to_le_bytes());
        generation.copy_from_slice(&self.generation.to_le_bytes());
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let word = |at: usize| Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?));
        Some(Self {
            epoch: word(0)?,
            generation: word(8)?,
        })
    }
}

/// What a filter VM does with a compact configuration that arrives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrival {
    /// Not older than anything seen: it supersedes the VM's table.
    Apply,
    /// Older than the table this VM enforces: keep enforcing that one (the
    /// new plugin instance shares it). Envoy already accepted the
    /// configuration without asking this VM (a plugin it had validated
    /// before), so refusing would only leave the worker without a table.
    KeepNewer,
    /// Older than a table this Envoy enforced, and this VM has none to keep
    /// (Envoy's validation VM): refuse it, Envoy NACKs and keeps the newer.
    Refuse,
}

/// The rule that keeps every Envoy from moving backwards: `incoming`
/// against the newest table of its lineage in this VM (`here`) and, in a VM
/// that has configured nothing before (Envoy's validation VM), the newest
/// any VM of this Envoy applied (`floor`, shared between VMs).
pub fn arrival(incoming: Stamp, here: Option<Stamp>, floor: Option<Stamp>) -> Arrival {
    let newest = here.max(floor);
    if !matches!(newest, Some(n) if incoming < n) {
        Arrival::Apply
    } else if here.is_some() {
        Arrival::KeepNewer
    } else {
        Arrival::Refuse
    }
}

/// Whether a plugin configuration is in the compact encoding (JSON never
/// starts with these bytes).
pub fn is_compact(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC)
}

/// The lineage of a compact configuration (from its first
/// [`LINEAGE_END`] bytes); `None` for JSON and for version 1.
pub fn lineage(head: &[u8]) -> Option<&[u8]> {
    if !is_compact(head) || !matches!(head.get(4), Some(&VERSION | &VERSION_2)) {
        return None;
    }
    head.get(8..LINEAGE_END)
}

/// The stamp of a compact configuration (from its first [`STAMP_END`]
/// bytes); `None` for JSON and for version 1. Version 2 has epoch 0.
pub fn stamp(head: &[u8]) -> Option<Stamp> {
    lineage(head)?;
    if head.get(4) == Some(&VERSION_2) {
        let generation = u64::from_le_bytes(head.get(LINEAGE_END..LINEAGE_END + 8)?.try_into().ok()?);
        return Some(Stamp { epoch: 0, generation });
    }
    Stamp::from_bytes(head.get(LINEAGE_END..STAMP_END)?)
}

/// Sets the stamp of a header made by [`header`].
pub fn set_stamp(header: &mut [u8], stamp: Stamp) {
    if let Some(field) = header.get_mut(LINEAGE_END..STAMP_END) {
        field.copy_from_slice(&stamp.to_bytes());
    }
}

/// The header and settings of a compact configuration: `settings` (its
/// `tokens` must be empty) checked with the filter's own validation, so the
/// encoder never emits what the filter would refuse. The table section
/// follows it. The stamp is 0 until [`set_stamp`].
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
    let mut out = Vec::with_capacity(STAMP_END + 4 + json.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[VERSION, 0, 0, 0]);
    out.extend_from_slice(lineage);
    out.extend_from_slice(&Stamp::default().to_bytes());
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
            Some([VERSION_2, 0, 0, 0]) => LINEAGE_END + 8,
            Some([VERSION, 0, 0, 0]) => STAMP_END,
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
