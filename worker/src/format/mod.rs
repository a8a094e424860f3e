//! Checkpoint formats: safetensors headers, sharded-checkpoint indexes and element types.
pub mod dtype;
pub mod index;
pub mod names;
pub mod safetensors;
