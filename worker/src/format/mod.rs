//! Checkpoint formats: safetensors headers and element types.
pub mod dtype;
pub mod safetensors;
