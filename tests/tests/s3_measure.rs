//! A measurement, not a check (ignored by default): the TIES merge of a generated family
//! embedded on local files vs coordinator + 1 and 2 workers over S3 on loopback. Run with a
//! release build:
//!
//! ```sh
//! cargo build --release -p shardmerge -p shardmerge-tests
//! SHARDMERGE_BIN=$PWD/target/release/shardmerge GEN_FAMILY=$PWD/target/release/gen-family \
//!     cargo test -p shardmerge-tests --test s3_measure -- --ignored --nocapture
//! ```

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use shardmerge_tests::{ok, run_cli, shardmerge_bin, Cluster, S3Server};

#[test]
#[ignore = "a measurement; run by hand (see the module docs)"]
fn measure_ties_embedded_vs_s3_workers() {
    let gen = std::env::var_os("GEN_FAMILY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_gen-family")));
    let bin = shardmerge_bin!();
    let work = tempfile::tempdir().expect("tempdir");
    let models = work.path().join("models");
    let st = Command::new(&gen)
        .args(["--out", models.to_str().unwrap()])
        .args([
            "--hidden",
            "1024",
            "--intermediate",
            "2816",
            "--layers",
            "4",
            "--heads",
            "8",
        ])
        .args([
            "--kv-heads",
            "8",
            "--vocab",
            "8000",
            "--dtype",
            "bf16",
            "--seed",
            "0",
        ])
        .args(["--models", "base,instruct,lang_eu,lang_ca"])
        .status()
        .expect("gen-family");
    assert!(st.success());
    let recipe = |root: &str| {
        format!(
            "merge_method: ties\nbase_model: {root}/base\nmodels:\n- model: {root}/instruct\n  parameters: {{weight: 1.0, density: 0.5}}\n- model: {root}/lang_eu\n  parameters: {{weight: 0.7, density: 0.5}}\n- model: {root}/lang_ca\n  parameters: {{weight: 0.7, density: 0.5}}\n"
        )
    };
    std::fs::write(work.path().join("local.yml"), recipe("models")).unwrap();
    let s3 = S3Server::shared();
    s3.create_bucket("measure", true);
    let b = s3.bucket("measure");
    for m in ["base", "instruct", "lang_eu", "lang_ca"] {
        b.upload_dir(&models.join(m), &format!("models/{m}"));
    }
    std::fs::write(work.path().join("s3.yml"), recipe("s3://measure/models")).unwrap();

    let t = Instant::now();
    ok(
        &run_cli(
            &bin,
            &s3.env(),
            work.path(),
            &["run", "local.yml", "out-local", "-q"],
        ),
        "embedded run",
    );
    let embedded = t.elapsed();
    let mut rows = vec![("embedded, local files, 2 slots".to_string(), embedded)];
    for workers in [1usize, 2] {
        let cluster = Cluster::start(&bin, s3.env(), 30.0, workers);
        let out = format!("s3://measure/out-{workers}");
        let t = Instant::now();
        ok(
            &cluster.cli(
                work.path(),
                &[
                    "submit",
                    "s3.yml",
                    &out,
                    "--wait",
                    "--coordinator",
                    &cluster.url,
                ],
            ),
            "submit --wait",
        );
        rows.push((
            format!("coordinator + {workers} worker(s), S3 on loopback"),
            t.elapsed(),
        ));
    }
    let size = std::fs::metadata(models.join("base/model.safetensors"))
        .unwrap()
        .len();
    println!("\nties, base + 3, {} MB per model:", size / 1_000_000);
    for (what, d) in rows {
        println!("  {what:45} {:6.2} s", d.as_secs_f64());
    }
}
