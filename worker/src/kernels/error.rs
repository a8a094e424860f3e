//! What a kernel refuses, as a value a caller can match on.

use std::fmt;

/// Why a kernel refused a tensor. Every variant carries the message a user sees (its
/// `Display`); the variant says what kind of thing was wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelError {
    /// A parameter's value is outside what the method accepts (a density of 0, a boolean
    /// that is neither 0 nor 1, a base index past the inputs).
    Param(String),
    /// The inputs do not fit together or do not fit the method: too few or too many models,
    /// slices or shapes that differ in length.
    Shape(String),
    /// Something the kernel needs was not given: a parameter, the base model, the statistics
    /// of an earlier pass.
    Missing(String),
    /// The arithmetic cannot be carried out on these values (weights that sum to 0).
    Numerical(String),
    /// State handed between passes is not what the kernel produced (a bug, not a user error).
    Internal(String),
}

impl KernelError {
    /// The message a user sees.
    pub fn message(&self) -> &str {
        match self {
            KernelError::Param(m)
            | KernelError::Shape(m)
            | KernelError::Missing(m)
            | KernelError::Numerical(m)
            | KernelError::Internal(m) => m,
        }
    }
}

impl fmt::Display for KernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for KernelError {}

impl KernelError {
    pub fn param(m: impl Into<String>) -> Self {
        KernelError::Param(m.into())
    }
    pub fn shape(m: impl Into<String>) -> Self {
        KernelError::Shape(m.into())
    }
    pub fn missing(m: impl Into<String>) -> Self {
        KernelError::Missing(m.into())
    }
    pub fn numerical(m: impl Into<String>) -> Self {
        KernelError::Numerical(m.into())
    }
    pub fn internal(m: impl Into<String>) -> Self {
        KernelError::Internal(m.into())
    }
}
