//! One statistics pass of a tensor's rows, from wherever its keys and deltas come: the
//! decoded inputs ([`Method::partial`]) or the inputs as stored ([`super::stored`]).

use super::*;

/// Streams each model's delta: `deltas(j, f)` calls `f(at, chunk)` chunk by chunk.
pub(super) type DeltaSource<'a> = dyn FnMut(usize, &mut dyn FnMut(usize, &mut [f32])) + 'a;

/// What a statistics pass reads: each selection problem's keys (`keys(p, f)`: [`KeySource`]),
/// each model's delta (`deltas(j, f)` calls `f(at, chunk)` chunk by chunk in element order,
/// the chunk `r(x - b)` of elements `[at, ..)`, free to overwrite), and the decoded inputs for a
/// DELLA drop (none where the method has none).
pub(super) struct Sources<'a, 'k> {
    pub(super) inputs: &'a [&'a [f32]],
    pub(super) keys: &'k mut select::KeySource<'k>,
    pub(super) deltas: &'k mut DeltaSource<'k>,
}

/// [`Method::partial`] of pass `pass` over rows `rows`, from `src`.
pub(super) fn partial_of(
    plan: &Plan,
    ctx: &TensorCtx,
    pass: u32,
    state: &Stats,
    rows: RowRange,
    src: Sources,
) -> KResult<Stats> {
    if pass < plan.sel_passes {
        return Ok(if pass == 0 {
            select::partial0_resolvable_with(plan.ranks.len(), src.keys)
        } else if resolved(state) {
            // pass 0 located the boundaries (bfloat16 keys): nothing to count
            Stats::default()
        } else {
            select::partial1_with(state, &plan.ranks, src.keys)
        });
    }
    // L1 pass: Σ|δ| and Σ|masked δ| per model (zero sums for models not rescaled)
    let mut st = Stats::default();
    for j in 0..plan.others.len() {
        let mut before = F32Sum::new();
        let mut after = F32Sum::new();
        if plan.keep[j].rescalable() {
            let mut sp = Sparse::new(plan, ctx, state.child(0), rows, src.inputs, j)?;
            (src.deltas)(j, &mut |at, dc| {
                // the sums are exact, so summing chunk by chunk changes no bit
                before.add_abs(dc);
                sp.sparsify(at, dc);
                after.add_abs(dc);
            });
        }
        st.sums.push(before.finish());
        st.sums.push(after.finish());
    }
    Ok(st)
}
