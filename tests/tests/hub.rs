//! Hugging Face model ids (`org/name[@revision]`) in recipes: read from a loopback server that
//! serves the Hub's resolve layout (every request redirected to a second path, as the Hub
//! redirects to signed CDN URLs; ranges honoured; bytes counted), and from a cache folder laid
//! out as `huggingface_hub` writes it. The output must be byte-identical to the same models
//! given as local paths, and planning must read only headers.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use shardmerge_tests::{checkpoint_files, ok, run_cli, shardmerge_bin};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const MODELS: [&str; 3] = ["base", "instruct", "lang_ca"];

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("examples")
        .join("models")
}

/// What the server saw.
#[derive(Default)]
struct Counters {
    /// Body bytes sent for `.safetensors` files.
    tensor_bytes: AtomicU64,
    /// Redirects the resolve path answered, and requests to the redirect target.
    resolves: AtomicU64,
    redirected: AtomicU64,
    /// GETs of the redirect target that carried a Range header.
    ranged: AtomicU64,
    /// A resolve request carried `Authorization: Bearer hf_test`.
    saw_token: AtomicBool,
    /// A redirect-target request carried an Authorization header.
    token_leaked: AtomicBool,
}

/// A tiny HTTP/1.1 server: `/{org}/{model}/resolve/{main|COMMIT}/{file}` answers 302 to
/// `http://localhost:PORT/cdn/{model}/{file}?sig=N` (a new signature each time, with `X-Repo-Commit`), which serves
/// `examples/models/{model}/{file}` honouring `Range` (or ignoring it, if `ignore_range`).
struct HubServer {
    port: u16,
    counters: Arc<Counters>,
}

impl HubServer {
    fn start(ignore_range: bool) -> HubServer {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        std::thread::spawn(move || {
            let sig = Arc::new(AtomicU64::new(0));
            for s in l.incoming().flatten() {
                let c = c.clone();
                let sig = sig.clone();
                std::thread::spawn(move || serve(s, port, &c, &sig, ignore_range));
            }
        });
        HubServer { port, counters }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

fn serve(s: TcpStream, port: u16, c: &Counters, sig: &AtomicU64, ignore_range: bool) {
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    let mut line = String::new();
    if r.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    let mut range: Option<(u64, u64)> = None;
    let mut auth: Option<String> = None;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
            break;
        }
        let (k, v) = h.split_once(':').unwrap_or((&h, ""));
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_string());
        if k == "range" {
            let (a, b) = v.strip_prefix("bytes=").unwrap().split_once('-').unwrap();
            range = Some((a.parse().unwrap(), b.parse().unwrap()));
        } else if k == "authorization" {
            auth = Some(v);
        }
    }
    let path = target.split('?').next().unwrap_or("").to_string();
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let reply = |w: &mut TcpStream, status: &str, headers: &[(String, String)], body: &[u8]| {
        let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let _ = w.write_all(head.as_bytes());
        if method != "HEAD" {
            let _ = w.write_all(body);
        }
    };
    if segs.len() >= 5 && segs[0] == "org" && segs[2] == "resolve" {
        if auth.as_deref() == Some("Bearer hf_test") {
            c.saw_token.store(true, Ordering::SeqCst);
        }
        if segs[3] != "main" && segs[3] != COMMIT {
            return reply(
                &mut w,
                "404 Not Found",
                &[("X-Error-Code".into(), "RevisionNotFound".into())],
                b"",
            );
        }
        let file = segs[4..].join("/");
        if !examples().join(segs[1]).join(&file).is_file() {
            return reply(
                &mut w,
                "404 Not Found",
                &[("X-Error-Code".into(), "EntryNotFound".into())],
                b"",
            );
        }
        c.resolves.fetch_add(1, Ordering::SeqCst);
        let n = sig.fetch_add(1, Ordering::SeqCst);
        // another origin (as the Hub's CDN is): the token must not follow the redirect
        let to = format!("http://localhost:{port}/cdn/{}/{file}?sig={n}", segs[1]);
        return reply(
            &mut w,
            "302 Found",
            &[
                ("Location".into(), to),
                ("X-Repo-Commit".into(), COMMIT.into()),
                ("Content-Length".into(), "0".into()),
            ],
            b"",
        );
    }
    if segs.len() >= 3 && segs[0] == "cdn" {
        c.redirected.fetch_add(1, Ordering::SeqCst);
        if auth.is_some() {
            c.token_leaked.store(true, Ordering::SeqCst);
        }
        let file = segs[2..].join("/");
        let Ok(data) = std::fs::read(examples().join(segs[1]).join(&file)) else {
            return reply(
                &mut w,
                "404 Not Found",
                &[("Content-Length".into(), "0".into())],
                b"",
            );
        };
        let counted = |n: usize| {
            if file.ends_with(".safetensors") && method != "HEAD" {
                c.tensor_bytes.fetch_add(n as u64, Ordering::SeqCst);
            }
        };
        match range {
            Some((a, b)) if !ignore_range => {
                c.ranged.fetch_add(1, Ordering::SeqCst);
                let end = (b + 1).min(data.len() as u64);
                let body = &data[a as usize..end as usize];
                counted(body.len());
                reply(
                    &mut w,
                    "206 Partial Content",
                    &[
                        ("Content-Length".into(), body.len().to_string()),
                        (
                            "Content-Range".into(),
                            format!("bytes {a}-{}/{}", end - 1, data.len()),
                        ),
                    ],
                    body,
                )
            }
            _ => {
                counted(data.len());
                reply(
                    &mut w,
                    "200 OK",
                    &[("Content-Length".into(), data.len().to_string())],
                    &data,
                )
            }
        }
    } else {
        let _ = r.read_to_end(&mut Vec::new());
        reply(
            &mut w,
            "404 Not Found",
            &[("Content-Length".into(), "0".into())],
            b"",
        )
    }
}

fn recipe(models: &[String]) -> String {
    format!(
        "merge_method: ties\nbase_model: {}\nmodels:\n  - model: {}\n    parameters: {{density: 0.5, weight: 1.0}}\n  - model: {}\n    parameters: {{density: 0.5, weight: 0.7}}\nparameters:\n  normalize: true\ndtype: bfloat16\ntokenizer_source: base\n",
        models[0], models[1], models[2]
    )
}

/// Runs `shardmerge run` in a fresh folder on `models`; returns the output's checkpoint files.
fn run_merge(
    models: &[String],
    env: &[(String, String)],
) -> (Output, std::collections::BTreeMap<String, Vec<u8>>) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("r.yml"), recipe(models)).unwrap();
    let out = run_cli(
        &shardmerge_bin!(),
        env,
        dir.path(),
        &["run", "r.yml", "out", "-q"],
    );
    let files = if out.status.success() {
        checkpoint_files(&dir.path().join("out"))
    } else {
        Default::default()
    };
    (out, files)
}

fn local_reference() -> std::collections::BTreeMap<String, Vec<u8>> {
    let models: Vec<String> = MODELS
        .iter()
        .map(|m| examples().join(m).to_string_lossy().into_owned())
        .collect();
    let (out, files) = run_merge(&models, &[]);
    ok(&out, "shardmerge run on local paths");
    files
}

fn hub_env(endpoint: &str, cache: &Path) -> Vec<(String, String)> {
    vec![
        ("HF_ENDPOINT".into(), endpoint.into()),
        ("HF_HUB_CACHE".into(), cache.to_string_lossy().into_owned()),
        ("HF_TOKEN".into(), "hf_test".into()),
    ]
}

#[test]
fn hub_ids_read_over_http_like_a_path() {
    let want = local_reference();
    assert!(!want.is_empty());
    let server = HubServer::start(false);
    let cache = tempfile::tempdir().unwrap();
    let ids: Vec<String> = MODELS.iter().map(|m| format!("org/{m}")).collect();
    let (out, got) = run_merge(&ids, &hub_env(&server.endpoint(), cache.path()));
    ok(&out, "shardmerge run on hub ids");
    assert_eq!(got, want, "hub output differs from the local-path output");
    let c = &server.counters;
    assert!(
        c.saw_token.load(Ordering::SeqCst),
        "HF_TOKEN not sent to the endpoint"
    );
    assert!(
        !c.token_leaked.load(Ordering::SeqCst),
        "HF_TOKEN sent to the redirect target"
    );
    // every read went through a fresh resolve redirect (none reused)
    assert_eq!(
        c.resolves.load(Ordering::SeqCst),
        c.redirected.load(Ordering::SeqCst)
    );
    assert!(c.ranged.load(Ordering::SeqCst) > 0);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("hf_test"));
}

#[test]
fn plan_on_hub_ids_reads_only_headers() {
    let server = HubServer::start(false);
    let cache = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<String> = MODELS.iter().map(|m| format!("org/{m}@main")).collect();
    std::fs::write(dir.path().join("r.yml"), recipe(&ids)).unwrap();
    let env = hub_env(&server.endpoint(), cache.path());
    let out = run_cli(&shardmerge_bin!(), &env, dir.path(), &["plan", "r.yml"]);
    ok(&out, "shardmerge plan on hub ids");
    let mut files = 0u64;
    let mut total = 0u64;
    for m in MODELS {
        for e in std::fs::read_dir(examples().join(m)).unwrap().flatten() {
            if e.file_name().to_string_lossy().ends_with(".safetensors") {
                files += 1;
                total += e.metadata().unwrap().len();
            }
        }
    }
    let read = server.counters.tensor_bytes.load(Ordering::SeqCst);
    eprintln!("plan read {read} bytes of {files} safetensors files totalling {total} bytes");
    assert!(read > 0);
    assert!(
        read <= files * 8 * 1024,
        "plan read {read} bytes of safetensors from the hub: more than headers ({files} files)"
    );
}

#[test]
fn a_200_answer_to_a_range_request_is_refused() {
    let server = HubServer::start(true);
    let cache = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<String> = MODELS.iter().map(|m| format!("org/{m}")).collect();
    std::fs::write(dir.path().join("r.yml"), recipe(&ids)).unwrap();
    let env = hub_env(&server.endpoint(), cache.path());
    let out = run_cli(&shardmerge_bin!(), &env, dir.path(), &["plan", "r.yml"]);
    assert!(
        !out.status.success(),
        "plan accepted a 200 answer to a range request"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("HTTP 200") && err.contains("Range"), "{err}");
}

/// Lays `examples/models/{m}` out as `huggingface_hub` caches `org/{m}`: `refs/main` holding
/// the commit, `snapshots/COMMIT/FILE` symlinks into `blobs/`.
fn write_cache(root: &Path, m: &str) {
    let repo = root.join(format!("models--org--{m}"));
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    let snap = repo.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::write(repo.join("refs/main"), COMMIT).unwrap();
    for e in std::fs::read_dir(examples().join(m)).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let data = std::fs::read(e.path()).unwrap();
        let blob = format!("{:08x}{}", crc32fast::hash(&data), data.len());
        std::fs::write(repo.join("blobs").join(&blob), &data).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{blob}"), snap.join(&name)).unwrap();
    }
}

#[test]
fn hub_ids_read_from_the_cache_like_a_path() {
    let want = local_reference();
    let cache = tempfile::tempdir().unwrap();
    for m in MODELS {
        write_cache(cache.path(), m);
    }
    // no server: any network read fails
    let dead = format!("http://127.0.0.1:{}", shardmerge_tests::free_port());
    let ids: Vec<String> = MODELS.iter().map(|m| format!("org/{m}")).collect();
    let mut env = hub_env(&dead, cache.path());
    env.push(("HF_HUB_OFFLINE".into(), "1".into()));
    let (out, got) = run_merge(&ids, &env);
    ok(&out, "shardmerge run on cached hub ids");
    assert_eq!(
        got, want,
        "cached hub output differs from the local-path output"
    );
}

#[test]
fn an_existing_local_folder_wins_over_a_hub_id() {
    let dir = tempfile::tempdir().unwrap();
    for m in MODELS {
        let to = dir.path().join("org").join(m);
        std::fs::create_dir_all(&to).unwrap();
        for e in std::fs::read_dir(examples().join(m)).unwrap().flatten() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
    let ids: Vec<String> = MODELS.iter().map(|m| format!("org/{m}")).collect();
    std::fs::write(dir.path().join("r.yml"), recipe(&ids)).unwrap();
    let dead = format!("http://127.0.0.1:{}", shardmerge_tests::free_port());
    let cache = tempfile::tempdir().unwrap();
    let env = hub_env(&dead, cache.path());
    let out = run_cli(
        &shardmerge_bin!(),
        &env,
        dir.path(),
        &["run", "r.yml", "out", "-q"],
    );
    ok(&out, "shardmerge run on local org/name folders");
    assert_eq!(checkpoint_files(&dir.path().join("out")), local_reference());
}

#[test]
fn distributed_workers_read_hub_ids_by_range() {
    let want = local_reference();
    let server = HubServer::start(false);
    let cache = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let ids: Vec<String> = MODELS.iter().map(|m| format!("org/{m}")).collect();
    std::fs::write(work.path().join("r.yml"), recipe(&ids)).unwrap();
    let allowed = work.path().to_string_lossy().into_owned();
    let cluster = shardmerge_tests::Cluster::start_with(
        &shardmerge_bin!(),
        hub_env(&server.endpoint(), cache.path()),
        10.0,
        2,
        &["--allow", "hf://org/", "--allow", &allowed],
    );
    let out = work.path().join("out").to_string_lossy().into_owned();
    ok(
        &cluster.cli(
            work.path(),
            &[
                "submit",
                "r.yml",
                &out,
                "--coordinator",
                &cluster.url,
                "--wait",
            ],
        ),
        "shardmerge submit on hub ids",
    );
    assert_eq!(checkpoint_files(&work.path().join("out")), want);
    assert!(server.counters.ranged.load(Ordering::SeqCst) > 0);
    assert!(!cluster.logs().contains("hf_test"), "the token was logged");
}
