//! The names in corral's subtree: the fixed ones and the check every other one passes.

use super::error::CgroupError;

/// The leaf the agent's own processes live in.
pub const SUPERVISOR: &str = "supervisor";
pub(super) const APP_PREFIX: &str = "app-";
pub(super) const WORKER_PREFIX: &str = "worker-";

/// Check one path component of corral's subtree: not empty, no `/`, not `.` or `..`, no NUL or
/// control characters, at most 200 bytes (room for a prefix within NAME_MAX).
pub fn validate_name(name: &str) -> Result<(), CgroupError> {
    let reason = if name.is_empty() {
        Some("empty")
    } else if name.contains('/') {
        Some("contains `/`")
    } else if name == "." || name == ".." {
        Some("is `.` or `..`")
    } else if name.chars().any(char::is_control) {
        Some("contains a control character")
    } else if name.len() > 200 {
        Some("longer than 200 bytes")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(CgroupError::InvalidName {
            name: name.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for bad in ["", "a/b", "../x", "..", ".", "/", "a\nb", "a\0b"] {
            assert!(
                matches!(validate_name(bad), Err(CgroupError::InvalidName { .. })),
                "{bad:?} accepted"
            );
        }
        assert!(validate_name(&"x".repeat(201)).is_err());
        for good in ["api", "my-app_2", "3", "a..b", "with.dot"] {
            validate_name(good).unwrap();
        }
        let e = validate_name("a/b").unwrap_err().to_string();
        assert_eq!(e, "invalid cgroup name `a/b`: contains `/`");
    }
}
