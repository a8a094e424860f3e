//! A whole tensor from its inputs as stored ([`Stored`]: 16-bit floats): every statistics pass
//! and the mix widen the chunk of the model and of the base they need and subtract, instead of
//! reading deltas decoded up front. A pass then reads 4 bytes per element and model from memory
//! where the held path ([`super::held`]) reads 8 to 12, and nothing is decoded before the first
//! pass: on a tensor that does not fit in cache the passes are memory-bound, so recomputing
//! the delta costs less than storing it. The same steps on the same values as
//! [`Method::partial`] and [`Method::apply`] over the whole tensor, so the same bits.

use std::cell::OnceCell;
use std::ops::Range;

use super::held::problem_model;
use super::*;

impl Gta {
    /// [`Method::takes_stored`]: tensors with statistics passes (the held path's), except
    /// with a DELLA drop (it ranks decoded rows).
    pub(super) fn stored_applies(&self, ctx: &TensorCtx) -> bool {
        self.plan(ctx).is_ok_and(|plan| {
            plan.sel_passes + plan.l1_passes > 0
                && !plan.keep.iter().any(|k| matches!(k, Keep::Della { .. }))
        })
    }

    /// [`Method::whole_stored`].
    pub(super) fn whole_from_stored(
        &self,
        ctx: &TensorCtx,
        inputs: &[Stored],
        out: &mut [f32],
        let_go: &dyn Fn(Range<usize>),
    ) -> KResult<()> {
        let plan = self.plan(ctx)?;
        if !self.stored_applies(ctx) {
            return Err(crate::kernels::KernelError::internal(
                "whole_stored on a tensor takes_stored refuses",
            ));
        }
        let t = Deltas::of(&plan, ctx, inputs, out.len(), let_go)?;
        let base = t.base;
        // (taken at most once: the capture reuses the one walk's sample where it declined)
        let sample = OnceCell::new();
        if self.whole_in_one_walk(&plan, ctx, &t, out, (&sample, select::TRY_SHARE))? {
            return Ok(());
        }
        let whole = RowRange {
            start: 0,
            end: ctx.rows,
            index: 0,
        };
        let mut cap = capture(&plan, &t, &sample);
        let state = crate::kernels::run_passes(self, ctx, |pass, st| {
            if let (1, Some(c)) = (pass, &cap) {
                if pass < plan.sel_passes && !resolved(st) {
                    if let Some(p) = c.partial1(st, &plan.ranks) {
                        return Ok(vec![p]);
                    }
                }
            }
            Ok(vec![stored_partial(
                &plan,
                ctx,
                pass,
                st,
                whole,
                &t,
                cap.as_mut(),
            )?])
        })?;
        let sel_state = state.child(0);
        let mut sparse = Vec::with_capacity(t.models.len());
        for j in 0..t.models.len() {
            sparse.push(Sparse::new(&plan, ctx, sel_state, whole, &[], j)?);
        }
        let scales = rescale_factors(&plan, &state)?;
        let (mut d, mut b) = ([0f32; CHUNK], [0f32; CHUNK]);
        let last = t.models.len().saturating_sub(1);
        self.mix_chunks(&plan, &scales, Base::Stored(base), out, |j, at, dst| {
            let delta = t.chunk(j, at, &mut d[..dst.len()], &mut b);
            sparse[j].sparsify_from(at, delta, dst);
            if j == last {
                (t.let_go)(at..at + dst.len());
            }
        });
        Ok(())
    }
}

/// The deltas of a tensor's models, from their stored values a chunk at a time.
pub(super) struct Deltas<'a> {
    pub(super) work: Work,
    pub(super) base: Stored<'a>,
    /// The non-base inputs, in order.
    pub(super) models: Vec<Stored<'a>>,
    /// Told the elements each walk is done with ([`Method::whole_stored`]).
    pub(super) let_go: &'a dyn Fn(Range<usize>),
}

impl<'a> Deltas<'a> {
    /// The deltas of `inputs` (as stored) by `plan`, checked against tensor `ctx` and its
    /// output's length `n`.
    fn of(
        plan: &Plan,
        ctx: &TensorCtx,
        inputs: &[Stored<'a>],
        n: usize,
        let_go: &'a dyn Fn(Range<usize>),
    ) -> KResult<Self> {
        if inputs.len() != ctx.n_models() {
            return Err(Shape(format!(
                "expected {} inputs, got {}",
                ctx.n_models(),
                inputs.len()
            )));
        }
        let want = (ctx.rows as usize).checked_mul(ctx.row_len);
        if want != Some(n) || inputs.iter().any(|x| x.len() != n) {
            return Err(Shape(
                "stored inputs differ from the output in length".into(),
            ));
        }
        let base = *inputs
            .get(plan.base)
            .ok_or_else(|| Param(format!("base model index {} is out of range", plan.base)))?;
        Ok(Deltas {
            work: plan.work,
            base,
            models: plan.others.iter().map(|&i| inputs[i]).collect(),
            let_go,
        })
    }

    /// Model `j`'s delta over elements `[at, at + d.len())` (at most [`CHUNK`]), in `d`
    /// (`b` is working space): `r(x - b)` in the working dtype, as [`Work::sub_into`] gives it.
    pub(super) fn chunk<'d>(
        &self,
        j: usize,
        at: usize,
        d: &'d mut [f32],
        b: &mut [f32; CHUNK],
    ) -> &'d [f32] {
        self.models[j].delta(&self.base, self.work, at, d, &mut b[..d.len()]);
        d
    }

    /// Model `j`'s delta, chunk by chunk in element order, to `f`.
    pub(super) fn each(&self, j: usize, mut f: impl FnMut(usize, &mut [f32])) {
        let n = self.base.len();
        let (mut d, mut b) = ([0f32; CHUNK], [0f32; CHUNK]);
        for at in (0..n).step_by(CHUNK) {
            let dc = &mut d[..CHUNK.min(n - at)];
            self.chunk(j, at, dc, &mut b);
            f(at, dc);
            (self.let_go)(at..at + dc.len());
        }
    }
}

/// For a tensor whose selection takes a second pass (f32 or float16 keys; bfloat16 ones are
/// located by the first) and that is large enough for a sample to tell: a [`select::Capture`]
/// guessed from the keys of every 16th chunk, which pass 0 then fills.
fn capture(plan: &Plan, t: &Deltas, sample: &OnceCell<select::Sample>) -> Option<select::Capture> {
    let n = t.base.len();
    if plan.sel_passes < 2 || matches!(plan.work, Work::BF16) || n < 16 * CHUNK {
        return None;
    }
    let s = sampled(sample, plan, t);
    Some(select::Capture::new(&plan.ranks, n as u64, s))
}

/// The sample of `t`'s keys in `cell` ([`sample_keys`]), taken on first use.
pub(super) fn sampled<'c>(
    cell: &'c OnceCell<select::Sample>,
    plan: &Plan,
    t: &Deltas,
) -> &'c select::Sample {
    cell.get_or_init(|| {
        select::Sample::new(plan.ranks.len(), &mut |p, f| sample_keys(plan, t, p, f))
    })
}

/// The keys of every 16th chunk of selection problem `p`, to `f`: a sample for
/// [`select::Capture`] and [`select::Brackets`].
fn sample_keys(plan: &Plan, t: &Deltas, p: usize, f: &mut dyn FnMut(&[u32])) {
    let n = t.base.len();
    let (mut d, mut b, mut ks) = ([0f32; CHUNK], [0f32; CHUNK], [0u32; CHUNK]);
    let Some(j) = problem_model(plan, p) else {
        return;
    };
    for at in (0..n).step_by(16 * CHUNK) {
        let dc = &mut d[..CHUNK.min(n - at)];
        t.chunk(j, at, dc, &mut b);
        let k = &mut ks[..dc.len()];
        select::keys_into(dc, k);
        f(k);
        // (reading a chunk maps in the pages around it too)
        (t.let_go)(at..n.min(at + 16 * CHUNK));
    }
}

/// [`Method::partial`] of pass `pass` over the whole tensor, from the stored inputs; pass 0
/// shows its keys to `cap` as it counts them.
fn stored_partial(
    plan: &Plan,
    ctx: &TensorCtx,
    pass: u32,
    state: &Stats,
    rows: RowRange,
    t: &Deltas,
    mut cap: Option<&mut select::Capture>,
) -> KResult<Stats> {
    let mut keys = |p: usize, f: &mut dyn FnMut(&[u32])| {
        let Some(j) = problem_model(plan, p) else {
            return;
        };
        let mut ks = [0u32; CHUNK];
        t.each(j, |_, dc| {
            let ks = &mut ks[..dc.len()];
            select::keys_into(dc, ks);
            if pass == 0 {
                if let Some(c) = cap.as_deref_mut() {
                    c.see(p, ks);
                }
            }
            f(ks);
        });
    };
    // (an L1 pass draws a rescaled drop here and again, the same draws, in the mix)
    let mut deltas = |j: usize, f: &mut dyn FnMut(usize, &mut [f32])| t.each(j, f);
    let src = Sources {
        inputs: &[],
        keys: &mut keys,
        deltas: &mut deltas,
    };
    partial_of(plan, ctx, pass, state, rows, src)
}
