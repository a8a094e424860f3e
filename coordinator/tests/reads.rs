//! Read once, counted truthfully: a storage wrapper counts the tensor bytes a merge really
//! reads; every method reads each input byte at most 1.25 times, whether its tensors stay
//! whole (default flags) or are cut into statistics units (small tasks and slots: the later
//! passes and the writes read the row cache), and `plan`, the run's status and the count agree
//! within 1%, in all and for each input (each model folder: the store it is read from).

mod common;

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use common::*;
use shardmerge::embedded::{self, RunOptions};
use shardmerge::job::SubmitOptions;
use shardmerge::planinfo;
use shardmerge_worker::storage::{Receipt, Resolver, SResult, Storage, Upload};

/// Counts the bytes of range reads of safetensors data: planning reads each file's first 8
/// bytes and its header (ranges starting at 0 and 8); every read starting further on is data.
/// With `by_folder`, also by the folder of the file read (a model's location).
#[derive(Debug)]
struct DataReads {
    inner: Arc<dyn Storage>,
    n: Arc<AtomicU64>,
    by_folder: Option<Arc<Mutex<BTreeMap<String, u64>>>>,
}

impl DataReads {
    fn count(&self, path: &str, range: &Range<u64>, got: usize) {
        if path.ends_with(".safetensors") && range.start > 8 {
            self.n.fetch_add(got as u64, Ordering::SeqCst);
            if let Some(by) = &self.by_folder {
                let folder = path.rsplit_once('/').map_or("", |(d, _)| d);
                let mut by = by.lock().unwrap();
                *by.entry(folder.to_string()).or_default() += got as u64;
            }
        }
    }
}

#[async_trait]
impl Storage for DataReads {
    fn scheme_root(&self) -> String {
        self.inner.scheme_root()
    }
    fn is_local(&self) -> bool {
        self.inner.is_local()
    }
    fn min_part_size(&self) -> u64 {
        self.inner.min_part_size()
    }
    async fn size(&self, path: &str) -> SResult<u64> {
        self.inner.size(path).await
    }
    async fn exists(&self, path: &str) -> SResult<bool> {
        self.inner.exists(path).await
    }
    async fn read_range(&self, path: &str, range: Range<u64>) -> SResult<Bytes> {
        let b = self.inner.read_range(path, range.clone()).await?;
        self.count(path, &range, b.len());
        Ok(b)
    }
    async fn read_range_into(
        &self,
        path: &str,
        range: Range<u64>,
        buf: Vec<u8>,
    ) -> SResult<Vec<u8>> {
        let b = self.inner.read_range_into(path, range.clone(), buf).await?;
        self.count(path, &range, b.len());
        Ok(b)
    }
    async fn read_all(&self, path: &str) -> SResult<Bytes> {
        self.inner.read_all(path).await
    }
    async fn put(&self, path: &str, data: Bytes) -> SResult<()> {
        self.inner.put(path, data).await
    }
    async fn list(&self, dir: &str) -> SResult<Vec<String>> {
        self.inner.list(dir).await
    }
    async fn delete(&self, path: &str) -> SResult<()> {
        self.inner.delete(path).await
    }
    async fn begin_upload(&self, path: &str, size: u64) -> SResult<Upload> {
        self.inner.begin_upload(path, size).await
    }
    async fn write_part(
        &self,
        u: &Upload,
        part: u32,
        offset: u64,
        data: Bytes,
    ) -> SResult<Receipt> {
        self.inner.write_part(u, part, offset, data).await
    }
    async fn check_upload(&self, u: &Upload, parts: &[Receipt], size: u64) -> SResult<()> {
        self.inner.check_upload(u, parts, size).await
    }
    async fn finish_upload(&self, u: &Upload, parts: &[Receipt]) -> SResult<()> {
        self.inner.finish_upload(u, parts).await
    }
    async fn abort_upload(&self, u: &Upload) -> SResult<()> {
        self.inner.abort_upload(u).await
    }
}

/// Each method's recipe over the golden family (base + instruct + two language models).
const RECIPES: &[(&str, &str)] = &[
    ("task_arithmetic", "merge_method: task_arithmetic\nbase_model: models/base\nmodels:\n- model: models/instruct\n  parameters: {weight: 1.0}\n- model: models/lang_eu\n  parameters: {weight: 0.7}\n"),
    ("ties", "merge_method: ties\nbase_model: models/base\nmodels:\n- model: models/instruct\n  parameters: {weight: 1.0, density: 0.5}\n- model: models/lang_eu\n  parameters: {weight: 0.7, density: 0.5}\n- model: models/lang_ca\n  parameters: {weight: 0.7, density: 0.5}\n"),
    ("dare_ties", "merge_method: dare_ties\nbase_model: models/base\nmodels:\n- model: models/instruct\n  parameters: {weight: 1.0, density: 0.3}\n- model: models/lang_eu\n  parameters: {weight: 1.0, density: 0.5}\n"),
    ("della", "merge_method: della\nbase_model: models/base\nmodels:\n- model: models/instruct\n  parameters: {weight: 1.0, density: 0.5, epsilon: 0.1}\n- model: models/lang_eu\n  parameters: {weight: 1.0, density: 0.5, epsilon: 0.1}\n"),
    ("breadcrumbs_ties", "merge_method: breadcrumbs_ties\nbase_model: models/base\nmodels:\n- model: models/instruct\n  parameters: {weight: 1.0, density: 0.8, gamma: 0.02}\n- model: models/lang_eu\n  parameters: {weight: 1.0, density: 0.7, gamma: 0.05}\n"),
    ("model_stock", "merge_method: model_stock\nbase_model: models/base\nmodels:\n- model: models/instruct\n- model: models/lang_eu\n- model: models/lang_ca\n"),
    ("slerp", "merge_method: slerp\nbase_model: models/instruct\nmodels:\n- model: models/instruct\n- model: models/lang_eu\nparameters: {t: 0.4}\n"),
];

struct Counted {
    /// Tensor bytes the wrapper saw read.
    read: u64,
    /// What `plan` says the job reads, and the input tensors' bytes.
    planned: u64,
    inputs: u64,
    /// What the finished job's status says it read.
    status: u64,
    units: usize,
    /// What the wrapper saw read from each model folder.
    by_folder: BTreeMap<String, u64>,
    /// The status's reads by input: location, read, planned.
    by_input: Vec<(String, u64, u64)>,
}

async fn counted(recipe: &str, task_size: u64, slot_memory: u64) -> Counted {
    let n = Arc::new(AtomicU64::new(0));
    let n2 = n.clone();
    let by = Arc::new(Mutex::new(BTreeMap::new()));
    let by2 = by.clone();
    let resolver = Resolver::with_wrapper(move |s| {
        Arc::new(DataReads {
            inner: s,
            n: n2.clone(),
            by_folder: Some(by2.clone()),
        }) as Arc<dyn Storage>
    });
    let submit = SubmitOptions {
        task_size,
        slot_memory,
        base_dir: golden(),
        ..Default::default()
    };
    let info = planinfo::describe(recipe, &submit, 2, &Resolver::new())
        .await
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let o = RunOptions {
        workers: 2,
        submit,
        quiet: true,
        cache: Some(row_cache()),
        tap: None,
    };
    let out = tmp.path().join("out");
    let s = embedded::run(recipe, out.to_str().unwrap(), &o, resolver)
        .await
        .unwrap();
    let by_folder = by.lock().unwrap().clone();
    Counted {
        read: n.load(Ordering::SeqCst),
        planned: info.bytes_read(),
        inputs: info.bytes_input(),
        status: s.status.bytes_read,
        units: info.cut.units.len(),
        by_folder,
        by_input: s
            .status
            .inputs
            .iter()
            .map(|i| (i.input.clone(), i.bytes_read, i.bytes_read_total))
            .collect(),
    }
}

/// Each input's reads in the status against the wrapper's count for its folder (within 1%, the
/// plan's figure too); every folder read is an input's.
fn check_inputs(name: &str, layout: &str, c: &Counted) {
    assert!(
        !c.by_input.is_empty(),
        "{name} ({layout}): no reads by input"
    );
    let mut folders = c.by_folder.clone();
    for (input, status, planned) in &c.by_input {
        let folder = folders
            .keys()
            .find(|f| input.ends_with(f.as_str()))
            .cloned();
        let read = folder.and_then(|f| folders.remove(&f)).unwrap_or(0);
        eprintln!("    {input}: read {read} B, status {status} B, planned {planned} B");
        let off = |a: u64| (a as f64 - read as f64).abs() / (read as f64).max(1.0);
        assert!(
            off(*status) <= 0.01,
            "{name} ({layout}): status says {status} B read from {input}, {read} B were"
        );
        assert!(
            off(*planned) <= 0.01,
            "{name} ({layout}): plan says {planned} B read from {input}, {read} B were"
        );
    }
    assert!(
        folders.is_empty(),
        "{name} ({layout}): read from folders that are no input: {folders:?}"
    );
}

fn check(name: &str, layout: &str, c: &Counted) {
    let ratio = c.read as f64 / c.inputs as f64;
    eprintln!(
        "{name:17} {layout:14} read {:9} B of {:9} B input ({ratio:.3}x), planned {:9} B, status {:9} B, {} statistics units",
        c.read, c.inputs, c.planned, c.status, c.units
    );
    assert!(
        ratio <= 1.25,
        "{name} ({layout}): read {ratio:.2}x the input bytes"
    );
    let off = |a: u64| (a as f64 - c.read as f64).abs() / c.read as f64;
    assert!(
        off(c.planned) <= 0.01,
        "{name} ({layout}): plan says {} B, {} B were read",
        c.planned,
        c.read
    );
    assert!(
        off(c.status) <= 0.01,
        "{name} ({layout}): status says {} B, {} B were read",
        c.status,
        c.read
    );
    check_inputs(name, layout, c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_method_reads_each_input_byte_once() {
    for (name, recipe) in RECIPES {
        // default flags: 4 MiB tasks, 1 GiB for 2 slots; the golden tensors stay whole
        let c = counted(recipe, 4 << 20, 512 << 20).await;
        check(name, "default flags", &c);
        // 4 KiB tasks in 64 KiB slots: tensors cut into statistics units
        let c = counted(recipe, 4096, 64 << 10).await;
        check(name, "cut", &c);
        if *name != "task_arithmetic" {
            assert!(c.units > 0, "{name}: the cut layout has no statistics unit");
        }
    }
}

/// Every file of a checkpoint folder, by name.
fn all_files(dir: &std::path::Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(e.path()).unwrap())
        })
        .collect()
}

/// Runs each point of `s` alone (into `tmp/single/K`) and checks its checkpoint is the grid's
/// `outs[K]`, byte for byte.
async fn same_as_run_alone(
    s: &shardmerge::recipe::sweep::Sweep,
    outs: &[String],
    o: &RunOptions,
    tmp: &std::path::Path,
) {
    for (k, p) in s.points.iter().enumerate() {
        let single = tmp.join(format!("single/{k}"));
        embedded::run(&p.recipe, single.to_str().unwrap(), o, Resolver::new())
            .await
            .unwrap();
        assert!(
            all_files(&single) == all_files(std::path::Path::new(&outs[k])),
            "point {}: the grid's checkpoint differs from the point run alone",
            p.name
        );
    }
}

/// A resolver whose stores count the tensor bytes read (all stores together), and the count.
fn counting_resolver() -> (Resolver, Arc<AtomicU64>) {
    let n = Arc::new(AtomicU64::new(0));
    let n2 = n.clone();
    let counting = Resolver::with_wrapper(move |s| {
        Arc::new(DataReads {
            inner: s,
            n: n2.clone(),
            by_folder: None,
        }) as Arc<dyn Storage>
    });
    (counting, n)
}

/// Runs every point of sweep recipe `sweep` (over the example family) as one grid, reading
/// through a counting store; checks each point's checkpoint against the point run alone, and
/// returns the bytes read over the input bytes of one point.
async fn grid_reads(sweep: &str, points: usize, task_size: u64, slot_memory: u64) -> f64 {
    let s = shardmerge::recipe::sweep::expand(sweep).unwrap().unwrap();
    assert_eq!(s.points.len(), points);
    let (counting, n) = counting_resolver();
    let submit = SubmitOptions {
        task_size,
        slot_memory,
        base_dir: std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".."),
        ..Default::default()
    };
    let o = RunOptions {
        workers: 2,
        submit: submit.clone(),
        quiet: true,
        cache: Some(row_cache()),
        tap: None,
    };
    let tmp = tempfile::tempdir().unwrap();
    let outs: Vec<String> = (0..points)
        .map(|k| {
            tmp.path()
                .join(format!("grid/{k}"))
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let grid: Vec<embedded::GridPoint<'_>> = s
        .points
        .iter()
        .zip(&outs)
        .map(|(p, out)| embedded::GridPoint {
            recipe: &p.recipe,
            out,
        })
        .collect();
    let results = embedded::run_grid(&grid, &o, counting).await.unwrap();
    let mut reported = 0;
    for r in results {
        reported += r.unwrap().status.bytes_read;
    }
    let read = n.load(Ordering::SeqCst);
    let info = planinfo::describe(&s.points[0].recipe, &submit, 2, &Resolver::new())
        .await
        .unwrap();
    same_as_run_alone(&s, &outs, &o, tmp.path()).await;
    let ratio = read as f64 / info.bytes_input() as f64;
    eprintln!(
        "grid of {points} points (task size {task_size}, slot {slot_memory}): read {read} B of {} B input ({ratio:.3}x); status says {reported} B",
        info.bytes_input()
    );
    assert_eq!(reported, read, "the points' statuses say what was read");
    ratio
}

const TA_GRID: &str = "merge_method: task_arithmetic
base_model: examples/models/base
models:
  - model: examples/models/instruct
    parameters:
      weight: {sweep: [0.5, 0.75, 1.0]}
  - model: examples/models/lang_eu
    parameters:
      weight: {sweep: [0.5, 0.75, 1.0]}
dtype: bfloat16
";

const TIES_GRID: &str = "merge_method: ties
base_model: examples/models/base
models:
  - model: examples/models/instruct
    parameters: {weight: 1.0}
  - model: examples/models/lang_eu
    parameters:
      weight: {sweep: [0.5, 1.0]}
  - model: examples/models/lang_ca
    parameters: {weight: 0.7}
parameters:
  density: {sweep: [0.3, 0.7]}
  normalize: true
dtype: bfloat16
";

/// A sweep reads its inputs once for all its points: a 3 x 3 task_arithmetic grid and a
/// 2-density x 2-weight TIES grid over the example family write 9 and 4 checkpoints, each
/// byte-identical to its point run alone, reading each input byte at most 1.25 times in all,
/// with tensors whole or cut into many tasks (and, for TIES, into statistics units).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_reads_each_input_byte_once_for_all_its_points() {
    let ratio = grid_reads(TA_GRID, 9, 4 << 20, 512 << 20).await;
    assert!(
        ratio <= 1.25,
        "task_arithmetic grid: read {ratio:.2}x the input"
    );
    // small tasks: each point's tensors cut into many tasks, each read once for all points
    let ratio = grid_reads(TA_GRID, 9, 4096, 9 * (64 << 10)).await;
    assert!(
        ratio <= 1.25,
        "task_arithmetic grid, cut: read {ratio:.2}x the input"
    );
    let ratio = grid_reads(TIES_GRID, 4, 4 << 20, 512 << 20).await;
    assert!(ratio <= 1.25, "ties grid: read {ratio:.2}x the input");
    // small slots: tensors cut into statistics units, whose passes are shared too (the rows
    // read once into the first point's row cache, every point's partials computed from them)
    let ratio = grid_reads(TIES_GRID, 4, 4096, 4 * (64 << 10)).await;
    assert!(ratio <= 1.25, "ties grid, cut: read {ratio:.2}x the input");
}

const METHODS_GRID: &str = "sweep_methods: [task_arithmetic, ties]
base_model: examples/models/base
models:
  - model: examples/models/instruct
    parameters: {weight: 1.0}
  - model: examples/models/lang_eu
    parameters:
      weight: {sweep: [0.5, 1.0]}
parameters:
  density: 0.5
dtype: bfloat16
";

const METHODS3_GRID: &str = "sweep_methods: [task_arithmetic, dare_ties, ties]
base_model: examples/models/base
models:
  - model: examples/models/instruct
    parameters: {weight: 1.0}
  - model: examples/models/lang_eu
    parameters: {weight: 0.8}
parameters:
  density: 0.5
random_seed: 7
dtype: bfloat16
";

/// Five methods with statistics passes or draws of their own (DARE draws, breadcrumbs trims
/// at both ends), over the same models.
const METHODS5_GRID: &str =
    "sweep_methods: [task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs_ties]
base_model: examples/models/base
models:
  - model: examples/models/instruct
    parameters: {weight: 1.0, density: 0.6}
  - model: examples/models/lang_eu
    parameters: {weight: 0.8, density: 0.5}
random_seed: 11
dtype: bfloat16
";

/// A grid whose methods would cut it differently (task_arithmetic at any row, TIES into
/// statistics units) reads the inputs once: every point is cut like its TIES points
/// (`cut::cut_like`), and its task_arithmetic points ride on the first TIES point (cut their
/// own way, each method's points read the inputs once: 2x; unlinked, 3x). A DARE-TIES point
/// joins them too (its inputs differ from the others' only in where their draws start: 3x
/// before), and so do dare_linear and breadcrumbs_ties points (two statistics passes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grid_of_methods_reads_once() {
    let ratio = grid_reads(METHODS_GRID, 4, 4096, 4 * (64 << 10)).await;
    assert!(ratio <= 1.25, "methods grid: read {ratio:.2}x the input");
    // and with tensors whole in their tasks (the default slot)
    let ratio = grid_reads(METHODS_GRID, 4, 4096, 64 << 20).await;
    assert!(
        ratio <= 1.25,
        "methods grid, whole: read {ratio:.2}x the input"
    );
    // three methods, one of them drawing DARE's masks
    let ratio = grid_reads(METHODS3_GRID, 3, 4096, 3 * (64 << 10)).await;
    assert!(ratio <= 1.25, "3-methods grid: read {ratio:.2}x the input");
    // five, whole and cut into statistics units
    for slot in [64 << 20, 5 * (64 << 10)] {
        let ratio = grid_reads(METHODS5_GRID, 5, 4096, slot).await;
        assert!(ratio <= 1.25, "5-methods grid: read {ratio:.2}x the input");
    }
}

/// A grid's points stay linked across a coordinator restart: each job's journal record names
/// the grid's first job, and the restarted coordinator links the points again before any
/// leases a task, so the resumed grid still reads each input byte about once (unlinked, its 9
/// points read the inputs 9 times), and every point is byte-identical to its run alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grid_resumed_after_a_restart_still_reads_once() {
    resumed_grid_reads(TA_GRID, 9, 9 * (64 << 10)).await;
}

/// A grid of methods resumed: each point's journal record keeps the recipes it was cut like
/// (`JournalJob.cut_like`), so the restarted coordinator cuts every point as before (its
/// layout checked against the record) and the points still read the rows once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grid_of_methods_resumed_after_a_restart_still_reads_once() {
    resumed_grid_reads(METHODS_GRID, 4, 4 * (64 << 10)).await;
}

/// Submits the grid `sweep` with a journal, restarts the coordinator before
/// any task ran, runs the `n_points` resumed points and checks their reads and their bytes.
async fn resumed_grid_reads(sweep: &str, n_points: usize, slot_memory: u64) {
    use shardmerge::job::JobManager;
    use shardmerge::journal::Journal;
    use shardmerge_worker::exec::Executor;
    use shardmerge_worker::pull::{self, LoopOptions};

    let s = shardmerge::recipe::sweep::expand(sweep).unwrap().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let (counting, n) = counting_resolver();
    let o = SubmitOptions {
        task_size: 4096,
        slot_memory,
        base_dir: std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".."),
        ..Default::default()
    };
    let outs: Vec<String> = (0..s.points.len())
        .map(|k| {
            tmp.path()
                .join(format!("grid/{k}"))
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let manager = || async {
        let journal = Journal::open(state.to_str().unwrap(), &counting)
            .await
            .unwrap();
        let mgr = JobManager::with_journal(counting.clone(), journal);
        let resumed = mgr.recover().await.unwrap();
        (mgr, resumed)
    };
    // the grid submitted, then the coordinator stopped before any task ran
    let (first, _) = manager().await;
    let points: Vec<(&str, &str)> = s
        .points
        .iter()
        .zip(&outs)
        .map(|(p, out)| (p.recipe.as_str(), out.as_str()))
        .collect();
    first.submit_grid(&points, &o).await.unwrap();
    drop(first);
    let (mgr, resumed) = manager().await;
    assert_eq!(resumed.len(), n_points, "{resumed:?}");
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let workers = tokio::spawn(pull::run(
        mgr.clone(),
        // (the row cache keeps a statistics unit's rows for its later passes and writes)
        Executor::new(counting.clone()).with_cache(Some(row_cache())),
        LoopOptions {
            worker_id: "w".into(),
            slots: 2,
            slot_memory: o.slot_memory,
            max_idle: std::time::Duration::from_millis(20),
        },
        stop_rx,
    ));
    for id in &resumed {
        let mut rx = mgr.watch(id).unwrap();
        let st = tokio::time::timeout(std::time::Duration::from_secs(120), async {
            loop {
                let st = rx.borrow_and_update().clone();
                if embedded::terminal(&st) {
                    break st;
                }
                rx.changed().await.unwrap();
            }
        })
        .await
        .unwrap();
        assert_eq!(
            st.state,
            shardmerge_proto::JobState::Succeeded as i32,
            "{st:?}"
        );
    }
    stop.send(true).unwrap();
    workers.await.unwrap();
    let read = n.load(Ordering::SeqCst);
    let info = planinfo::describe(&s.points[0].recipe, &o, 2, &Resolver::new())
        .await
        .unwrap();
    let ratio = read as f64 / info.bytes_input() as f64;
    eprintln!(
        "resumed grid of {n_points} points: read {read} B of {} B input ({ratio:.3}x)",
        info.bytes_input()
    );
    assert!(ratio <= 1.25, "the resumed grid read {ratio:.2}x the input");
    let run = RunOptions {
        workers: 2,
        submit: o.clone(),
        quiet: true,
        cache: Some(row_cache()),
        tap: None,
    };
    same_as_run_alone(&s, &outs, &run, tmp.path()).await;
}
