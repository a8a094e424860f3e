//! The merge report computed from a merge's own reads (`run --report`): the executor hands
//! every input row range its kernels are given to a [`ReportTap`], which computes the report's
//! statistics of the tensors it was built for from those values, no read of its own.
//!
//! A tensor's statistics are exact sums and counts, so its row ranges' partial statistics,
//! folded, equal the tensor's computed at once (`kernels::report`). The tap folds each range's
//! as it comes, and notes the rows folded: a range that meets them (seen again, by a retried
//! task or another point of a sweep, or overlapping another cut's) is not computed, lest its
//! rows count twice. A tensor's statistics are its tap's once its rows are all folded (one
//! statistics value per tensor, whatever the number of tasks). A tensor whose report
//! trims at some density needs its whole tensor at once (two selection passes precede the
//! sums): only a range that is the whole tensor counts for it. What the tap could not cover
//! (a tensor cut so, one read some other way, or one whose inputs differ from the report's)
//! the report reads as it would without the tap.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use shardmerge_proto as pb;

use super::{input_dtype, method_of, tensor_ctx, TaskError};
use crate::format::dtype::{self, DType};
use crate::kernels::exact::ExactSum;
use crate::kernels::report::{self, Distance};
use crate::kernels::{self, Reduced, RowRange, Stats};

/// Values of each input decoded at a time from stored bytes, at least: a range is cut into at
/// most [`MOST_CHUNKS`] chunks (each chunk's partial statistics are held until its pass is
/// reduced; a selection pass's are histograms of a few MB).
const CHUNK_VALUES: usize = 1 << 18;
const MOST_CHUNKS: usize = 32;

/// Report statistics gathered from the rows a merge reads.
#[derive(Debug, Default)]
pub struct ReportTap {
    tensors: HashMap<String, Tapped>,
    /// A merge job's id → the sweep point it writes ([`ReportTap::name_point`]).
    points: Mutex<HashMap<String, String>>,
}

#[derive(Debug)]
struct Tapped {
    /// The report's job for the tensor (its method the report's).
    job: pb::TensorJob,
    /// It has selection passes: only the whole tensor at once counts.
    whole: bool,
    got: Mutex<Got>,
    /// Per sweep point: its distance from the base over the rows folded (each [`Got`]'s
    /// statistics one exact sum).
    dists: Mutex<HashMap<String, Got>>,
}

/// What a tensor's tap has folded: the rows (disjoint ranges, adjacent ones joined) and their
/// statistics, folded as they came.
#[derive(Debug, Default)]
struct Got {
    /// Start → end of each range of rows folded.
    rows: BTreeMap<u64, u64>,
    stats: Option<Stats>,
}

impl Got {
    /// Whether rows `[a, b)` meet rows folded already (a range seen again, or overlapping
    /// one seen: not folded, lest its rows count twice).
    fn meets(&self, (a, b): (u64, u64)) -> bool {
        self.rows
            .range(..b)
            .next_back()
            .is_some_and(|(_, &e)| e > a)
    }

    /// Whether the rows folded are `[0, total)`, all of them.
    fn covers(&self, total: u64) -> bool {
        self.rows.len() == 1 && self.rows.get(&0) == Some(&total)
    }

    /// Folds the statistics `st` of rows `rows` in (exact sums and counts added, as the
    /// report folds a tensor's ranges and a layer's tensors: `report::merge`), unless they
    /// meet rows folded already.
    fn fold_in(&mut self, rows: (u64, u64), st: Stats) {
        if self.meets(rows) {
            return;
        }
        self.stats = Some(match self.stats.take() {
            None => st,
            Some(before) => report::merge(&[before, st]),
        });
        self.add(rows);
    }

    /// Notes rows `[a, b)` folded (disjoint from those before), joining adjacent ranges.
    fn add(&mut self, (mut a, mut b): (u64, u64)) {
        if let Some((&s, _)) = self.rows.range(..a).next_back().filter(|(_, &e)| e == a) {
            a = s;
        }
        if let Some(e) = self.rows.remove(&b) {
            b = e;
        }
        self.rows.insert(a, b);
    }
}

impl ReportTap {
    /// A tap for the report's tensor jobs `jobs` (one per tensor, by name). A job with a
    /// re-mapped vocabulary or an input that is not a plain stored tensor is left to the
    /// report's own reads.
    pub fn new(jobs: Vec<pb::TensorJob>) -> Result<ReportTap, TaskError> {
        let mut tensors = HashMap::with_capacity(jobs.len());
        for job in jobs {
            let plain = job.row_map.is_none()
                && job
                    .inputs
                    .iter()
                    .all(|s| s.lora.is_none() && s.derived.is_none() && s.shape == job.shape);
            if !plain {
                continue;
            }
            let whole = method_of(&job)?.passes(&tensor_ctx(&job)?) > 1;
            let (got, dists) = Default::default();
            tensors.insert(
                job.name.clone(),
                Tapped {
                    job,
                    whole,
                    got,
                    dists,
                },
            );
        }
        let points = Mutex::default();
        Ok(ReportTap { tensors, points })
    }

    /// Says that the merge job `job_id` writes sweep point `point` (a name the report uses
    /// to ask for its distances, [`ReportTap::distance`]): the values its kernels compute are
    /// measured against the base as they are written.
    pub fn name_point(&self, job_id: &str, point: &str) {
        lock(&self.points).insert(job_id.to_string(), point.to_string());
    }

    /// Of tensor `name`, the distance from the base of sweep point `point`'s values, when the
    /// ranges measured cover the tensor.
    pub fn distance(&self, name: &str, point: &str) -> Option<ExactSum> {
        let t = self.tensors.get(name)?;
        let dists = lock(&t.dists);
        let got = dists.get(point)?;
        let total = crate::tensor::view2d(&t.job.shape).0;
        got.covers(total)
            .then(|| got.stats.as_ref()?.sums.first().cloned())
            .flatten()
    }

    /// Of the merge job `job_id`'s tensor `job`, the report's tensor and the sweep point,
    /// when its values over `rows` are to be measured.
    fn point_wanted(
        &self,
        job_id: &str,
        job: &pb::TensorJob,
        rows: (u64, u64),
    ) -> Option<(&Tapped, String)> {
        let point = lock(&self.points).get(job_id)?.clone();
        let t = self.tensor_of(job)?;
        let seen = lock(&t.dists).get(&point).is_some_and(|g| g.meets(rows));
        (!seen).then_some((t, point))
    }

    /// A measure of the values the merge jobs `jobs` write over rows `rows` of `job` (the
    /// same tensor read alike by each), a block of rows at a time ([`Outputs::add`]).
    pub(super) fn outputs(
        &self,
        jobs: &[&str],
        job: &pb::TensorJob,
        rows: (u64, u64),
    ) -> Option<Outputs<'_>> {
        let points: Vec<Option<(Distance, String)>> = jobs
            .iter()
            .map(|j| {
                let (_, point) = self.point_wanted(j, job, rows)?;
                Some((Distance::new(), point))
            })
            .collect();
        let t = self.tensors.get(&job.name)?;
        let base = t.job.base_index? as usize;
        let any = points.iter().any(Option::is_some);
        any.then_some(Outputs {
            t,
            rows,
            base,
            points,
            decoded: Vec::new(),
        })
    }

    /// The tensor a merge's `job` computes, when the tap covers it and the merge reads exactly
    /// the report's inputs, in the same order.
    fn tensor_of(&self, job: &pb::TensorJob) -> Option<&Tapped> {
        let t = self.tensors.get(&job.name)?;
        super::group::same_tensor_reads(&t.job, job).then_some(t)
    }

    /// The report's job for the tensor a merge's `job` computes, when the tap covers it and
    /// the merge reads exactly the report's inputs, in the same order, and `rows` is a range
    /// the tap wants and meets none folded already.
    fn wanted(&self, job: &pb::TensorJob, rows: (u64, u64)) -> Option<&Tapped> {
        let t = self.tensor_of(job)?;
        let total = crate::tensor::view2d(&t.job.shape).0;
        if (t.whole && rows != (0, total)) || rows.0 >= rows.1 || rows.1 > total {
            return None;
        }
        let seen = lock(&t.got).meets(rows);
        (!seen).then_some(t)
    }

    /// Rows `rows` of `job`'s inputs, decoded (as its kernel is given them).
    pub(super) fn decoded(&self, job: &pb::TensorJob, rows: (u64, u64), inputs: &[&[f32]]) {
        let Some(t) = self.wanted(job, rows) else {
            return;
        };
        let n = (rows.1 - rows.0) as usize * crate::tensor::view2d(&job.shape).1 as usize;
        if inputs.iter().any(|v| v.len() != n) {
            return;
        }
        // (decoded already: the range is one chunk)
        let r = statistics(&t.job, rows, n, |pass, state, at, out| {
            let part: Vec<&[f32]> = inputs
                .iter()
                .map(|v| &v[at.first..at.first + at.n])
                .collect();
            out.push(partial(&t.job, pass, state, at.rows, &part)?);
            Ok(())
        });
        t.keep(rows, r);
    }

    /// Rows `rows` of `job`'s inputs as stored (each input's bytes in its dtype); `let_go`
    /// is told each range of values decoded (mapped pages to let go behind the walk).
    pub(super) fn stored(
        &self,
        job: &pb::TensorJob,
        rows: (u64, u64),
        inputs: &[&[u8]],
        let_go: &dyn Fn(std::ops::Range<usize>),
    ) {
        let Some(t) = self.wanted(job, rows) else {
            return;
        };
        let dts: Option<Vec<DType>> = t
            .job
            .inputs
            .iter()
            .map(|s| input_dtype(s, job).ok())
            .collect();
        let Some(dts) = dts else {
            return;
        };
        let mut bufs: Vec<Vec<f32>> = vec![Vec::new(); inputs.len()];
        let n = (rows.1 - rows.0) as usize * crate::tensor::view2d(&job.shape).1 as usize;
        let per = CHUNK_VALUES.max(n.div_ceil(MOST_CHUNKS));
        let r = statistics(&t.job, rows, per, |pass, state, at, out| {
            for ((b, raw), dt) in bufs.iter_mut().zip(inputs).zip(&dts) {
                let bytes = raw
                    .get(at.first * dt.size()..(at.first + at.n) * dt.size())
                    .ok_or_else(|| super::fatal("stored rows short"))?;
                b.resize(at.n, 0.0);
                dtype::decode(*dt, bytes, b);
            }
            let_go(at.first..at.first + at.n);
            let part: Vec<&[f32]> = bufs.iter().map(Vec::as_slice).collect();
            out.push(partial(&t.job, pass, state, at.rows, &part)?);
            Ok(())
        });
        t.keep(rows, r);
    }

    /// An accumulator of rows `rows` of `job`'s inputs handed over a block of rows at a time
    /// ([`Blocks::add`]), kept when [`Blocks::finish`]ed: a range with no selection passes.
    pub(super) fn blocks(&self, job: &pb::TensorJob, rows: (u64, u64)) -> Option<Blocks<'_>> {
        let t = self.wanted(job, rows).filter(|t| !t.whole)?;
        Some(Blocks {
            t,
            rows,
            parts: Vec::new(),
            failed: false,
        })
    }

    /// The reduced statistics of tensor `name`, when the ranges folded cover it.
    pub fn stats(&self, name: &str) -> Option<Stats> {
        let t = self.tensors.get(name)?;
        let got = lock(&t.got);
        let total = crate::tensor::view2d(&t.job.shape).0;
        got.covers(total).then(|| got.stats.clone()).flatten()
    }
}

impl Tapped {
    /// Folds the statistics `r` of rows `rows`, unless they meet rows folded meanwhile.
    fn keep(&self, rows: (u64, u64), r: Result<Stats, TaskError>) {
        match r {
            Ok(st) => lock(&self.got).fold_in(rows, st),
            // (the report reads the tensor itself, and says what is wrong)
            Err(e) => tracing::debug!("report tap: tensor {}: {e}", self.job.name),
        }
    }
}

/// A range's statistics gathered a block of rows at a time ([`ReportTap::blocks`]).
pub(super) struct Blocks<'a> {
    t: &'a Tapped,
    rows: (u64, u64),
    parts: Vec<Stats>,
    failed: bool,
}

impl Blocks<'_> {
    /// Rows `[start, end)` of the inputs, decoded: the next block of the range.
    pub(super) fn add(&mut self, (start, end): (u64, u64), inputs: &[&[f32]]) {
        if self.failed {
            return;
        }
        let n = inputs.first().map_or(0, |v| v.len());
        let r = statistics(&self.t.job, (start, end), n, |pass, state, at, out| {
            out.push(partial(&self.t.job, pass, state, at.rows, inputs)?);
            Ok(())
        });
        match r {
            Ok(st) => self.parts.push(st),
            Err(e) => {
                tracing::debug!("report tap: tensor {}: {e}", self.t.job.name);
                self.failed = true;
            }
        }
    }

    /// Keeps the range's statistics (every block of it added).
    pub(super) fn finish(self) {
        if !self.failed {
            self.t.keep(self.rows, Ok(report::merge(&self.parts)));
        }
    }
}

/// Sweep points' values measured against the base as they are written
/// ([`ReportTap::outputs`]).
pub(super) struct Outputs<'a> {
    t: &'a Tapped,
    rows: (u64, u64),
    /// Which of the inputs is the base.
    base: usize,
    /// Per merge job: its distance so far and its point (none: not measured).
    points: Vec<Option<(Distance, String)>>,
    decoded: Vec<f32>,
}

impl Outputs<'_> {
    /// The next block: the inputs' values, and each job's values as written (`out[k]`, in
    /// dtype `odt`).
    pub(super) fn add(&mut self, inputs: &[&[f32]], out: &[&[u8]], odt: DType) {
        let Some(base) = inputs.get(self.base) else {
            return;
        };
        for (p, bytes) in self.points.iter_mut().zip(out) {
            let Some((d, _)) = p else {
                continue;
            };
            self.decoded.resize(bytes.len() / odt.size(), 0.0);
            dtype::decode(odt, bytes, &mut self.decoded);
            d.add(&self.decoded, base);
        }
    }

    /// Keeps each point's distance over the rows (every block of them added).
    pub(super) fn finish(self) {
        let mut dists = lock(&self.t.dists);
        for (d, point) in self.points.into_iter().flatten() {
            let st = Stats {
                sums: vec![d.finish()],
                ..Default::default()
            };
            dists.entry(point).or_default().fold_in(self.rows, st);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One chunk of a range's rows: the rows (the range index the chunk's ordinal), and where
/// its values are among the range's (`n` from value `first`).
#[derive(Clone, Copy)]
struct Chunk {
    rows: RowRange,
    first: usize,
    n: usize,
}

/// The statistics of rows `rows` of `job` from `chunk(pass, state, chunk, out)`, which pushes
/// the partial of one chunk of whole rows (about `values` values each): every pass run and
/// reduced, so that of a range with one pass its folded partials, of the whole tensor its
/// statistics.
fn statistics(
    job: &pb::TensorJob,
    (start, end): (u64, u64),
    values: usize,
    mut chunk: impl FnMut(u32, &Stats, Chunk, &mut Vec<Stats>) -> Result<(), TaskError>,
) -> Result<Stats, TaskError> {
    let ctx = tensor_ctx(job)?;
    let m = method_of(job)?;
    let row_len = ctx.row_len.max(1);
    let per = (values / row_len).max(1) as u64;
    let named = |e: kernels::KernelError| super::fatal(format!("tensor {}: {e}", job.name));
    let mut state = Stats::default();
    for pass in 0..m.passes(&ctx) {
        let mut parts = Vec::new();
        let (mut row, mut index) = (start, 0u32);
        while row < end {
            let e = (row + per).min(end);
            let at = Chunk {
                rows: RowRange {
                    start: row,
                    end: e,
                    index,
                },
                first: ((row - start) as usize) * row_len,
                n: ((e - row) as usize) * row_len,
            };
            chunk(pass, &state, at, &mut parts)?;
            (row, index) = (e, index.saturating_add(1));
        }
        match m.reduce(&ctx, pass, state, parts).map_err(named)? {
            Reduced::More(s) => state = s,
            Reduced::Done(s) => return Ok(s),
        }
    }
    Ok(state)
}

/// One chunk's partial statistics of `pass`.
fn partial(
    job: &pb::TensorJob,
    pass: u32,
    state: &Stats,
    rows: RowRange,
    inputs: &[&[f32]],
) -> Result<Stats, TaskError> {
    let ctx = tensor_ctx(job)?;
    method_of(job)?
        .partial(&ctx, pass, state, rows, inputs)
        .map_err(|e| super::fatal(format!("tensor {}: {e}", job.name)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::report;

    /// The report's job over a `rows` x 3 tensor of three f32 inputs (base first), trimming
    /// at `densities`.
    fn job(rows: u64, densities: &[f64]) -> pb::TensorJob {
        let mut params: HashMap<String, f64> =
            report::density_params(densities).into_iter().collect();
        params.insert("points".into(), 0.0);
        let src = |m: &str| pb::TensorSource {
            uri: format!("file:///{m}.safetensors"),
            dtype: DType::F32.to_proto() as i32,
            shape: vec![rows, 3],
            model: m.into(),
            ..Default::default()
        };
        pb::TensorJob {
            name: "w".into(),
            shape: vec![rows, 3],
            out_dtype: DType::F32.to_proto() as i32,
            method: report::NAME.into(),
            params: Some(pb::ParamMap {
                values: params.into_iter().collect(),
            }),
            inputs: vec![src("base"), src("a"), src("b")],
            model_params: vec![pb::ParamMap::default(); 3],
            base_index: Some(0),
            ..Default::default()
        }
    }

    fn values(rows: u64) -> Vec<Vec<f32>> {
        (0..3)
            .map(|i| {
                (0..rows * 3)
                    .map(|k| ((k * 7 + i * 13) % 11) as f32 * 0.25 - 1.0)
                    .collect()
            })
            .collect()
    }

    fn feed(tap: &ReportTap, j: &pb::TensorJob, v: &[Vec<f32>], (a, b): (u64, u64)) {
        let refs: Vec<&[f32]> = v
            .iter()
            .map(|x| &x[a as usize * 3..b as usize * 3])
            .collect();
        tap.decoded(j, (a, b), &refs);
    }

    /// Ranges seen twice (a retried task's, another point's) count once, and the ranges
    /// folded give the statistics of the whole tensor at once; a range overlapping one folded
    /// is not folded (its rows would count twice), and a gap leaves the tensor to the
    /// report's own reads until it is filled.
    #[test]
    fn ranges_tile_once_whatever_came_twice() {
        let j = job(10, &[]);
        let v = values(10);
        let whole = ReportTap::new(vec![j.clone()]).unwrap();
        feed(&whole, &j, &v, (0, 10));
        let want = whole.stats("w").unwrap();
        let tap = ReportTap::new(vec![j.clone()]).unwrap();
        for r in [(0, 4), (4, 10), (0, 4), (0, 6), (6, 10), (4, 10)] {
            feed(&tap, &j, &v, r);
        }
        assert_eq!(tap.stats("w"), Some(want.clone()));
        let gap = ReportTap::new(vec![j.clone()]).unwrap();
        feed(&gap, &j, &v, (0, 4));
        feed(&gap, &j, &v, (5, 10));
        feed(&gap, &j, &v, (3, 6));
        assert_eq!(gap.stats("w"), None);
        // another tensor's rows, or a merge reading other inputs, are not taken
        let mut other = j.clone();
        other.inputs[2].uri = "file:///c.safetensors".into();
        feed(&gap, &other, &v, (4, 5));
        assert_eq!(gap.stats("w"), None);
        feed(&gap, &j, &v, (4, 5));
        assert_eq!(gap.stats("w"), Some(want));
    }

    /// With trim densities only the whole tensor at once counts; its stored bytes give the
    /// statistics its decoded values give.
    #[test]
    fn trims_take_the_whole_tensor_and_stored_bytes_decode_alike() {
        let j = job(9, &[0.5]);
        let v = values(9);
        let tap = ReportTap::new(vec![j.clone()]).unwrap();
        feed(&tap, &j, &v, (0, 4));
        feed(&tap, &j, &v, (4, 9));
        assert_eq!(tap.stats("w"), None);
        feed(&tap, &j, &v, (0, 9));
        let decoded = tap.stats("w").unwrap();
        let stored = ReportTap::new(vec![j.clone()]).unwrap();
        let bytes: Vec<Vec<u8>> = v
            .iter()
            .map(|x| x.iter().flat_map(|f| f.to_le_bytes()).collect())
            .collect();
        let raw: Vec<&[u8]> = bytes.iter().map(Vec::as_slice).collect();
        stored.stored(&j, (0, 9), &raw, &|_| {});
        assert_eq!(stored.stats("w"), Some(decoded));
    }

    #[test]
    fn ranges_folded_join_and_meet() {
        let mut g = Got::default();
        for r in [(4, 6), (0, 2), (2, 4), (8, 9)] {
            assert!(!g.meets(r), "{r:?}");
            g.add(r);
        }
        assert_eq!(g.rows, BTreeMap::from([(0, 6), (8, 9)]));
        for r in [(0, 1), (5, 7), (3, 9), (8, 9), (7, 10)] {
            assert!(g.meets(r), "{r:?}");
        }
        assert!(!g.meets((6, 8)) && !g.meets((9, 12)));
        g.add((6, 8));
        assert_eq!(g.rows, BTreeMap::from([(0, 9)]));
    }
}
