//! Errors of the coordinator and CLI. Each says what was wrong and, where it helps, what to do.

use shardmerge_worker::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The recipe is malformed or asks for something unsupported.
    #[error("recipe: {0}")]
    Recipe(String),
    /// An input checkpoint is missing, corrupt or inconsistent with the others.
    #[error("{0}")]
    Input(String),
    /// Storage failed.
    #[error("{0}")]
    Storage(#[from] StorageError),
    /// The job failed or was cancelled.
    #[error("{0}")]
    Job(String),
    /// Anything else (usage, RPC).
    #[error("{0}")]
    Other(String),
}

pub type Result<T> = std::result::Result<T, Error>;
