use super::Location;
#[derive(Debug)]
pub struct ConfigError { pub at: Option<Location>, pub message: String, pub hint: Option<String> }
