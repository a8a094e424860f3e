//! Errors of the coordinator and CLI. Each variant says what happened and carries what it
//! happened to (the recipe key, the file or tensor, the job), so callers match on it and the
//! gRPC service answers with the right code (`server::code_of`); its message says what was
//! wrong and, where it helps, what to do.

use std::fmt;

use shardmerge_worker::kernels::KernelError;
use shardmerge_worker::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The recipe is malformed or asks for something unsupported: `key` names the setting
    /// (`merge_method`, `slices[0].sources[1].layer_range`; empty when no one setting is at
    /// fault), `reason` what is wrong with it.
    #[error("recipe: {}{reason}", At(.key))]
    Recipe { key: String, reason: String },
    /// An input checkpoint is missing, corrupt or inconsistent with the others: `at` names the
    /// file, model or tensor.
    #[error("{}{reason}", At(.at))]
    Input { at: String, reason: String },
    /// An output tensor cannot be planned from its inputs as the recipe asks.
    #[error("tensor {tensor}: {reason}")]
    Plan { tensor: String, reason: String },
    /// A merge method refused a tensor: its parameters at planning (`pass` none, a recipe
    /// error), or the statistics of pass `pass`.
    #[error("{}merge_method {method}, tensor {tensor}: {source}", Planning(.pass))]
    Kernel {
        method: &'static str,
        tensor: String,
        pass: Option<u32>,
        source: KernelError,
    },
    /// Job `job`'s inputs no longer plan to what they did when it started.
    #[error("{reason}")]
    InputChanged { job: String, reason: String },
    /// The output at `path` already holds what would be overwritten.
    #[error("{reason}")]
    AlreadyExists { path: String, reason: String },
    /// Storage failed.
    #[error("{0}")]
    Storage(#[from] StorageError),
    /// The coordinator's journal at `uri` cannot be written or read.
    #[error("{reason}")]
    Journal { uri: String, reason: String },
    /// Job `job` was cancelled.
    #[error("{reason}")]
    Cancelled { job: String, reason: String },
    /// Job `job` failed.
    #[error("{reason}")]
    Job { job: String, reason: String },
    /// Committing output file `file` (or the checkpoint's own files) failed.
    #[error("commit: {}{reason}", At(.file))]
    Commit { file: String, reason: String },
    /// A limit of the coordinator was reached (`limit`: jobs held, recipe size).
    #[error("{reason}")]
    Exhausted { limit: &'static str, reason: String },
    /// A command-line or service setting (`setting`: a flag, a file it names) is unusable.
    #[error("{}{reason}", At(.setting))]
    Usage { setting: String, reason: String },
    /// A call to coordinator `url` failed.
    #[error("{reason}")]
    Rpc { url: String, reason: String },
}

/// `at: ` before a message, or nothing when `at` is empty.
struct At<'a>(&'a str);

impl fmt::Display for At<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            Ok(())
        } else {
            write!(f, "{}: ", self.0)
        }
    }
}

/// `recipe: ` before a kernel's refusal at planning (no pass), nothing for a pass's.
struct Planning<'a>(&'a Option<u32>);

impl fmt::Display for Planning<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None => f.write_str("recipe: "),
            Some(_) => Ok(()),
        }
    }
}

impl Error {
    /// A recipe error at setting `key`.
    pub fn recipe(key: impl fmt::Display, reason: impl fmt::Display) -> Error {
        Error::Recipe {
            key: key.to_string(),
            reason: reason.to_string(),
        }
    }

    /// An input error at `at` (a file, model or tensor; empty for the inputs as a whole).
    pub fn input(at: impl fmt::Display, reason: impl fmt::Display) -> Error {
        Error::Input {
            at: at.to_string(),
            reason: reason.to_string(),
        }
    }

    /// A planning error of output tensor `tensor`.
    pub fn plan(tensor: impl fmt::Display, reason: impl fmt::Display) -> Error {
        Error::Plan {
            tensor: tensor.to_string(),
            reason: reason.to_string(),
        }
    }

    /// A job's failure.
    pub fn job(job: impl fmt::Display, reason: impl fmt::Display) -> Error {
        Error::Job {
            job: job.to_string(),
            reason: reason.to_string(),
        }
    }

    /// A commit failure of file `file`.
    pub fn commit(file: impl fmt::Display, reason: impl fmt::Display) -> Error {
        Error::Commit {
            file: file.to_string(),
            reason: reason.to_string(),
        }
    }

    /// An unusable setting.
    pub fn usage(setting: impl fmt::Display, reason: impl fmt::Display) -> Error {
        Error::Usage {
            setting: setting.to_string(),
            reason: reason.to_string(),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    /// The messages keep today's words; what they are about is a field a caller can match on.
    #[test]
    fn variants_carry_what_the_message_names() {
        let e = Error::recipe("models[1].parameters.weight", "expected a number");
        assert_eq!(
            e.to_string(),
            "recipe: models[1].parameters.weight: expected a number"
        );
        assert!(matches!(e, Error::Recipe { ref key, .. } if key == "models[1].parameters.weight"));
        assert_eq!(
            Error::recipe("", "the recipe names no models").to_string(),
            "recipe: the recipe names no models"
        );
        let e = Error::input("file:///m/model.safetensors", "file not found");
        assert_eq!(e.to_string(), "file:///m/model.safetensors: file not found");
        let e = Error::plan("lm_head.weight", "shape mismatch");
        assert_eq!(e.to_string(), "tensor lm_head.weight: shape mismatch");
        let k = |pass| Error::Kernel {
            method: "ties",
            tensor: "w".into(),
            pass,
            source: KernelError::param("density must be greater than 0"),
        };
        assert_eq!(
            k(None).to_string(),
            "recipe: merge_method ties, tensor w: density must be greater than 0"
        );
        assert_eq!(
            k(Some(1)).to_string(),
            "merge_method ties, tensor w: density must be greater than 0"
        );
    }
}
