//! Test support for the multi-process suites in `tests/`: a real S3 server on loopback (MinIO
//! when a `minio` binary is on PATH, otherwise Garage), a coordinator and worker processes of
//! the `shardmerge` program, fixtures and byte comparisons.
//!
//! When neither `minio` nor `garage` is installed the S3 suites fail with instructions: they
//! never pass without having run.
//!
//! `family` is the synthetic model family generator behind `gen-family`, `examples/`, `bench/`
//! and every suite's test models; `writer` is the one safetensors writer of the suites.

pub mod family;
#[cfg(test)]
mod family_tests;
pub mod memory;
pub mod proxy;
pub mod storage_suite;
pub mod writer;

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as OPath;
use object_store::{ObjectStore, PutPayload};

pub use shardmerge_proto as pb;
use shardmerge_worker::format::dtype::DType;
use shardmerge_worker::storage::local::OwnedDir;
use shardmerge_worker::storage::object::ObjectStorage;
use shardmerge_worker::storage::Storage;

/// The `shardmerge` program (this package's copy of it; see `Cargo.toml`). Expands to the path
/// cargo built for the calling test, unless `SHARDMERGE_BIN` names another build.
#[macro_export]
macro_rules! shardmerge_bin {
    () => {
        std::env::var_os("SHARDMERGE_BIN")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_BIN_EXE_shardmerge-it")))
    };
}

/// The fixtures folder of this package.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// A free TCP port on 127.0.0.1 (free when asked; the child binds it right after).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

fn wait_tcp(addr: SocketAddr, timeout: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    false
}

fn on_path(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo/bin"));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// Spawns `cmd` so that it dies with this process (Linux: parent-death signal), from a thread
/// that lives as long as the process (the signal follows the spawning thread).
fn spawn_tied(mut cmd: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<std::sync::mpsc::Sender<SpawnReq>>> = OnceLock::new();
    type SpawnReq = (Command, std::sync::mpsc::Sender<std::io::Result<Child>>);
    #[cfg(target_os = "linux")]
    // SAFETY: `pre_exec` runs the closure in the forked child before exec, where only
    // async-signal-safe calls are allowed. The closure makes one `prctl` system call (async-
    // signal-safe: no allocation, no locks) and touches no memory of the parent.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let tx = SPAWNER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<SpawnReq>();
        std::thread::spawn(move || {
            for (mut c, reply) in rx {
                let _ = reply.send(c.spawn());
            }
            loop {
                std::thread::park();
            }
        });
        Mutex::new(tx)
    });
    let (rtx, rrx) = std::sync::mpsc::channel();
    tx.lock()
        .unwrap_or_else(|p| p.into_inner())
        .send((cmd, rtx))
        .expect("spawner thread");
    rrx.recv().expect("spawner reply")
}

const ACCESS_KEY: &str = "GK0123456789abcdef01234567";
const SECRET_KEY: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const REGION: &str = "us-east-1";

/// A fresh folder for an S3 server's data under the system's temporary folder.
fn server_dir() -> Result<OwnedDir, String> {
    OwnedDir::new(&std::env::temp_dir(), "shardmerge-s3-test-")
        .map(|(d, _)| d)
        .map_err(|e| format!("a folder for the S3 server: {e}"))
}

/// A running S3 server on loopback.
pub struct S3Server {
    pub kind: &'static str,
    pub endpoint: String,
    /// Its data and logs: removed when the server is dropped, and by the next test process
    /// that starts a server when this one ends without dropping it (the shared server lives
    /// in a static, which is never dropped: each test binary left up to 600 MB behind).
    dir: OwnedDir,
    child: Mutex<Child>,
    garage: Option<(PathBuf, PathBuf)>,
    /// How the server process was started (program, arguments, environment, log name), to
    /// start it again after [`S3Server::stop`].
    launch: Launch,
}

struct Launch {
    bin: PathBuf,
    args: Vec<std::ffi::OsString>,
    env: Vec<(&'static str, String)>,
    log: &'static str,
}

impl Launch {
    fn spawn(&self, dir: &Path) -> std::io::Result<Child> {
        let mut cmd = Command::new(&self.bin);
        cmd.args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .stderr(append_log(dir, self.log));
        spawn_tied(cmd)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let mut c = self.child.lock().unwrap_or_else(|p| p.into_inner());
        let _ = c.kill();
        let _ = c.wait();
    }
}

const NO_SERVER: &str =
    "no S3 server binary for the S3 tests: install MinIO (put `minio` on PATH: \
https://min.io/docs/minio/linux/index.html) or Garage (`cargo install --locked garage \
--no-default-features --features bundled-libs,lmdb`), then run the tests again";

impl S3Server {
    /// The server shared by every test of this process (started on first use).
    pub fn shared() -> &'static S3Server {
        static S: OnceLock<S3Server> = OnceLock::new();
        S.get_or_init(|| match S3Server::start() {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        })
    }

    pub fn start() -> Result<S3Server, String> {
        if let Some(minio) = on_path("minio") {
            return Self::start_minio(&minio);
        }
        if let Some(garage) = on_path("garage") {
            return Self::start_garage(&garage);
        }
        Err(NO_SERVER.to_string())
    }

    fn start_minio(bin: &Path) -> Result<S3Server, String> {
        let dir = server_dir()?;
        let (port, console) = (free_port(), free_port());
        let launch = Launch {
            bin: bin.to_path_buf(),
            args: vec![
                "server".into(),
                dir.path().join("data").into(),
                "--address".into(),
                format!("127.0.0.1:{port}").into(),
                "--console-address".into(),
                format!("127.0.0.1:{console}").into(),
            ],
            env: vec![
                ("MINIO_ROOT_USER", ACCESS_KEY.to_string()),
                ("MINIO_ROOT_PASSWORD", SECRET_KEY.to_string()),
            ],
            log: "minio.log",
        };
        let child = launch
            .spawn(dir.path())
            .map_err(|e| format!("{}: {e}", bin.display()))?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let s = S3Server {
            kind: "minio",
            endpoint: format!("http://127.0.0.1:{port}"),
            dir,
            child: Mutex::new(child),
            garage: None,
            launch,
        };
        if !wait_tcp(addr, Duration::from_secs(20)) {
            return Err(format!("minio did not start: {}", s.log("minio.log")));
        }
        Ok(s)
    }

    fn start_garage(bin: &Path) -> Result<S3Server, String> {
        let dir = server_dir()?;
        let (rpc, s3) = (free_port(), free_port());
        let secret: String = (0..32)
            .map(|i| format!("{:02x}", (i * 37 + std::process::id() as usize) % 256))
            .collect();
        let cfg = dir.path().join("garage.toml");
        std::fs::write(
            &cfg,
            format!(
                "metadata_dir = \"{m}\"\ndata_dir = \"{d}\"\ndb_engine = \"lmdb\"\n\
                 replication_factor = 1\nrpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{secret}\"\n\
                 [s3_api]\ns3_region = \"{REGION}\"\napi_bind_addr = \"127.0.0.1:{s3}\"\n\
                 root_domain = \".s3.garage.localhost\"\n",
                m = dir.path().join("meta").display(),
                d = dir.path().join("data").display(),
            ),
        )
        .map_err(|e| e.to_string())?;
        let launch = Launch {
            bin: bin.to_path_buf(),
            args: vec!["-c".into(), cfg.clone().into(), "server".into()],
            env: vec![("RUST_LOG", "warn".to_string())],
            log: "garage.log",
        };
        let child = launch
            .spawn(dir.path())
            .map_err(|e| format!("{}: {e}", bin.display()))?;
        let s = S3Server {
            kind: "garage",
            endpoint: format!("http://127.0.0.1:{s3}"),
            dir,
            child: Mutex::new(child),
            garage: Some((bin.to_path_buf(), cfg)),
            launch,
        };
        // The CLI talks to the node over RPC, which opens some time after the process starts
        // (`node id` can answer from the key file before it does): wait for the RPC port, then
        // retry every set-up step until it succeeds or the deadline passes.
        let rpc_addr: SocketAddr = format!("127.0.0.1:{rpc}").parse().expect("addr");
        if !wait_tcp(rpc_addr, Duration::from_secs(30)) {
            return Err(format!(
                "garage RPC port did not open: {}",
                s.log("garage.log")
            ));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let node = s.garage_retry(&["node", "id", "-q"], deadline)?;
        let node = node.trim().split('@').next().unwrap_or("").to_string();
        s.garage_retry(
            &["layout", "assign", "-z", "dc1", "-c", "1G", &node],
            deadline,
        )?;
        s.garage_retry(&["layout", "apply", "--version", "1"], deadline)?;
        s.garage_retry(
            &[
                "key", "import", "--yes", "-n", "test", ACCESS_KEY, SECRET_KEY,
            ],
            deadline,
        )?;
        let addr: SocketAddr = format!("127.0.0.1:{s3}").parse().expect("addr");
        if !wait_tcp(addr, Duration::from_secs(20)) {
            return Err(format!(
                "garage S3 API did not open: {}",
                s.log("garage.log")
            ));
        }
        Ok(s)
    }

    /// Kills the server process at once (SIGKILL); its data stays for [`S3Server::resume`].
    pub fn stop(&self) {
        let mut c = self.child.lock().unwrap_or_else(|p| p.into_inner());
        let _ = c.kill();
        let _ = c.wait();
    }

    /// Starts the server again after [`S3Server::stop`], on the same address over the same
    /// data, and waits until its S3 API answers.
    pub fn resume(&self) -> Result<(), String> {
        let child = self
            .launch
            .spawn(self.dir.path())
            .map_err(|e| e.to_string())?;
        *self.child.lock().unwrap_or_else(|p| p.into_inner()) = child;
        let addr: SocketAddr = self
            .endpoint
            .trim_start_matches("http://")
            .parse()
            .map_err(|e| format!("{}: {e}", self.endpoint))?;
        if !wait_tcp(addr, Duration::from_secs(30)) {
            return Err(format!(
                "{} did not come back: {}",
                self.kind,
                self.log(self.launch.log)
            ));
        }
        Ok(())
    }

    /// `garage_cli`, retried every 200 ms until it succeeds or `deadline` passes. Every step
    /// used with it is idempotent or fails harmlessly when repeated after a success.
    fn garage_retry(&self, args: &[&str], deadline: Instant) -> Result<String, String> {
        loop {
            match self.garage_cli(args) {
                Ok(out) => return Ok(out),
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!(
                        "garage did not become ready: {e}\n{}",
                        self.log("garage.log")
                    ))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    fn garage_cli(&self, args: &[&str]) -> Result<String, String> {
        let (bin, cfg) = self.garage.as_ref().expect("garage");
        let out = Command::new(bin)
            .arg("-c")
            .arg(cfg)
            .args(args)
            .env("RUST_LOG", "warn")
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "garage {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    /// Creates a bucket the test key may read and write (`writable: false`: read only).
    pub fn create_bucket(&self, name: &str, writable: bool) {
        if self.garage.is_some() {
            let deadline = Instant::now() + Duration::from_secs(20);
            match self.garage_retry(&["bucket", "create", name], deadline) {
                Ok(_) => {}
                // an earlier try that succeeded on the server but not for us
                Err(e) if e.contains("already exists") => {}
                Err(e) => panic!("{e}"),
            }
            let mut args = vec!["bucket", "allow", "--read"];
            if writable {
                args.extend(["--write", "--owner"]);
            }
            args.extend([name, "--key", "test"]);
            self.garage_retry(&args, deadline)
                .unwrap_or_else(|e| panic!("{e}"));
        } else {
            // MinIO: the root user may do everything; a read-only bucket is not modelled
            assert!(writable, "read-only buckets are only set up on Garage");
            if let Some(mc) = on_path("mc") {
                let alias = format!("sm{}", std::process::id());
                let ok = Command::new(&mc)
                    .args([
                        "alias",
                        "set",
                        &alias,
                        &self.endpoint,
                        ACCESS_KEY,
                        SECRET_KEY,
                    ])
                    .output()
                    .is_ok_and(|o| o.status.success())
                    && Command::new(&mc)
                        .args(["mb", &format!("{alias}/{name}")])
                        .output()
                        .is_ok_and(|o| o.status.success());
                assert!(ok, "mc mb {name} failed");
            } else {
                std::fs::create_dir_all(self.dir.path().join("data").join(name))
                    .expect("create bucket folder");
            }
        }
    }

    /// The AWS_* environment that points `shardmerge` at this server.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", self.endpoint.as_str()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
            ("AWS_REGION", REGION),
            ("AWS_ALLOW_HTTP", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// Client settings for this server (endpoint, credentials, region), without a bucket.
    fn client(&self) -> AmazonS3Builder {
        AmazonS3Builder::new()
            .with_endpoint(&self.endpoint)
            .with_allow_http(true)
            .with_access_key_id(ACCESS_KEY)
            .with_secret_access_key(SECRET_KEY)
            .with_region(REGION)
    }

    /// One bucket as the workers see it: shardmerge's own S3 storage.
    pub fn storage(&self, bucket: &str) -> Arc<dyn Storage> {
        Arc::new(ObjectStorage::s3(bucket, self.client()).expect("S3 storage"))
    }

    /// A client for one bucket, for the test itself.
    pub fn bucket(&self, name: &str) -> Bucket {
        let s3 = self
            .client()
            .with_bucket_name(name)
            .with_virtual_hosted_style_request(false)
            .build()
            .expect("S3 client");
        Bucket {
            name: name.to_string(),
            s3: Arc::new(s3),
        }
    }
}

/// `dir/name` opened for appending (a restarted process adds to its log), or nowhere.
fn append_log(dir: &Path, name: &str) -> Stdio {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(name))
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::null())
}

fn log_file(dir: &Path, name: &str) -> Stdio {
    std::fs::File::create(dir.join(name))
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::null())
}

/// One bucket, seen from the test.
pub struct Bucket {
    pub name: String,
    s3: Arc<AmazonS3>,
}

fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime")
    })
}

/// Runs a future to completion on the harness runtime.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    rt().block_on(f)
}

impl Bucket {
    pub fn uri(&self, key: &str) -> String {
        format!("s3://{}/{}", self.name, key)
    }

    pub fn put(&self, key: &str, data: Vec<u8>) {
        block_on(self.s3.put(&OPath::from(key), PutPayload::from(data)))
            .unwrap_or_else(|e| panic!("put {key}: {e}"));
    }

    /// Uploads every file under `dir` to `prefix/`.
    pub fn upload_dir(&self, dir: &Path, prefix: &str) {
        for e in std::fs::read_dir(dir).expect("read fixture dir") {
            let e = e.expect("entry");
            if e.path().is_file() {
                let name = e.file_name().to_string_lossy().into_owned();
                self.put(
                    &format!("{prefix}/{name}"),
                    std::fs::read(e.path()).expect("read fixture"),
                );
            }
        }
    }

    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        match block_on(async { self.s3.get(&OPath::from(key)).await?.bytes().await }) {
            Ok(b) => Some(b.to_vec()),
            Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => panic!("get {key}: {e}"),
        }
    }

    /// The objects under `prefix/` (names relative to it) and their bytes, less a job's claim
    /// object (`.shardmerge-claim.NONCE`: the output's lock, not part of the checkpoint; a
    /// cancelled job may still be deleting it when the listing is taken).
    pub fn output_objects(&self, prefix: &str) -> BTreeMap<String, Vec<u8>> {
        self.list(prefix)
            .into_iter()
            .filter(|n| !n.starts_with(".shardmerge-claim"))
            .map(|n| {
                let data = self.get(&format!("{prefix}/{n}")).expect("object listed");
                (n, data)
            })
            .collect()
    }

    /// Names (relative to `prefix/`) of the objects under `prefix`.
    pub fn list(&self, prefix: &str) -> Vec<String> {
        use futures::TryStreamExt;
        let p = OPath::from(prefix);
        let items: Vec<_> = block_on(self.s3.list(Some(&p)).try_collect::<Vec<_>>())
            .unwrap_or_else(|e| panic!("list {prefix}: {e}"));
        let mut names: Vec<String> = items
            .into_iter()
            .map(|m| {
                m.location
                    .to_string()
                    .trim_start_matches(prefix)
                    .trim_start_matches('/')
                    .to_string()
            })
            .collect();
        names.sort();
        names
    }
}

/// Starts `shardmerge coordinator` on 127.0.0.1:`port` and waits until it listens. Its log is
/// `coordinator.log`, or `coordinator.<n>.log` for the `n`-th restart.
fn spawn_coordinator(
    bin: &Path,
    env: &[(String, String)],
    dir: &Path,
    port: u16,
    lease_ttl: f64,
    args: &[String],
    restart: usize,
) -> Child {
    let mut cmd = Command::new(bin);
    let log = if restart == 0 {
        "coordinator.log".to_string()
    } else {
        format!("coordinator.{restart}.log")
    };
    // jobs may use any path unless the test says otherwise (the coordinator's own default
    // refuses every job without --allow)
    let policy: &[&str] = if args.iter().any(|a| a.starts_with("--allow")) {
        &[]
    } else {
        &["--allow-any"]
    };
    // the audit sample fixed, so a run replays (docs/security.md, "Result audits")
    let seed: &[&str] = if args.iter().any(|a| a == "--audit-seed") {
        &[]
    } else {
        &["--audit-seed", "1"]
    };
    cmd.args(["coordinator", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--lease-ttl", &lease_ttl.to_string()])
        .args(args)
        .args(seed)
        .args(policy)
        .envs(env.iter().cloned())
        .env("RUST_LOG", "shardmerge=info,warn")
        .stdout(Stdio::null())
        .stderr(log_file(dir, &log));
    let child = spawn_tied(cmd).expect("start coordinator");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    assert!(
        wait_tcp(addr, Duration::from_secs(30)),
        "coordinator did not listen on {addr}"
    );
    child
}

/// A coordinator and its workers, as processes of the `shardmerge` program.
pub struct Cluster {
    pub bin: PathBuf,
    pub url: String,
    pub env: Vec<(String, String)>,
    pub dir: tempfile::TempDir,
    coordinator: Child,
    /// How the coordinator was started, to start it again.
    coordinator_cmd: (u16, f64, Vec<String>),
    restarts: usize,
    workers: Vec<Option<Child>>,
    /// The coordinator address workers are given (`url` unless [`Cluster::workers_via`]).
    worker_url: String,
}

impl Cluster {
    /// Starts a coordinator with `lease_ttl` seconds and `workers` workers of one thread.
    pub fn start(
        bin: &Path,
        env: Vec<(String, String)>,
        lease_ttl: f64,
        workers: usize,
    ) -> Cluster {
        Self::start_with(bin, env, lease_ttl, workers, &[])
    }

    /// `start`, passing `coordinator_args` to the coordinator too.
    pub fn start_with(
        bin: &Path,
        env: Vec<(String, String)>,
        lease_ttl: f64,
        workers: usize,
        coordinator_args: &[&str],
    ) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let args: Vec<String> = coordinator_args.iter().map(|a| a.to_string()).collect();
        let coordinator = spawn_coordinator(bin, &env, dir.path(), port, lease_ttl, &args, 0);
        let mut c = Cluster {
            bin: bin.to_path_buf(),
            url: format!("http://127.0.0.1:{port}"),
            env,
            dir,
            coordinator,
            coordinator_cmd: (port, lease_ttl, args),
            restarts: 0,
            workers: Vec::new(),
            worker_url: format!("http://127.0.0.1:{port}"),
        };
        for _ in 0..workers {
            c.add_worker();
        }
        c
    }

    /// Workers started from now on reach the coordinator at `url` (a proxy in front of it).
    pub fn workers_via(&mut self, url: &str) {
        self.worker_url = url.to_string();
    }

    /// The coordinator's address (`host:port`), for a proxy in front of it.
    pub fn coordinator_addr(&self) -> String {
        self.url.trim_start_matches("http://").to_string()
    }

    /// Starts one more worker; returns its index.
    pub fn add_worker(&mut self) -> usize {
        self.add_worker_logging(Some("warn"))
    }

    /// Starts one more worker with `RUST_LOG` set to `rust_log` (`None`: unset, the worker's
    /// default levels); its log is `self.log(&format!("worker{i}.log"))`. Returns its index.
    pub fn add_worker_logging(&mut self, rust_log: Option<&str>) -> usize {
        let i = self.workers.len();
        let mut cmd = Command::new(&self.bin);
        cmd.args([
            "worker",
            "--coordinator",
            &self.worker_url,
            "--threads",
            "1",
        ])
        .args(["--memory-limit", "256MiB", "--id", &format!("w{i}")])
        .envs(self.env.iter().cloned());
        match rust_log {
            Some(l) => cmd.env("RUST_LOG", l),
            None => cmd.env_remove("RUST_LOG"),
        };
        cmd.stdout(Stdio::null())
            .stderr(log_file(self.dir.path(), &format!("worker{i}.log")));
        self.workers
            .push(Some(spawn_tied(cmd).expect("start worker")));
        i
    }

    /// Starts the hostile worker program `bin` (`tests/src/bin/hostile_worker.rs`; a test has
    /// it as `env!("CARGO_BIN_EXE_hostile-worker")`) against this coordinator with `args`
    /// (`--id`, `--lie-fraction`, `--seed`, `--mode`, ...); its log is `worker{i}.log`.
    /// Returns its index among the workers (`kill_worker`, `wait_worker` take it).
    pub fn add_hostile_worker(&mut self, bin: &Path, args: &[&str]) -> usize {
        let i = self.workers.len();
        let mut cmd = Command::new(bin);
        cmd.args(["--coordinator", &self.worker_url])
            .args(args)
            .envs(self.env.iter().cloned())
            .stdout(Stdio::null())
            .stderr(log_file(self.dir.path(), &format!("worker{i}.log")));
        self.workers
            .push(Some(spawn_tied(cmd).expect("start hostile worker")));
        i
    }

    /// Kills the coordinator at once (SIGKILL: nothing saved on the way out) and starts it
    /// again on the same address with the same arguments; returns once it listens.
    pub fn restart_coordinator(&mut self) {
        let _ = self.coordinator.kill();
        let _ = self.coordinator.wait();
        self.restarts += 1;
        let (port, ttl, args) = self.coordinator_cmd.clone();
        self.coordinator = spawn_coordinator(
            &self.bin,
            &self.env,
            self.dir.path(),
            port,
            ttl,
            &args,
            self.restarts,
        );
    }

    /// The coordinator's process id (to read its memory).
    pub fn coordinator_pid(&self) -> u32 {
        self.coordinator.id()
    }

    /// Kills worker `i` at once (SIGKILL: no goodbye, its leases must expire).
    pub fn kill_worker(&mut self, i: usize) {
        if let Some(mut c) = self.workers[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The process id of worker `i`, while it runs (to send it a signal).
    pub fn worker_pid(&self, i: usize) -> Option<u32> {
        self.workers.get(i)?.as_ref().map(Child::id)
    }

    /// Waits (at most `timeout`) for worker `i` to exit; its exit status, if it did.
    pub fn wait_worker(&mut self, i: usize, timeout: Duration) -> Option<std::process::ExitStatus> {
        let c = self.workers.get_mut(i)?.as_mut()?;
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Runs `shardmerge ARGS` in `cwd` with the S3 environment; returns its output.
    pub fn cli(&self, cwd: &Path, args: &[&str]) -> Output {
        run_cli(&self.bin, &self.env, cwd, args)
    }

    /// The whole of log `name` (`coordinator.log`, `worker0.log`, ...).
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    /// The coordinator's and workers' logs, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        let mut names: Vec<_> = std::fs::read_dir(self.dir.path())
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        names.sort();
        for p in names {
            if p.extension().is_some_and(|e| e == "log") {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                let tail: String = text
                    .lines()
                    .rev()
                    .take(30)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n");
                s.push_str(&format!("--- {}\n{tail}\n", p.display()));
            }
        }
        s
    }

    /// The coordinator's view of a job.
    pub fn job(&self, id: &str) -> pb::JobStatus {
        let url = self.url.clone();
        let id = id.to_string();
        block_on(async move {
            let mut c = shardmerge_worker::client::client(&url).expect("client");
            c.get_job(pb::GetJobRequest { job_id: id })
                .await
                .expect("GetJob")
                .into_inner()
        })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        for w in self.workers.iter_mut().flatten() {
            let _ = w.kill();
            let _ = w.wait();
        }
        let _ = self.coordinator.kill();
        let _ = self.coordinator.wait();
    }
}

/// Runs the `shardmerge` program to completion.
pub fn run_cli(bin: &Path, env: &[(String, String)], cwd: &Path, args: &[&str]) -> Output {
    Command::new(bin)
        .args(args)
        .current_dir(cwd)
        .envs(env.iter().cloned())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", bin.display()))
}

/// Asserts a command succeeded, showing its output when not.
pub fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The files that make a checkpoint's bytes (weights and index), by name.
pub fn checkpoint_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut m = BTreeMap::new();
    for e in std::fs::read_dir(dir).expect("read output dir").flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if is_checkpoint_file(&name) {
            m.insert(name, std::fs::read(e.path()).expect("read output"));
        }
    }
    m
}

pub fn is_checkpoint_file(name: &str) -> bool {
    name.ends_with(".safetensors")
        || name == "model.safetensors.index.json"
        || name == "config.json"
}

/// Two models of [`generate_family`] (`dir/m0`, `dir/m1`) and `dir/r.yml`, a linear recipe
/// averaging them.
pub fn family_and_linear_recipe(dir: &Path, layers: usize, hidden: u64) {
    generate_family(dir, 2, layers, hidden);
    std::fs::write(
        dir.join("r.yml"),
        "merge_method: linear\nmodels:\n- model: m0\n  parameters:\n    weight: 0.5\n- model: m1\n  parameters:\n    weight: 0.5\n",
    )
    .expect("recipe");
}

/// A family of `n` models of `layers` Llama-style layers (four `hidden`-square projections
/// each, then a norm), float32, under `dir/m{i}`: the values of [`family`]'s generator for
/// models named `m{i}`.
pub fn generate_family(dir: &Path, n: usize, layers: usize, hidden: u64) -> Vec<PathBuf> {
    use family::{Kind, TensorSpec};
    let mut tensors = Vec::new();
    for l in 0..layers {
        for p in [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ] {
            tensors.push(TensorSpec {
                name: format!("model.layers.{l}.{p}.weight"),
                shape: vec![hidden, hidden],
                kind: Kind::Weight,
            });
        }
    }
    tensors.push(TensorSpec {
        name: "model.norm.weight".into(),
        shape: vec![hidden],
        kind: Kind::Norm,
    });
    let spec = family::FamilySpec {
        hidden,
        intermediate: hidden,
        layers: layers as u64,
        heads: 1,
        kv_heads: 1,
        vocab: 0,
        dtype: DType::F32,
        seed: 1,
        rms_norm_eps: 1e-5,
    };
    (0..n)
        .map(|i| {
            let d = dir.join(format!("m{i}"));
            family::write_tensors(&spec, &format!("m{i}"), &tensors, &d, None, 1)
                .expect("write model");
            d
        })
        .collect()
}

/// GET http://127.0.0.1:PORT/PATH (a metrics or probe endpoint): (status code, body).
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect to the metrics port");
    c.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    std::io::Write::write_all(&mut c, req.as_bytes()).expect("send");
    let mut text = String::new();
    std::io::Read::read_to_string(&mut c, &mut text).expect("read");
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (code, body)
}
