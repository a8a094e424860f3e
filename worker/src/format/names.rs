//! The names of a checkpoint's files, in one place: every reader and writer of a checkpoint
//! folder spells them from here.

/// The one data file of a checkpoint that is not split.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The index of a split checkpoint; written last, so a folder without it is not finished.
pub const INDEX: &str = "model.safetensors.index.json";
/// The model's configuration.
pub const CONFIG: &str = "config.json";
/// The model card shardmerge writes with the recipe.
pub const MODEL_CARD: &str = "README.md";
/// The checksum manifest shardmerge writes next to the index: each data file's size and CRC-32C.
pub const CHECKSUMS: &str = "shardmerge.checksums.json";

/// Data file `k` (from 0) of a checkpoint split into `n` files.
pub fn shard(k: usize, n: usize) -> String {
    format!("model-{:05}-of-{:05}.safetensors", k + 1, n)
}

#[cfg(test)]
mod tests {
    #[test]
    fn shards_are_numbered_from_one() {
        assert_eq!(super::shard(0, 3), "model-00001-of-00003.safetensors");
        assert_eq!(super::shard(11, 12), "model-00012-of-00012.safetensors");
    }
}
