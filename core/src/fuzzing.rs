//! Invariants checked by the fuzz targets (`fuzz/`) and by the replay of their
//! corpora and crashes in `cargo test` (`core/tests/fuzz_replay.rs`). Each
//! function takes arbitrary bytes and panics only when an invariant breaks.
#![allow(clippy::panic)]

use crate::bearer::{self, BearerError};
use crate::config::Config;
use crate::name::is_dns_label;
use crate::role::Verb;
use crate::rules::Rules;
use crate::spec::PluginConfig;

/// The `Authorization` parser: a token is returned only for `Bearer` + one
/// space + a b64token that is the rest of the value.
pub fn bearer(data: &[u8]) {
    match bearer::parse(data) {
        Ok(token) => {
            let start = data.iter().position(|c| *c != b' ' && *c != b'\t').unwrap_or(0);
            let end = data
                .iter()
                .rposition(|c| *c != b' ' && *c != b'\t')
                .map_or(0, |e| e + 1);
            let value = data.get(start..end).unwrap_or_default();
            let scheme = value.get(..7).unwrap_or_default();
            if !scheme.eq_ignore_ascii_case(b"bearer ") || value.get(7..) != Some(token) || token.is_empty() {
                panic!("accepted a value that is not `Bearer <token>`");
            }
            if token
                .iter()
                .any(|c| !(c.is_ascii_alphanumeric() || b"-._~+/=".contains(c)))
            {
                panic!("accepted a token outside the b64token alphabet");
            }
        }
        Err(BearerError::Multiple) if !data.contains(&b',') => panic!("Multiple without a comma"),
        Err(_) if data.contains(&b',') && !matches!(bearer::parse(data), Err(BearerError::Multiple)) => {
            panic!("a comma must always mean Multiple")
        }
        Err(_) => {}
    }
}

/// The path classifier with the built-in rules: a match always names a DNS
/// label that stands as a whole segment of the path before the query, and
/// never comes from a path with an ambiguous spelling. The query's `_method`
/// overrides come out bounded and upper-cased.
pub fn classify(data: &[u8]) {
    static BUILTIN: std::sync::OnceLock<Option<Rules>> = std::sync::OnceLock::new();
    let Some(rules) = BUILTIN.get_or_init(|| Rules::builtin().ok()) else {
        panic!("built-in rules must compile")
    };
    let (method, path) = match data.split_first() {
        Some((m, rest)) => (*m, rest),
        None => (0, data),
    };
    for method in crate::overrides::query_methods(path) {
        let m = method.as_bytes();
        if m.len() > 16 || m.iter().any(u8::is_ascii_lowercase) {
            panic!("an override method that is unbounded or not upper-cased");
        }
    }
    if let Some(scope) = rules.classify(path) {
        if !is_dns_label(scope.namespace) {
            panic!("namespace is not a DNS label");
        }
        let before_query = path.split(|c| *c == b'?').next().unwrap_or_default();
        if before_query
            .iter()
            .any(|c| matches!(c, b'%' | b';' | b'\\' | b'#') || !(0x21..=0x7e).contains(c))
        {
            panic!("matched a path with an ambiguous spelling");
        }
        if !before_query.split(|c| *c == b'/').any(|seg| seg == scope.namespace) {
            panic!("namespace is not a segment of the path");
        }
        let method: &[u8] = match method % 6 {
            0 => b"GET",
            1 => b"POST",
            2 => b"PUT",
            3 => b"PATCH",
            4 => b"DELETE",
            _ => b"HEAD",
        };
        if let Some(verb) = Verb::from_method(method, scope.collection) {
            let _ = scope.permits(crate::role::Role::Viewer, verb);
        }
    }
}

/// The configuration decoders (JSON and compact): never panic, errors always
/// name a field, whatever parses survives a round trip through JSON, and a
/// valid configuration survives a round trip through the compact encoding.
pub fn config(data: &[u8]) {
    if let Err(e) = Config::from_plugin_configuration(data.to_vec()) {
        if e.field.is_empty() {
            panic!("error without a field");
        }
    }
    match PluginConfig::from_json(data) {
        Ok(spec) => {
            let again = PluginConfig::from_json(spec.to_json().as_bytes());
            if again.as_ref() != Ok(&spec) {
                panic!("configuration does not round-trip through JSON");
            }
            match Config::from_spec(&spec) {
                Err(e) if e.field.is_empty() => panic!("error without a field"),
                Err(_) => {}
                Ok(config) => {
                    let Ok(bytes) = crate::compact::encode(&spec, &[0; crate::compact::LINEAGE_LEN]) else {
                        panic!("a valid configuration must encode")
                    };
                    match Config::from_plugin_configuration(bytes) {
                        Ok(compact) if compact.token_count() == config.token_count() => {}
                        _ => panic!("the compact encoding must decode to the same tokens"),
                    }
                }
            }
        }
        Err(e) if e.field.is_empty() => panic!("error without a field"),
        Err(_) => {}
    }
}
