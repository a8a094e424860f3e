//! Errors of the coordinator and CLI. Each variant says what happened (so the gRPC service can
//! answer with the right code, see `server::status_of`); its message says what was wrong and,
//! where it helps, what to do.

use shardmerge_worker::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The recipe is malformed or asks for something unsupported.
    #[error("recipe: {0}")]
    Recipe(String),
    /// An input checkpoint is missing, corrupt or inconsistent with the others.
    #[error("{0}")]
    Input(String),
    /// A job's inputs no longer plan to what they did when it started.
    #[error("{0}")]
    InputChanged(String),
    /// Something asked for does not exist (a job, a record).
    #[error("{0}")]
    NotFound(String),
    /// The output already holds what would be overwritten.
    #[error("{0}")]
    AlreadyExists(String),
    /// Storage failed.
    #[error("{0}")]
    Storage(#[from] StorageError),
    /// The coordinator's journal cannot be written or read.
    #[error("{0}")]
    Journal(String),
    /// The job was cancelled.
    #[error("{0}")]
    Cancelled(String),
    /// The job failed.
    #[error("{0}")]
    Job(String),
    /// A limit of the coordinator was reached (jobs held, recipe size).
    #[error("{0}")]
    Exhausted(String),
    /// Anything else (usage, RPC).
    #[error("{0}")]
    Other(String),
}

pub type Result<T> = std::result::Result<T, Error>;
