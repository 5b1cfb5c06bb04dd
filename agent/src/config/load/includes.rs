//! `[agent] include`: the glob patterns, the files they match, and what an included file may
//! hold (`[app.NAME]` tables only).

use std::collections::BTreeSet;
use std::ops::Range;
use std::path::{Path, PathBuf};

use super::source::Source;
use crate::config::raw::{Apps, IncludedFile};
use crate::config::ConfigError;

/// One include pattern, and where it is written (`None`: the default).
pub(super) struct Pattern {
    pub(super) pattern: String,
    pub(super) span: Option<Range<usize>>,
}

/// Every file the include patterns match, sorted, without duplicates or the main file itself.
pub(super) fn find_includes(
    main: &Source<'_>,
    patterns: &[Pattern],
) -> Result<Vec<PathBuf>, ConfigError> {
    let options = glob::MatchOptions {
        case_sensitive: true,
        require_literal_separator: true,
        // `*.toml` does not pick up editors' hidden files.
        require_literal_leading_dot: true,
    };
    let main_canonical = std::fs::canonicalize(main.file).ok();
    let mut found = BTreeSet::new();
    for Pattern { pattern, span } in patterns {
        let at = |message: String| match span {
            Some(span) => main.error(span.clone(), message),
            None => ConfigError::nowhere(message),
        };
        let full = if Path::new(pattern).is_absolute() {
            pattern.clone()
        } else {
            let dir = main.dir.to_str().ok_or_else(|| {
                at(format!(
                    "cannot expand include pattern `{pattern}`: the directory {} is not UTF-8",
                    main.dir.display()
                ))
            })?;
            let dir = glob::Pattern::escape(dir);
            format!("{}/{pattern}", dir.trim_end_matches('/'))
        };
        let paths = glob::glob_with(&full, options)
            .map_err(|e| at(format!("invalid include pattern `{pattern}`: {}", e.msg)))?;
        for entry in paths {
            let p = entry.map_err(|e| {
                at(format!(
                    "cannot read {} while expanding `{pattern}`: {}",
                    e.path().display(),
                    e.error()
                ))
            })?;
            let is_main = p == main.file
                || (main_canonical.is_some() && std::fs::canonicalize(&p).ok() == main_canonical);
            if !is_main {
                found.insert(p);
            }
        }
    }
    Ok(found.into_iter().collect())
}

/// The `[app.NAME]` tables of an included file; `[agent]` there is an error naming `main`,
/// where it belongs.
pub(super) fn included_apps(src: &Source<'_>, main: &Path) -> Result<Apps, ConfigError> {
    let file: IncludedFile = src.parse()?;
    if let Some(agent) = file.agent {
        return Err(src
            .error(
                agent.span(),
                "[agent] belongs in the main file, not in an included file",
            )
            .with_hint(format!(
                "move this table to {}; included files hold [app.NAME] tables only",
                main.display()
            )));
    }
    Ok(file.app)
}
