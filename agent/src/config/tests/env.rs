//! The environment of an app: `env`, `env_file`, and the names corral sets itself.

use super::*;

#[test]
fn env_file_then_env() {
    let dir = TempDir::new("env");
    let env_file = dir.write(
        "api.env",
        concat!(
            "# comment\n\nexport A=1\nB = 'two words # not a comment'\n",
            "C=\"line\\nbreak \\\"q\\\"\" # note\nD=x=y\nE=\n",
        ),
    );
    let text = app(
        &format!("env_file = {:?}", env_file.to_str().unwrap()),
        "\n[app.api.env]\nA = \"override\"\n",
    );
    let config = load_text(&text).unwrap();
    let env = &api(&config).env;
    let expected: BTreeMap<String, String> = [
        ("A", "override"),
        ("B", "two words # not a comment"),
        ("C", "line\nbreak \"q\""),
        ("D", "x=y"),
        ("E", ""),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(env, &expected);
}

#[test]
fn relative_env_file_is_relative_to_the_config_file() {
    let dir = TempDir::new("env-rel");
    dir.write("api.env", "A=1\n");
    let main = dir.write("corral.toml", &app("env_file = \"api.env\"", ""));
    let config = load(&main, &FakeLookup).unwrap();
    let env = &api(&config).env;
    assert_eq!(env.get("A").map(String::as_str), Some("1"));
}

#[test]
fn reserved_env_name() {
    let e = assert_err(
        &app("env = { LISTEN_FDS = \"2\" }", ""),
        "4:9",
        "environment variable `LISTEN_FDS` is set by corral",
    );
    assert!(e.hint.unwrap().contains("LISTEN_PID"));
}

#[test]
fn env_name_starting_with_digit() {
    assert_err(
        &app("env = { 1PASSWORD = \"x\" }", ""),
        "4:9",
        "environment variable name `1PASSWORD` cannot start with a digit",
    );
}

#[test]
fn env_value_wrong_type() {
    assert_err(
        &app("env = { PORT = 8000 }", ""),
        "4:16",
        "`PORT` in [app.api.env]: expected a string, found integer `8000`",
    );
}

/// Loads an app whose `env_file` is `name` in `dir` holding `text`, and asserts the error starts
/// with that file, then `:{rest}`.
fn assert_env_file_err(dir: &TempDir, name: &str, text: &str, rest: &str) {
    let env_file = dir.write(name, text);
    let e = err(&app(
        &format!("env_file = {:?}", env_file.to_str().unwrap()),
        "",
    ));
    let expected = format!("{}:{rest}", env_file.display());
    assert!(
        e.to_string().starts_with(&expected),
        "{e}\nexpected {expected:?}"
    );
}

#[test]
fn bad_env_file_line() {
    let dir = TempDir::new("env-bad");
    assert_env_file_err(
        &dir,
        "api.env",
        "# ok\nA=1\nthis line has no equals sign\n",
        "3:1: expected KEY=VALUE",
    );
    assert_env_file_err(
        &dir,
        "reserved.env",
        "export NOTIFY_SOCKET=/tmp/x\n",
        "1:8: environment variable `NOTIFY_SOCKET` is set by corral",
    );
    assert_env_file_err(
        &dir,
        "quote.env",
        "A=\"unterminated\n",
        "1:3: missing the closing \"",
    );
}

#[test]
fn missing_env_file() {
    assert_err(
        &app("env_file = \"/nonexistent-corral-test/api.env\"", ""),
        "4:12",
        "`env_file` in [app.api]: cannot read /nonexistent-corral-test/api.env: ",
    );
}
