//! Included files: merged in sorted order, and refused for what only the main file may hold.

use super::*;

#[test]
fn includes_merge_in_sorted_order() {
    let dir = TempDir::new("include");
    let main = dir.write(
        "corral.toml",
        "[agent]\nstate_dir = \"/run/corral-test\"\n\n[app.main]\ncommand = [\"/bin/main\"]\n\
         user = \"api\"\n[app.main.listen]\naddress = \"127.0.0.1:8000\"\n",
    );
    let b = dir.write(
        "apps.d/b.toml",
        "[app.bravo]\ncommand = [\"/bin/b\"]\nuser = \"nobody\"\n\
         [app.bravo.listen]\naddress = \"127.0.0.1:8002\"\n",
    );
    let a = dir.write(
        "apps.d/a.toml",
        "# first\n[app.alpha]\ncommand = [\"/bin/a\"]\nuser = \"api\"\n\
         [app.alpha.listen]\naddress = \"127.0.0.1:8001\"\n",
    );
    // Neither hidden files nor other extensions are picked up by the default `*.toml`.
    dir.write("apps.d/.draft.toml", "this is not toml");
    dir.write("apps.d/notes.txt", "this is not toml either");

    let config = load(&main, &FakeLookup).unwrap();
    assert_eq!(config.files, vec![main.clone(), a.clone(), b.clone()]);
    let names: Vec<&str> = config.apps.keys().map(AppName::as_str).collect();
    assert_eq!(names, ["alpha", "bravo", "main"]);
    let alpha = &config.apps[&AppName::new("alpha").unwrap()];
    assert_eq!(
        alpha.defined_at,
        Location {
            file: a,
            line: 2,
            col: 1
        }
    );
    assert_eq!(config.agent.state_dir, PathBuf::from("/run/corral-test"));

    // An explicit absolute pattern, and a pattern that matches nothing.
    let text = format!(
        "[agent]\ninclude = [{:?}, \"nothing.d/*.toml\"]\n",
        dir.0.join("apps.d/b*.toml").to_str().unwrap()
    );
    let config = load_str(&main, &text, &FakeLookup).unwrap();
    assert_eq!(config.files, vec![main.clone(), b]);
}

#[test]
fn empty_include_dir_is_fine() {
    let dir = TempDir::new("include-empty");
    std::fs::create_dir_all(dir.0.join("apps.d")).unwrap();
    let main = dir.write("corral.toml", &app("", ""));
    let config = load(&main, &FakeLookup).unwrap();
    assert_eq!(config.files, vec![main]);
}

#[test]
fn duplicate_app_across_files() {
    let dir = TempDir::new("dup");
    let main = dir.write("corral.toml", &app("", ""));
    let other = dir.write(
        "apps.d/api.toml",
        "\n[app.api]\ncommand = [\"/bin/other\"]\nuser = \"api\"\n\
         [app.api.listen]\naddress = \"127.0.0.1:9000\"\n",
    );
    let e = load(&main, &FakeLookup).unwrap_err();
    assert_eq!(
        e.to_string().lines().next().unwrap(),
        format!(
            "{}:2:1: app `api` is defined twice: at {}:1:1 and at {}:2:1",
            other.display(),
            main.display(),
            other.display()
        )
    );
}

#[test]
fn agent_table_in_included_file() {
    let dir = TempDir::new("agent-inc");
    let main = dir.write("corral.toml", &app("", ""));
    let other = dir.write("apps.d/x.toml", "\n\n[agent]\nstate_dir = \"/x\"\n");
    let e = load(&main, &FakeLookup).unwrap_err();
    let shown = e.to_string();
    assert!(
        shown.starts_with(&format!(
            "{}:3:1: [agent] belongs in the main file, not in an included file",
            other.display()
        )),
        "{shown}"
    );
    assert!(e.hint.unwrap().contains(&main.display().to_string()));
}

#[test]
fn bad_include_pattern() {
    assert_err(
        "[agent]\ninclude = [\"apps.d/[*.toml\"]\n",
        "2:12",
        "invalid include pattern `apps.d/[*.toml`",
    );
}

#[test]
fn unknown_key_in_included_file() {
    let dir = TempDir::new("inc-unknown");
    let main = dir.write("corral.toml", &app("", ""));
    let other = dir.write("apps.d/x.toml", "[apps.web]\ncommand = [\"/bin/web\"]\n");
    let e = load(&main, &FakeLookup).unwrap_err();
    let shown = e.to_string();
    assert!(
        shown.starts_with(&format!(
            "{}:1:2: unknown key `apps` at the top level",
            other.display()
        )),
        "{shown}"
    );
    assert!(e.hint.unwrap().starts_with("did you mean `app`?"));
}
