use super::*;
use std::path::Path;
pub fn load(_path: &Path, _lookup: &dyn Lookup) -> Result<Config, ConfigError> { unimplemented!() }
pub fn load_str(_path: &Path, _text: &str, _lookup: &dyn Lookup) -> Result<Config, ConfigError> { unimplemented!() }
