//! A vocabulary merge run distributed: the `tokenizer:` case of tests/fixtures/vocab (union,
//! per-token sources, `force`) with its models in a bucket on a real S3 server, a coordinator
//! and three worker processes, gives the bytes of `shardmerge run` on the local copies, and the
//! same tokenizer files.

use shardmerge_tests::{
    checkpoint_files, fixtures, is_checkpoint_file, ok, run_cli, shardmerge_bin, Cluster, S3Server,
};

const CASE: &str = "tokens_task_arithmetic_bf16";
const MODELS: &[&str] = &["base", "instruct", "lang", "lang2"];

#[test]
fn tokenizer_case_on_s3_matches_embedded() {
    let vocab = fixtures().join("vocab");
    let s3 = S3Server::shared();
    let bin = shardmerge_bin!();
    s3.create_bucket("vocab", true);
    let bucket = s3.bucket("vocab");
    for m in MODELS {
        bucket.upload_dir(&vocab.join("models").join(m), &format!("models/{m}"));
    }
    let work = tempfile::tempdir().expect("tempdir");
    let local = work.path().join("local");
    let recipe = vocab.join("cases").join(CASE).join("config.yml");
    ok(
        &run_cli(
            &bin,
            &s3.env(),
            &vocab,
            &[
                "run",
                recipe.to_str().unwrap(),
                local.to_str().unwrap(),
                "-q",
            ],
        ),
        "shardmerge run",
    );
    let text = std::fs::read_to_string(&recipe).expect("recipe");
    let remote = text.replace("models/", "s3://vocab/models/");
    std::fs::write(work.path().join("recipe.yml"), remote).expect("write");
    let cluster = Cluster::start(&bin, s3.env(), 10.0, 3);
    let out = bucket.uri("out");
    ok(
        &cluster.cli(
            work.path(),
            &[
                "submit",
                "recipe.yml",
                &out,
                "--coordinator",
                &cluster.url,
                "--wait",
            ],
        ),
        "shardmerge submit",
    );
    let mut want = checkpoint_files(&local);
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        want.insert(f.to_string(), std::fs::read(local.join(f)).expect(f));
    }
    let names: Vec<String> = bucket
        .list("out")
        .into_iter()
        .filter(|n| is_checkpoint_file(n) || n.starts_with("tokenizer"))
        .collect();
    assert_eq!(names, want.keys().cloned().collect::<Vec<_>>());
    for (name, bytes) in &want {
        let got = bucket
            .get(&format!("out/{name}"))
            .unwrap_or_else(|| panic!("out/{name} missing"));
        assert!(got == *bytes, "{name}: bytes differ from the embedded run");
    }
    let cfg: serde_json::Value = serde_json::from_slice(&want["config.json"]).expect("config.json");
    assert_eq!(cfg["vocab_size"], 299);
}
