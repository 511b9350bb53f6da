//! Override spellings: which query parameters count as `_method`, and how
//! their values are read.
#![cfg(test)] // helpers are test code too, for clippy.toml's allow-*-in-tests
use apitokens_core::overrides::{query_methods, OverrideMethod};
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

fn methods(path: &str) -> Vec<String> {
    query_methods(path.as_bytes())
        .map(|m| String::from_utf8(m.as_bytes().to_vec()).unwrap())
        .collect()
}

#[test]
fn finds_every_spelling_of_the_parameter() {
    assert_eq!(methods("/a"), Vec::<String>::new());
    assert_eq!(methods("/a?x=1&method=DELETE&__method=PUT"), Vec::<String>::new());
    assert_eq!(methods("/a?_method=DELETE"), ["DELETE"]);
    assert_eq!(methods("/a?x=1&_method=delete&y"), ["DELETE"]);
    assert_eq!(methods("/a?x=1;_METHOD=Put"), ["PUT"]);
    assert_eq!(methods("/a?%5Fmethod=D%45LETE"), ["DELETE"]);
    assert_eq!(methods("/a?.method=PATCH"), ["PATCH"]);
    assert_eq!(methods("/a?+_method=PATCH"), ["PATCH"]);
    assert_eq!(methods("/a?%20_method=PATCH"), ["PATCH"]);
    assert_eq!(methods("/a?%20method=PATCH"), Vec::<String>::new());
    assert_eq!(methods("/a?_method[]=DELETE"), ["DELETE"]);
    assert_eq!(methods("/a?_method"), [""]);
    assert_eq!(methods("/a?_method=GET&_method=DELETE"), ["GET", "DELETE"]);
    assert_eq!(methods("/a?_method=%zzDELETE"), ["%ZZDELETE"]);
    assert_eq!(methods("/a?_method=DELETE+"), ["DELETE "]);
    assert_eq!(methods("/a?_method=DELETEDELETEDELETEDELETE"), [""]);
}

#[test]
fn header_values_are_upper_cased_and_bounded() {
    assert_eq!(OverrideMethod::from_header(b"delete").as_bytes(), b"DELETE");
    assert_eq!(OverrideMethod::from_header(b"Patch").as_bytes(), b"PATCH");
    assert_eq!(OverrideMethod::from_header(b"\xff").as_bytes(), b"\xff");
    assert_eq!(OverrideMethod::from_header(&[b'A'; 17]).as_bytes(), b"");
    assert_eq!(OverrideMethod::from_header(&[b'A'; 16]).as_bytes(), &[b'A'; 16]);
}
