//! What the kernel benches share: a [`TensorCtx`] set up for any method, and inputs shaped
//! like fine-tunes of one base.

#![allow(dead_code)] // each bench target uses part of it

use std::collections::HashMap;

use shardmerge_worker::kernels::round::Work;
use shardmerge_worker::kernels::{rng, BaseRule, Method, TensorCtx};

/// Inputs per method unless its spec or `check` wants another count.
pub const DEFAULT_MODELS: usize = 3;
/// Value for a parameter without a default that the brief does not name (`t`).
const REQUIRED_FALLBACK: f64 = 0.5;
pub const TENSOR_NAME: &str = "model.layers.0.mlp.up_proj.weight";

/// Owns what a `TensorCtx` borrows (the bench's stand-in for the test-only `testutil::Case`).
pub struct Setup {
    pub params: HashMap<String, f64>,
    pub model_params: Vec<HashMap<String, f64>>,
    pub base: Option<usize>,
    pub shape: [u64; 2],
}

impl Setup {
    /// `n` models, input 0 the base if the method requires one; `weight` 1.0 and `density` 0.5
    /// per model where the method takes them, the spec's defaults for everything else.
    pub fn new(m: &dyn Method, n: usize, shape: [u64; 2]) -> Setup {
        let spec = m.spec();
        let params = spec
            .params
            .iter()
            .map(|p| (p.name.to_string(), p.default.unwrap_or(REQUIRED_FALLBACK)))
            .collect();
        let per_model: HashMap<String, f64> = spec
            .tensor_params
            .iter()
            .map(|p| {
                let v = match p.name {
                    "weight" => 1.0,
                    "density" => 0.5,
                    _ => p.default.unwrap_or(REQUIRED_FALLBACK),
                };
                (p.name.to_string(), v)
            })
            .collect();
        Setup {
            params,
            model_params: vec![per_model; n],
            base: (spec.base == BaseRule::Required).then_some(0),
            shape,
        }
    }

    /// The context, computing in `work`; `work_bf16`: the recipe's dtype is bfloat16 (keep
    /// probabilities rounded as mergekit's), whatever the compute dtype.
    pub fn ctx(&self, work: Work, work_bf16: bool) -> TensorCtx<'_> {
        TensorCtx {
            name: TENSOR_NAME,
            shape: &self.shape,
            rows: self.shape[0],
            row_len: self.shape[1] as usize,
            params: &self.params,
            model_params: self.model_params.iter().collect(),
            base: self.base,
            model_keys: (0..self.model_params.len() as u64)
                .map(|i| i * 7919 + 1)
                .collect(),
            tensor_key: rng::key_of(TENSOR_NAME),
            seed: 0,
            // mergekit's draws, deep into a 70B model's stream: each range pays its jump
            rng: rng::Mode::Mergekit,
            rng_offsets: (0..self.model_params.len() as u64)
                .map(|i| (i + 1) * 50_000_000_000)
                .collect(),
            work_bf16,
            work,
        }
    }
}

/// A model count the method accepts: `DEFAULT_MODELS` clamped to the spec's range, else the
/// first count in the range that `check` passes.
pub fn setup_for(m: &dyn Method, shape: [u64; 2]) -> Setup {
    let spec = m.spec();
    let lo = spec.min_models;
    let hi = spec.max_models.unwrap_or(lo.max(DEFAULT_MODELS) + 2);
    let preferred = DEFAULT_MODELS.clamp(lo, hi);
    let mut errors = Vec::new();
    for n in std::iter::once(preferred).chain((lo..=hi).filter(|&n| n != preferred)) {
        let s = Setup::new(m, n, shape);
        match m.check(&s.ctx(Work::F32, false)) {
            Ok(()) => return s,
            Err(e) => errors.push(format!("{n} models: {e}")),
        }
    }
    panic!("{}: no valid model count: {}", spec.name, errors.join("; "));
}

/// Deterministic data shaped like fine-tunes of one base: input 0 in ±0.02, the others that
/// plus a delta in ±0.002 (so task vectors are small and signs disagree, as in real merges).
pub fn inputs(n: usize, numel: usize) -> Vec<Vec<f32>> {
    let unit = |salt: u64| {
        let s = rng::Stream::new(salt, 1, 2);
        (0..numel as u64).map(move |i| s.uniform(i) as f32 * 2.0 - 1.0)
    };
    let base: Vec<f32> = unit(0).map(|v| v * 0.02).collect();
    let mut all = vec![base.clone()];
    for i in 1..n {
        all.push(
            base.iter()
                .zip(unit(i as u64))
                .map(|(&b, d)| b + d * 0.002)
                .collect(),
        );
    }
    all
}
