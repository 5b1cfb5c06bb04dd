//! `[app.NAME]` itself: the command, the identity it runs as, its working directory and its
//! pre-start commands.

use super::*;

#[test]
fn root_only_when_written() {
    let config = load_text(&app("", "").replace("user = \"api\"", "user = \"root\"")).unwrap();
    let api = api(&config);
    assert_eq!((api.identity.uid, api.identity.gid), (0, 0));
}

#[test]
fn group_falls_back_to_numeric_gid() {
    struct NoGroups;
    impl Lookup for NoGroups {
        fn user(&self, _: &str) -> Option<(u32, u32)> {
            Some((1000, 4242))
        }
        fn group_name(&self, _: u32) -> Option<String> {
            None
        }
        fn group(&self, _: &str) -> Option<u32> {
            None
        }
    }
    let config = load_str(Path::new(MAIN), &app("", ""), &NoGroups).unwrap();
    let api = api(&config);
    assert_eq!(api.identity.group, "4242");
    assert_eq!(api.identity.gid, 4242);
}

#[test]
fn missing_command() {
    let e = assert_err(
        "[app.api]\nuser = \"api\"\n[app.api.listen]\naddress = \"127.0.0.1:8000\"\n",
        "1:1",
        "missing key `command` in [app.api]",
    );
    assert!(e.hint.unwrap().contains("command = ["));
}

#[test]
fn empty_command() {
    assert_err(
        &with_command("[]"),
        "2:11",
        "`command` in [app.api]: expected the program and its arguments, found an empty array",
    );
}

#[test]
fn empty_command_argument() {
    assert_err(
        &with_command("[\"/bin/serve\", \"\"]"),
        "2:26",
        "arguments cannot be empty strings",
    );
}

#[test]
fn command_item_wrong_type_counts_columns_in_characters() {
    // `é` is two bytes: the column of `3` is 17 in characters, 18 in bytes.
    assert_err(
        &with_command("[\"é\", 3]"),
        "2:17",
        "each item of `command` in [app.api]: expected a string, found integer `3`",
    );
}

#[test]
fn command_not_an_array() {
    assert_err(
        &with_command("\"/bin/serve --fd 3\""),
        "2:11",
        "`command` in [app.api]: expected an array, found string",
    );
}

#[test]
fn missing_user() {
    let e = assert_err(
        "[app.api]\ncommand = [\"/bin/serve\"]\n[app.api.listen]\naddress = \"127.0.0.1:8000\"\n",
        "1:1",
        "app `api` has no `user`: workers never run as root unless `user = \"root\"` is written",
    );
    assert!(e.hint.unwrap().contains("user = \"api\""));
}

#[test]
fn unknown_user() {
    let e = assert_err(
        &app("", "").replace("user = \"api\"", "user = \"ghost\""),
        "3:8",
        "user `ghost` does not exist on this machine",
    );
    assert!(e.hint.unwrap().contains("useradd --system ghost"));
}

#[test]
fn unknown_group() {
    let e = assert_err(
        &app("group = \"wheel\"", ""),
        "4:9",
        "group `wheel` does not exist on this machine",
    );
    assert!(e.hint.unwrap().contains("groupadd --system wheel"));
}

#[test]
fn relative_workdir() {
    assert_err(
        &app("workdir = \"srv/api\"", ""),
        "4:11",
        "`workdir` in [app.api]: expected an absolute path, found \"srv/api\"",
    );
}

#[test]
fn pre_start_missing_command() {
    assert_err(
        &app("", "[[app.api.pre_start]]\ntimeout = \"1m\"\n"),
        "7:1",
        "missing key `command` in [[app.api.pre_start]]",
    );
}

#[test]
fn pre_start_single_brackets() {
    let e = assert_err(
        &app("", "[app.api.pre_start]\ncommand = [\"/bin/x\"]\n"),
        "7:1",
        "`pre_start` in [app.api]: expected an array, found a table",
    );
    assert!(e.hint.unwrap().contains("[[app.api.pre_start]]"));
}
