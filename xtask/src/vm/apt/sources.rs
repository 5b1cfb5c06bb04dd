//! Which Debian archive this machine's apt sources name (one-line .list files and deb822
//! .sources files alike); none is written in this project.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};

/// Debian codenames a main-archive entry may carry (not -updates, -security, -backports).
const CODENAMES: &[&str] = &[
    "bookworm", "trixie", "forky", "bullseye", "sid", "stable", "testing", "unstable",
];

/// The main Debian archive's address, from this machine's apt sources: the first `deb` entry
/// whose suites include bookworm, else one with another plain Debian codename.
pub fn debian_mirror() -> Result<String> {
    let mut entries: Vec<(String, Vec<String>)> = Vec::new();
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    for file in &files {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        match file.extension().and_then(|e| e.to_str()) {
            Some("sources") => entries.extend(parse_deb822(&text)),
            Some("list") => entries.extend(parse_one_line(&text)),
            _ if file.ends_with("sources.list") => entries.extend(parse_one_line(&text)),
            _ => {}
        }
    }
    let pick = |suite: &str| {
        entries
            .iter()
            .find(|(_, suites)| suites.iter().any(|s| s == suite))
            .map(|(uri, _)| uri.trim_end_matches('/').to_string())
    };
    CODENAMES.iter().find_map(|c| pick(c)).with_context(|| {
        format!(
            "no Debian archive in this machine's apt sources ({}): need a `deb` entry whose \
             suites include bookworm, to fetch kernels from",
            files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

/// (URI, suites) of each enabled `Types: deb` stanza of a deb822 .sources file.
fn parse_deb822(text: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let mut fields: BTreeMap<String, String> = BTreeMap::new();
    let mut last: Option<String> = None;
    let mut flush = |fields: &mut BTreeMap<String, String>| {
        let get = |k: &str| fields.get(k).map(String::as_str).unwrap_or("");
        let enabled = !get("enabled").trim().eq_ignore_ascii_case("no");
        if enabled && get("types").split_whitespace().any(|t| t == "deb") {
            let suites: Vec<String> = get("suites").split_whitespace().map(String::from).collect();
            for uri in get("uris").split_whitespace() {
                out.push((uri.to_string(), suites.clone()));
            }
        }
        fields.clear();
    };
    for line in text.lines() {
        if line.trim_start().starts_with('#') {
            continue;
        }
        if line.trim().is_empty() {
            flush(&mut fields);
            last = None;
        } else if line.starts_with([' ', '\t']) {
            if let Some(v) = last.as_ref().and_then(|k| fields.get_mut(k)) {
                v.push(' ');
                v.push_str(line.trim());
            }
        } else if let Some((k, v)) = line.split_once(':') {
            let k = k.trim().to_ascii_lowercase();
            fields.insert(k.clone(), v.trim().to_string());
            last = Some(k);
        }
    }
    flush(&mut fields);
    out
}

/// (URI, [suite]) of each `deb` line of a one-line-style sources.list.
fn parse_one_line(text: &str) -> Vec<(String, Vec<String>)> {
    text.lines()
        .filter_map(|line| {
            let line = line.split('#').next().unwrap_or("").trim();
            let rest = line.strip_prefix("deb ")?.trim_start();
            // Options: `[arch=amd64 signed-by=...]`.
            let rest = match rest.strip_prefix('[') {
                Some(r) => r.split_once(']')?.1,
                None => rest,
            };
            let mut words = rest.split_whitespace();
            let uri = words.next()?.to_string();
            let suite = words.next()?.to_string();
            Some((uri, vec![suite]))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deb822_sources() {
        let text = "Types: deb\n# comment\nURIs: http://a.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\nTypes: deb\nURIs: http://b.example/debian-security\nSuites: bookworm-security\n\nTypes: deb-src\nURIs: http://c.example\nSuites: bookworm\n\nEnabled: no\nTypes: deb\nURIs: http://d.example\nSuites: bookworm\n";
        let e = parse_deb822(text);
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].0, "http://a.example/debian");
        assert_eq!(e[0].1, ["bookworm", "bookworm-updates"]);
        assert_eq!(e[1].1, ["bookworm-security"]);
    }

    #[test]
    fn one_line_sources() {
        let text = "# x\ndeb [arch=amd64 signed-by=/k.gpg] http://a.example/debian/ bookworm main\ndeb-src http://b.example bookworm main\ndeb http://c.example trixie main # hi\n";
        let e = parse_one_line(text);
        assert_eq!(
            e,
            vec![
                (
                    "http://a.example/debian/".to_string(),
                    vec!["bookworm".to_string()]
                ),
                ("http://c.example".to_string(), vec!["trixie".to_string()]),
            ]
        );
    }
}
