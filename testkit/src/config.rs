//! Builders for valid corral configs: the `[agent]` table and `[app.NAME]` tables, rendered to
//! TOML text, so that a test states only what it needs. Keys are corral's own (SPEC.md,
//! "Config"): `App::new("web").workers("memory_max", "64MiB")` is `memory_max = "64MiB"` in
//! `[app.web.workers]`. Nothing here checks a key; the agent does (unknown keys are errors).
//!
//! A config that must be malformed, or whose exact text matters (the line and column an error
//! must point at), is literal text in its test instead.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// A TOML value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Array(Vec<Value>),
    /// An inline table, `{ key = value, ... }`.
    Table(Table),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Str(s) => write_string(f, s),
            Value::Int(n) => write!(f, "{n}"),
            // Debug keeps the fraction of a whole number (`1.0`, not `1`, which is an integer).
            Value::Float(x) => write!(f, "{x:?}"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Array(items) => {
                f.write_str("[")?;
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{item}")?;
                }
                f.write_str("]")
            }
            Value::Table(t) if t.is_empty() => f.write_str("{}"),
            Value::Table(t) => {
                f.write_str("{ ")?;
                for (i, (k, v)) in t.0.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write_key(f, k)?;
                    write!(f, " = {v}")?;
                }
                f.write_str(" }")
            }
        }
    }
}

/// A TOML basic string: quoted, with `"`, `\` and control characters escaped.
fn write_string(f: &mut fmt::Formatter<'_>, s: &str) -> fmt::Result {
    f.write_str("\"")?;
    for c in s.chars() {
        match c {
            '"' => f.write_str("\\\"")?,
            '\\' => f.write_str("\\\\")?,
            '\n' => f.write_str("\\n")?,
            '\t' => f.write_str("\\t")?,
            '\r' => f.write_str("\\r")?,
            c if c.is_control() => write!(f, "\\u{:04X}", c as u32)?,
            c => write!(f, "{c}")?,
        }
    }
    f.write_str("\"")
}

/// A key: bare where TOML allows it, quoted otherwise.
fn write_key(f: &mut fmt::Formatter<'_>, key: &str) -> fmt::Result {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        f.write_str(key)
    } else {
        write_string(f, key)
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Value {
        Value::Str(s.to_string())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Value {
        Value::Str(s)
    }
}

impl From<&String> for Value {
    fn from(s: &String) -> Value {
        Value::Str(s.clone())
    }
}

impl From<&Path> for Value {
    fn from(p: &Path) -> Value {
        Value::Str(p.display().to_string())
    }
}

impl From<PathBuf> for Value {
    fn from(p: PathBuf) -> Value {
        Value::from(p.as_path())
    }
}

impl From<&PathBuf> for Value {
    fn from(p: &PathBuf) -> Value {
        Value::from(p.as_path())
    }
}

impl From<SocketAddr> for Value {
    fn from(a: SocketAddr) -> Value {
        Value::Str(a.to_string())
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Value {
        Value::Bool(b)
    }
}

impl From<f64> for Value {
    fn from(x: f64) -> Value {
        Value::Float(x)
    }
}

impl From<i64> for Value {
    fn from(n: i64) -> Value {
        Value::Int(n)
    }
}

impl From<i32> for Value {
    fn from(n: i32) -> Value {
        Value::Int(n.into())
    }
}

impl From<u32> for Value {
    fn from(n: u32) -> Value {
        Value::Int(n.into())
    }
}

impl From<u16> for Value {
    fn from(n: u16) -> Value {
        Value::Int(n.into())
    }
}

impl From<usize> for Value {
    fn from(n: usize) -> Value {
        Value::Int(i64::try_from(n).expect("a TOML integer is at most i64::MAX"))
    }
}

impl From<Table> for Value {
    fn from(t: Table) -> Value {
        Value::Table(t)
    }
}

impl<T: Into<Value>> From<Vec<T>> for Value {
    fn from(items: Vec<T>) -> Value {
        Value::Array(items.into_iter().map(Into::into).collect())
    }
}

impl<T: Into<Value>, const N: usize> From<[T; N]> for Value {
    fn from(items: [T; N]) -> Value {
        Value::Array(items.into_iter().map(Into::into).collect())
    }
}

/// Keys and values in the order they were first set; setting a key again replaces its value
/// in place. Displayed as `key = value` lines (the body of a `[table]`); as a [`Value`], an
/// inline table.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Table(Vec<(String, Value)>);

impl Table {
    pub fn new() -> Table {
        Table::default()
    }

    /// `key = value`.
    pub fn set(mut self, key: &str, value: impl Into<Value>) -> Table {
        self.insert(key, value.into());
        self
    }

    /// Every key of `other` set here, in `other`'s order.
    pub fn merge(mut self, other: Table) -> Table {
        for (k, v) in other.0 {
            self.insert(&k, v);
        }
        self
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn insert(&mut self, key: &str, value: Value) {
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.0.push((key.to_string(), value)),
        }
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (k, v) in &self.0 {
            write_key(f, k)?;
            writeln!(f, " = {v}")?;
        }
        Ok(())
    }
}

/// The `[agent]` table.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AgentTable(Table);

impl AgentTable {
    /// An agent that keeps everything in `dir`: `state_dir` is `dir/run` (its control socket
    /// `dir/run/control.sock`), `bpf_pin_dir` is `dir/bpf`, `acme_dir` is `dir/acme`, and no
    /// file is included.
    pub fn private(dir: &Path) -> AgentTable {
        AgentTable(
            Table::new()
                .set("state_dir", dir.join("run"))
                .set("control_socket", dir.join("run/control.sock"))
                .set("bpf_pin_dir", dir.join("bpf"))
                .set("acme_dir", dir.join("acme"))
                .set("include", Value::Array(Vec::new())),
        )
    }

    /// `key = value` in `[agent]`.
    pub fn set(self, key: &str, value: impl Into<Value>) -> AgentTable {
        AgentTable(self.0.set(key, value))
    }

    /// Every setting of `settings` in `[agent]`.
    pub fn merge(self, settings: Table) -> AgentTable {
        AgentTable(self.0.merge(settings))
    }
}

impl fmt::Display for AgentTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[agent]\n{}\n", self.0)
    }
}

/// One app: `[app.NAME]` and its `listen`, `workers`, `restart`, `pre_start` and `tls` tables
/// (a table with nothing set is left out). Displayed with a blank line first, so apps can be
/// written one after the other and after an [`AgentTable`].
#[derive(Clone, Debug, PartialEq)]
pub struct App {
    name: String,
    app: Table,
    listen: Table,
    workers: Table,
    restart: Table,
    pre_start: Vec<Table>,
    tls: Table,
}

impl App {
    /// An app with nothing set yet.
    pub fn new(name: &str) -> App {
        App {
            name: name.to_string(),
            app: Table::new(),
            listen: Table::new(),
            workers: Table::new(),
            restart: Table::new(),
            pre_start: Vec::new(),
            tls: Table::new(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `command = [...]`.
    pub fn command<S: AsRef<str>>(self, argv: impl IntoIterator<Item = S>) -> App {
        let argv: Vec<Value> = argv.into_iter().map(|a| a.as_ref().into()).collect();
        self.set("command", argv)
    }

    /// `user = "..."`.
    pub fn user(self, user: &str) -> App {
        self.set("user", user)
    }

    /// `key = "value"` in the app's `env` (an inline table).
    pub fn env(mut self, key: &str, value: impl fmt::Display) -> App {
        let env = match self.app.get("env") {
            Some(Value::Table(t)) => t.clone(),
            _ => Table::new(),
        };
        self.app
            .insert("env", env.set(key, value.to_string()).into());
        self
    }

    /// `key = value` in `[app.NAME]` (`group`, `workdir`, `env_file`, ...).
    pub fn set(mut self, key: &str, value: impl Into<Value>) -> App {
        self.app.insert(key, value.into());
        self
    }

    /// `address = "..."` in `[app.NAME.listen]`.
    pub fn address(self, address: impl fmt::Display) -> App {
        self.listen("address", address.to_string())
    }

    /// `key = value` in `[app.NAME.listen]` (`steering`, `backlog`).
    pub fn listen(mut self, key: &str, value: impl Into<Value>) -> App {
        self.listen.insert(key, value.into());
        self
    }

    /// `count = n` in `[app.NAME.workers]`.
    pub fn count(self, n: usize) -> App {
        self.workers("count", n)
    }

    /// `key = value` in `[app.NAME.workers]` (`memory_max`, `ready`, `stop_timeout`, ...).
    pub fn workers(mut self, key: &str, value: impl Into<Value>) -> App {
        self.workers.insert(key, value.into());
        self
    }

    /// `key = value` in `[app.NAME.restart]` (`policy`, `max_restarts`, `window`, ...).
    pub fn restart(mut self, key: &str, value: impl Into<Value>) -> App {
        self.restart.insert(key, value.into());
        self
    }

    /// One more `[[app.NAME.pre_start]]` step (`command`, `name`, `timeout`).
    pub fn pre_start(mut self, step: Table) -> App {
        self.pre_start.push(step);
        self
    }

    /// `key = value` in `[app.NAME.tls]` (`address`, `cert`, `key`, `sni`, `ktls`, ...).
    pub fn tls(mut self, key: &str, value: impl Into<Value>) -> App {
        self.tls.insert(key, value.into());
        self
    }
}

impl App {
    /// `[app.NAME]`, `[app.NAME.table]` or, for an array of tables, `[[app.NAME.table]]`,
    /// after a blank line.
    fn header(&self, f: &mut fmt::Formatter<'_>, table: &str, array: bool) -> fmt::Result {
        let (open, close) = if array { ("[[", "]]") } else { ("[", "]") };
        write!(f, "\n{open}app.")?;
        write_key(f, &self.name)?;
        if !table.is_empty() {
            write!(f, ".{table}")?;
        }
        writeln!(f, "{close}")
    }
}

impl fmt::Display for App {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.header(f, "", false)?;
        write!(f, "{}", self.app)?;
        for (table, body) in [
            ("listen", &self.listen),
            ("workers", &self.workers),
            ("restart", &self.restart),
        ] {
            if !body.is_empty() {
                self.header(f, table, false)?;
                write!(f, "{body}")?;
            }
        }
        for step in &self.pre_start {
            self.header(f, "pre_start", true)?;
            write!(f, "{step}")?;
        }
        if !self.tls.is_empty() {
            self.header(f, "tls", false)?;
            write!(f, "{}", self.tls)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_app_renders_its_tables_in_order_and_leaves_out_empty_ones() {
        let app = App::new("web")
            .command(["/bin/sh", "-c", "exec demo"])
            .user("nobody")
            .env("A", 1)
            .env("B", "two")
            .address("127.0.0.1:8000")
            .listen("steering", "hash")
            .count(2)
            .workers("stop_timeout", "5s")
            .workers("cpu_max", 1.0)
            .pre_start(
                Table::new()
                    .set("name", "migrate")
                    .set("command", ["/bin/true"]),
            )
            .pre_start(Table::new().set("command", ["/bin/false"]))
            .tls("address", "127.0.0.1:8443")
            .tls(
                "sni",
                [Table::new().set("cert", "b.crt").set("key", "b.key")],
            );
        assert_eq!(
            app.to_string(),
            r#"
[app.web]
command = ["/bin/sh", "-c", "exec demo"]
user = "nobody"
env = { A = "1", B = "two" }

[app.web.listen]
address = "127.0.0.1:8000"
steering = "hash"

[app.web.workers]
count = 2
stop_timeout = "5s"
cpu_max = 1.0

[[app.web.pre_start]]
name = "migrate"
command = ["/bin/true"]

[[app.web.pre_start]]
command = ["/bin/false"]

[app.web.tls]
address = "127.0.0.1:8443"
sni = [{ cert = "b.crt", key = "b.key" }]
"#
        );
    }

    #[test]
    fn setting_a_key_again_replaces_it_in_place() {
        let app = App::new("w")
            .count(1)
            .workers("stop_timeout", "5s")
            .count(3)
            .env("X", "a")
            .env("X", "b");
        assert_eq!(
            app.to_string(),
            "\n[app.w]\nenv = { X = \"b\" }\n\n[app.w.workers]\ncount = 3\nstop_timeout = \"5s\"\n"
        );
    }

    #[test]
    fn strings_and_keys_are_escaped() {
        let t = Table::new()
            .set("cmd", "say \"hi\"\\\n")
            .set("a key", true)
            .set("empty", Table::new());
        assert_eq!(
            t.to_string(),
            "cmd = \"say \\\"hi\\\"\\\\\\n\"\n\"a key\" = true\nempty = {}\n"
        );
        assert_eq!(App::new("a b").to_string(), "\n[app.\"a b\"]\n");
    }

    #[test]
    fn a_private_agent_keeps_its_state_in_its_directory() {
        let agent = AgentTable::private(Path::new("/tmp/t"))
            .set("enforce_limits", false)
            .merge(Table::new().set("metrics", "127.0.0.1:9464"));
        assert_eq!(
            agent.to_string(),
            "[agent]\nstate_dir = \"/tmp/t/run\"\ncontrol_socket = \"/tmp/t/run/control.sock\"\n\
             bpf_pin_dir = \"/tmp/t/bpf\"\nacme_dir = \"/tmp/t/acme\"\ninclude = []\n\
             enforce_limits = false\n\
             metrics = \"127.0.0.1:9464\"\n\n"
        );
    }
}
