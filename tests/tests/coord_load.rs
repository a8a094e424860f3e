//! `coord-load` measures the coordinator's real path: every fake completion it sends is
//! accepted (a part receipt of the planned length and the zeros' checksums), and the job it
//! submits succeeds. Before its results carried a receipt, every one was refused and the job
//! failed after its retries, so the tool timed refusals. Audits (every task audited here, by
//! the second of its two simulated worker processes) are answered as a worker answers them,
//! with nothing written: the tool reported the range's length, every audit was refused and
//! the 70B job failed with 1,357 results refused.

use std::process::Command;

use shardmerge_tests::{family_and_linear_recipe, shardmerge_bin, Cluster};

#[test]
fn coord_load_completes_a_job_with_every_result_accepted() {
    let bin = shardmerge_bin!();
    let work = tempfile::tempdir().expect("tempdir");
    family_and_linear_recipe(work.path(), 2, 64);
    let cluster = Cluster::start_with(
        &bin,
        Vec::new(),
        30.0,
        0,
        &["--state", "memory", "--audit-fraction", "1"],
    );
    let out = work.path().join("out");
    let run = Command::new(env!("CARGO_BIN_EXE_coord-load"))
        .current_dir(work.path())
        .args([
            "--coordinator",
            &cluster.url,
            "--recipe",
            "r.yml",
            "--slots",
            "16",
        ])
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run coord-load");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "coord-load failed:\n{stdout}\n{stderr}\n{}",
        cluster.logs()
    );
    assert!(
        stdout.contains("state JOB_STATE_SUCCEEDED") && stdout.contains(", 0 refused)"),
        "{stdout}"
    );
    assert!(
        out.join("model.safetensors.index.json").exists() || out.join("model.safetensors").exists(),
        "no checkpoint in {}",
        out.display()
    );
}
