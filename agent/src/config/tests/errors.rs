//! How a refused file is reported: file:line:col, message and hint, for unknown keys, bad TOML
//! and names.

use super::*;

#[test]
fn display_has_location_message_and_hint() {
    let e = workers_err("count = 0", "8:9", "count");
    assert_eq!(
        e.to_string(),
        format!(
            "{MAIN}:8:9: `count` in [app.api.workers]: expected an integer from 1 to 1024 or \
             \"auto\", found 0\n  hint: write `count = \"auto\"` for one worker per CPU"
        )
    );
    let no_hint = ConfigError::at(loc("f.toml", 1, 2), "bad");
    assert_eq!(no_hint.to_string(), "f.toml:1:2: bad");
}

#[test]
fn missing_file() {
    let e = load(Path::new("/nonexistent-corral-test/nope.toml"), &FakeLookup).unwrap_err();
    assert_eq!(e.at, None);
    let shown = e.to_string();
    assert!(
        shown.starts_with("cannot read /nonexistent-corral-test/nope.toml: "),
        "{shown}"
    );
}

#[test]
fn invalid_toml() {
    assert_err("[app.api\n", "1:9", "invalid TOML: ");
    assert_err("[app.api]\nuser = \n", "2:8", "invalid TOML: ");
}

#[test]
fn duplicate_table_in_one_file() {
    let e = assert_err(
        &format!("{}[app.api]\nuser = \"api\"\n", app("", "")),
        "7:6",
        "table [app.api] is defined twice",
    );
    assert!(e.hint.is_some());
    assert_err(
        &app("user = \"nobody\"", ""),
        "4:1",
        "key `user` is defined twice",
    );
}

#[test]
fn unknown_key_top_level() {
    let e = assert_err("foo = 1\n", "1:1", "unknown key `foo` at the top level");
    assert!(e.hint.unwrap().contains("`agent`, `app`"));
}

#[test]
fn unknown_key_app() {
    let e = assert_err(
        &app("colour = \"red\"", ""),
        "4:1",
        "unknown key `colour` in [app.api]",
    );
    assert!(e.hint.unwrap().contains("`command`"));
}

#[test]
fn unknown_key_workers_suggests_the_closest() {
    let e = workers_err("cont = 4", "8:1", "unknown key `cont` in [app.api.workers]");
    assert!(e.hint.unwrap().starts_with("did you mean `count`?"));
}

#[test]
fn unknown_key_restart() {
    restart_err(
        "retries = 3",
        "8:1",
        "unknown key `retries` in [app.api.restart]",
    );
}

#[test]
fn unknown_key_listen() {
    assert_err(
        &app("", "port = 80\n"),
        "7:1",
        "unknown key `port` in [app.api.listen]",
    );
}

#[test]
fn unknown_key_pre_start() {
    assert_err(
        &app(
            "",
            "[[app.api.pre_start]]\ncommand = [\"/bin/x\"]\nretry = true\n",
        ),
        "9:1",
        "unknown key `retry` in [[app.api.pre_start]]",
    );
}

#[test]
fn bad_app_name() {
    assert_err(
        &app("", "")
            .replace("[app.api]", "[app.\"a/b\"]")
            .replace("app.api.listen", "app.\"a/b\".listen"),
        "1:6",
        "app name `a/b` contains `/`",
    );
}
