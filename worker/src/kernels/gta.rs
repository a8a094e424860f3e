//! Generalized task arithmetic: `task_arithmetic`, `ties`, `dare_linear`, `dare_ties`,
//! `breadcrumbs`, `breadcrumbs_ties`, `della`, `della_linear`.
//!
//! The reference is mergekit 0.1.5 (what the parity fixtures were made with). It differs from
//! some older mergekit sources: magnitude keeps at least one element (density <= 0 keeps none,
//! instead of failing), and breadcrumbs keeps ranks `[n_bot, n_bot + int(density·n))` (older
//! code's `[n_bot:-n_top]` slice came out empty when `int(gamma·n)` was 0).
//!
//! Every method works on task vectors (deltas) δᵢ = xᵢ − base of the non-base models:
//!
//! 1. *sparsify* each δᵢ (none, top-k magnitude, magnitude with outliers cut, random DARE
//!    drop, DELLA's rank-weighted random drop), optionally rescaling what is left so its L1 norm
//!    matches the unsparsified delta's (`rescale`);
//! 2. weight each δᵢ by `weight`;
//! 3. *mix*: plain sum, or (TIES consensus) a sum of only the deltas whose sign agrees with the
//!    sign of the weighted sum, with the divisor the sum of the agreeing weights;
//! 4. divide by the divisor when `normalize`, multiply by `lambda`, add to the base.
//!
//! The eight methods differ only in their [`Config`]: which sparsification and whether there
//! is a sign consensus (plus default values of `normalize` and `rescale`).
//!
//! In a 16-bit working dtype ([`Work`]: the recipe's `dtype` bfloat16/float16) every step
//! rounds as mergekit's torch ops do: inputs, weights, each delta and weighted delta, each sum
//! over the models (accumulated in f32, rounded once), the divisor, the quotient, the `lambda`
//! product (an f32 scalar) and the final addition. The selection keys are the rounded deltas'
//! magnitudes. The rescale factor's L1 sums are exact, then rounded (torch's summation order
//! over a whole tensor is not reproduced).
//!
//! Statistics passes: magnitude selections (ties, breadcrumbs*) find their exact rank
//! boundaries in two radix-selection passes (one when every key is a bfloat16 magnitude, as in a
//! bfloat16 working dtype: the first pass's histogram is then exact, [`select::resolve0`]);
//! with `rescale`, one more pass sums |δ| before and
//! after masking (exactly) per model. Element indices of the whole tensor key every random draw
//! and every tie-break, so cutting the tensor into row ranges never changes a bit.

mod fused;
mod held;
mod methods;
mod mix;
mod once;
pub use once::NOTED_SHARE;
mod partial;
mod points;
mod sparse;
mod stored;

pub use methods::{
    BREADCRUMBS, BREADCRUMBS_TIES, DARE_LINEAR, DARE_TIES, DELLA, DELLA_LINEAR, TASK_ARITHMETIC,
    TIES,
};

use mix::Base;
use partial::{partial_of, Sources};
use sparse::{della_axis, for_each_key_chunk, Sparse, CHUNK};

use super::exact::F32Sum;
use super::round::{rk, Work};
use super::select;
use super::stats::merge_sums;
use super::KernelError::{Missing, Param, Shape};
use super::{KResult, Method, MethodSpec, Reduced, RowRange, Stats, Stored, TensorCtx};

/// How deltas are sparsified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sparsify {
    None,
    /// Keep the `max(1, int(density·n))` largest |δ| (TIES); none at density <= 0.
    Magnitude,
    /// Drop the `gamma` share of largest |δ| and enough small ones to reach `density`
    /// (breadcrumbs).
    Outliers,
    /// Keep each element with probability `density` (DARE).
    Random,
    /// Keep with a probability growing with the element's magnitude rank in its row (DELLA).
    Della,
}

#[derive(Clone, Copy, Debug)]
pub struct Config {
    pub sparsify: Sparsify,
    /// TIES sign consensus by weighted sum.
    pub consensus: bool,
}

pub struct Gta {
    spec: MethodSpec,
    cfg: Config,
}

/// What survives sparsification of one delta.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Keep {
    /// Everything (no sparsification, or density ≥ 1): no rescaling either.
    All,
    /// Nothing.
    Nothing,
    /// Ranks `[lo, hi)` in ascending (|δ|, index) order; `sel` is the selection problem.
    Window { lo: u64, hi: u64, sel: usize },
    /// Bernoulli(p) per element.
    Random { p: f64 },
    /// DELLA: per-row rank-dependent Bernoulli.
    Della { density: f64, epsilon: f64 },
}

impl Keep {
    /// Whether the L1 rescale applies (when `rescale` is set).
    fn rescalable(&self) -> bool {
        matches!(
            self,
            Keep::Window { .. } | Keep::Random { .. } | Keep::Della { .. }
        )
    }
}

/// Everything one tensor's merge needs, resolved from the context.
struct Plan {
    base: usize,
    /// Non-base inputs in order; index `j` below refers to `others[j]`.
    others: Vec<usize>,
    weights: Vec<f32>,
    keep: Vec<Keep>,
    /// Ranks per selection problem (one problem per model with a window).
    ranks: Vec<Vec<u64>>,
    normalize: bool,
    rescale: bool,
    lambda: f32,
    /// The dtype every step rounds to.
    work: Work,
    /// Statistics passes: selection (0 or 2), then L1 sums (0 or 1).
    sel_passes: u32,
    l1_passes: u32,
}

/// Python's `int(x)` of a float: truncation toward zero.
fn py_int(x: f64) -> i64 {
    x.trunc() as i64
}

/// Python's `seq[start:stop]` bounds for a sequence of length `n` (step 1).
fn py_slice(n: i64, start: i64, stop: i64) -> (i64, i64) {
    let norm = |i: i64| if i < 0 { (i + n).max(0) } else { i.min(n) };
    let (a, b) = (norm(start), norm(stop));
    (a, b.max(a))
}

fn finite(name: &str, v: f64) -> KResult<f64> {
    if v.is_finite() {
        Ok(v)
    } else {
        Err(Param(format!("{name} must be a finite number, got {v}")))
    }
}

impl Gta {
    fn plan(&self, ctx: &TensorCtx) -> KResult<Plan> {
        let name = self.spec.name;
        let base = ctx.base_index(name)?;
        if base >= ctx.n_models() {
            return Err(Param(format!("base model index {base} is out of range")));
        }
        let others = ctx.others();
        let n = ctx.numel();
        let ni = n as i64;
        let mut weights = Vec::with_capacity(others.len());
        let mut keep = Vec::with_capacity(others.len());
        let mut ranks = Vec::new();
        for &i in &others {
            weights.push(
                ctx.work
                    .r(finite("weight", ctx.model_param(i, "weight")?)? as f32),
            );
            let k = match self.cfg.sparsify {
                Sparsify::None => Keep::All,
                sp => {
                    let density = finite("density", ctx.model_param(i, "density")?)?;
                    if density <= 0.0 {
                        // mergekit would drop the whole task vector (or assert); that is
                        // never what a recipe means, so say so before any work is done
                        return Err(Param(format!(
                            "density must be greater than 0 (the share of each task vector kept), got {density}"
                        )
                        ));
                    }
                    if density >= 1.0 {
                        Keep::All
                    } else {
                        match sp {
                            Sparsify::Magnitude => {
                                let k = select::magnitude_keep(density, n) as i64;
                                if density <= 0.0 || n == 0 {
                                    Keep::Nothing
                                } else {
                                    ranks.push(vec![(ni - k) as u64, n]);
                                    Keep::Window {
                                        lo: (ni - k) as u64,
                                        hi: n,
                                        sel: ranks.len() - 1,
                                    }
                                }
                            }
                            Sparsify::Outliers => {
                                let gamma = finite("gamma", ctx.model_param(i, "gamma")?)?;
                                if !(0.0..=1.0).contains(&gamma) {
                                    return Err(Param(format!(
                                        "gamma must be in [0, 1], got {gamma}"
                                    )));
                                }
                                let target = py_int(density * n as f64);
                                let n_top = py_int(gamma * n as f64);
                                // outlier removal shrinks as needed to keep `target` elements:
                                // mergekit keeps sorted[n_bot : n_bot + target]
                                let n_bot = (ni - target - n_top).max(0);
                                let (lo, hi) = py_slice(ni, n_bot, n_bot + target);
                                if hi <= lo {
                                    Keep::Nothing
                                } else {
                                    ranks.push(vec![lo as u64, hi as u64]);
                                    Keep::Window {
                                        lo: lo as u64,
                                        hi: hi as u64,
                                        sel: ranks.len() - 1,
                                    }
                                }
                            }
                            Sparsify::Random => Keep::Random {
                                p: ctx.keep_probability(density),
                            },
                            Sparsify::Della => {
                                let epsilon = finite("epsilon", ctx.model_param(i, "epsilon")?)?;
                                if density <= 0.0 {
                                    Keep::Nothing
                                } else {
                                    if density + epsilon >= 1.0 || density - epsilon <= 0.0 {
                                        return Err(Param(format!(
                                            "epsilon must be such that density ± epsilon is in \
                                             (0, 1); got density {density}, epsilon {epsilon}"
                                        )));
                                    }
                                    let (m, _) = della_axis(ctx)?;
                                    if m < 2 {
                                        return Err(Shape(format!(
                                            "density < 1 needs at least 2 elements along the \
                                             ranked dimension, got {m}"
                                        )));
                                    }
                                    Keep::Della { density, epsilon }
                                }
                            }
                            Sparsify::None => Keep::All,
                        }
                    }
                }
            };
            keep.push(k);
        }
        let lambda = finite("lambda", ctx.param("lambda")?)? as f32;
        let rescale = ctx.flag("rescale")?;
        let sel_passes = if ranks.is_empty() { 0 } else { select::PASSES };
        let l1_passes = u32::from(rescale && keep.iter().any(Keep::rescalable));
        Ok(Plan {
            base,
            others,
            weights,
            keep,
            ranks,
            normalize: ctx.flag("normalize")?,
            rescale,
            lambda,
            work: ctx.work,
            sel_passes,
            l1_passes,
        })
    }
}

/// Each model's L1 rescale factor from the statistics passes (None: not rescaled).
fn rescale_factors(plan: &Plan, state: &Stats) -> KResult<Vec<Option<f32>>> {
    (0..plan.others.len())
        .map(|j| {
            if !(plan.rescale && plan.l1_passes > 0 && plan.keep[j].rescalable()) {
                return Ok(None);
            }
            let s = state
                .values
                .get(j)
                .copied()
                .ok_or_else(|| Missing("rescale statistics are missing".into()))?;
            Ok((!s.is_nan()).then_some(s as f32))
        })
        .collect()
}

/// Whether pass 0 located the selection boundaries on its own ([`select::resolve0`]): its
/// state then holds them as a child, as the second pass's does.
fn resolved(state: &Stats) -> bool {
    !state.children.is_empty()
}

fn check_inputs(ctx: &TensorCtx, inputs: &[&[f32]], len: usize) -> KResult<()> {
    if inputs.len() != ctx.n_models() {
        return Err(Shape(format!(
            "expected {} inputs, got {}",
            ctx.n_models(),
            inputs.len()
        )));
    }
    if inputs.iter().any(|x| x.len() != len) {
        return Err(Shape("input slices differ in length".into()));
    }
    Ok(())
}

impl Method for Gta {
    fn spec(&self) -> &MethodSpec {
        &self.spec
    }

    fn check(&self, ctx: &TensorCtx) -> KResult<()> {
        self.plan(ctx).map(|_| ())
    }

    fn draws(&self, ctx: &TensorCtx) -> Vec<u64> {
        // mergekit draws once per element of every randomly sparsified delta (none at
        // density >= 1); a plan error surfaces in `check`
        let Ok(plan) = self.plan(ctx) else {
            return Vec::new();
        };
        let mut n = vec![0; ctx.n_models()];
        for (j, k) in plan.keep.iter().enumerate() {
            if matches!(k, Keep::Random { .. } | Keep::Della { .. }) {
                n[plan.others[j]] = ctx.numel();
            }
        }
        n
    }

    fn passes(&self, ctx: &TensorCtx) -> u32 {
        // a plan error surfaces in `apply`
        self.plan(ctx).map_or(0, |p| p.sel_passes + p.l1_passes)
    }

    fn partial(
        &self,
        ctx: &TensorCtx,
        pass: u32,
        state: &Stats,
        rows: RowRange,
        inputs: &[&[f32]],
    ) -> KResult<Stats> {
        let plan = self.plan(ctx)?;
        let len = inputs.first().map_or(0, |x| x.len());
        check_inputs(ctx, inputs, len)?;
        let mut keys =
            |j: usize, f: &mut dyn FnMut(&[u32])| for_each_key_chunk(&plan, inputs, j, f);
        let mut deltas = |j: usize, f: &mut dyn FnMut(usize, &mut [f32])| {
            let (x, b) = (inputs[plan.others[j]], inputs[plan.base]);
            let mut d = [0f32; CHUNK];
            for at in (0..len).step_by(CHUNK) {
                let end = (at + CHUNK).min(len);
                let dc = &mut d[..end - at];
                plan.work.sub_into(&x[at..end], &b[at..end], dc);
                f(at, dc);
            }
        };
        let sources = Sources {
            inputs,
            keys: &mut keys,
            deltas: &mut deltas,
        };
        partial_of(&plan, ctx, pass, state, rows, sources)
    }

    fn reduce(
        &self,
        ctx: &TensorCtx,
        pass: u32,
        state: Stats,
        partials: Vec<Stats>,
    ) -> KResult<Reduced> {
        let plan = self.plan(ctx)?;
        if pass < plan.sel_passes {
            if pass == 0 {
                let n = vec![ctx.numel(); plan.ranks.len()];
                let s0 = select::reduce0(&partials, &plan.ranks, &n)?;
                let Some(sel) = select::resolve0(&s0, &partials, &plan.ranks) else {
                    return Ok(Reduced::More(s0));
                };
                // every key was a bfloat16 magnitude: the second pass would find nothing new
                let st = Stats {
                    children: vec![sel],
                    ..Default::default()
                };
                return Ok(if plan.l1_passes == 0 {
                    Reduced::Done(st)
                } else {
                    Reduced::More(st)
                });
            }
            if resolved(&state) {
                return Ok(Reduced::More(state));
            }
            let sel = select::reduce1(&state, &partials, &plan.ranks)?;
            return Ok(Reduced::More(Stats {
                children: vec![sel],
                ..Default::default()
            }));
        }
        let sums = merge_sums(&partials);
        let mut out = state;
        out.values = (0..plan.others.len())
            .map(|j| {
                let w = plan.work;
                let before = w.r(sums.get(2 * j).map_or(0.0, |s| s.value()) as f32);
                let after = w.r(sums.get(2 * j + 1).map_or(0.0, |s| s.value()) as f32);
                let eps = 1e-7f32;
                if !plan.keep[j].rescalable() || before < eps || after < eps {
                    f64::NAN
                } else {
                    w.r(before / after) as f64
                }
            })
            .collect();
        Ok(Reduced::More(out))
    }

    fn apply(
        &self,
        ctx: &TensorCtx,
        state: &Stats,
        rows: RowRange,
        inputs: &[&[f32]],
        out: &mut [f32],
    ) -> KResult<()> {
        let plan = self.plan(ctx)?;
        check_inputs(ctx, inputs, out.len())?;
        let base = inputs[plan.base];
        let sel_state = state.child(0);
        let mut sparse = Vec::with_capacity(plan.others.len());
        for j in 0..plan.others.len() {
            sparse.push(Sparse::new(&plan, ctx, sel_state, rows, inputs, j)?);
        }
        let scales = rescale_factors(&plan, state)?;
        let (work, others) = (plan.work, &plan.others);
        self.mix_chunks(&plan, &scales, Base::Decoded(base), out, |j, at, d| {
            let end = at + d.len();
            sparse[j].fill(work, &inputs[others[j]][at..end], &base[at..end], at, d);
        });
        Ok(())
    }

    fn whole_in_place(
        &self,
        ctx: &TensorCtx,
        inputs: &mut [&mut [f32]],
        out: &mut [f32],
    ) -> Option<KResult<bool>> {
        self.whole_held(ctx, inputs, out)
    }

    fn takes_stored(&self, ctx: &TensorCtx) -> bool {
        self.stored_applies(ctx)
    }

    fn whole_stored(
        &self,
        ctx: &TensorCtx,
        inputs: &[Stored],
        out: &mut [f32],
        let_go: &dyn Fn(std::ops::Range<usize>),
    ) -> KResult<()> {
        self.whole_from_stored(ctx, inputs, out, let_go)
    }

    fn apply_points(
        &self,
        ctxs: &[TensorCtx],
        states: &[Stats],
        rows: RowRange,
        inputs: &[&[f32]],
        outs: &mut [&mut [f32]],
    ) -> Option<KResult<()>> {
        self.points(ctxs, states, rows, inputs, outs)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::mix::{mix_f32, mix_f32_wide, mix_rounded, mix_rounded_wide};
    use super::*;
    use crate::kernels::simd;

    /// bf16 op by op, as torch: a hand-computed reference of mergekit's steps for
    /// task_arithmetic (lambda, no normalize) and ties' consensus at density 1.
    /// Every build of the bf16 and f32 mixes the CPU runs gives the baseline build's bits
    /// (weights of 1 and not, with and without consensus, normalize and lambda; deltas with
    /// ties, zeros of both signs, infinities and NaN).
    #[test]
    fn mix_builds_agree() {
        let bf = |x: f32| half::bf16::from_f32(x).to_f32();
        let len = CHUNK - 3;
        let val = |i: usize, salt: usize| -> f32 {
            let h = (i * 2654435761 + salt * 40503) % 1000;
            match h {
                0 => f32::NAN,
                1 => f32::INFINITY,
                2 => -0.0,
                3..=50 => 0.0,
                _ => bf((h as f32 - 500.0) * 1e-3),
            }
        };
        let base: Vec<f32> = (0..len).map(|i| val(i, 7)).collect();
        for method in [&TASK_ARITHMETIC, &TIES] {
            for (w, lambda, normalize) in [(1.0, 1.0, 0.0), (0.3, 0.7, 1.0), (1.0, 2.0, 1.0)] {
                let mut c = case(method, &[len as u64], 4);
                c.model_params[2].insert("weight".into(), w);
                c.params.insert("lambda".into(), lambda);
                c.params.insert("normalize".into(), normalize);
                c.work = Work::BF16;
                let ctx = c.ctx();
                let plan = method.plan(&ctx).unwrap();
                let mut deltas = vec![0f32; 3 * CHUNK];
                for j in 0..3 {
                    for i in 0..len {
                        deltas[j * CHUNK + i] = val(i, j);
                    }
                }
                let (mut a, mut b) = (vec![0f32; len], vec![0f32; len]);
                let d3 = deltas.clone();
                let cons = method.cfg.consensus;
                mix_rounded::<1>(&plan, cons, &mut deltas, &base, &mut a);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                let mut scratch = [[0f32; CHUNK]; 3];
                let mut f = vec![0f32; len];
                mix_f32(&plan, cons, 1.7, &d3, &base, &mut f, &mut scratch);
                for level in simd::levels() {
                    let what = format!("{} w {w}, {}", method.spec.name, level.name());
                    let mut d2 = d3.clone();
                    mix_rounded_wide::<1>(level, &plan, cons, &mut d2, &base, &mut b);
                    assert_eq!(bits(&a), bits(&b), "{what}");
                    // the f32 mix
                    mix_f32_wide(level, &plan, cons, 1.7, &d3, &base, &mut b, &mut scratch);
                    assert_eq!(bits(&f), bits(&b), "{what}, f32");
                }
            }
        }
    }

    /// The 16-bit mix is every step rounded as torch rounds it, against `half`'s rounding,
    /// with and without the sign consensus (one loop for up to four models; without the
    /// consensus it reads the deltas without changing them): any model count, weights of 1
    /// and not, `normalize` and `lambda`, with NaNs (any quiet payload a rounding leaves),
    /// infinities, signed zeros and sums that overflow; every build the CPU runs. The f32 mix
    /// too, against the same steps unrounded.
    #[test]
    fn mix_rounds_every_step() {
        let bf = |x: f32| half::bf16::from_f32(x).to_f32();
        let len = CHUNK - 5;
        let val = |i: usize, salt: usize| -> f32 {
            let h = (i * 2654435761 + salt * 40503) % 1000;
            match h {
                0 => f32::NAN,
                1 => f32::from_bits(0xffe5_0000), // a negative quiet NaN with a payload
                2 => f32::INFINITY,
                3 => f32::NEG_INFINITY,
                4 => -0.0,
                5 => bf(-1e-39), // a sum that rounds to -0.0
                6..=40 => 0.0,
                41..=60 => bf(3.0e38 * if h.is_multiple_of(2) { 1.0 } else { -1.0 }),
                _ => bf((h as f32 - 500.0) * 1e-3),
            }
        };
        let base: Vec<f32> = (0..len).map(|i| val(i, 99)).collect();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let cases = [
            (1.0, 1.0, 0.0),
            (0.3, 0.7, 1.0),
            (1.7, 2.0, 0.0),
            (-0.5, 1.0, 1.0),
        ];
        for method in [&TASK_ARITHMETIC, &TIES] {
            let cons = method.cfg.consensus;
            for n in 0..=6usize {
                for (w, lambda, normalize) in cases {
                    let mut c = case(method, &[len as u64], n + 1);
                    for i in 1..=n {
                        let wi = if i % 2 == 0 { 1.0 } else { w * i as f64 };
                        c.model_params[i].insert("weight".into(), wi);
                    }
                    c.params.insert("lambda".into(), lambda);
                    c.params.insert("normalize".into(), normalize);
                    c.work = Work::BF16;
                    let plan = method.plan(&c.ctx()).unwrap();
                    let mut deltas = vec![0f32; n.max(1) * CHUNK];
                    for j in 0..n {
                        for i in 0..len {
                            deltas[j * CHUNK + i] = val(i, j);
                        }
                    }
                    let want = mix_reference(&plan, cons, &deltas, &base, bf);
                    let what = format!("{} {n} models, w {w}", method.spec.name);
                    let kept = deltas.clone();
                    let mut got = vec![0f32; len];
                    let mut mixer = mix::Mixer::new(&plan);
                    if mixer.mix_shared(method, &plan, &deltas, &base, &mut got) {
                        assert_eq!(bits(&got), bits(&want), "{what}");
                        assert_eq!(bits(&deltas), bits(&kept), "{what}: deltas changed");
                    }
                    // the f32 mix: the same steps without rounding
                    let f32_want = mix_reference(&plan, cons, &deltas, &base, |x| x);
                    let t: f32 = plan.weights.iter().sum();
                    let t = if t.abs() < 1e-8 { 1.0 } else { t };
                    let mut sc = [[0f32; CHUNK]; 3];
                    mix_f32(&plan, cons, t, &deltas, &base, &mut got, &mut sc);
                    assert_eq!(bits(&got), bits(&f32_want), "{what}, f32");
                    mix_rounded::<1>(&plan, cons, &mut deltas, &base, &mut got);
                    assert_eq!(bits(&got), bits(&want), "{what}, baseline build");
                    for level in simd::levels() {
                        let l = level.name();
                        mix_f32_wide(level, &plan, cons, t, &kept, &base, &mut got, &mut sc);
                        assert_eq!(bits(&got), bits(&f32_want), "{what}, f32 {l}");
                        let mut d = kept.clone();
                        mix_rounded_wide::<1>(level, &plan, cons, &mut d, &base, &mut got);
                        assert_eq!(bits(&got), bits(&want), "{what}, {l} build");
                        if !cons {
                            fused::sum_rounded_wide::<1>(level, &plan, &kept, &base, &mut got);
                            assert_eq!(bits(&got), bits(&want), "{what}, {l} sum");
                        }
                    }
                }
            }
        }
    }

    /// mergekit's bf16 mix element by element, each step rounded with `r`.
    fn mix_reference(
        plan: &Plan,
        consensus: bool,
        deltas: &[f32],
        base: &[f32],
        r: impl Fn(f32) -> f32,
    ) -> Vec<f32> {
        let ws = &plan.weights;
        let t = r(ws.iter().sum());
        let t = if t.abs() < 1e-8 { 1.0 } else { t };
        (0..base.len())
            .map(|i| {
                let wd: Vec<f32> = (0..ws.len())
                    .map(|j| r(deltas[j * CHUNK + i] * ws[j]))
                    .collect();
                let s = r(wd.iter().fold(0.0, |a, &x| a + x));
                let keep = |x: f32| !consensus || if s >= 0.0 { x > 0.0 } else { x < 0.0 };
                let mut m = 0.0f32;
                let mut dv = 0.0f32;
                for (&x, &wj) in wd.iter().zip(ws) {
                    m += if keep(x) { x } else { 0.0 };
                    dv += if keep(x) { wj } else { 0.0 };
                }
                let mut m = r(m);
                let dv = if consensus { r(dv) } else { t };
                let dv = if dv == 0.0 { 1.0 } else { dv };
                if plan.normalize {
                    m = r(m / dv);
                }
                if plan.lambda != 1.0 {
                    m = r(m * plan.lambda);
                }
                r(base[i] + m)
            })
            .collect()
    }

    #[test]
    fn bf16_op_by_op() {
        let bf = |x: f32| half::bf16::from_f32(x).to_f32();
        let base = [1.0f32, -0.5, 0.25, 3.0, 0.0078125, -7.5];
        let m1 = [1.0234375f32, -0.49609375, 0.26953125, 2.90625, 0.0, -7.25];
        let m2 = [
            0.98828125f32,
            -0.515625,
            0.2421875,
            3.0625,
            0.01171875,
            -7.75,
        ];
        let (w1, w2, lambda) = (0.3f64, 0.9f64, 0.7f64);
        for method in [&TASK_ARITHMETIC, &TIES] {
            let mut c = Case::new(&[6], 3).with_defaults(method);
            c.base = Some(0);
            c.model_params[1].insert("weight".into(), w1);
            c.model_params[2].insert("weight".into(), w2);
            c.params.insert("lambda".into(), lambda);
            c.work = Work::BF16;
            let out = run(method, &c, &[base.to_vec(), m1.to_vec(), m2.to_vec()]);
            let (w1, w2, l) = (bf(w1 as f32), bf(w2 as f32), lambda as f32);
            let want: Vec<f32> = (0..6)
                .map(|e| {
                    let d1 = bf(m1[e] - base[e]);
                    let d2 = bf(m2[e] - base[e]);
                    let (wd1, wd2) = (bf(d1 * w1), bf(d2 * w2));
                    let mixed = if std::ptr::eq(method, &TIES) {
                        let pos = bf(wd1 + wd2) >= 0.0;
                        let agree = |wd: f32| if pos { wd > 0.0 } else { wd < 0.0 };
                        let (mut m, mut dv) = (0f32, 0f32);
                        for (wd, w) in [(wd1, w1), (wd2, w2)] {
                            if agree(wd) {
                                m += wd;
                                dv += w;
                            }
                        }
                        let dv = if bf(dv) == 0.0 { 1.0 } else { bf(dv) };
                        bf(bf(m) / dv) // ties normalizes
                    } else {
                        bf(wd1 + wd2)
                    };
                    bf(base[e] + bf(mixed * l))
                })
                .collect();
            assert_eq!(out, want, "{}", method.spec.name);
        }
    }

    fn case(m: &Gta, shape: &[u64], n_models: usize) -> Case {
        let mut c = Case::new(shape, n_models);
        c.base = Some(0);
        c.seed = 17;
        for i in 1..n_models {
            c.model_params[i].insert("weight".into(), 1.0);
        }
        c.with_defaults(m)
    }

    fn set(c: &mut Case, i: usize, name: &str, v: f64) {
        c.model_params[i].insert(name.into(), v);
    }

    #[test]
    fn task_arithmetic_by_hand() {
        let m = &TASK_ARITHMETIC;
        let mut c = case(m, &[4], 3);
        set(&mut c, 2, "weight", 0.5);
        let inputs = [
            vec![1.0, 2.0, 3.0, 4.0],
            vec![2.0; 4],
            vec![1.0, 3.0, 5.0, 0.0],
        ];
        assert_eq!(run(m, &c, &inputs), vec![2.0, 2.5, 3.0, 0.0]);
        c.params.insert("normalize".into(), 1.0);
        c.params.insert("lambda".into(), 3.0);
        // deltas sum to [1, .5, 0, -4], / 1.5, * 3
        let want: Vec<f32> = [1.0f32, 0.5, 0.0, -4.0]
            .iter()
            .zip(&inputs[0])
            .map(|(d, b)| b + d / 1.5 * 3.0)
            .collect();
        assert_eq!(run(m, &c, &inputs), want);
    }

    #[test]
    fn ties_by_hand() {
        let m = &TIES;
        let mut c = case(m, &[4], 3);
        set(&mut c, 1, "density", 0.5);
        set(&mut c, 2, "density", 0.5);
        // model 1 keeps -4 and 3; model 2 keeps 2 and the later of the tied 1s
        let inputs = [
            vec![0.0; 4],
            vec![1.0, -2.0, 3.0, -4.0],
            vec![-1.0, 1.0, 2.0, 0.5],
        ];
        assert_eq!(run(m, &c, &inputs), vec![0.0, 1.0, 2.5, -4.0]);
        // without normalize the agreeing deltas are summed
        c.params.insert("normalize".into(), 0.0);
        assert_eq!(run(m, &c, &inputs), vec![0.0, 1.0, 5.0, -4.0]);
        // opposite signs: the weighted majority wins
        // tiny densities keep at least one element; density 0 is refused at plan time
        let mut c1 = case(m, &[4], 2);
        set(&mut c1, 1, "density", 0.01);
        assert_eq!(run(m, &c1, &inputs[..2]), vec![0.0, 0.0, 0.0, -4.0]);
        set(&mut c1, 1, "density", 0.0);
        assert!(m.check(&c1.ctx()).is_err());
        let mut c = case(m, &[2], 3);
        c.params.insert("normalize".into(), 0.0);
        set(&mut c, 2, "weight", 3.0);
        let inputs = [vec![1.0; 2], vec![2.0, 0.0], vec![0.0, 1.5]];
        assert_eq!(run(m, &c, &inputs), vec![-2.0, 2.5]);
    }

    #[test]
    fn breadcrumbs_by_hand() {
        let m = &BREADCRUMBS;
        let mut c = case(m, &[10], 2);
        let base = vec![0.0f32; 10];
        let x: Vec<f32> = (1..=10).map(|v| v as f32).collect();
        let inputs = [base, x];
        let with = |c: &mut Case, density: f64, gamma: f64| {
            set(c, 1, "density", density);
            set(c, 1, "gamma", gamma);
            run(m, c, &inputs)
        };
        // target 5, top 1 → ranks [4, 9): values 5..=9
        let want: Vec<f32> = (1..=10)
            .map(|v| if (5..=9).contains(&v) { v as f32 } else { 0.0 })
            .collect();
        assert_eq!(with(&mut c, 0.5, 0.1), want);
        // target 9, top 1 → n_bot 0: values 1..=9
        let want: Vec<f32> = (1..=10)
            .map(|v| if v <= 9 { v as f32 } else { 0.0 })
            .collect();
        assert_eq!(with(&mut c, 0.95, 0.1), want);
        // no outliers to cut (int(gamma * n) == 0): the `target` largest, values 6..=10
        let want: Vec<f32> = (1..=10)
            .map(|v| if v >= 6 { v as f32 } else { 0.0 })
            .collect();
        assert_eq!(with(&mut c, 0.5, 0.0), want);
        let want: Vec<f32> = (1..=10)
            .map(|v| if v >= 2 { v as f32 } else { 0.0 })
            .collect();
        assert_eq!(with(&mut c, 0.99, 0.05), want);
        // density >= 1 keeps everything
        assert_eq!(with(&mut c, 1.0, 0.1), inputs[1]);
        // rescale restores the L1 norm: kept 5..=9 (sum 35) of 55
        c.params.insert("rescale".into(), 1.0);
        let out = with(&mut c, 0.5, 0.1);
        let s = 55f32 / 35f32;
        let want: Vec<f32> = (1..=10)
            .map(|v| {
                if (5..=9).contains(&v) {
                    v as f32 * s
                } else {
                    0.0
                }
            })
            .collect();
        assert_eq!(out, want);
    }

    #[test]
    fn breadcrumbs_ties_by_hand() {
        let m = &BREADCRUMBS_TIES;
        let mut c = case(m, &[10], 3);
        for i in 1..3 {
            set(&mut c, i, "density", 0.8);
            set(&mut c, i, "gamma", 0.1);
        }
        // each model keeps ranks [1, 9): drops its smallest and its largest |delta|
        let a: Vec<f32> = (1..=10).map(|v| v as f32).collect();
        let b: Vec<f32> = (1..=10)
            .map(|v| -(v as f32) * 0.5 + if v == 1 { 100.0 } else { 0.0 })
            .collect();
        let out = run(m, &c, &[vec![0.0; 10], a.clone(), b.clone()]);
        // a drops 1 and 10; b drops -1 (v=2, its smallest) and 99.5 (v=1, its largest)
        let mut want = vec![0.0f32; 10];
        for v in 2..=9usize {
            let (x, y) = (a[v - 1], if v >= 3 { b[v - 1] } else { 0.0 });
            // majority is +: only a's positive delta counts
            want[v - 1] = if x + y >= 0.0 { x } else { y };
        }
        // v = 10: a dropped it, b kept it alone
        want[9] = b[9];
        assert_eq!(out, want);
    }

    #[test]
    fn dare_extremes_and_rescale() {
        for m in [&DARE_LINEAR, &DARE_TIES] {
            let mut c = case(m, &[13, 11], 2);
            let base = data(143, 1, 1.0);
            let x: Vec<f32> = data(143, 2, 1.0)
                .iter()
                .zip(&base)
                .map(|(d, b)| b + d)
                .collect();
            let inputs = [base.clone(), x.clone()];
            // density 1: plain task arithmetic
            let plain = run(
                &TASK_ARITHMETIC,
                &case(&TASK_ARITHMETIC, &[13, 11], 2),
                &inputs,
            );
            assert_eq!(run(m, &c, &inputs), plain);
            set(&mut c, 1, "density", 0.0);
            assert!(m.check(&c.ctx()).is_err());
            set(&mut c, 1, "density", 0.5);
            let out = run(m, &c, &inputs);
            let deltas: Vec<f32> = x.iter().zip(&base).map(|(x, b)| x - b).collect();
            let kept: Vec<bool> = out.iter().zip(&base).map(|(o, b)| o != b).collect();
            let n_kept = kept.iter().filter(|&&k| k).count();
            assert!((40..=103).contains(&n_kept), "{n_kept}");
            let l1: f64 = deltas.iter().map(|d| d.abs() as f64).sum();
            let l1k: f64 = deltas
                .iter()
                .zip(&kept)
                .filter(|(_, &k)| k)
                .map(|(d, _)| d.abs() as f64)
                .sum();
            let s = (l1 as f32) / (l1k as f32);
            for ((o, b), (d, k)) in out.iter().zip(&base).zip(deltas.iter().zip(&kept)) {
                if *k {
                    assert_eq!(*o, b + d * s);
                }
            }
        }
    }

    /// mergekit's masks: element e of input i is kept iff 24 bits of the MT19937 output at
    /// (input i's stream position + e) fall below the density in the working dtype.
    #[test]
    fn dare_draws_are_torch_bernoulli() {
        let (rows, cols) = (300u64, 400u64);
        let n = (rows * cols) as usize;
        let mut c = case(&DARE_LINEAR, &[rows, cols], 3);
        for i in 1..3 {
            set(&mut c, i, "density", 0.3);
        }
        c.params.insert("rescale".into(), 0.0);
        let base = data(n, 1, 1.0);
        let inputs = [base.clone(), data(n, 2, 1.0), data(n, 3, 1.0)];
        let changed = |c: &Case| -> Vec<bool> {
            run(&DARE_LINEAR, c, &inputs)
                .iter()
                .zip(&base)
                .map(|(o, b)| o != b)
                .collect()
        };
        let (seed, offsets) = (c.seed, c.ctx().rng_offsets);
        let expect = |p: f64| -> Vec<bool> {
            let mask = |i: usize| -> Vec<bool> {
                let mut g = super::super::mt::Mt19937::at(seed, offsets[i]);
                (0..n)
                    .map(|_| ((g.next_u32() & 0xff_ffff) as f64 / (1u64 << 24) as f64) < p)
                    .collect()
            };
            let (a, b) = (mask(1), mask(2));
            a.iter().zip(&b).map(|(x, y)| x | y).collect()
        };
        let f32_mask = changed(&c);
        assert_eq!(f32_mask, expect(0.3f32 as f64));
        // bfloat16: torch fills the probability tensor with bf16(0.3) = 0.30078125
        c.work_bf16 = true;
        let bf16_mask = changed(&c);
        assert_eq!(bf16_mask, expect(0.30078125));
        assert_ne!(
            f32_mask, bf16_mask,
            "the bf16 rounding should change some draws"
        );
    }

    #[test]
    fn della_probabilities_follow_rank() {
        for m in [&DELLA, &DELLA_LINEAR] {
            let rows = 400u64;
            let mut c = case(m, &[rows, 8], 2);
            set(&mut c, 1, "density", 0.5);
            set(&mut c, 1, "epsilon", 0.3);
            c.params.insert("rescale".into(), 0.0);
            let base = vec![0.0f32; rows as usize * 8];
            // every row: magnitudes 1..=8 in shuffled order
            let x: Vec<f32> = (0..rows as usize * 8)
                .map(|e| (((e % 8) * 5 + e / 8) % 8 + 1) as f32)
                .collect();
            let out = run(m, &c, &[base, x.clone()]);
            let mut kept = [0usize; 8];
            for (o, v) in out.iter().zip(&x) {
                if *o != 0.0 {
                    assert_eq!(o, v);
                    kept[*v as usize - 1] += 1;
                }
            }
            // smallest kept with p = 0.2, largest with p = 0.8
            let share = |k: usize| kept[k] as f64 / rows as f64;
            assert!((share(0) - 0.2).abs() < 0.07, "{kept:?}");
            assert!((share(7) - 0.8).abs() < 0.07, "{kept:?}");
        }
    }

    #[test]
    fn checks_reject_bad_parameters() {
        let err = |m: &Gta, c: &Case| m.check(&c.ctx()).unwrap_err().to_string();
        let mut c = case(&TIES, &[10, 10], 2);
        set(&mut c, 1, "density", -0.5);
        assert!(err(&TIES, &c).contains("density"));

        let mut c = case(&DELLA, &[10, 10], 2);
        set(&mut c, 1, "density", 0.1);
        assert!(err(&DELLA, &c).contains("epsilon"));
        set(&mut c, 1, "density", 0.9);
        assert!(err(&DELLA, &c).contains("epsilon"));
        set(&mut c, 1, "density", 0.5);
        assert!(DELLA.check(&c.ctx()).is_ok());
        set(&mut c, 1, "density", 0.0);
        assert!(err(&DELLA, &c).contains("density must be greater than 0"));

        let mut c = case(&BREADCRUMBS, &[10], 2);
        set(&mut c, 1, "density", 0.5);
        set(&mut c, 1, "gamma", 1.5);
        assert!(err(&BREADCRUMBS, &c).contains("gamma"));

        let mut c = case(&TASK_ARITHMETIC, &[3], 2);
        c.base = None;
        assert!(err(&TASK_ARITHMETIC, &c).contains("base"));
        let mut c = case(&TASK_ARITHMETIC, &[3], 2);
        set(&mut c, 1, "weight", f64::NAN);
        assert!(err(&TASK_ARITHMETIC, &c).contains("weight"));
    }

    /// Inputs with exact ties (values on a coarse grid) and zero deltas.
    fn tie_inputs(n: usize, n_models: usize) -> Vec<Vec<f32>> {
        let base = data(n, 100, 1.0);
        let mut out = vec![base.clone()];
        for i in 1..n_models {
            let d = data(n, 100 + i as u64, 4.0);
            out.push(
                d.iter()
                    .zip(&base)
                    .enumerate()
                    .map(|(e, (d, b))| if e % 7 == i { *b } else { b + d.round() * 0.25 })
                    .collect(),
            );
        }
        out
    }

    #[test]
    fn whole_and_cut_are_bit_identical() {
        for m in [
            &TASK_ARITHMETIC,
            &TIES,
            &DARE_LINEAR,
            &DARE_TIES,
            &BREADCRUMBS,
            &BREADCRUMBS_TIES,
            &DELLA,
            &DELLA_LINEAR,
        ] {
            for shape in [vec![37u64, 19], vec![101], vec![5, 3, 7]] {
                let n: u64 = shape.iter().product();
                for rescale in [0.0, 1.0] {
                    let mut c = case(m, &shape, 4);
                    c.base = Some(1);
                    c.params.insert("rescale".into(), rescale);
                    c.params.insert("lambda".into(), 0.9);
                    set(&mut c, 0, "weight", 0.7);
                    set(&mut c, 2, "weight", -0.3);
                    set(&mut c, 0, "density", 0.4);
                    set(&mut c, 2, "density", 0.55);
                    set(&mut c, 3, "density", 0.3);
                    set(&mut c, 0, "gamma", 0.05);
                    set(&mut c, 2, "gamma", 0.0);
                    set(&mut c, 3, "epsilon", 0.2);
                    let inputs = tie_inputs(n as usize, 4);
                    let whole = run(m, &c, &inputs);
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert!(whole.iter().zip(&inputs[1]).any(|(o, b)| o != b));
                    for cut in [1u64, 2, 3, 5, 7, 36] {
                        let part = run_cut(m, &c, &inputs, cut);
                        assert_eq!(
                            bits(&whole),
                            bits(&part),
                            "{} {shape:?} cut {cut}",
                            m.spec.name
                        );
                    }
                }
            }
        }
    }

    /// Values (bfloat16 values) as bfloat16 bytes, as a checkpoint stores them.
    fn bf16_bytes(inputs: &[Vec<f32>]) -> Vec<Vec<u8>> {
        let le = |x: &f32| half::bf16::from_f32(*x).to_le_bytes();
        inputs
            .iter()
            .map(|v| v.iter().flat_map(le).collect())
            .collect()
    }

    /// Four inputs of `n` values each (from seed `seed` on), rounded to bfloat16.
    fn bf16_inputs(n: usize, seed: u64) -> Vec<Vec<f32>> {
        (0..4)
            .map(|i| {
                data(n, seed + i, 1.0)
                    .iter()
                    .map(|&x| half::bf16::from_f32(x).to_f32())
                    .collect()
            })
            .collect()
    }

    /// `m` run whole over `inputs` (the reference the stored paths must equal).
    fn run_whole_of(m: &Gta, ctx: &TensorCtx, inputs: &[Vec<f32>]) -> Vec<f32> {
        let refs: Vec<&[f32]> = inputs.iter().map(Vec::as_slice).collect();
        let mut want = vec![0f32; refs[0].len()];
        crate::kernels::run_whole(m, ctx, &refs, &mut want).unwrap();
        want
    }

    /// A tensor large enough for pass 0 to keep the keys pass 1 counts ([`select::Capture`],
    /// f32 keys): the stored path gives the bits of the method run whole, and tells its caller
    /// it is done with every element by the end (the worker lets mapped pages go by it).
    #[test]
    fn stored_with_kept_keys_equals_whole() {
        let (rows, cols) = (400, 1001);
        let n = rows * cols;
        let inputs = bf16_inputs(n, 7);
        for m in [&TIES, &BREADCRUMBS_TIES] {
            let mut c = case(m, &[rows as u64, cols as u64], 4);
            c.base = Some(0);
            set(&mut c, 1, "density", 0.3);
            set(&mut c, 2, "density", 0.55);
            set(&mut c, 3, "density", 0.8);
            let ctx = c.ctx();
            let want = run_whole_of(m, &ctx, &inputs);
            let bytes = bf16_bytes(&inputs);
            let stored: Vec<Stored> = bytes.iter().map(|b| Stored::Bf16(b)).collect();
            let mut got = vec![f32::NAN; n];
            let done = std::cell::Cell::new(0);
            let let_go = |r: std::ops::Range<usize>| {
                assert!(r.start <= r.end && r.end <= n, "{r:?}");
                done.set(done.get().max(r.end));
            };
            m.whole_stored(&ctx, &stored, &mut got, &let_go).unwrap();
            assert_eq!(done.get(), n, "{}: let go of elements up to", m.spec.name);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert!(bits(&got) == bits(&want), "{}", m.spec.name);
        }
    }

    /// A tensor large enough for a sample to bracket its boundaries: the one walk
    /// ([`once`]) takes it, and gives the bits of the method run whole, in f32 and bf16, with
    /// breadcrumbs' two boundaries, a model at density one, and NaN and infinite inputs.
    #[test]
    fn one_walk_equals_whole() {
        let (rows, cols) = (1000, 1111);
        let n = rows * cols;
        let mut inputs = bf16_inputs(n, 3);
        inputs[2][5] = f32::NAN;
        inputs[0][n - 9] = f32::INFINITY;
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for m in [&TIES, &BREADCRUMBS_TIES, &BREADCRUMBS] {
            for work in [Work::F32, Work::BF16] {
                let mut c = case(m, &[rows as u64, cols as u64], 4);
                c.base = Some(0);
                c.work = work;
                set(&mut c, 1, "density", 0.3);
                set(&mut c, 2, "density", 0.55);
                set(&mut c, 3, "density", 1.0);
                let ctx = c.ctx();
                let want = run_whole_of(m, &ctx, &inputs);
                let bytes = bf16_bytes(&inputs);
                let stored: Vec<Stored> = bytes.iter().map(|b| Stored::Bf16(b)).collect();
                let t = stored::Deltas {
                    work,
                    base: stored[0],
                    models: stored[1..].to_vec(),
                    let_go: &|_| {},
                };
                let mut got = vec![f32::NAN; n];
                let plan = m.plan(&ctx).unwrap();
                // (any share: breadcrumbs' two boundaries per model take more than production tries)
                let sample = std::cell::OnceCell::new();
                let took =
                    (m.whole_in_one_walk(&plan, &ctx, &t, &mut got, (&sample, 1.0))).unwrap();
                assert!(took, "{} {work:?}: the walk gave up", m.spec.name);
                assert!(bits(&got) == bits(&want), "{} {work:?}", m.spec.name);
            }
        }
    }

    /// The held path ([`Method::whole_in_place`]: each delta made in place of its input, by
    /// pass 0's walk over its keys where it is a selection problem) gives the bits of the
    /// method run whole, in f32 and bf16, with a model that is no selection problem (at
    /// density one) and without; and it says whether every input was finite (a NaN or an
    /// infinity in the base or in any model, at any place). So does the path from the inputs
    /// as stored ([`Method::whole_stored`]).
    #[test]
    fn held_and_stored_equal_whole() {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let bf = |v: Vec<f32>| -> Vec<f32> {
            v.iter()
                .map(|&x| half::bf16::from_f32(x).to_f32())
                .collect()
        };
        for m in [
            &TIES,
            &DARE_TIES,
            &BREADCRUMBS_TIES,
            &BREADCRUMBS,
            &DARE_LINEAR,
        ] {
            for work in [Work::F32, Work::BF16] {
                for d3 in [0.3, 1.0] {
                    let mut c = case(m, &[37, 19], 4);
                    c.base = Some(1);
                    c.work = work;
                    c.params.insert("rescale".into(), 1.0);
                    set(&mut c, 0, "weight", 0.7);
                    set(&mut c, 0, "density", 0.4);
                    set(&mut c, 2, "density", 0.55);
                    set(&mut c, 3, "density", d3);
                    let clean: Vec<Vec<f32>> = tie_inputs(37 * 19, 4).into_iter().map(bf).collect();
                    let mut cases = vec![(clean.clone(), true)];
                    for (i, at, bad) in
                        [(1, 0, f32::NAN), (0, 700, f32::INFINITY), (3, 5, f32::NAN)]
                    {
                        let mut v = clean.clone();
                        v[i][at] = bad;
                        cases.push((v, false));
                    }
                    for (inputs, finite) in cases {
                        let what = format!("{} {work:?} d3 {d3} finite {finite}", m.spec.name);
                        let ctx = c.ctx();
                        let refs: Vec<&[f32]> = inputs.iter().map(Vec::as_slice).collect();
                        let mut want = vec![0f32; 37 * 19];
                        let whole = crate::kernels::run_whole(m, &ctx, &refs, &mut want);
                        let mut held_in = inputs.clone();
                        let mut muts: Vec<&mut [f32]> =
                            held_in.iter_mut().map(Vec::as_mut_slice).collect();
                        let mut got = vec![f32::NAN; 37 * 19];
                        let Some(held) = m.whole_in_place(&ctx, &mut muts, &mut got) else {
                            panic!("{what}: not held");
                        };
                        match (&whole, held) {
                            (Ok(()), Ok(f)) => {
                                assert_eq!(bits(&got), bits(&want), "{what}");
                                assert_eq!(f, finite, "{what}");
                            }
                            (Err(w), Err(_)) => assert!(!finite, "{what}: {w}"),
                            (w, h) => panic!("{what}: whole {w:?}, held {h:?}"),
                        }
                        // the same inputs as stored (bf16 bytes: the values are bf16)
                        let bytes = bf16_bytes(&inputs);
                        let stored: Vec<Stored> = bytes.iter().map(|b| Stored::Bf16(b)).collect();
                        assert!(m.takes_stored(&ctx), "{what}");
                        let mut got = vec![f32::NAN; 37 * 19];
                        match (&whole, m.whole_stored(&ctx, &stored, &mut got, &|_| {})) {
                            (Ok(()), Ok(())) => assert_eq!(bits(&got), bits(&want), "{what}"),
                            (Err(_), Err(_)) => {}
                            (w, s) => panic!("{what}: whole {w:?}, stored {s:?}"),
                        }
                    }
                }
            }
        }
    }
}
