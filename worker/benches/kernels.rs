//! Kernel throughput: every method in `kernels::registry()` run whole over one 1024×1024 f32
//! tensor, plus bf16 decode/encode. Throughput is output elements per second, single-threaded.
//!
//! `cargo bench -p shardmerge-worker` (a few minutes on 2 cores); `-- NAME` runs a subset.
//! Results and caveats: docs/benchmarks.md.

use std::collections::HashMap;
use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use shardmerge_worker::format::dtype::{self, DType};
use shardmerge_worker::kernels::{self, rng, BaseRule, Method, TensorCtx};

const ROWS: u64 = 1024;
const ROW_LEN: usize = 1024;
const NUMEL: usize = ROWS as usize * ROW_LEN;
/// Inputs per method unless its spec or `check` wants another count.
const DEFAULT_MODELS: usize = 3;
/// Value for a parameter without a default that the brief does not name (`t`).
const REQUIRED_FALLBACK: f64 = 0.5;
const TENSOR_NAME: &str = "model.layers.0.mlp.up_proj.weight";
const SHAPE: [u64; 2] = [ROWS, ROW_LEN as u64];

/// Owns what a `TensorCtx` borrows (the bench's stand-in for the test-only `testutil::Case`).
struct Setup {
    params: HashMap<String, f64>,
    model_params: Vec<HashMap<String, f64>>,
    base: Option<usize>,
}

impl Setup {
    /// `n` models, input 0 the base if the method requires one; `weight` 1.0 and `density` 0.5
    /// per model where the method takes them, the spec's defaults for everything else.
    fn new(m: &dyn Method, n: usize) -> Setup {
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
        }
    }

    fn ctx(&self) -> TensorCtx<'_> {
        TensorCtx {
            name: TENSOR_NAME,
            shape: &SHAPE,
            rows: ROWS,
            row_len: ROW_LEN,
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
            work_bf16: false,
            work: shardmerge_worker::kernels::round::Work::F32,
        }
    }
}

/// A model count the method accepts: `DEFAULT_MODELS` clamped to the spec's range, else the
/// first count in the range that `check` passes.
fn setup_for(m: &dyn Method) -> Setup {
    let spec = m.spec();
    let lo = spec.min_models;
    let hi = spec.max_models.unwrap_or(lo.max(DEFAULT_MODELS) + 2);
    let preferred = DEFAULT_MODELS.clamp(lo, hi);
    let mut errors = Vec::new();
    for n in std::iter::once(preferred).chain((lo..=hi).filter(|&n| n != preferred)) {
        let s = Setup::new(m, n);
        match m.check(&s.ctx()) {
            Ok(()) => return s,
            Err(e) => errors.push(format!("{n} models: {e}")),
        }
    }
    panic!("{}: no valid model count: {}", spec.name, errors.join("; "));
}

/// Deterministic data shaped like fine-tunes of one base: input 0 in ±0.02, the others that
/// plus a delta in ±0.002 (so task vectors are small and signs disagree, as in real merges).
fn inputs(n: usize) -> Vec<Vec<f32>> {
    let unit = |salt: u64| {
        let s = rng::Stream::new(salt, 1, 2);
        (0..NUMEL as u64).map(move |i| s.uniform(i) as f32 * 2.0 - 1.0)
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

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
}

fn bench_kernels(c: &mut Criterion) {
    let data = inputs(
        kernels::registry()
            .iter()
            .map(|m| setup_for(*m).model_params.len())
            .max()
            .unwrap_or(DEFAULT_MODELS),
    );
    let mut g = c.benchmark_group("kernels");
    // slow methods (iterative, multi-pass) take tens of ms per call: flat sampling keeps the
    // iteration count at sample_size instead of growing it 1..=n per sample
    g.sampling_mode(SamplingMode::Flat);
    g.throughput(Throughput::Elements(NUMEL as u64));
    for &m in kernels::registry() {
        let setup = setup_for(m);
        let ctx = setup.ctx();
        let n = ctx.n_models();
        let refs: Vec<&[f32]> = data[..n].iter().map(Vec::as_slice).collect();
        let mut out = vec![0f32; NUMEL];
        let id = format!("{}/{n}", m.spec().name);
        // fail loudly before timing: a method that errors would otherwise time its error path
        kernels::run_whole(m, &ctx, &refs, &mut out)
            .unwrap_or_else(|e| panic!("{}: {e}", m.spec().name));
        g.bench_function(id, |b| {
            b.iter(|| {
                kernels::run_whole(m, black_box(&ctx), black_box(&refs), &mut out).unwrap();
                black_box(&out);
            })
        });
    }
    g.finish();
}

fn bench_dtype(c: &mut Criterion) {
    let src: Vec<f32> = inputs(1).remove(0);
    let mut bytes = vec![0u8; NUMEL * DType::BF16.size()];
    dtype::encode(DType::BF16, &src, &mut bytes);
    let mut back = vec![0f32; NUMEL];

    let mut g = c.benchmark_group("dtype");
    g.throughput(Throughput::Elements(NUMEL as u64));
    g.bench_function("bf16_decode", |b| {
        b.iter(|| {
            dtype::decode(DType::BF16, black_box(&bytes), &mut back);
            black_box(&back);
        })
    });
    g.bench_function("bf16_encode", |b| {
        b.iter(|| {
            dtype::encode(DType::BF16, black_box(&src), &mut bytes);
            black_box(&bytes);
        })
    });
    g.bench_function("bf16_encode_finite", |b| {
        b.iter(|| {
            black_box(dtype::encode_finite(
                DType::BF16,
                black_box(&src),
                &mut bytes,
            ));
            black_box(&bytes);
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_kernels, bench_dtype
}
criterion_main!(benches);
