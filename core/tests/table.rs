//! The token table and the compact encoding the control plane pushes.
#![cfg(test)] // helpers are test code too, for clippy.toml's allow-*-in-tests
mod common;

use apitokens_core::compact;
use apitokens_core::gate;
use apitokens_core::spec::{ClientAddressesSpec, PluginConfig, RateLimitSpec, TokenSpec};
use apitokens_core::table::{Digest, TokenTable};
use apitokens_core::{Config, Role};
use common::recorder::Recorder;
use common::*;

const LINEAGE: compact::Lineage = *b"0123456789abcdef";
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

fn spec(i: usize) -> TokenSpec {
    TokenSpec {
        name: format!("namespaces/ns-{}/apitokens/token-{i}", i % 97),
        role: ["viewer", "editor", "owner"][i % 3].to_owned(),
        secret_sha256: sha256_hex(&format!("secret-{i}")),
        expire_time: (i % 5 == 0).then(|| format!("2030-01-01T00:00:{:02}.5Z", i % 60)),
        // Every seventh token is in a rotation's overlap (not among the first three).
        previous_secret_sha256: (i % 7 == 3).then(|| sha256_hex(&format!("previous-{i}"))),
        previous_secret_expire_time: (i % 7 == 3).then(|| "2029-06-01T00:00:00Z".to_owned()),
        // Every eleventh is disabled (some of them in an overlap too).
        disabled: i % 11 == 4,
        // Every thirteenth has conditions (a time long past, and every
        // other one address ranges), some in an overlap or disabled too.
        not_before_time: (i % 13 == 6).then(|| "2020-01-01T00:00:00Z".to_owned()),
        client_addresses: (i % 26 == 6).then(|| ClientAddressesSpec {
            allow: Some(vec!["10.0.0.0/8".to_owned(), "2001:db8::/32".to_owned()]),
            except: Some(vec![format!("10.{}.0.0/16", i % 200)]),
        }),
        // Every seventeenth a rate limit.
        rate_limit: (i % 17 == 8).then(|| RateLimitSpec {
            requests: 1 + i as u32,
            per: ["second", "minute"][i % 2].to_owned(),
            burst: (i % 3 == 0).then_some(5),
        }),
    }
}

fn specs(n: usize) -> Vec<TokenSpec> {
    (0..n).map(spec).collect()
}

#[test]
fn finds_every_token_and_nothing_else() {
    let n = 20_000;
    let table = TokenTable::from_specs(&specs(n)).unwrap();
    let overlapping = (0..n).filter(|i| i % 7 == 3).count();
    assert_eq!(table.len(), n + overlapping, "one entry per secret");
    for i in 0..n {
        let token = table
            .get(&Digest::of(format!("secret-{i}").as_bytes()))
            .unwrap_or_else(|| panic!("token {i}"));
        let s = spec(i);
        assert_eq!(token.name(), s.name);
        assert_eq!(token.namespace(), format!("ns-{}", i % 97));
        assert_eq!(token.role(), Role::parse(&s.role).unwrap());
        assert_eq!(token.expire().map(|t| t.to_rfc3339()), s.expire_time);
        assert!(!token.is_previous());
        assert_eq!(token.is_disabled(), s.disabled, "token {i}");
        let previous = table.get(&Digest::of(format!("previous-{i}").as_bytes()));
        if i % 7 == 3 {
            let previous = previous.unwrap_or_else(|| panic!("previous secret of {i}"));
            assert_eq!((previous.name(), previous.role()), (token.name(), token.role()));
            assert!(previous.is_previous());
            assert_eq!(previous.is_disabled(), s.disabled, "previous secret of {i}");
            // The overlap ends at its own time or the token's expiry, whichever is first.
            let until = apitokens_core::Timestamp::parse_rfc3339("2029-06-01T00:00:00Z").unwrap();
            assert_eq!(previous.expire(), Some(token.expire().map_or(until, |e| e.min(until))));
        } else {
            assert!(previous.is_none());
        }
    }
    for i in n..2 * n {
        assert!(
            table.get(&Digest::of(format!("secret-{i}").as_bytes())).is_none(),
            "absent {i}"
        );
    }
    assert!(table.get(&Digest([0; 32])).is_none());
    assert!(table.get(&Digest([0xff; 32])).is_none());
    assert_eq!(table.iter().count(), n + overlapping);
}

#[test]
fn small_and_empty_tables() {
    let empty = TokenTable::from_specs(&[]).unwrap();
    assert!(empty.is_empty());
    assert!(empty.get(&Digest::of(b"x")).is_none());
    for n in 1..8 {
        let table = TokenTable::from_specs(&specs(n)).unwrap();
        for i in 0..n {
            assert!(
                table.get(&Digest::of(format!("secret-{i}").as_bytes())).is_some(),
                "{n}/{i}"
            );
        }
        assert!(table.get(&Digest::of(b"other")).is_none());
    }
}

#[test]
fn compact_encoding_decides_like_json() {
    let json = fixture_json(r#","realm":"r","identityHeaders":{"role":"x-r"}"#);
    let spec = PluginConfig::from_json(json.as_bytes()).unwrap();
    let bytes = compact::encode(&spec, &LINEAGE).unwrap();
    assert!(compact::is_compact(&bytes));
    assert_eq!(compact::lineage(&bytes[..compact::LINEAGE_END]), Some(&LINEAGE[..]));
    let mut stamped = bytes.clone();
    let stamp = compact::Stamp {
        epoch: 1_733_500_000_000,
        generation: 42,
    };
    compact::set_stamp(&mut stamped, stamp);
    assert_eq!(compact::stamp(&stamped[..compact::STAMP_END]), Some(stamp));
    assert_eq!(compact::stamp(&bytes), Some(compact::Stamp::default()));
    assert!(Config::from_plugin_configuration(stamped).is_ok());
    let from_compact = Config::from_plugin_configuration(bytes).unwrap();
    let from_json = Config::from_plugin_configuration(json.into_bytes()).unwrap();
    assert_eq!(from_compact.token_count(), from_json.token_count());
    assert_eq!(from_compact.identity_headers(), from_json.identity_headers());
    for secret in [VIEWER, EDITOR, OWNER, OTHER_OWNER, EXPIRING, "nope"] {
        let auth = bearer(secret);
        for (method, path) in [
            ("GET", "/api/v1/namespaces/default/jobs"),
            ("DELETE", "/api/v1/namespaces/default/jobs/7"),
            ("GET", "/apitokens/v1/namespaces/default/apitokens"),
        ] {
            // The whole per-request flow, as the filter runs it.
            let run = |config: &Config| {
                let mut host = Recorder::request(method, path, Some(&auth));
                let verdict = gate::on_request_headers(&mut host, config, None);
                (
                    verdict,
                    host.reply.map(|(denial, _)| denial),
                    host.headers,
                    host.counters,
                )
            };
            assert_eq!(run(&from_compact), run(&from_json), "{secret} {method} {path}");
        }
    }
}

#[test]
fn the_disabled_flag_survives_the_compact_encoding_and_json() {
    let config = PluginConfig {
        tokens: specs(60),
        ..PluginConfig::default()
    };
    let from_compact = Config::from_plugin_configuration(compact::encode(&config, &LINEAGE).unwrap()).unwrap();
    // JSON: written as `"disabled": true` only when true.
    let json = config.to_json();
    assert_eq!(json.matches(r#""disabled":true"#).count(), 6, "{json}");
    assert!(!json.contains(r#""disabled":false"#));
    let from_json = Config::from_plugin_configuration(json.into_bytes()).unwrap();
    for config in [&from_compact, &from_json] {
        let disabled: Vec<String> = config
            .tokens()
            .iter()
            .filter(|(_, t)| t.is_disabled() && !t.is_previous())
            .map(|(_, t)| t.name().to_owned())
            .collect();
        let mut expected: Vec<String> = (0..60).filter(|i| i % 11 == 4).map(|i| spec(i).name).collect();
        let mut disabled = disabled;
        disabled.sort();
        expected.sort();
        assert_eq!(disabled, expected);
        // Token 59 is disabled and in an overlap: both its entries carry it.
        let previous = config.tokens().get(&Digest::of(b"previous-59")).unwrap();
        assert!(previous.is_previous() && previous.is_disabled());
    }
}

#[test]
fn compact_encoding_is_smaller_than_json() {
    let spec = PluginConfig {
        tokens: specs(10_000),
        ..PluginConfig::default()
    };
    let compact = compact::encode(&spec, &LINEAGE).unwrap().len();
    let json = spec.to_json().len();
    assert!(compact * 10 < json * 7, "compact {compact} bytes, JSON {json} bytes");
    // Per token, for tokens without conditions (most are): under 100
    // bytes. (Conditions add their own bytes: 10 for a rate limit, 13 for
    // a not-before time, 6 or 18 per address range.)
    let plain = PluginConfig {
        tokens: spec
            .tokens
            .iter()
            .cloned()
            .map(|t| TokenSpec {
                not_before_time: None,
                client_addresses: None,
                rate_limit: None,
                ..t
            })
            .collect(),
        ..PluginConfig::default()
    };
    let plain = compact::encode(&plain, &LINEAGE).unwrap().len();
    assert!(plain / 10_000 < 100, "{} bytes per token", plain / 10_000);
}

#[test]
fn the_encoder_reports_json_field_paths() {
    let field_of = |spec: PluginConfig| compact::encode(&spec, &LINEAGE).unwrap_err().field;
    let with_tokens = |tokens| PluginConfig {
        tokens,
        ..PluginConfig::default()
    };
    let mut tokens = specs(3);
    tokens[2].secret_sha256 = tokens[0].secret_sha256.clone();
    assert_eq!(field_of(with_tokens(tokens)), "tokens[2].secretSha256");
    let mut tokens = specs(3);
    tokens[1].expire_time = Some("9999-12-31T23:59:59-23:59".into());
    assert_eq!(field_of(with_tokens(tokens)), "tokens[1].expireTime");
    let realm = PluginConfig {
        realm: Some("a\"b".into()),
        ..PluginConfig::default()
    };
    assert_eq!(field_of(realm), "realm");
}

#[test]
fn every_truncation_and_corruption_is_rejected_or_harmless() {
    let spec = PluginConfig {
        tokens: specs(4),
        ..PluginConfig::default()
    };
    let bytes = compact::encode(&spec, &LINEAGE).unwrap();
    // (Zero bytes is the empty JSON configuration.)
    for len in 1..bytes.len() {
        assert!(
            Config::from_plugin_configuration(bytes[..len].to_vec()).is_err(),
            "truncated to {len}"
        );
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(Config::from_plugin_configuration(longer).is_err());
    // Any single corrupted byte: rejected, or still a valid table (never a panic).
    for at in 0..bytes.len() {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut bad = bytes.clone();
            bad[at] ^= flip;
            if let Ok(config) = Config::from_plugin_configuration(bad) {
                for (_, token) in config.tokens().iter() {
                    assert!(apitokens_core::name::TokenName::parse(token.name()).is_ok());
                }
            }
        }
    }
}

#[test]
fn compact_tables_are_validated_like_json() {
    let spec = PluginConfig {
        tokens: specs(3),
        ..PluginConfig::default()
    };
    let good = compact::encode(&spec, &LINEAGE).unwrap();
    let at = compact::STAMP_END;
    let settings_len = u32::from_le_bytes(good[at..at + 4].try_into().unwrap()) as usize;
    let table = at + 4 + settings_len;
    let entry = |i: usize| table + 4 + i * 52;

    let mut swapped = good.clone();
    let (a, b) = (entry(0), entry(1));
    let first: Vec<u8> = swapped[a..a + 52].to_vec();
    swapped.copy_within(b..b + 52, a);
    swapped[b..b + 52].copy_from_slice(&first);
    assert!(Config::from_plugin_configuration(swapped)
        .unwrap_err()
        .problem
        .contains("sorted"));

    let mut role = good.clone();
    role[entry(1) + 48] = 3;
    assert!(Config::from_plugin_configuration(role)
        .unwrap_err()
        .problem
        .contains("role"));

    let mut shared_name = good.clone();
    let offset: [u8; 4] = shared_name[entry(0) + 44..entry(0) + 48].try_into().unwrap();
    shared_name[entry(1) + 44..entry(1) + 48].copy_from_slice(&offset);
    assert!(Config::from_plugin_configuration(shared_name).is_err());

    // An expiry past 9999-12-31T23:59:59Z (or before year 0) is refused as
    // it is in JSON, naming the entry, not the value.
    for (secs, nanos) in [
        (253_402_300_800i64, 0u32),
        (253_402_300_799, 1),
        (i64::MAX, 0),
        (-62_167_219_201, 0),
    ] {
        let mut far = good.clone();
        far[entry(1) + 32..entry(1) + 40].copy_from_slice(&secs.to_le_bytes());
        far[entry(1) + 40..entry(1) + 44].copy_from_slice(&nanos.to_le_bytes());
        let e = Config::from_plugin_configuration(far).unwrap_err();
        assert!(e.problem.contains("entry 1: expireTime must lie between"), "{e}");
        assert!(!e.to_string().contains(&secs.to_string()), "{e}");
    }
    let mut latest = good.clone();
    latest[entry(1) + 32..entry(1) + 40].copy_from_slice(&253_402_300_799i64.to_le_bytes());
    latest[entry(1) + 40..entry(1) + 44].copy_from_slice(&0u32.to_le_bytes());
    assert!(Config::from_plugin_configuration(latest).is_ok());

    // The flags byte: bit 0 a previous secret, bit 1 disabled; any other
    // bit is a flag this filter does not know, refused (it could be one that
    // refuses the token).
    let flags = |i: usize| entry(i) + 49;
    let mut disabled = good.clone();
    disabled[flags(1)] = 2;
    let config = Config::from_plugin_configuration(disabled).unwrap();
    let disabled: Vec<bool> = config.tokens().iter().map(|(_, t)| t.is_disabled()).collect();
    assert_eq!(disabled, [false, true, false]);
    for bit in [8u8, 0x10, 0x20, 0x40, 0x80] {
        for with in [0u8, 2] {
            let mut unknown = good.clone();
            unknown[flags(1)] = bit | with;
            let e = Config::from_plugin_configuration(unknown).unwrap_err();
            assert!(e.problem.contains("entry 1: unknown flags"), "{bit:#x}: {e}");
        }
    }
    // Bit 2, conditions, on an entry whose name has none: what follows the
    // name is read as conditions, and refused.
    let mut conditioned = good.clone();
    conditioned[flags(1)] = 4;
    let e = Config::from_plugin_configuration(conditioned).unwrap_err();
    assert!(e.problem.contains("conditions"), "{e}");
    for reserved in [50, 51] {
        let mut unknown = good.clone();
        unknown[entry(1) + reserved] = 2;
        assert!(Config::from_plugin_configuration(unknown).is_err(), "byte {reserved}");
    }

    let mut version = good.clone();
    version[4] = 4;
    assert!(Config::from_plugin_configuration(version)
        .unwrap_err()
        .problem
        .contains("version"));
}

#[test]
fn version_2_headers_are_read_with_epoch_0() {
    let spec = PluginConfig {
        tokens: specs(2),
        ..PluginConfig::default()
    };
    let v3 = compact::encode(&spec, &LINEAGE).unwrap();
    // Version 2: the same header without the epoch (the generation follows
    // the lineage directly).
    let mut v2 = v3[..compact::LINEAGE_END].to_vec();
    v2[4] = 2;
    v2.extend_from_slice(&9u64.to_le_bytes());
    v2.extend_from_slice(&v3[compact::STAMP_END..]);
    assert_eq!(
        compact::stamp(&v2),
        Some(compact::Stamp {
            epoch: 0,
            generation: 9
        })
    );
    assert_eq!(compact::lineage(&v2), Some(&LINEAGE[..]));
    assert_eq!(Config::from_plugin_configuration(v2).unwrap().token_count(), 2);
}

#[test]
fn no_vm_ever_moves_to_an_older_table() {
    use compact::{arrival, Arrival, Stamp};
    let at = |epoch, generation| Stamp { epoch, generation };
    // A first table, or one at least as new as everything seen: applied.
    assert_eq!(arrival(at(1, 5), None, None), Arrival::Apply);
    assert_eq!(arrival(at(1, 5), Some(at(1, 5)), Some(at(1, 5))), Arrival::Apply);
    assert_eq!(arrival(at(1, 6), Some(at(1, 5)), None), Arrival::Apply);
    // A later epoch wins whatever its generation (a store restored, then
    // accepted by an operator: its revisions start lower).
    assert_eq!(arrival(at(2, 1), Some(at(1, 900)), Some(at(1, 900))), Arrival::Apply);
    // Older than what this VM enforces: it keeps its table.
    assert_eq!(arrival(at(1, 3), Some(at(1, 5)), Some(at(1, 5))), Arrival::KeepNewer);
    assert_eq!(arrival(at(1, 900), Some(at(2, 1)), None), Arrival::KeepNewer);
    // Envoy's validation VM has no table, only the shared floor: refused.
    assert_eq!(arrival(at(1, 3), None, Some(at(1, 5))), Arrival::Refuse);
    assert_eq!(arrival(at(1, 5), None, Some(at(1, 5))), Arrival::Apply);
}
