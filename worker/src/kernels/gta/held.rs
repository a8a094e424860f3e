//! A whole tensor whose inputs the kernel may overwrite: each model's delta is computed once,
//! in place of its input, and every statistics pass and the mix read it; a rescaled random
//! (DARE) drop is drawn once, in the L1 pass, instead of again in the mix. The same steps on
//! the same values as [`Method::partial`] and [`Method::apply`] over the whole tensor, so the
//! same bits.

use super::*;

impl Gta {
    /// [`Method::whole_in_place`]: None for a tensor without statistics passes (nothing to
    /// share between passes) or with a DELLA drop (it ranks the deltas itself).
    pub(super) fn whole_held(
        &self,
        ctx: &TensorCtx,
        inputs: &mut [&mut [f32]],
        out: &mut [f32],
    ) -> Option<KResult<bool>> {
        let plan = match self.plan(ctx) {
            Ok(p) => p,
            Err(e) => return Some(Err(e)),
        };
        if plan.sel_passes + plan.l1_passes == 0
            || plan.keep.iter().any(|k| matches!(k, Keep::Della { .. }))
        {
            return None;
        }
        Some(self.held(ctx, &plan, inputs, out))
    }

    fn held(
        &self,
        ctx: &TensorCtx,
        plan: &Plan,
        inputs: &mut [&mut [f32]],
        out: &mut [f32],
    ) -> KResult<bool> {
        {
            let refs: Vec<&[f32]> = inputs.iter().map(|x| &**x).collect();
            check_inputs(ctx, &refs, out.len())?;
        }
        let (before, rest) = inputs.split_at_mut(plan.base);
        let Some((base, after)) = rest.split_first_mut() else {
            return Err(Param(format!(
                "base model index {} is out of range",
                plan.base
            )));
        };
        let base: &[f32] = base;
        // the non-base inputs in order: `others` is every input but the base, in order
        let mut d: Vec<&mut [f32]> = before
            .iter_mut()
            .chain(after.iter_mut())
            .map(|x| &mut **x)
            .collect();
        let mut finite = crate::kernels::round::all_finite(base);
        // each model's delta is made in place of its input once: by pass 0's walk over its
        // keys when it is a selection problem (the keys of a chunk are taken while it is in
        // cache), else before the first pass that reads it
        let mut made = vec![false; d.len()];
        let whole = RowRange {
            start: 0,
            end: ctx.rows,
            index: 0,
        };
        let mut state = Stats::default();
        let mut masked = vec![false; d.len()];
        for pass in 0..plan.sel_passes + plan.l1_passes {
            let partial = if pass == 0 && plan.sel_passes > 0 {
                let mut keys = |p: usize, f: &mut dyn FnMut(&[u32])| {
                    finite &= deltas_keys(plan, &mut d, &mut made, base, p, f);
                };
                select::partial0_resolvable_with(plan.ranks.len(), &mut keys)
            } else {
                finite &= make_deltas(plan.work, &mut d, &mut made, base);
                if pass >= plan.sel_passes {
                    l1_in_place(plan, ctx, &state, whole, &mut d, &mut masked)?
                } else if resolved(&state) {
                    Stats::default()
                } else {
                    let mut keys = |p: usize, f: &mut dyn FnMut(&[u32])| held_keys(plan, &d, p, f);
                    select::partial1_with(&state, &plan.ranks, &mut keys)
                }
            };
            match self.reduce(ctx, pass, state, vec![partial])? {
                Reduced::More(s) => state = s,
                Reduced::Done(s) => {
                    state = s;
                    break;
                }
            }
        }
        finite &= make_deltas(plan.work, &mut d, &mut made, base);
        let sel_state = state.child(0);
        let mut sparse = Vec::with_capacity(d.len());
        for (j, &m) in masked.iter().enumerate() {
            // (the drop was applied in place: only the copy is left to do)
            sparse.push(match m {
                true => Sparse::All,
                false => Sparse::new(plan, ctx, sel_state, whole, &[], j)?,
            });
        }
        let scales = rescale_factors(plan, &state)?;
        self.mix_chunks(plan, &scales, Base::Decoded(base), out, |j, at, dst| {
            sparse[j].sparsify_from(at, &d[j][at..at + dst.len()], dst);
        });
        Ok(finite)
    }
}

/// The deltas of the models not made yet (`made[j]` false), in place; whether every input
/// they were made from was finite.
fn make_deltas(work: Work, d: &mut [&mut [f32]], made: &mut [bool], base: &[f32]) -> bool {
    let mut finite = true;
    for (dj, m) in d.iter_mut().zip(made.iter_mut()) {
        if !*m {
            finite &= deltas_in_place(work, dj, base);
            *m = true;
        }
    }
    finite
}

/// [`held_keys`] of selection problem `p` in pass 0, making its model's delta in place first
/// chunk by chunk (unless made already) and taking each chunk's keys while it is in cache;
/// whether every input value it made the delta from was finite.
fn deltas_keys(
    plan: &Plan,
    d: &mut [&mut [f32]],
    made: &mut [bool],
    base: &[f32],
    p: usize,
    f: &mut dyn FnMut(&[u32]),
) -> bool {
    let Some(j) = problem_model(plan, p) else {
        return true;
    };
    if made[j] {
        held_keys(plan, d, p, f);
        return true;
    }
    made[j] = true;
    let mut finite = true;
    let mut keys = [0u32; CHUNK];
    for (xc, bc) in d[j].chunks_mut(CHUNK).zip(base.chunks(CHUNK)) {
        finite &= plan.work.sub_in_place(xc, bc);
        let ks = &mut keys[..xc.len()];
        select::keys_into(xc, ks);
        f(ks);
    }
    finite
}

/// `x = r(x - b)` in the working dtype, as [`Work::sub_into`] gives it, chunk by chunk; whether
/// every value of `x` was finite.
fn deltas_in_place(work: Work, x: &mut [f32], b: &[f32]) -> bool {
    let mut finite = true;
    for (xc, bc) in x.chunks_mut(CHUNK).zip(b.chunks(CHUNK)) {
        finite &= work.sub_in_place(xc, bc);
    }
    finite
}

/// [`for_each_key_chunk`] over held deltas: the selection keys of selection problem `p`.
fn held_keys(plan: &Plan, d: &[&mut [f32]], p: usize, f: &mut dyn FnMut(&[u32])) {
    let Some(j) = problem_model(plan, p) else {
        return;
    };
    let mut keys = [0u32; CHUNK];
    for dc in d[j].chunks(CHUNK) {
        let ks = &mut keys[..dc.len()];
        select::keys_into(dc, ks);
        f(ks);
    }
}

/// The model whose delta selection problem `p` ranks (the `p`-th with a window).
pub(super) fn problem_model(plan: &Plan, p: usize) -> Option<usize> {
    plan.keep
        .iter()
        .enumerate()
        .filter(|(_, k)| matches!(k, Keep::Window { .. }))
        .map(|(j, _)| j)
        .nth(p)
}

/// The L1 pass over held deltas: the sums [`Method::partial`] gives, with each rescaled
/// model's drop applied in place (`masked[j]` set) so that the mix does not draw it again.
fn l1_in_place(
    plan: &Plan,
    ctx: &TensorCtx,
    state: &Stats,
    rows: RowRange,
    d: &mut [&mut [f32]],
    masked: &mut [bool],
) -> KResult<Stats> {
    let mut st = Stats::default();
    for (j, dj) in d.iter_mut().enumerate() {
        let mut before = F32Sum::new();
        let mut after = F32Sum::new();
        if plan.keep[j].rescalable() {
            let mut sp = Sparse::new(plan, ctx, state.child(0), rows, &[], j)?;
            for (k, dc) in dj.chunks_mut(CHUNK).enumerate() {
                // the sums are exact, so summing chunk by chunk changes no bit
                before.add_abs(dc);
                sp.sparsify(k * CHUNK, dc);
                after.add_abs(dc);
            }
            masked[j] = true;
        }
        st.sums.push(before.finish());
        st.sums.push(after.finish());
    }
    Ok(st)
}
