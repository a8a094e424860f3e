//! Local paths the coordinator resolves against.

use std::path::PathBuf;

/// The folder relative paths in a recipe resolve against: the working directory, as mergekit.
pub fn cwd() -> PathBuf {
    std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."))
}
