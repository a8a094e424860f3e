//! Access control, TLS and the path policy, tried against real processes: a coordinator and
//! workers of the `shardmerge` program, the CLI clients, a real S3 server for the policy.
//! Certificates are made at run time (rcgen): a CA, a server certificate for
//! localhost/127.0.0.1, a client certificate.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use shardmerge_tests::{
    block_on, fixtures, free_port, ok, pb, run_cli, shardmerge_bin, Cluster, S3Server,
};
use shardmerge_worker::client::{self, ClientOptions, Token};
use tonic::Code;

const MAIN: &str = "main-0123456789abcdef0123456789abcdef";
const WORKER: &str = "worker-0123456789abcdef0123456789abcdef";
const WRONG: &str = "wrong-0123456789abcdef0123456789abcdef";

fn golden() -> PathBuf {
    fixtures().join("golden")
}

/// Files of one test: tokens, certificates.
struct Secrets {
    dir: tempfile::TempDir,
}

impl Secrets {
    fn new() -> Secrets {
        let s = Secrets {
            dir: tempfile::tempdir().expect("tempdir"),
        };
        for (name, t) in [("main", MAIN), ("worker", WORKER), ("wrong", WRONG)] {
            std::fs::write(s.path(name), format!("{t}\n")).expect("write token");
        }
        s
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn arg(&self, name: &str) -> String {
        self.path(name).to_str().expect("utf-8 path").to_string()
    }

    /// Writes ca.pem, server.pem/server.key (localhost, 127.0.0.1), client.pem/client.key and,
    /// from another CA, rogue.pem/rogue.key.
    fn certificates(&self) {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair,
        };
        let ca = |name: &str| {
            let mut p = CertificateParams::new(Vec::<String>::new()).expect("ca params");
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.distinguished_name.push(DnType::CommonName, name);
            let key = KeyPair::generate().expect("ca key");
            let cert = p.self_signed(&key).expect("ca cert");
            (cert.pem(), Issuer::new(p, key))
        };
        let leaf = |issuer: &Issuer<'_, KeyPair>, names: Vec<String>, usage| {
            let mut p = CertificateParams::new(names).expect("params");
            p.distinguished_name
                .push(DnType::CommonName, "shardmerge test");
            p.extended_key_usages = vec![usage];
            let key = KeyPair::generate().expect("key");
            let cert = p.signed_by(&key, issuer).expect("sign");
            (cert.pem(), key.serialize_pem())
        };
        let (ca_pem, issuer) = ca("shardmerge test CA");
        let (_, rogue_issuer) = ca("someone else's CA");
        std::fs::write(self.path("ca.pem"), ca_pem).expect("write");
        let server = leaf(
            &issuer,
            vec!["localhost".into(), "127.0.0.1".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let client = leaf(
            &issuer,
            vec!["worker".into()],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        let rogue = leaf(
            &rogue_issuer,
            vec!["worker".into()],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        for (name, (cert, key)) in [("server", server), ("client", client), ("rogue", rogue)] {
            std::fs::write(self.path(&format!("{name}.pem")), cert).expect("write");
            std::fs::write(self.path(&format!("{name}.key")), key).expect("write");
        }
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Asserts the command failed with exit 1 and its output holds `want`; returns the output.
fn fails(o: &Output, want: &str, what: &str) -> String {
    let t = text(o);
    assert_eq!(o.status.code(), Some(1), "{what} did not fail: {t}");
    assert!(t.contains(want), "{what}: expected `{want}` in:\n{t}");
    t
}

/// Waits for a child to exit within `limit`; kills it and fails when it does not.
fn exits_within(mut c: Child, limit: Duration, what: &str) -> Output {
    let start = Instant::now();
    loop {
        match c.try_wait() {
            Ok(Some(_)) => return c.wait_with_output().expect("output"),
            Ok(None) if start.elapsed() < limit => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = c.kill();
                let o = c.wait_with_output().expect("output");
                panic!("{what} still ran after {limit:?}: {}", text(&o));
            }
        }
    }
}

fn spawn(bin: &Path, args: &[&str], env: &[(&str, &str)]) -> Child {
    Command::new(bin)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.to_string(), v.to_string())))
        .env("RUST_LOG", "warn")
        .env_remove("SHARDMERGE_TOKEN")
        .env_remove("SHARDMERGE_TOKEN_FILE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start shardmerge")
}

fn options(token: Option<&str>) -> ClientOptions {
    ClientOptions {
        token: token.map(|t| Token::new(t, "test").expect("token")),
        ..Default::default()
    }
}

/// Calls every RPC of the coordinator with `token`; returns each RPC's name and code.
fn every_rpc(url: &str, token: Option<&str>) -> Vec<(&'static str, Code)> {
    let o = options(token);
    let url = url.to_string();
    block_on(async move {
        let mut c = client::connect(&url, &o).expect("client");
        let code = |r: Result<(), tonic::Status>| r.map_or_else(|s| s.code(), |_| Code::Ok);
        vec![
            (
                "SubmitJob",
                code(
                    c.submit_job(pb::SubmitJobRequest::default())
                        .await
                        .map(drop),
                ),
            ),
            (
                "GetJob",
                code(c.get_job(pb::GetJobRequest::default()).await.map(drop)),
            ),
            (
                "ListJobs",
                code(c.list_jobs(pb::ListJobsRequest {}).await.map(drop)),
            ),
            (
                "WatchJob",
                code(c.watch_job(pb::GetJobRequest::default()).await.map(drop)),
            ),
            (
                "CancelJob",
                code(
                    c.cancel_job(pb::CancelJobRequest::default())
                        .await
                        .map(drop),
                ),
            ),
            (
                "PollWork",
                code(c.poll_work(pb::PollWorkRequest::default()).await.map(drop)),
            ),
            (
                "RenewLease",
                code(
                    c.renew_lease(pb::RenewLeaseRequest::default())
                        .await
                        .map(drop),
                ),
            ),
            (
                "CompleteTask",
                code(
                    c.complete_task(pb::CompleteTaskRequest::default())
                        .await
                        .map(drop),
                ),
            ),
            (
                "FailTask",
                code(c.fail_task(pb::FailTaskRequest::default()).await.map(drop)),
            ),
        ]
    })
}

const WORKER_RPCS: [&str; 4] = ["PollWork", "RenewLease", "CompleteTask", "FailTask"];

/// With `--token-file`, every RPC without a token or with a wrong one is `Unauthenticated`;
/// the worker token passes only the worker RPCs; the main token passes all. The CLI clients
/// say what to do; a worker with a wrong token stops and says why; no token reaches the log.
#[test]
fn tokens_guard_every_rpc() {
    let bin = shardmerge_bin!();
    let s = Secrets::new();
    let (main, worker, wrong) = (s.arg("main"), s.arg("worker"), s.arg("wrong"));
    let cluster = Cluster::start_with(
        &bin,
        Vec::new(),
        10.0,
        0,
        &[
            "--token-file",
            &main,
            "--worker-token-file",
            &worker,
            "--allow-any",
        ],
    );
    let url = cluster.url.clone();
    for token in [None, Some(WRONG), Some(""), Some(&MAIN[..MAIN.len() - 1])] {
        let token = token.filter(|t| t.len() >= 16);
        for (rpc, code) in every_rpc(&url, token) {
            assert_eq!(code, Code::Unauthenticated, "{rpc} with {token:?}");
        }
    }
    for (rpc, code) in every_rpc(&url, Some(WORKER)) {
        if WORKER_RPCS.contains(&rpc) {
            assert!(
                !matches!(code, Code::Unauthenticated | Code::PermissionDenied),
                "{rpc} refused the worker token: {code:?}"
            );
        } else {
            assert_eq!(code, Code::PermissionDenied, "{rpc} with the worker token");
        }
    }
    for (rpc, code) in every_rpc(&url, Some(MAIN)) {
        assert!(
            !matches!(code, Code::Unauthenticated | Code::PermissionDenied),
            "{rpc} refused the main token: {code:?}"
        );
    }

    // the CLI clients
    let dir = cluster.dir.path();
    std::fs::write(
        dir.join("recipe.yml"),
        "merge_method: linear\nmodels:\n- model: a\n",
    )
    .expect("write");
    let none = cluster.cli(dir, &["status", "--coordinator", &url]);
    fails(&none, "requires a token", "status without a token");
    fails(
        &cluster.cli(
            dir,
            &["status", "--coordinator", &url, "--token-file", &wrong],
        ),
        "wrong token",
        "status with a wrong token",
    );
    let t = fails(
        &cluster.cli(
            dir,
            &[
                "submit",
                "recipe.yml",
                "out",
                "--coordinator",
                &url,
                "--token-file",
                &worker,
            ],
        ),
        "the worker token grants only",
        "submit with the worker token",
    );
    assert!(!t.contains(WORKER), "{t}");
    fails(
        &cluster.cli(
            dir,
            &[
                "cancel",
                "job-1",
                "--coordinator",
                &url,
                "--token-file",
                &worker,
            ],
        ),
        "the worker token grants only",
        "cancel with the worker token",
    );
    ok(
        &cluster.cli(
            dir,
            &["status", "--coordinator", &url, "--token-file", &main],
        ),
        "status with the main token",
    );
    // the token may come from the environment too
    let o = run_cli(
        &bin,
        &[("SHARDMERGE_TOKEN".to_string(), MAIN.to_string())],
        dir,
        &["status", "--coordinator", &url],
    );
    ok(&o, "status with SHARDMERGE_TOKEN");
    let o = run_cli(
        &bin,
        &[("SHARDMERGE_TOKEN_FILE".to_string(), main.clone())],
        dir,
        &["status", "--coordinator", &url],
    );
    ok(&o, "status with SHARDMERGE_TOKEN_FILE");

    // a worker whose token is refused stops at once and says why
    let w = spawn(
        &bin,
        &[
            "worker",
            "--coordinator",
            &url,
            "--threads",
            "1",
            "--token-file",
            &wrong,
        ],
        &[],
    );
    let o = exits_within(w, Duration::from_secs(20), "a worker with a wrong token");
    fails(&o, "refused this worker", "a worker with a wrong token");

    // a flood of unauthenticated calls: all refused, logged at a bounded rate with a note
    let flood = url.clone();
    let refused = block_on(async move {
        let mut c = client::connect(&flood, &options(None)).expect("client");
        let mut refused = 0;
        for _ in 0..3000 {
            let r = c.list_jobs(pb::ListJobsRequest {}).await;
            refused += usize::from(r.is_err_and(|s| s.code() == Code::Unauthenticated));
        }
        refused
    });
    assert_eq!(refused, 3000);

    // refusals are logged, tokens never
    let log = std::fs::read_to_string(dir.join("coordinator.log")).expect("coordinator log");
    assert!(log.contains("refused a call"), "{log}");
    let lines = log.lines().filter(|l| l.contains("refused a call")).count();
    assert!(
        lines <= 40,
        "{lines} refusal lines for 3000+ refused calls:\n{log}"
    );
    assert!(log.contains("further ones are counted"), "{log}");
    for t in [MAIN, WORKER, WRONG] {
        assert!(!log.contains(t), "a token reached the log:\n{log}");
    }
}

/// Without a token the coordinator serves loopback only; elsewhere it refuses to start unless
/// told `--insecure-no-auth`. Bad token files are refused with the file named.
#[test]
fn no_token_on_a_network_address_is_refused() {
    let bin = shardmerge_bin!();
    let s = Secrets::new();
    let port = free_port().to_string();
    let listen = format!("0.0.0.0:{port}");
    let c = spawn(
        &bin,
        &["coordinator", "--listen", &listen, "--allow-any"],
        &[],
    );
    let o = exits_within(c, Duration::from_secs(20), "a coordinator without a token");
    fails(&o, "refusing to serve", "a coordinator without a token");
    std::fs::write(s.path("short"), "abc\n").expect("write");
    let c = spawn(
        &bin,
        &[
            "coordinator",
            "--listen",
            "127.0.0.1:0",
            "--token-file",
            &s.arg("short"),
        ],
        &[],
    );
    let o = exits_within(
        c,
        Duration::from_secs(20),
        "a coordinator with a short token",
    );
    fails(&o, "at least 16 characters", "a short token");
    let c = spawn(
        &bin,
        &[
            "coordinator",
            "--listen",
            "127.0.0.1:0",
            "--worker-token-file",
            &s.arg("worker"),
        ],
        &[],
    );
    let o = exits_within(c, Duration::from_secs(20), "a worker token alone");
    fails(&o, "needs --token-file", "a worker token alone");
}

/// A TLS coordinator: plain-text clients fail clearly, an https client that does not trust its
/// CA fails, and workers and `submit` with the right CA (and token) complete a job.
#[test]
fn tls_coordinator_serves_https_only() {
    let bin = shardmerge_bin!();
    let s = Secrets::new();
    s.certificates();
    let out_dir = tempfile::tempdir().expect("tempdir");
    let golden = golden();
    let (cert, key, ca) = (s.arg("server.pem"), s.arg("server.key"), s.arg("ca.pem"));
    let main = s.arg("main");
    let env = vec![
        ("SHARDMERGE_TOKEN_FILE".to_string(), main.clone()),
        ("SHARDMERGE_TLS_CA".to_string(), ca.clone()),
    ];
    let mut cluster = Cluster::start_with(
        &bin,
        env,
        10.0,
        0,
        &[
            "--token-file",
            &main,
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--allow",
            golden.to_str().expect("utf-8"),
            "--allow",
            out_dir.path().to_str().expect("utf-8"),
        ],
    );
    let plain = cluster.url.clone();
    let https = plain.replace("http://", "https://");
    let dir = cluster.dir.path().to_path_buf();
    // plain text to a TLS coordinator
    let token_only = [("SHARDMERGE_TOKEN_FILE".to_string(), main.clone())];
    let t = fails(
        &run_cli(
            &bin,
            &token_only,
            &dir,
            &["status", "--coordinator", &plain],
        ),
        "use an https:// URL",
        "a plain-text client",
    );
    assert!(!t.contains(MAIN), "{t}");
    // https, but not trusting the coordinator's CA (the system roots only)
    let o = run_cli(
        &bin,
        &token_only,
        &dir,
        &["status", "--coordinator", &https],
    );
    assert_eq!(o.status.code(), Some(1), "untrusted CA: {}", text(&o));
    assert!(!text(&o).contains(MAIN), "{}", text(&o));
    // told from rustls' typed error, not from the message's words
    assert!(
        text(&o).contains("TLS with coordinator") && text(&o).contains("--tls-ca"),
        "untrusted CA: {}",
        text(&o)
    );
    // TLS options with an http:// URL are a mistake, not a silent downgrade
    fails(
        &cluster.cli(&dir, &["status", "--coordinator", &plain, "--tls-ca", &ca]),
        "use https://",
        "--tls-ca with http://",
    );
    // the right CA: workers and a client complete a job
    cluster.url = https.clone();
    // workers are given their own address (`Cluster::workers_via`): https too, or they refuse
    // the TLS options given with a plain URL and the job never runs
    cluster.workers_via(&https);
    cluster.add_worker();
    cluster.add_worker();
    let out = out_dir.path().join("out");
    let recipe = golden.join("cases/linear_soup/config.yml");
    ok(
        &cluster.cli(
            &golden,
            &[
                "submit",
                recipe.to_str().expect("utf-8"),
                out.to_str().expect("utf-8"),
                "--coordinator",
                &https,
                "--wait",
                "-q",
            ],
        ),
        "submit over TLS",
    );
    let v = ok(
        &cluster.cli(&dir, &["verify", out.to_str().expect("utf-8")]),
        "verify",
    );
    assert!(v.starts_with("ok:"), "{v}");
}

/// Mutual TLS: with `--tls-client-ca` the coordinator takes only clients whose certificate
/// its CA signed.
#[test]
fn mutual_tls_requires_a_client_certificate() {
    let bin = shardmerge_bin!();
    let s = Secrets::new();
    s.certificates();
    let ca = s.arg("ca.pem");
    let cluster = Cluster::start_with(
        &bin,
        Vec::new(),
        10.0,
        0,
        &[
            "--tls-cert",
            &s.arg("server.pem"),
            "--tls-key",
            &s.arg("server.key"),
            "--tls-client-ca",
            &ca,
            "--allow-any",
        ],
    );
    let https = cluster.url.replace("http://", "https://");
    let dir = cluster.dir.path();
    let status = |extra: &[&str]| {
        let mut a = vec!["status", "--coordinator", &https, "--tls-ca", &ca];
        a.extend_from_slice(extra);
        cluster.cli(dir, &a)
    };
    let o = status(&[]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "no client certificate: {}",
        text(&o)
    );
    let (rc, rk) = (s.arg("rogue.pem"), s.arg("rogue.key"));
    let o = status(&["--tls-client-cert", &rc, "--tls-client-key", &rk]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "a rogue certificate: {}",
        text(&o)
    );
    let (cc, ck) = (s.arg("client.pem"), s.arg("client.key"));
    let st = ok(
        &status(&["--tls-client-cert", &cc, "--tls-client-key", &ck]),
        "status with a client certificate",
    );
    assert!(st.contains("no jobs"), "{st}");
}

/// Submits the golden linear recipe with its models moved to `models` (URIs) and `output`
/// to the coordinator at `url`; returns the CLI's output.
fn submit_linear(cluster: &Cluster, url: &str, work: &Path, models: &str, output: &str) -> Output {
    let text = std::fs::read_to_string(golden().join("cases/linear_soup/config.yml"))
        .expect("read recipe")
        .replace("models/", &format!("{models}/"));
    std::fs::write(work.join("recipe.yml"), text).expect("write recipe");
    cluster.cli(
        work,
        &[
            "submit",
            "recipe.yml",
            output,
            "--coordinator",
            url,
            "--wait",
            "-q",
        ],
    )
}

/// A child process killed when the test ends, passed or not.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `--allow`: a job with an input or its output outside the prefixes is refused before any
/// storage is touched (no output object appears; the refusal reads the same whether the
/// outside model exists or not), a job inside runs, and a coordinator without `--allow`
/// refuses everything.
#[test]
fn jobs_outside_allow_are_refused_without_touching_storage() {
    let s3 = S3Server::shared();
    let bin = shardmerge_bin!();
    s3.create_bucket("policy", true);
    let b = s3.bucket("policy");
    for m in ["instruct", "lang_eu", "lang_ca"] {
        let src = golden().join("models").join(m);
        b.upload_dir(&src, &format!("allowed/models/{m}"));
        b.upload_dir(&src, &format!("private/models/{m}"));
    }
    let work = tempfile::tempdir().expect("tempdir");
    let cluster = Cluster::start_with(
        &bin,
        s3.env(),
        10.0,
        1,
        &[
            "--allow",
            "s3://policy/allowed",
            "--allow",
            work.path().to_str().expect("utf-8"),
        ],
    );
    let allowed = b.uri("allowed/models");
    // an input outside (it exists), the output inside
    let t = fails(
        &submit_linear(
            &cluster,
            &cluster.url,
            work.path(),
            &b.uri("private/models"),
            &b.uri("allowed/out1"),
        ),
        "outside the storage this coordinator may use",
        "an input outside --allow",
    );
    assert!(b.list("allowed/out1").is_empty(), "the refused job wrote");
    // the same refusal for a model that does not exist, and for another bucket
    let t2 = fails(
        &submit_linear(
            &cluster,
            &cluster.url,
            work.path(),
            &b.uri("nothing-here"),
            &b.uri("allowed/out1"),
        ),
        "outside the storage",
        "a missing input outside --allow",
    );
    let t3 = fails(
        &submit_linear(
            &cluster,
            &cluster.url,
            work.path(),
            "s3://no-such-bucket/x",
            &b.uri("allowed/out1"),
        ),
        "outside the storage",
        "an input in an unknown bucket",
    );
    let shape = |t: &str, uri: &str| t.replace(uri, "URI");
    assert_eq!(
        shape(&t, &b.uri("private/models")),
        shape(&t2, &b.uri("nothing-here")),
        "the refusal says whether the outside model exists"
    );
    assert_eq!(
        shape(&t, &b.uri("private/models")),
        shape(&t3, "s3://no-such-bucket/x")
    );
    // `..` does not climb out
    fails(
        &submit_linear(
            &cluster,
            &cluster.url,
            work.path(),
            &b.uri("allowed/../private/models"),
            &b.uri("allowed/out1"),
        ),
        "`..` segments are not allowed",
        "an S3 key with ..",
    );
    // the output outside: refused, nothing written there
    fails(
        &submit_linear(
            &cluster,
            &cluster.url,
            work.path(),
            &allowed,
            &b.uri("private/out"),
        ),
        "output `s3://policy/private/out` is outside",
        "an output outside --allow",
    );
    assert!(b.list("private/out").is_empty());
    // local paths outside, through `..` too
    fails(
        &submit_linear(
            &cluster,
            &cluster.url,
            work.path(),
            golden().join("models").to_str().expect("utf-8"),
            &b.uri("allowed/out1"),
        ),
        "outside the storage",
        "a local input outside --allow",
    );
    fails(
        &submit_linear(
            &cluster,
            &cluster.url,
            work.path(),
            &allowed,
            "../elsewhere",
        ),
        "output `../elsewhere` is outside",
        "a local output outside --allow through ..",
    );
    assert!(!work.path().join("../elsewhere").exists());
    // a local symlink out of the allowed folder
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(golden().join("models"), work.path().join("link"))
            .expect("symlink");
        fails(
            &submit_linear(
                &cluster,
                &cluster.url,
                work.path(),
                "link",
                &b.uri("allowed/out1"),
            ),
            "outside the storage",
            "a symlink out of an allowed folder",
        );
    }
    // inside: the job runs
    ok(
        &submit_linear(
            &cluster,
            &cluster.url,
            work.path(),
            &allowed,
            &b.uri("allowed/out1"),
        ),
        "a job inside --allow",
    );
    assert!(b
        .list("allowed/out1")
        .contains(&"model.safetensors.index.json".to_string()));

    // no --allow at all: every job is refused, and says how to allow
    let port = free_port();
    let mut c = Command::new(&bin);
    c.args(["coordinator", "--listen", &format!("127.0.0.1:{port}")])
        .envs(s3.env())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _closed = Killed(c.spawn().expect("start coordinator"));
    let closed = format!("http://127.0.0.1:{port}");
    let start = Instant::now();
    let t = loop {
        let o = submit_linear(
            &cluster,
            &closed,
            work.path(),
            &allowed,
            &b.uri("allowed/out2"),
        );
        let t = text(&o);
        if !t.contains("unreachable") || start.elapsed() > Duration::from_secs(20) {
            break o;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    fails(
        &t,
        "started without --allow",
        "a coordinator without --allow",
    );
    assert!(b.list("allowed/out2").is_empty());
}
