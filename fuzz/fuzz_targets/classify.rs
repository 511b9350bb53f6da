#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| apitokens_core::fuzzing::classify(data));
