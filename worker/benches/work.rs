//! The cost of computing in the recipe's 16-bit dtype: every method that rounds op by op
//! ([`Work`]) run whole over the same bf16-valued inputs in f32, bfloat16 and float16, in one
//! process, interleaved, with the ratio to f32 and a checksum of each output's bits.
//!
//! `cargo bench -p shardmerge-worker --bench work` (about a minute on 2 cores after the
//! release build); `-- NAME` runs the methods whose name contains NAME. Environment:
//! `WORK_BENCH_ROWS` (default 1024 rows of 1024 elements), `WORK_BENCH_REPS` (default 7;
//! the best of them is reported, so load on a shared machine inflates no figure it does not
//! inflate in every repetition). The checksums (FNV-1a of the output bits) let a change to the
//! kernels show it changed no bit: run before and after and compare the last column.

use std::time::{Duration, Instant};

use shardmerge_worker::kernels::round::Work;
use shardmerge_worker::kernels::{self, Method};

mod common;

const ROW_LEN: u64 = 1024;
/// The methods whose arithmetic follows [`Work`].
const ROUNDING: &[&str] = &[
    "linear",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
];
const WORKS: [Work; 3] = [Work::F32, Work::BF16, Work::F16];

fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v}: expected a whole number")),
        Err(_) => default,
    }
}

/// FNV-1a over the f32 bits.
fn checksum(xs: &[f32]) -> u64 {
    xs.iter().fold(0xcbf2_9ce4_8422_2325, |h, x| {
        x.to_bits()
            .to_le_bytes()
            .iter()
            .fold(h, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
    })
}

fn main() {
    let rows = env_usize("WORK_BENCH_ROWS", 1024) as u64;
    let reps = env_usize("WORK_BENCH_REPS", 7).max(1);
    // cargo bench passes `--bench`; any other argument filters by method name
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let shape = [rows, ROW_LEN];
    let numel = (rows * ROW_LEN) as usize;
    let methods: Vec<&dyn Method> = ROUNDING
        .iter()
        .filter(|n| filter.is_empty() || filter.iter().any(|f| n.contains(f.as_str())))
        .map(|n| kernels::method(n).unwrap_or_else(|| panic!("{n}: not in the registry")))
        .collect();
    let n_max = methods
        .iter()
        .map(|m| common::setup_for(*m, shape).model_params.len())
        .max()
        .unwrap_or(common::DEFAULT_MODELS);
    // values a bf16 checkpoint decodes to, as the bench's and most real merges' inputs are
    let data: Vec<Vec<f32>> = common::inputs(n_max, numel)
        .into_iter()
        .map(|v| {
            v.into_iter()
                .map(|x| half::bf16::from_f32(x).to_f32())
                .collect()
        })
        .collect();

    println!(
        "{} rows x {ROW_LEN}, bf16-valued inputs, best of {reps}, single-threaded",
        rows
    );
    println!(
        "{:<18} {:>3} {:>9} {:>9} {:>9} {:>8} {:>8}  checksums f32 / bf16 / f16",
        "method", "n", "f32_ms", "bf16_ms", "f16_ms", "bf16/f32", "f16/f32"
    );
    for m in methods {
        let setup = common::setup_for(m, shape);
        let n = setup.model_params.len();
        let refs: Vec<&[f32]> = data[..n].iter().map(Vec::as_slice).collect();
        let ctxs: Vec<_> = WORKS.iter().map(|&w| setup.ctx(w, true)).collect();
        let mut outs = vec![vec![0f32; numel]; WORKS.len()];
        let mut best = [Duration::MAX; 3];
        for _ in 0..reps {
            // interleaved: each repetition times every dtype under the same load
            for ((ctx, out), best) in ctxs.iter().zip(outs.iter_mut()).zip(best.iter_mut()) {
                let t = Instant::now();
                kernels::run_whole(m, ctx, &refs, out)
                    .unwrap_or_else(|e| panic!("{}: {e}", m.spec().name));
                *best = (*best).min(t.elapsed());
                std::hint::black_box(&out);
            }
        }
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let sums: Vec<String> = outs
            .iter()
            .map(|o| format!("{:016x}", checksum(o)))
            .collect();
        println!(
            "{:<18} {:>3} {:>9.2} {:>9.2} {:>9.2} {:>8.2} {:>8.2}  {}",
            m.spec().name,
            n,
            ms(best[0]),
            ms(best[1]),
            ms(best[2]),
            ms(best[1]) / ms(best[0]),
            ms(best[2]) / ms(best[0]),
            sums.join(" ")
        );
    }
}
