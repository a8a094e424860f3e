//! Kernel throughput: every method in `kernels::registry()` run whole over one 1024×1024 f32
//! tensor, plus bf16 decode/encode. Throughput is output elements per second, single-threaded.
//!
//! `cargo bench -p shardmerge-worker` (a few minutes on 2 cores); `-- NAME` runs a subset.
//! Results and caveats: docs/benchmarks.md.

use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use shardmerge_worker::format::dtype::{self, DType};
use shardmerge_worker::kernels::round::Work;
use shardmerge_worker::kernels::{self, Method};

mod common;

const ROWS: u64 = 1024;
const ROW_LEN: usize = 1024;
const NUMEL: usize = ROWS as usize * ROW_LEN;
const SHAPE: [u64; 2] = [ROWS, ROW_LEN as u64];

fn setup_for(m: &dyn Method) -> common::Setup {
    common::setup_for(m, SHAPE)
}

fn inputs(n: usize) -> Vec<Vec<f32>> {
    common::inputs(n, NUMEL)
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
            .unwrap_or(common::DEFAULT_MODELS),
    );
    let mut g = c.benchmark_group("kernels");
    // slow methods (iterative, multi-pass) take tens of ms per call: flat sampling keeps the
    // iteration count at sample_size instead of growing it 1..=n per sample
    g.sampling_mode(SamplingMode::Flat);
    g.throughput(Throughput::Elements(NUMEL as u64));
    for &m in kernels::registry() {
        let setup = setup_for(m);
        let ctx = setup.ctx(Work::F32, false);
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
