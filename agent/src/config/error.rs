//! The one error type of configuration loading: where, what, and how to fix it.

use std::fmt;

use super::Location;

/// A configuration error. Displayed as `FILE:LINE:COL: message`, followed by `  hint: ...` on a
/// second line when there is a hint. Without a location (a file that cannot be read) the message
/// names the file itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub at: Option<Location>,
    pub message: String,
    pub hint: Option<String>,
}

impl ConfigError {
    /// An error at a place in a file.
    pub fn at(at: Location, message: impl Into<String>) -> Self {
        ConfigError {
            at: Some(at),
            message: message.into(),
            hint: None,
        }
    }

    /// An error that is not about a place in a file (the message names the file).
    pub fn nowhere(message: impl Into<String>) -> Self {
        ConfigError {
            at: None,
            message: message.into(),
            hint: None,
        }
    }

    /// The same error with a hint on how to fix it.
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(at) = &self.at {
            write!(f, "{at}: ")?;
        }
        f.write_str(&self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}
