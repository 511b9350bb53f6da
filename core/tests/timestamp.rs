//! RFC 3339 parsing and formatting.
#![cfg(test)] // helpers are test code too, for clippy.toml's allow-*-in-tests
use apitokens_core::Timestamp;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

fn parse(s: &str) -> (i64, u32) {
    let t = Timestamp::parse_rfc3339(s).unwrap_or_else(|_| panic!("{s}"));
    (t.unix_seconds(), t.subsec_nanos())
}

#[test]
fn parses_utc_offsets_and_fractions() {
    assert_eq!(parse("1970-01-01T00:00:00Z"), (0, 0));
    assert_eq!(parse("2027-01-01T00:00:00Z"), (1_798_761_600, 0));
    assert_eq!(parse("2027-01-01t00:00:00z"), (1_798_761_600, 0));
    assert_eq!(parse("2027-01-01T01:30:00+01:30"), (1_798_761_600, 0));
    assert_eq!(parse("2026-12-31T19:00:00-05:00"), (1_798_761_600, 0));
    assert_eq!(parse("2027-01-01T00:00:00.5Z"), (1_798_761_600, 500_000_000));
    assert_eq!(parse("2027-01-01T00:00:00.123456789123Z"), (1_798_761_600, 123_456_789));
    assert_eq!(parse("2024-02-29T12:00:00Z"), (1_709_208_000, 0));
    assert_eq!(parse("2000-02-29T00:00:00Z").0, 951_782_400);
    assert_eq!(parse("1969-12-31T23:59:59Z"), (-1, 0));
    assert_eq!(parse("9999-12-31T23:59:59Z").0, 253_402_300_799);
    // A leap second is the first second of the next minute.
    assert_eq!(parse("2016-12-31T23:59:60Z").0, parse("2017-01-01T00:00:00Z").0);
}

#[test]
fn rejects_what_rfc_3339_does_not_allow() {
    for s in [
        "2023-02-29T00:00:00Z",
        "1900-02-29T00:00:00Z",
        "2027-00-10T00:00:00Z",
        "2027-01-00T00:00:00Z",
        "2027-01-01T00:00:61Z",
        "2027-1-01T00:00:00Z",
        "２０２７-01-01T00:00:00Z",
        "2027-01-01T00:00:00ZZ",
        "2027-01-01T00:00:00+0100",
    ] {
        assert!(Timestamp::parse_rfc3339(s).is_err(), "{s}");
    }
}

#[test]
fn formats_in_utc_and_round_trips() {
    for s in [
        "1970-01-01T00:00:00Z",
        "2027-01-01T00:00:00Z",
        "2024-02-29T23:59:59.25Z",
        "1969-07-20T20:17:40Z",
    ] {
        assert_eq!(Timestamp::parse_rfc3339(s).unwrap().to_rfc3339(), s);
    }
    assert_eq!(
        Timestamp::parse_rfc3339("2027-01-01T02:00:00+02:00")
            .unwrap()
            .to_rfc3339(),
        "2027-01-01T00:00:00Z"
    );
}

#[test]
fn orders_chronologically() {
    let a = Timestamp::parse_rfc3339("2027-01-01T00:00:00Z").unwrap();
    let b = Timestamp::parse_rfc3339("2027-01-01T00:00:00.000000001Z").unwrap();
    assert!(a < b);
    assert_eq!(
        Timestamp::from_unix(5, 1_500_000_000),
        Timestamp::from_unix(6, 500_000_000)
    );
}

#[test]
fn accepts_instants_from_year_0_to_9999_only() {
    use apitokens_core::timestamp::TimestampError;
    assert_eq!(
        Timestamp::parse_rfc3339("9999-12-31T23:59:59Z").unwrap(),
        Timestamp::MAX
    );
    assert_eq!(
        Timestamp::parse_rfc3339("0000-01-01T00:00:00Z").unwrap(),
        Timestamp::MIN
    );
    assert_eq!(Timestamp::MAX.to_rfc3339(), "9999-12-31T23:59:59Z");
    assert_eq!(Timestamp::MIN.to_rfc3339(), "0000-01-01T00:00:00Z");
    // Valid RFC 3339 whose instant lies outside: the offset carries it over.
    for s in [
        "9999-12-31T23:59:59-23:59",
        "9999-12-31T23:59:59.5Z",
        "9999-12-31T23:30:00-00:30",
        "0000-01-01T00:00:00+00:01",
    ] {
        assert_eq!(Timestamp::parse_rfc3339(s), Err(TimestampError::OutOfRange), "{s}");
    }
    assert_eq!(
        Timestamp::parse_rfc3339("10000-01-01T00:00:00Z"),
        Err(TimestampError::Syntax)
    );
    // Whatever is accepted formats back to something accepted.
    for s in ["9999-12-31T23:59:59+23:59", "0000-01-01T23:59:59-00:01"] {
        let t = Timestamp::parse_rfc3339(s).unwrap();
        assert_eq!(Timestamp::parse_rfc3339(&t.to_rfc3339()).unwrap(), t, "{s}");
    }
    assert!(Timestamp::MAX.in_range() && Timestamp::MIN.in_range());
    assert!(!Timestamp::from_unix(Timestamp::MAX.unix_seconds(), 1).in_range());
    assert!(!Timestamp::from_unix(Timestamp::MIN.unix_seconds() - 1, 999_999_999).in_range());
}
