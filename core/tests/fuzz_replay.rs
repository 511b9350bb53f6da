//! Replays the fuzz corpora and every crash ever found (`fuzz/regressions/`)
//! through the same invariant checks the fuzz targets run, so `make test`
//! catches a regression without libFuzzer.
#![cfg(test)] // helpers are test code too, for clippy.toml's allow-*-in-tests
#![cfg(not(target_arch = "wasm32"))]
use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut count = 0;
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')) {
                continue;
            }
            let data = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| check(&data));
            assert!(outcome.is_ok(), "{} breaks an invariant", path.display());
            count += 1;
        }
    }
    count
}

#[test]
fn bearer_corpus_and_regressions() {
    assert!(replay("bearer", apitokens_core::fuzzing::bearer) > 0);
}

#[test]
fn classify_corpus_and_regressions() {
    assert!(replay("classify", apitokens_core::fuzzing::classify) > 0);
}

#[test]
fn config_corpus_and_regressions() {
    assert!(replay("config", apitokens_core::fuzzing::config) > 0);
}
