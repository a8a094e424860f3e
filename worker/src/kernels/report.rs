//! The merge report's statistics of one tensor (`shardmerge report`): how the task vectors
//! δⱼ = xⱼ − base of the non-base models relate, as exact sums and counts.
//!
//! It runs as a method with statistics passes and no output: with trim densities, two passes of
//! the TIES kernel's exact rank selection ([`select`], one problem per density and model, the
//! window [`magnitude_keep`] gives), then one pass of sums and counts. Every figure is an exact
//! sum ([`DotSum`], laid out as [`super::stats::gram_upper`] lays out its sums) or an integer
//! count, so a tensor cut into row ranges, and a layer or a whole model summed from its tensors
//! ([`merge`]), give the same bits as one piece. Deltas are float32 differences of the inputs (whatever the recipe's `dtype`).
//!
//! Layout of a tensor's (reduced) [`Stats`], with `m` models besides the base and `D`
//! densities: `sums` is the upper triangle, in row order, of the Gram matrix of
//! `[base, δ₀, …, δₘ₋₁]`; `counts` is `[elements]`, then per pair `i < j` of models (row order)
//! `[both non-zero, same sign]`, then per density `[≥ 2 trimmed non-zero, sign conflict]`.
//!
//! A sweep's points: with the parameter `points` = P, the last P inputs are not models but
//! the checkpoints the points wrote, and each one's squared distance from the base,
//! Σ (pₖ − base)², is an exact sum after the Gram triangle (`sums[(m+1)(m+2)/2 + k]`).

use super::dot::DotSum;
use super::exact::ExactSum;
use super::select::{self, magnitude_keep, Boundary, Cursor};
use super::stats::merge_sums;
use super::{
    BaseRule, KResult, KernelError, Method, MethodSpec, Reduced, RowRange, Stats, TensorCtx,
};

/// The report's pseudo-method (not a merge method: recipes cannot name it).
pub struct Report;

/// Its name on the wire (`TensorJob.method`).
pub const NAME: &str = "report";

pub static REPORT: Report = Report;

static SPEC: MethodSpec = MethodSpec {
    name: NAME,
    params: &[],
    tensor_params: &[],
    base: BaseRule::Required,
    min_models: 2,
    max_models: None,
};

/// Elements per chunk of the sums-and-counts pass.
const CHUNK: usize = 2048;

/// The method-level parameters that ask for trims at `densities` (each in (0, 1)).
pub fn density_params(densities: &[f64]) -> Vec<(String, f64)> {
    let mut p = vec![("densities".to_string(), densities.len() as f64)];
    p.extend(
        densities
            .iter()
            .enumerate()
            .map(|(i, &d)| (format!("density.{i}"), d)),
    );
    p
}

fn densities(ctx: &TensorCtx) -> KResult<Vec<f64>> {
    let n = ctx.params.get("densities").copied().unwrap_or(0.0);
    (0..n as usize)
        .map(|i| {
            let d = ctx.param(&format!("density.{i}"))?;
            if d > 0.0 && d < 1.0 {
                Ok(d)
            } else {
                Err(KernelError::param(format!(
                    "report density must be in (0, 1), got {d}"
                )))
            }
        })
        .collect()
}

/// Index of pair `(i, j)`, `i < j < m`, in row order of the strict upper triangle.
pub fn pair_index(m: usize, i: usize, j: usize) -> usize {
    i * m - i * (i + 1) / 2 + (j - i - 1)
}

struct Shape {
    base: usize,
    others: Vec<usize>,
    /// Inputs that are sweep points' outputs (the last `points`).
    points: Vec<usize>,
    densities: Vec<f64>,
    /// Rank boundary per selection problem (density-major: `d * m + j`).
    ranks: Vec<Vec<u64>>,
}

impl Shape {
    fn of(ctx: &TensorCtx) -> KResult<Shape> {
        let base = ctx.base_index(NAME)?;
        if base >= ctx.n_models() {
            return Err(KernelError::param(format!(
                "base model index {base} is out of range"
            )));
        }
        let n_in = ctx.n_models();
        let p = ctx.params.get("points").copied().unwrap_or(0.0);
        let models = n_in.saturating_sub(p as usize);
        // (the base alone with points: their distances only, [`with_distances`])
        let least = if p >= 1.0 { 1 } else { 2 };
        if p < 0.0 || p.fract() != 0.0 || models < least || base >= models {
            return Err(KernelError::param(format!(
                "report points {p}: the inputs must be the base, the models (at least one, unless there are points), then the points ({n_in} inputs)"
            )));
        }
        let others: Vec<usize> = ctx.others().into_iter().filter(|&i| i < models).collect();
        let points = (models..n_in).collect();
        let densities = densities(ctx)?;
        let n = ctx.numel();
        let ranks = densities
            .iter()
            .flat_map(|&d| others.iter().map(move |_| vec![n - magnitude_keep(d, n)]))
            .collect();
        Ok(Shape {
            base,
            others,
            points,
            densities,
            ranks,
        })
    }

    fn sel_passes(&self) -> u32 {
        if self.ranks.is_empty() {
            0
        } else {
            select::PASSES
        }
    }
}

/// Sums and counts of one row range (the last pass).
fn sums_and_counts(s: &Shape, sel: &Stats, rows: RowRange, inputs: &[&[f32]]) -> KResult<Stats> {
    let len = inputs.first().map_or(0, |x| x.len());
    let m = s.others.len();
    // the Gram matrix of [base, δ₀, …] in upper-triangle row order, then each point's distance
    let mut sums: Vec<DotSum> = (0..(m + 1) * (m + 2) / 2 + s.points.len())
        .map(|_| DotSum::new())
        .collect();
    let pairs = m * m.saturating_sub(1) / 2;
    let mut counts = vec![0u64; 1 + 2 * pairs + 2 * s.densities.len()];
    counts[0] = len as u64;
    let bounds = (0..s.ranks.len())
        .map(|p| select::boundaries(sel, p).into_iter().next())
        .collect::<Option<Vec<Boundary>>>()
        .ok_or_else(|| KernelError::internal("report selection state is missing a boundary"))?;
    let mut cursors: Vec<Cursor> = bounds.iter().map(|b| Cursor::new(b, rows.index)).collect();
    let mut d = vec![0f32; (m + 1) * CHUNK];
    let mut keys = vec![0u32; m * CHUNK];
    for at in (0..len).step_by(CHUNK) {
        let n = CHUNK.min(len - at);
        let base = &inputs[s.base][at..at + n];
        for (j, &i) in s.others.iter().enumerate() {
            diff(&inputs[i][at..at + n], base, &mut d[j * CHUNK..][..n]);
        }
        let vec = |i: usize| {
            if i == 0 {
                base
            } else {
                &d[(i - 1) * CHUNK..][..n]
            }
        };
        let mut k = 0;
        for i in 0..=m {
            for j in i..=m {
                sums[k].add_products(vec(i), vec(j));
                k += 1;
            }
        }
        for (&p, sum) in s.points.iter().zip(&mut sums[k..]) {
            let t = &mut d[m * CHUNK..][..n];
            diff(&inputs[p][at..at + n], base, t);
            sum.add_products(t, t);
        }
        for i in 0..m {
            for j in i + 1..m {
                let c = 1 + 2 * pair_index(m, i, j);
                let (both, same) = sign_counts(&d[i * CHUNK..][..n], &d[j * CHUNK..][..n]);
                counts[c] += both;
                counts[c + 1] += same;
            }
        }
        if !s.densities.is_empty() {
            for j in 0..m {
                select::keys_into(&d[j * CHUNK..][..n], &mut keys[j * CHUNK..][..n]);
            }
        }
        for di in 0..s.densities.len() {
            let c = 1 + 2 * pairs + 2 * di;
            let (conflicts, overlaps) = trimmed_counts(&d, &keys, n, &mut cursors[di * m..][..m]);
            counts[c] += overlaps;
            counts[c + 1] += conflicts;
        }
    }
    Ok(Stats {
        sums: sums.into_iter().map(DotSum::finish).collect(),
        counts,
        ..Default::default()
    })
}

/// Of `n` elements of a chunk, trimmed at one density (`cursors`: each model's boundary, in
/// model order; `d` and `keys`: each model's deltas and their keys, `CHUNK` apart): how many
/// have trimmed deltas of both signs, and how many have at least two non-zero ones. An element
/// is kept when it ranks at or above its model's boundary (the k largest |δ|).
fn trimmed_counts(d: &[f32], keys: &[u32], n: usize, cursors: &mut [Cursor]) -> (u64, u64) {
    let (mut pos, mut neg, mut nz) = ([0u8; CHUNK], [0u8; CHUNK], [0u8; CHUNK]);
    let mut kept = [0u8; CHUNK];
    for (j, cur) in cursors.iter_mut().enumerate() {
        cur.kept_into(&keys[j * CHUNK..][..n], &mut kept[..n]);
        let dj = &d[j * CHUNK..][..n];
        for k in 0..n {
            let (v, kk) = (dj[k], kept[k]);
            pos[k] |= kk & u8::from(v > 0.0);
            neg[k] |= kk & u8::from(v < 0.0);
            // (at least two is all that counts: capped, whatever the number of models)
            nz[k] = (nz[k] + (kk & u8::from(v != 0.0))).min(2);
        }
    }
    let (mut conflicts, mut overlaps) = (0u32, 0u32);
    for k in 0..n {
        conflicts += u32::from(pos[k] & neg[k]);
        overlaps += u32::from(nz[k] >= 2);
    }
    (u64::from(conflicts), u64::from(overlaps))
}

/// `out = x − base`, in f32.
fn diff(x: &[f32], base: &[f32], out: &mut [f32]) {
    for ((o, &x), &b) in out.iter_mut().zip(x).zip(base) {
        *o = x - b;
    }
}

/// Of the elements where `a` and `b` are both non-zero: how many, and how many of the same sign.
fn sign_counts(a: &[f32], b: &[f32]) -> (u64, u64) {
    let (mut both, mut same) = (0u32, 0u32);
    for (&x, &y) in a.iter().zip(b) {
        let nz = x != 0.0 && y != 0.0;
        both += u32::from(nz);
        same += u32::from(nz && (x > 0.0) == (y > 0.0));
    }
    (u64::from(both), u64::from(same))
}

/// Folds tensors' (or ranges') statistics into one: exact sums added, counts added. A layer's
/// or a model's figures are those of the merge of its tensors'.
pub fn merge(parts: &[Stats]) -> Stats {
    let mut counts: Vec<u64> = Vec::new();
    for p in parts {
        if counts.len() < p.counts.len() {
            counts.resize(p.counts.len(), 0);
        }
        for (c, &v) in counts.iter_mut().zip(&p.counts) {
            *c += v;
        }
    }
    Stats {
        sums: merge_sums(parts),
        counts,
        ..Default::default()
    }
}

/// A sweep point's distance from the base over some values, accumulated: Σ (pₖ − base)², each
/// difference in f32 and the sum exact, as the report's statistics compute it for a point given
/// as an input (`run --report` computes it from the values the merge wrote, `exec/tap.rs`).
pub struct Distance(DotSum);

impl Distance {
    pub fn new() -> Self {
        Distance(DotSum::new())
    }

    /// Adds the values `point` of the point and `base` of the base, element by element.
    pub fn add(&mut self, point: &[f32], base: &[f32]) {
        let mut t = [0f32; CHUNK];
        for (p, b) in point.chunks(CHUNK).zip(base.chunks(CHUNK)) {
            let t = &mut t[..p.len()];
            diff(p, b, t);
            self.0.add_products(t, t);
        }
    }

    /// The distances' statistics to join to the models' ([`with_distances`]): one exact sum
    /// per point, in the points' order.
    pub fn statistics(points: Vec<ExactSum>) -> Stats {
        let mut sums = vec![ExactSum::default()];
        sums.extend(points);
        Stats {
            sums,
            ..Default::default()
        }
    }

    pub fn finish(self) -> ExactSum {
        self.0.finish()
    }
}

impl Default for Distance {
    fn default() -> Self {
        Self::new()
    }
}

/// The models' statistics `models` (no points) with the points' distances of `distances`
/// (statistics of the base alone followed by the points, `points` = P): the same statistics as
/// one computation over the base, the models and the points, each sum exact.
pub fn with_distances(models: Stats, distances: &Stats) -> Stats {
    let mut sums = models.sums;
    sums.extend(distances.sums.iter().skip(1).cloned());
    Stats { sums, ..models }
}

/// A tensor's (or a group's) figures, from its statistics: `m` models besides the base, `n_d`
/// densities. Undefined ratios (a zero norm, no element where both are non-zero) are NaN.
#[derive(Clone, Debug, PartialEq)]
pub struct Figures {
    pub elements: u64,
    pub base_norm: f64,
    /// Per model: ‖δⱼ‖ and ‖δⱼ‖ / ‖base‖.
    pub norms: Vec<f64>,
    pub ratios: Vec<f64>,
    /// Per pair (row order): cosine of δᵢ and δⱼ; share of same signs where both are non-zero,
    /// and how many elements that is.
    pub cosines: Vec<f64>,
    pub sign_agreement: Vec<f64>,
    pub both_nonzero: Vec<u64>,
    /// Per density: share of elements whose trimmed deltas have both signs; how many elements
    /// that is, and how many have at least two trimmed non-zero deltas.
    pub conflict_rate: Vec<f64>,
    pub conflicts: Vec<u64>,
    pub overlaps: Vec<u64>,
    /// Per sweep point measured: ‖pₖ − base‖ and ‖pₖ − base‖ / ‖base‖.
    pub distances: Vec<f64>,
    pub distance_ratios: Vec<f64>,
}

fn ratio(a: f64, b: f64) -> f64 {
    if b == 0.0 {
        f64::NAN
    } else {
        a / b
    }
}

/// The figures of `st` (a reduced tensor's, or a [`merge`] of several).
pub fn figures(m: usize, n_d: usize, st: &Stats) -> Figures {
    let n = m + 1;
    let sum = |i: usize, j: usize| {
        st.sums
            .get(gram_upper_index(n, i, j))
            .map_or(0.0, |s| s.value())
    };
    let count = |k: usize| st.counts.get(k).copied().unwrap_or(0);
    let base_norm = sum(0, 0).sqrt();
    let norms: Vec<f64> = (0..m).map(|j| sum(j + 1, j + 1).sqrt()).collect();
    let pairs = m * m.saturating_sub(1) / 2;
    let elements = count(0);
    let mut f = Figures {
        elements,
        base_norm,
        ratios: norms.iter().map(|&x| ratio(x, base_norm)).collect(),
        norms: norms.clone(),
        cosines: Vec::with_capacity(pairs),
        sign_agreement: Vec::with_capacity(pairs),
        both_nonzero: Vec::with_capacity(pairs),
        conflict_rate: Vec::with_capacity(n_d),
        conflicts: Vec::with_capacity(n_d),
        overlaps: Vec::with_capacity(n_d),
        distances: Vec::new(),
        distance_ratios: Vec::new(),
    };
    let gram = n * (n + 1) / 2;
    for s in st.sums.iter().skip(gram) {
        let d = s.value().sqrt();
        f.distances.push(d);
        f.distance_ratios.push(ratio(d, base_norm));
    }
    for i in 0..m {
        for j in i + 1..m {
            let c = 1 + 2 * pair_index(m, i, j);
            f.cosines
                .push(ratio(sum(i + 1, j + 1), norms[i] * norms[j]));
            f.sign_agreement
                .push(ratio(count(c + 1) as f64, count(c) as f64));
            f.both_nonzero.push(count(c));
        }
    }
    for d in 0..n_d {
        let c = 1 + 2 * pairs + 2 * d;
        f.overlaps.push(count(c));
        f.conflicts.push(count(c + 1));
        f.conflict_rate
            .push(ratio(count(c + 1) as f64, elements as f64));
    }
    f
}

/// Index of the Gram sum of vectors `i <= j` among `n` (upper triangle, row order), as
/// [`super::stats::gram_upper`] lays them out.
pub fn gram_upper_index(n: usize, i: usize, j: usize) -> usize {
    i * n - i * i.saturating_sub(1) / 2 + (j - i)
}

impl Method for Report {
    fn spec(&self) -> &MethodSpec {
        &SPEC
    }

    fn check(&self, ctx: &TensorCtx) -> KResult<()> {
        Shape::of(ctx).map(|_| ())
    }

    fn passes(&self, ctx: &TensorCtx) -> u32 {
        Shape::of(ctx).map_or(1, |s| s.sel_passes() + 1)
    }

    fn partial(
        &self,
        ctx: &TensorCtx,
        pass: u32,
        state: &Stats,
        rows: RowRange,
        inputs: &[&[f32]],
    ) -> KResult<Stats> {
        let s = Shape::of(ctx)?;
        let len = inputs.first().map_or(0, |x| x.len());
        if inputs.len() != ctx.n_models() || inputs.iter().any(|x| x.len() != len) {
            return Err(KernelError::shape(
                "report inputs differ in number or length",
            ));
        }
        if pass < s.sel_passes() {
            let m = s.others.len();
            let mut keys = |p: usize, f: &mut dyn FnMut(&[u32])| {
                let j = p % m;
                let (mut k, mut dj) = ([0u32; CHUNK], [0f32; CHUNK]);
                for at in (0..len).step_by(CHUNK) {
                    let n = CHUNK.min(len - at);
                    let base = &inputs[s.base][at..at + n];
                    diff(&inputs[s.others[j]][at..at + n], base, &mut dj[..n]);
                    select::keys_into(&dj[..n], &mut k[..n]);
                    f(&k[..n]);
                }
            };
            return Ok(if pass == 0 {
                select::partial0_with(s.ranks.len(), &mut keys)
            } else {
                select::partial1_with(state, &s.ranks, &mut keys)
            });
        }
        sums_and_counts(&s, state.child(0), rows, inputs)
    }

    fn reduce(
        &self,
        ctx: &TensorCtx,
        pass: u32,
        state: Stats,
        partials: Vec<Stats>,
    ) -> KResult<Reduced> {
        let s = Shape::of(ctx)?;
        if pass < s.sel_passes() {
            if pass == 0 {
                let n = vec![ctx.numel(); s.ranks.len()];
                return Ok(Reduced::More(select::reduce0(&partials, &s.ranks, &n)?));
            }
            let sel = select::reduce1(&state, &partials, &s.ranks)?;
            return Ok(Reduced::More(Stats {
                children: vec![sel],
                ..Default::default()
            }));
        }
        Ok(Reduced::Done(merge(&partials)))
    }

    fn apply(
        &self,
        _ctx: &TensorCtx,
        _state: &Stats,
        _rows: RowRange,
        _inputs: &[&[f32]],
        _out: &mut [f32],
    ) -> KResult<()> {
        Err(KernelError::internal(
            "the report computes statistics only; it writes no tensor",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::run_passes;
    use crate::kernels::testutil::{data, Case};

    /// The reduced statistics of `inputs` cut into ranges of `per` rows.
    fn stats_cut(case: &Case, inputs: &[Vec<f32>], per: u64) -> Stats {
        let ctx = case.ctx();
        let rl = ctx.row_len;
        let ranges: Vec<RowRange> = (0..ctx.rows.div_ceil(per))
            .map(|i| RowRange {
                start: i * per,
                end: ((i + 1) * per).min(ctx.rows),
                index: i as u32,
            })
            .collect();
        let slice = |r: &RowRange| -> Vec<&[f32]> {
            inputs
                .iter()
                .map(|v| &v[r.start as usize * rl..r.end as usize * rl])
                .collect()
        };
        REPORT.check(&ctx).unwrap();
        run_passes(&REPORT, &ctx, |pass, st| {
            ranges
                .iter()
                .map(|r| REPORT.partial(&ctx, pass, st, *r, &slice(r)))
                .collect()
        })
        .unwrap()
    }

    fn case(rows: u64, cols: u64, densities: &[f64]) -> (Case, Vec<Vec<f32>>) {
        let mut c = Case::new(&[rows, cols], 4);
        c.base = Some(1);
        c.params = density_params(densities).into_iter().collect();
        let n = (rows * cols) as usize;
        let base = data(n, 9, 1.0);
        let mut inputs: Vec<Vec<f32>> = (0..4u64)
            .map(|s| {
                let d = data(n, s, 0.1);
                // deltas rounded to 1/64: many exact zeros and magnitude ties
                base.iter()
                    .zip(d)
                    .map(|(b, d)| b + (d * 64.0).round() / 64.0)
                    .collect()
            })
            .collect();
        inputs[1] = base;
        (c, inputs)
    }

    /// The figures by a direct computation: f64 sums, a sort for the trims.
    fn reference(inputs: &[Vec<f32>], base: usize, densities: &[f64]) -> Figures {
        let others: Vec<usize> = (0..inputs.len()).filter(|&i| i != base).collect();
        let b = &inputs[base];
        let n = b.len();
        let deltas: Vec<Vec<f32>> = others
            .iter()
            .map(|&i| inputs[i].iter().zip(b).map(|(x, b)| x - b).collect())
            .collect();
        let dot = |x: &[f32], y: &[f32]| -> f64 {
            x.iter().zip(y).map(|(&a, &b)| a as f64 * b as f64).sum()
        };
        let base_norm = dot(b, b).sqrt();
        let norms: Vec<f64> = deltas.iter().map(|d| dot(d, d).sqrt()).collect();
        let m = deltas.len();
        let mut f = Figures {
            elements: n as u64,
            base_norm,
            ratios: norms.iter().map(|x| x / base_norm).collect(),
            norms: norms.clone(),
            cosines: vec![],
            sign_agreement: vec![],
            both_nonzero: vec![],
            conflict_rate: vec![],
            conflicts: vec![],
            overlaps: vec![],
            distances: vec![],
            distance_ratios: vec![],
        };
        for i in 0..m {
            for j in i + 1..m {
                f.cosines
                    .push(dot(&deltas[i], &deltas[j]) / (norms[i] * norms[j]));
                let both: Vec<(f32, f32)> = deltas[i]
                    .iter()
                    .zip(&deltas[j])
                    .map(|(&a, &b)| (a, b))
                    .filter(|&(a, b)| a != 0.0 && b != 0.0)
                    .collect();
                let agree = both
                    .iter()
                    .filter(|(a, b)| (*a > 0.0) == (*b > 0.0))
                    .count();
                f.sign_agreement.push(agree as f64 / both.len() as f64);
                f.both_nonzero.push(both.len() as u64);
            }
        }
        for &d in densities {
            let trimmed: Vec<Vec<f32>> = deltas
                .iter()
                .map(|x| {
                    let k = ((d * n as f64) as usize).max(1).min(n);
                    let mut order: Vec<usize> = (0..n).collect();
                    // ascending (|δ|, index): the last k are kept
                    order.sort_by(|&a, &c| x[a].abs().total_cmp(&x[c].abs()).then(a.cmp(&c)));
                    let mut t = vec![0f32; n];
                    for &e in &order[n - k..] {
                        t[e] = x[e];
                    }
                    t
                })
                .collect();
            let (mut conf, mut over) = (0u64, 0u64);
            for e in 0..n {
                let pos = trimmed.iter().any(|t| t[e] > 0.0);
                let neg = trimmed.iter().any(|t| t[e] < 0.0);
                conf += u64::from(pos && neg);
                over += u64::from(trimmed.iter().filter(|t| t[e] != 0.0).count() >= 2);
            }
            f.conflicts.push(conf);
            f.overlaps.push(over);
            f.conflict_rate.push(conf as f64 / n as f64);
        }
        f
    }

    fn close(a: &[f64], b: &[f64]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-12 * y.abs().max(1e-300), "{x} vs {y}");
        }
    }

    #[test]
    fn figures_match_a_direct_computation() {
        let ds = [0.1, 0.5, 0.9];
        let (c, inputs) = case(7, 13, &ds);
        let f = figures(3, ds.len(), &stats_cut(&c, &inputs, 7));
        let r = reference(&inputs, 1, &ds);
        assert_eq!(f.elements, r.elements);
        close(&[f.base_norm], &[r.base_norm]);
        close(&f.norms, &r.norms);
        close(&f.ratios, &r.ratios);
        close(&f.cosines, &r.cosines);
        close(&f.sign_agreement, &r.sign_agreement);
        assert_eq!(f.both_nonzero, r.both_nonzero);
        assert_eq!((&f.conflicts, &f.overlaps), (&r.conflicts, &r.overlaps));
        close(&f.conflict_rate, &r.conflict_rate);
        assert!(f.conflicts.iter().any(|&c| c > 0));
    }

    #[test]
    fn the_same_bits_however_the_tensor_is_cut() {
        let ds = [0.3, 0.5];
        let (c, inputs) = case(9, 11, &ds);
        let whole = figures(3, 2, &stats_cut(&c, &inputs, 9));
        for per in [1, 2, 4] {
            assert_eq!(
                figures(3, 2, &stats_cut(&c, &inputs, per)),
                whole,
                "{per} rows"
            );
        }
        // and a group's figures are those of its tensors merged
        let (c2, inputs2) = case(3, 5, &ds);
        let a = stats_cut(&c, &inputs, 9);
        let b = stats_cut(&c2, &inputs2, 3);
        let joined: Vec<Vec<f32>> = inputs
            .iter()
            .zip(&inputs2)
            .map(|(x, y)| [x.clone(), y.clone()].concat())
            .collect();
        let mut c3 = Case::new(&[1, 99 + 15], 4);
        c3.base = Some(1);
        c3.params = c.params.clone();
        let fj = figures(3, 2, &merge(&[a, b]));
        let direct = figures(
            3,
            0,
            &stats_cut(
                &Case {
                    params: density_params(&[]).into_iter().collect(),
                    ..c3
                },
                &joined,
                1,
            ),
        );
        assert_eq!(
            (fj.norms, fj.cosines, fj.both_nonzero),
            (direct.norms, direct.cosines, direct.both_nonzero)
        );
    }

    /// Sweep points appended as inputs: each one's distance from the base is a direct f64
    /// computation's, the same bits however the tensor is cut, and the models' figures are
    /// those without the points.
    #[test]
    fn points_distances_match_a_direct_computation() {
        let ds = [0.5];
        let (c, inputs) = case(6, 7, &ds);
        let plain = figures(3, 1, &stats_cut(&c, &inputs, 6));
        let mut cp = Case::new(&[6, 7], 6);
        cp.base = Some(1);
        cp.params = c.params.clone();
        cp.params.insert("points".into(), 2.0);
        let mut all = inputs.clone();
        all.push(data(42, 5, 1.0));
        all.push(inputs[1].clone()); // a point equal to the base: distance 0
        let f = figures(3, 1, &stats_cut(&cp, &all, 6));
        let direct: f64 = all[4]
            .iter()
            .zip(&inputs[1])
            .map(|(&p, &b)| f64::from(p - b).powi(2))
            .sum();
        close(&f.distances, &[direct.sqrt(), 0.0]);
        close(&f.distance_ratios[..1], &[direct.sqrt() / plain.base_norm]);
        for per in [1, 4] {
            assert_eq!(figures(3, 1, &stats_cut(&cp, &all, per)), f, "{per} rows");
        }
        let f_models = Figures {
            distances: vec![],
            distance_ratios: vec![],
            ..f.clone()
        };
        assert_eq!(f_models, plain);
        // the distances computed apart (the base and the points alone) and joined to the
        // models' statistics: the same figures
        let mut cd = Case::new(&[6, 7], 3);
        cd.base = Some(0);
        cd.params.insert("points".into(), 2.0);
        let apart = stats_cut(&cd, &[inputs[1].clone(), all[4].clone(), all[5].clone()], 2);
        let models = stats_cut(&c, &inputs, 3);
        assert_eq!(figures(3, 1, &with_distances(models.clone(), &apart)), f);
        // and accumulated from the points' values and the base's, in any pieces
        let points: Vec<ExactSum> = [4, 5]
            .iter()
            .map(|&k| {
                let mut d = Distance::new();
                for (p, b) in all[k].chunks(5).zip(inputs[1].chunks(5)) {
                    d.add(p, b);
                }
                d.finish()
            })
            .collect();
        let joined = with_distances(models, &Distance::statistics(points));
        assert_eq!(figures(3, 1, &joined), f);
        // more points than inputs besides the base: refused
        cp.params.insert("points".into(), 5.0);
        assert!(REPORT.check(&cp.ctx()).is_err());
    }

    #[test]
    fn zero_deltas_give_undefined_not_infinite_figures() {
        let (c, mut inputs) = case(2, 3, &[0.5]);
        for i in [0, 2, 3] {
            inputs[i] = inputs[1].clone();
        }
        let f = figures(3, 1, &stats_cut(&c, &inputs, 1));
        assert!(f.norms.iter().all(|&x| x == 0.0));
        assert!(f
            .cosines
            .iter()
            .chain(&f.sign_agreement)
            .all(|x| x.is_nan()));
        assert_eq!(f.conflicts, vec![0]);
    }

    #[test]
    fn pair_and_gram_indices() {
        let m = 4;
        let mut at = 0;
        for i in 0..m {
            for j in i + 1..m {
                assert_eq!(pair_index(m, i, j), at);
                at += 1;
            }
        }
        let mut at = 0;
        for i in 0..5 {
            for j in i..5 {
                assert_eq!(gram_upper_index(5, i, j), at);
                at += 1;
            }
        }
    }

    #[test]
    fn bad_densities_are_refused() {
        let (c, _) = case(2, 3, &[1.0]);
        assert!(REPORT.check(&c.ctx()).is_err());
        assert!(task_method_finds_report());
    }

    fn task_method_finds_report() -> bool {
        crate::kernels::task_method(NAME).is_some() && crate::kernels::method(NAME).is_none()
    }
}
