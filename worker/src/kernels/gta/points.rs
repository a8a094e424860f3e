//! Several points of a sweep over the same input rows ([`Method::apply_points`]): each
//! model's task vector (δᵢ = xᵢ − base, rounded as `apply` rounds it) and the base in the
//! working dtype are computed once per chunk for every point; each point then sparsifies,
//! scales and mixes its own copy, exactly as `apply` does (same steps on the same values, so
//! the same bits).

use super::mix::Mixer;
use super::*;

impl Gta {
    /// [`Method::apply_points`]: None when the points do not agree on which input is the base,
    /// which are the others, or the working dtype (their deltas would differ).
    pub(super) fn points(
        &self,
        ctxs: &[TensorCtx],
        states: &[Stats],
        rows: RowRange,
        inputs: &[&[f32]],
        outs: &mut [&mut [f32]],
    ) -> Option<KResult<()>> {
        let plans = match ctxs
            .iter()
            .map(|c| self.plan(c))
            .collect::<KResult<Vec<_>>>()
        {
            Ok(p) => p,
            Err(e) => return Some(Err(e)),
        };
        let p0 = plans.first()?;
        let alike = |p: &Plan| (p.base, &p.others, p.work) == (p0.base, &p0.others, p0.work);
        if !plans.iter().all(alike) || states.len() != plans.len() || outs.len() != plans.len() {
            return None;
        }
        Some(self.points_alike(ctxs, &plans, states, rows, inputs, outs))
    }

    fn points_alike(
        &self,
        ctxs: &[TensorCtx],
        plans: &[Plan],
        states: &[Stats],
        rows: RowRange,
        inputs: &[&[f32]],
        outs: &mut [&mut [f32]],
    ) -> KResult<()> {
        let n = outs.first().map_or(0, |o| o.len());
        let mut each = Vec::with_capacity(plans.len());
        let lens = outs.iter().map(|o| o.len());
        for ((ctx, plan), (state, len)) in ctxs.iter().zip(plans).zip(states.iter().zip(lens)) {
            check_inputs(ctx, inputs, len)?;
            if len != n {
                return Err(Shape("the points' outputs differ in length".into()));
            }
            let sel_state = state.child(0);
            let sparse = (0..plan.others.len())
                .map(|j| Sparse::new(plan, ctx, sel_state, rows, inputs, j))
                .collect::<KResult<Vec<_>>>()?;
            each.push((sparse, rescale_factors(plan, state)?, Mixer::new(plan)));
        }
        let (work, others) = (plans[0].work, &plans[0].others);
        let base = inputs[plans[0].base];
        let nj = others.len();
        let (mut raw, mut deltas) = (vec![0f32; nj * CHUNK], vec![0f32; nj * CHUNK]);
        let mut bbuf = [0f32; CHUNK];
        for at in (0..n).step_by(CHUNK) {
            let end = (at + CHUNK).min(n);
            let len = end - at;
            // every point's deltas before sparsifying: `Sparse::fill`'s subtraction, once
            for (j, &i) in others.iter().enumerate() {
                work.sub_into(
                    &inputs[i][at..end],
                    &base[at..end],
                    &mut raw[j * CHUNK..][..len],
                );
            }
            let bc = work.rounded(&base[at..end], &mut bbuf);
            let last = each.len().saturating_sub(1);
            for (k, (((sparse, scales, mixer), plan), out)) in
                each.iter_mut().zip(plans).zip(outs.iter_mut()).enumerate()
            {
                // a point that neither sparsifies nor rescales mixes the deltas as they are
                let plain = sparse.iter().all(|s| matches!(s, Sparse::All))
                    && scales.iter().all(Option::is_none);
                if plain && mixer.mix_shared(self, plan, &raw, bc, &mut out[at..end]) {
                    continue;
                }
                // each point works on a copy of the deltas but the last, which may have them
                let ds = if k == last {
                    &mut raw
                } else {
                    for j in 0..nj {
                        deltas[j * CHUNK..][..len].copy_from_slice(&raw[j * CHUNK..][..len]);
                    }
                    &mut deltas
                };
                for (j, (sp, scale)) in sparse.iter_mut().zip(scales.iter()).enumerate() {
                    let d = &mut ds[j * CHUNK..][..len];
                    sp.sparsify(at, d);
                    if let Some(s) = *scale {
                        work.scale(d, s);
                    }
                }
                mixer.mix(self, plan, ds, bc, &mut out[at..end]);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::testutil::*;
    use super::super::*;
    use crate::kernels::run_passes;

    /// A point's output from `apply_points` is bit for bit its output alone: every method of
    /// the family, in f32, bfloat16 and float16, over lengths that end mid-chunk, with the
    /// points' weights, densities, lambdas and normalize varying (and with `rescale`).
    #[test]
    fn points_together_give_each_point_alone() {
        let methods = [
            &TASK_ARITHMETIC,
            &TIES,
            &DARE_LINEAR,
            &DARE_TIES,
            &BREADCRUMBS,
            &BREADCRUMBS_TIES,
            &DELLA,
            &DELLA_LINEAR,
        ];
        for m in methods {
            for work in [Work::F32, Work::BF16, Work::F16] {
                for shape in [[3u64, 7], [5, 2 * CHUNK as u64 + 5]] {
                    check_points(m, work, &shape);
                }
            }
        }
    }

    fn point(m: &Gta, shape: &[u64], work: Work, k: usize) -> Case {
        let mut c = Case::new(shape, 3);
        c.base = Some(0);
        c.seed = 5;
        c.work = work;
        c.work_bf16 = work == Work::BF16;
        for i in 1..3 {
            let w = if i == 1 { 1.0 } else { 0.3 + 0.2 * k as f64 };
            c.model_params[i].insert("weight".into(), w);
            c.model_params[i].insert("density".into(), 0.4 + 0.1 * k as f64);
            c.model_params[i].insert("epsilon".into(), 0.05);
            c.model_params[i].insert("gamma".into(), 0.02);
        }
        c.params.insert("lambda".into(), [1.0, 0.7, 1.3][k % 3]);
        c.params.insert("normalize".into(), (k % 2) as f64);
        c.params.insert("rescale".into(), ((k + 1) % 2) as f64);
        c.with_defaults(m)
    }

    fn check_points(m: &Gta, work: Work, shape: &[u64]) {
        let n = (shape[0] * shape[1]) as usize;
        let round = |v: Vec<f32>| -> Vec<f32> {
            let mut v = v;
            work.round_in_place(&mut v);
            v
        };
        let base = round(data(n, 1, 1.0));
        let inputs: Vec<Vec<f32>> = vec![
            base.clone(),
            round(
                base.iter()
                    .zip(data(n, 2, 0.1))
                    .map(|(b, d)| b + d)
                    .collect(),
            ),
            round(
                base.iter()
                    .zip(data(n, 3, 0.1))
                    .map(|(b, d)| b + d)
                    .collect(),
            ),
        ];
        let refs: Vec<&[f32]> = inputs.iter().map(Vec::as_slice).collect();
        let cases: Vec<Case> = (0..4).map(|k| point(m, shape, work, k)).collect();
        let ctxs: Vec<TensorCtx> = cases.iter().map(Case::ctx).collect();
        let whole = RowRange {
            start: 0,
            end: shape[0],
            index: 0,
        };
        let states: Vec<Stats> = ctxs
            .iter()
            .map(|ctx| {
                run_passes(m, ctx, |pass, st| {
                    Ok(vec![m.partial(ctx, pass, st, whole, &refs)?])
                })
                .unwrap()
            })
            .collect();
        let mut outs = vec![vec![f32::NAN; n]; cases.len()];
        let mut muts: Vec<&mut [f32]> = outs.iter_mut().map(Vec::as_mut_slice).collect();
        m.apply_points(&ctxs, &states, whole, &refs, &mut muts)
            .expect("the points agree on base, models and dtype")
            .unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for (k, (case, out)) in cases.iter().zip(&outs).enumerate() {
            let alone = run(m, case, &inputs);
            let what = format!("{} {work:?} {shape:?} point {k}", m.spec.name);
            assert_eq!(bits(out), bits(&alone), "{what}");
        }
    }

    /// Points that do not agree on the working dtype have different deltas: no shared path.
    #[test]
    fn points_with_different_dtypes_do_not_share() {
        let shape = [2u64, 3];
        let (a, b) = (
            point(&TASK_ARITHMETIC, &shape, Work::BF16, 0),
            point(&TASK_ARITHMETIC, &shape, Work::F32, 1),
        );
        let ctxs = [a.ctx(), b.ctx()];
        let inputs = vec![vec![1f32; 6]; 3];
        let refs: Vec<&[f32]> = inputs.iter().map(Vec::as_slice).collect();
        let mut outs = vec![vec![0f32; 6]; 2];
        let mut muts: Vec<&mut [f32]> = outs.iter_mut().map(Vec::as_mut_slice).collect();
        let states = [Stats::default(), Stats::default()];
        let whole = RowRange {
            start: 0,
            end: 2,
            index: 0,
        };
        assert!(TASK_ARITHMETIC
            .apply_points(&ctxs, &states, whole, &refs, &mut muts)
            .is_none());
    }
}
