//! `gen-family`: writes a synthetic Llama-layout model family (base and models derived from it).
//!
//! ```text
//! gen-family --out examples/models --hidden 64 --intermediate 160 --layers 4 \
//!     --heads 4 --kv-heads 2 --vocab 256 --dtype bf16 --models base,instruct,lang_eu
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use shardmerge_tests::family::{write_model, FamilySpec};
use shardmerge_worker::format::dtype::DType;

#[derive(Parser, Debug)]
#[command(
    name = "gen-family",
    about = "Write a synthetic Llama-layout model family: base, and models = base + a seeded delta"
)]
struct Args {
    /// Folder to write into; each model gets a subfolder named after it.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 64)]
    hidden: u64,
    #[arg(long, default_value_t = 160)]
    intermediate: u64,
    #[arg(long, default_value_t = 4)]
    layers: u64,
    #[arg(long, default_value_t = 4)]
    heads: u64,
    #[arg(long, default_value_t = 2)]
    kv_heads: u64,
    #[arg(long, default_value_t = 256)]
    vocab: u64,
    /// f32, f16 or bf16 (or the torch names).
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Comma-separated models to write. `base` is the base; any other name is base + a delta
    /// seeded by that name (the family is instruct, lang_eu, lang_ca, lang_gl).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "base,instruct,lang_eu,lang_ca,lang_gl"
    )]
    models: Vec<String>,
    /// Shard weights at this many bytes (Hugging Face layout, with an index). Repeatable as
    /// MODEL=BYTES to shard only that model; a plain number applies to all.
    #[arg(long)]
    shard_size: Vec<String>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// MODEL=N: give MODEL a vocabulary of N (rows shared with the base line up). Repeatable.
    #[arg(long)]
    vocab_override: Vec<String>,
    #[arg(long, default_value_t = 1e-5)]
    rms_norm_eps: f64,
    /// Threads generating values (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

/// A plain number for every model, and MODEL=N pairs.
type Pairs = (Option<u64>, Vec<(String, u64)>);

fn parse_pairs(items: &[String], what: &str) -> Result<Pairs, String> {
    let mut all = None;
    let mut per = Vec::new();
    for it in items {
        match it.split_once('=') {
            Some((m, n)) => {
                let n = n
                    .parse()
                    .map_err(|_| format!("--{what} {it}: {n:?} is not a number"))?;
                per.push((m.to_string(), n));
            }
            None => {
                all = Some(
                    it.parse()
                        .map_err(|_| format!("--{what} {it}: not a number or MODEL=N"))?,
                )
            }
        }
    }
    Ok((all, per))
}

fn run(a: Args) -> Result<(), String> {
    let dtype = DType::from_recipe(&a.dtype.to_lowercase())
        .ok_or_else(|| format!("--dtype {}: expected f32, f16 or bf16", a.dtype))?;
    let spec = FamilySpec {
        hidden: a.hidden,
        intermediate: a.intermediate,
        layers: a.layers,
        heads: a.heads,
        kv_heads: a.kv_heads,
        vocab: a.vocab,
        dtype,
        seed: a.seed,
        rms_norm_eps: a.rms_norm_eps,
    };
    spec.check()?;
    let (_, vocabs) = parse_pairs(&a.vocab_override, "vocab-override")?;
    let (shard_all, shards) = parse_pairs(&a.shard_size, "shard-size")?;
    for (m, _) in vocabs.iter().chain(&shards) {
        if !a.models.contains(m) {
            eprintln!("gen-family: warning: {m} is not among --models, ignored");
        }
    }
    let threads = a
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    for m in &a.models {
        if m.is_empty() || m.contains(['/', '\\']) || m.starts_with('.') {
            return Err(format!("--models: {m:?} is not a usable folder name"));
        }
        let vocab = vocabs
            .iter()
            .rev()
            .find(|(n, _)| n == m)
            .map_or(a.vocab, |p| p.1);
        let shard = shards
            .iter()
            .rev()
            .find(|(n, _)| n == m)
            .map(|p| p.1)
            .or(shard_all);
        let dir = a.out.join(m);
        let t0 = Instant::now();
        let st = write_model(&spec, m, vocab, &dir, shard, threads)
            .map_err(|e| format!("writing {}: {e}", dir.display()))?;
        let secs = t0.elapsed().as_secs_f64();
        println!(
            "{m}: {} params, {} file(s), {:.1} MB in {secs:.1} s ({:.0} MB/s) -> {}",
            st.params,
            st.files.len(),
            st.file_bytes as f64 / 1e6,
            st.file_bytes as f64 / 1e6 / secs.max(1e-9),
            dir.display()
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gen-family: {e}");
            ExitCode::FAILURE
        }
    }
}
