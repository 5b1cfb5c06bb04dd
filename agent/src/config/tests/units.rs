//! Sizes and durations: the forms accepted, and a refused value at its place with a hint.

use super::*;

#[test]
fn sizes() {
    assert_eq!(parse_size("1GiB"), Ok(1 << 30));
    assert_eq!(parse_size("900MiB"), Ok(900 << 20));
    assert_eq!(parse_size("64KiB"), Ok(64 << 10));
    assert_eq!(parse_size("1TiB"), Ok(1 << 40));
    assert_eq!(parse_size("512"), Ok(512));
    assert_eq!(parse_size("512B"), Ok(512));
    assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
    assert_eq!(parse_size("0.5KiB"), Ok(512));
    for bad in ["", "GiB", "-1GiB", "1.2.3MiB", "1 parsec", "99999999999TiB"] {
        assert!(parse_size(bad).is_err(), "{bad:?}");
    }
    for (bad, suggestion) in [
        ("1GB", "`1GiB`"),
        ("1G", "`1GiB`"),
        ("1gb", "`1GiB`"),
        ("512mb", "`512MiB`"),
        ("1.5kB", "`1.5KiB`"),
    ] {
        let e = parse_size(bad).unwrap_err();
        let hint = e.hint.unwrap();
        assert!(
            hint.contains(&format!("did you mean {suggestion}?")),
            "{hint}"
        );
        assert!(hint.contains("KiB, MiB, GiB, TiB"), "{hint}");
    }
}

#[test]
fn durations() {
    assert_eq!(parse_duration("100ms"), Ok(Duration::from_millis(100)));
    assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
    assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
    assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
    assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
    assert_eq!(
        parse_duration("1h 2m 3s 4ms"),
        Ok(Duration::from_millis(3_723_004))
    );
    assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
    assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    for bad in ["", "30", "-5s", "s", "5 minutes", "1.2.3s", "abc", "5d"] {
        assert!(parse_duration(bad).is_err(), "{bad:?}");
    }
    assert_eq!(
        parse_duration("30").unwrap_err().hint.unwrap(),
        "write `30s`; durations use the units ms, s, m and h, e.g. \"1m30s\""
    );
}

#[test]
fn bad_size() {
    workers_err(
        "memory_max = \"lots\"",
        "8:14",
        "`memory_max` in [app.api.workers]: expected a size such as \"512MiB\"",
    );
}

#[test]
fn decimal_size_unit_gets_a_hint() {
    let e = workers_err("memory_max = \"1GB\"", "8:14", "unknown size unit `GB`");
    assert_eq!(
        e.hint.as_deref(),
        Some("did you mean `1GiB`? sizes use binary units KiB, MiB, GiB, TiB")
    );
}

#[test]
fn negative_size() {
    workers_err("memory_max = -5", "8:14", "a size cannot be negative");
}

#[test]
fn bad_duration() {
    workers_err(
        "stop_timeout = \"soon\"",
        "8:16",
        "`stop_timeout` in [app.api.workers]: expected a duration such as \"30s\"",
    );
}

#[test]
fn bare_integer_duration() {
    let e = workers_err("stop_timeout = 30", "8:16", "found the bare number 30");
    assert!(e.hint.unwrap().contains("write `stop_timeout = \"30s\"`"));
}

#[test]
fn unitless_duration_string() {
    let e = restart_err("window = \"60\"", "8:10", "duration \"60\" has no unit");
    assert!(e.hint.unwrap().starts_with("write `60s`"));
}
