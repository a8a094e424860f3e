//! Sparsification of one model's delta, chunk by chunk in element order: the rank windows of
//! magnitude selections, random (DARE) and DELLA drops, and the selection keys the statistics
//! passes read.

use super::*;
use crate::kernels::{simd, KernelError};

/// Elements per chunk of the streaming kernels: small enough that every model's chunk of
/// deltas stays in L1/L2, large enough to amortise the per-chunk bookkeeping.
pub(super) const CHUNK: usize = 2048;

/// One side of a rank window, walked in element order without branches on the data: an
/// element with key `k` ranks below iff `k < key`, or `k == key` and fewer than `need` earlier
/// ties (counted from `seen`, this range's prefix) did.
#[derive(Clone, Copy)]
pub(super) struct Edge {
    key: u32,
    need: u64,
    seen: u64,
}

impl Edge {
    pub(super) fn new(b: &select::Boundary, range_index: u32) -> Edge {
        Edge {
            key: b.key,
            need: b.need,
            seen: b.prefix.get(range_index as usize).copied().unwrap_or(0),
        }
    }

    /// Same answer as [`select::Cursor::below`] (1 or 0), in integer arithmetic: the answer
    /// is a coin flip near the median, so a branch on it would mispredict half the time.
    #[inline(always)]
    fn below(&mut self, k: u32) -> u32 {
        let eq = u32::from(k == self.key);
        let r = u32::from(k < self.key) | (eq & u32::from(self.seen < self.need));
        self.seen += u64::from(eq);
        r
    }
}

/// Produces the sparsified (unscaled) delta of one model chunk by chunk, in element order.
pub(super) enum Sparse {
    All,
    Nothing,
    Window {
        lo: Edge,
        hi: Edge,
    },
    Random {
        d: crate::kernels::rng::Draws,
        p: f64,
    },
    /// DELLA ranks whole rows: materialised for the range up front.
    Full(Vec<f32>),
}

impl Sparse {
    pub(super) fn new(
        plan: &Plan,
        ctx: &TensorCtx,
        sel_state: &Stats,
        rows: RowRange,
        inputs: &[&[f32]],
        j: usize,
    ) -> KResult<Sparse> {
        Ok(match plan.keep[j] {
            Keep::All => Sparse::All,
            Keep::Nothing => Sparse::Nothing,
            Keep::Window { sel, .. } => {
                let bs = select::boundaries(sel_state, sel);
                let [lo, hi] = bs.as_slice() else {
                    return Err(KernelError::internal(
                        "selection state is missing a boundary",
                    ));
                };
                Sparse::Window {
                    lo: Edge::new(lo, rows.index),
                    hi: Edge::new(hi, rows.index),
                }
            }
            Keep::Random { p } => Sparse::Random {
                d: ctx.draws(plan.others[j], rows.first_element(ctx)),
                p,
            },
            Keep::Della { density, epsilon } => {
                Sparse::Full(della_delta(plan, ctx, rows, inputs, j, density, epsilon)?)
            }
        })
    }

    /// Writes the sparsified delta of elements `[at, at + d.len())` of the range into `d`;
    /// `x` and `b` are the model's and the base's values there. Chunks must come in order,
    /// from the range's first element (the window counts ties and the draws advance as they
    /// go).
    pub(super) fn fill(&mut self, work: Work, x: &[f32], b: &[f32], at: usize, d: &mut [f32]) {
        if matches!(
            self,
            Sparse::All | Sparse::Window { .. } | Sparse::Random { .. }
        ) {
            work.sub_into(x, b, d);
        }
        self.sparsify(at, d);
    }

    /// [`Sparse::fill`] for a chunk `d` that already holds the unsparsified delta.
    pub(super) fn sparsify(&mut self, at: usize, d: &mut [f32]) {
        match self {
            Sparse::All => {}
            Sparse::Nothing => d.iter_mut().for_each(|v| *v = 0.0),
            Sparse::Window { lo, hi } => {
                let mut tmp = [0f32; CHUNK];
                for dc in d.chunks_mut(CHUNK) {
                    let t = &mut tmp[..dc.len()];
                    t.copy_from_slice(dc);
                    window(lo, hi, t, dc);
                }
            }
            Sparse::Random { d: draws, p } => draws.mask(*p, d),
            Sparse::Full(all) => d.copy_from_slice(&all[at..at + d.len()]),
        }
    }

    /// [`Sparse::sparsify`] of a copy of `src` (the unsparsified delta) written to `d` (as
    /// long): a window reads `src` and writes `d` in one go.
    pub(super) fn sparsify_from(&mut self, at: usize, src: &[f32], d: &mut [f32]) {
        match self {
            Sparse::Window { lo, hi } => window(lo, hi, src, d),
            _ => {
                d.copy_from_slice(src);
                self.sparsify(at, d);
            }
        }
    }
}

/// [`window_block`] over `src` into `dst` (as long), block by block in element order, in the
/// widest build the CPU runs (same bits: integer compares and a product by 0 or 1).
fn window(lo: &mut Edge, hi: &mut Edge, src: &[f32], dst: &mut [f32]) {
    // walk with copies in registers: updating the counters through `self` on every element
    // chains each one behind a store and a reload
    let (mut l, mut h) = (*lo, *hi);
    window_wide(simd::level(), &mut l, &mut h, src, dst);
    (*lo, *hi) = (l, h);
}

#[inline(always)]
fn window_blocks(lo: &mut Edge, hi: &mut Edge, src: &[f32], dst: &mut [f32]) {
    for (s, d) in src.chunks(WINDOW_BLOCK).zip(dst.chunks_mut(WINDOW_BLOCK)) {
        window_block_from(lo, hi, s, d);
    }
}

simd::wide! {
    /// [`window_blocks`] built for `level`.
    fn window_wide(lo: &mut Edge, hi: &mut Edge, src: &[f32], dst: &mut [f32]) => window_blocks
}

/// Elements per block of [`window_block`].
pub(super) const WINDOW_BLOCK: usize = 64;

/// Keeps the elements of `block` (deltas, in element order) that rank at or above `lo` and
/// below `hi`; a dropped element becomes v · 0 (a zero of its sign). Multiplying by 1 or 0
/// rather than selecting: a coin flip near the median must not become a branch (a float select
/// is one on baseline x86-64).
///
/// A tie with an edge's key ranks below it while fewer than `need` earlier ties did. When
/// that answer is the same for every tie in the block (they all fit under `need`, or none
/// do; bf16 deltas tie by the thousand, but they cross `need` once per range), each verdict
/// depends on the element's own key only and the loop vectorises. The block that straddles
/// `need` is walked in order.
#[cfg(test)]
fn window_block(lo: &mut Edge, hi: &mut Edge, block: &mut [f32]) {
    let mut src = [0f32; WINDOW_BLOCK];
    let src = &mut src[..block.len()];
    src.copy_from_slice(block);
    window_block_from(lo, hi, src, block);
}

/// [`window_block`] reading the deltas from `src` and writing the kept ones to `dst` (as
/// long, at most [`WINDOW_BLOCK`]).
#[inline(always)]
fn window_block_from(lo: &mut Edge, hi: &mut Edge, src: &[f32], dst: &mut [f32]) {
    let mut keys = [0u32; WINDOW_BLOCK];
    let keys = &mut keys[..src.len()];
    // (u32 counts: a block has at most WINDOW_BLOCK elements)
    let (mut nl, mut nh) = (0u32, 0u32);
    for (k, v) in keys.iter_mut().zip(src) {
        *k = select::key(*v);
        nl += u32::from(*k == lo.key);
        nh += u32::from(*k == hi.key);
    }
    let (nl, nh) = (u64::from(nl), u64::from(nh));
    let settled = |e: &Edge, n: u64| e.seen >= e.need || e.seen + n <= e.need;
    // the products by 0 or 1 convert from i32, which vectorises (u32 does not before AVX-512)
    if settled(lo, nl) && settled(hi, nh) {
        let (kl, kh) = (lo.key, hi.key);
        let (tl, th) = (u32::from(lo.seen < lo.need), u32::from(hi.seen < hi.need));
        for ((o, &v), &k) in dst.iter_mut().zip(src).zip(keys.iter()) {
            let below_lo = u32::from(k < kl) | (u32::from(k == kl) & tl);
            let below_hi = u32::from(k < kh) | (u32::from(k == kh) & th);
            *o = v * ((1 ^ below_lo) & below_hi) as i32 as f32;
        }
        lo.seen += nl;
        hi.seen += nh;
    } else {
        for ((o, &v), &k) in dst.iter_mut().zip(src).zip(keys.iter()) {
            let kept = (1 ^ lo.below(k)) & hi.below(k);
            *o = v * kept as i32 as f32;
        }
    }
}

/// DELLA's sparsified (unscaled) delta of model `j` over one row range.
pub(super) fn della_delta(
    plan: &Plan,
    ctx: &TensorCtx,
    rows: RowRange,
    inputs: &[&[f32]],
    j: usize,
    density: f64,
    epsilon: f64,
) -> KResult<Vec<f32>> {
    let x = inputs[plan.others[j]];
    let b = inputs[plan.base];
    let mut d = vec![0f32; x.len().min(b.len())];
    plan.work.sub_into(x, b, &mut d);
    let first = rows.first_element(ctx);
    let (m, inner) = della_axis(ctx)?;
    // the range's draws in element order, a row at a time (kept in cache); ranks decide each
    // element's probability
    let mut draws = ctx.draws(plan.others[j], first);
    let mut u: Vec<u64> = Vec::with_capacity(ctx.row_len);
    let lo = (density - epsilon) as f32;
    let eps = epsilon as f32;
    let denom = (m as f32) - 1.0;
    // (|δ| key, position along the axis) packed in one integer: distinct, so an unstable
    // sort gives the (key, index) order
    // the keep probability of each rank along the axis (mergekit: ranks 1..=m, normalised by
    // (rank - min) / (max - min)); the same for every row
    // Held as bits: a draw u in [0, 1) is below p exactly when u's bits are below p's, for
    // p >= 0 (a p below 0 or NaN keeps nothing, as 0 does). Compared as integers, the verdict
    // (a coin flip) does not become a branch; compared as floats it did.
    let p_of_rank: Vec<u64> = (0..m)
        .map(|rank| {
            let rn = (((rank + 1) as f32 - 1.0) / denom).clamp(0.0, 1.0);
            let p = (lo + rn * 2.0 * eps) as f64;
            if p > 0.0 {
                p.to_bits()
            } else {
                0
            }
        })
        .collect();
    let mut order: Vec<u64> = Vec::with_capacity(m);
    let mut sort_tmp: Vec<u64> = Vec::with_capacity(m);
    // each position's probability, scattered from the sorted order: the draws are then read
    // in element order (reading them in sorted order stalled on every load)
    let mut p_at = vec![0u64; m];
    for row in 0..d.len() / ctx.row_len.max(1) {
        let r0 = row * ctx.row_len;
        u.clear();
        u.extend((0..ctx.row_len).map(|_| draws.uniform().to_bits()));
        for c in 0..inner {
            order.clear();
            order.extend(
                (0..m).map(|a| (u64::from(select::key(d[r0 + a * inner + c])) << 32) | a as u64),
            );
            select::radix_sort_high32(&mut order, &mut sort_tmp);
            for (&ka, &p) in order.iter().zip(&p_of_rank) {
                p_at[(ka & 0xffff_ffff) as usize] = p;
            }
            // dropped: v · 0, a zero of its sign (by multiplying: the verdict is a coin flip,
            // a branch on it would mispredict)
            if inner == 1 {
                for ((v, &u), &p) in d[r0..r0 + m].iter_mut().zip(&u).zip(&p_at) {
                    *v *= f32::from(u8::from(u < p));
                }
            } else {
                for (a, &p) in p_at.iter().enumerate() {
                    d[r0 + a * inner + c] *= f32::from(u8::from(u[a * inner + c] < p));
                }
            }
        }
    }
    Ok(d)
}

/// Calls `f` with the selection keys (|δ|) of selection problem `j`, chunk by chunk in
/// element order, without materialising them.
pub(super) fn for_each_key_chunk(
    plan: &Plan,
    inputs: &[&[f32]],
    j: usize,
    f: &mut dyn FnMut(&[u32]),
) {
    let Some(i) = plan
        .keep
        .iter()
        .zip(&plan.others)
        .filter(|(k, _)| matches!(k, Keep::Window { .. }))
        .map(|(_, &i)| i)
        .nth(j)
    else {
        return;
    };
    let (x, b) = (inputs[i], inputs[plan.base]);
    let mut keys = [0u32; CHUNK];
    let mut d = [0f32; CHUNK];
    for (xc, bc) in x.chunks(CHUNK).zip(b.chunks(CHUNK)) {
        let ks = &mut keys[..xc.len()];
        if plan.work.rounds() {
            let d = &mut d[..xc.len()];
            plan.work.sub_into(xc, bc, d);
            select::keys_into(d, ks);
        } else {
            for ((k, &x), &b) in ks.iter_mut().zip(xc).zip(bc) {
                *k = select::key(x - b);
            }
        }
        f(ks);
    }
}

/// Length of the ranked axis (dimension 1, or the whole of a 1-D tensor) and the stride of
/// its elements within a row, as DELLA ranks them.
pub(super) fn della_axis(ctx: &TensorCtx) -> KResult<(usize, usize)> {
    let (m, inner) = match ctx.shape.len() {
        0 => {
            return Err(KernelError::Shape(
                "della sparsification needs a tensor of at least one dimension".into(),
            ))
        }
        1 => (ctx.row_len, 1),
        _ => {
            let m = ctx.shape[1] as usize;
            let inner: usize = ctx.shape[2..].iter().map(|&d| d as usize).product();
            if m * inner != ctx.row_len {
                return Err(KernelError::Shape(format!(
                    "tensor {}: shape does not match its row length",
                    ctx.name
                )));
            }
            (m, inner)
        }
    };
    // the ranking packs a position along the axis into 32 bits
    if m > u32::MAX as usize {
        return Err(KernelError::Shape(format!(
            "tensor {}: della ranks along a dimension of {m} elements; at most {} are supported",
            ctx.name,
            u32::MAX
        )));
    }
    Ok((m, inner))
}

#[cfg(test)]
mod tests {
    use super::*;

    type WindowFn = dyn Fn(&mut Edge, &mut Edge, &[f32], &mut [f32]);

    #[test]
    fn window_blocks_agree_with_the_walk_in_order() {
        // few distinct values (ties by the hundred, as bf16 deltas have), edges that fall
        // inside, before and after the ties of their key, blocks cut at odd places
        let s = crate::kernels::rng::Stream::new(5, 6, 7);
        let vals: Vec<f32> = (0..5000u64)
            .map(|i| ((s.uniform(i) * 9.0).floor() as f32 - 4.0) * 0.25)
            .collect();
        for (lk, lneed, lseen, hk, hneed, hseen) in [
            (0.5f32, 300, 0, 0.75f32, 100, 0),
            (0.0, 0, 0, 1.0, 10_000, 0),
            (0.25, 1000, 990, 1.0, 5, 3),
            (0.0, 560, 17, 0.5, 2, 50),
        ] {
            let edge = |k: f32, need, seen| Edge {
                key: select::key(k),
                need,
                seen,
            };
            let (mut l, mut h) = (edge(lk, lneed, lseen), edge(hk, hneed, hseen));
            let want: Vec<f32> = vals
                .iter()
                .map(|&v| {
                    let k = select::key(v);
                    v * ((1 ^ l.below(k)) & h.below(k)) as f32
                })
                .collect();
            let (mut l2, mut h2) = (edge(lk, lneed, lseen), edge(hk, hneed, hseen));
            let mut got = vals.clone();
            let mut at = 0;
            for len in [1, 63, 64, 65, 200, 7, 5000].iter().cycle() {
                if at == got.len() {
                    break;
                }
                let end = (at + len).min(got.len());
                for block in got[at..end].chunks_mut(WINDOW_BLOCK) {
                    window_block(&mut l2, &mut h2, block);
                }
                at = end;
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want));
            assert_eq!((l2.seen, h2.seen), (l.seen, h.seen));
            // the whole walk from a source, in every build the CPU runs and the dispatching
            // one, in chunks cut at odd places
            let mut builds: Vec<Box<WindowFn>> = vec![Box::new(window)];
            for level in simd::levels() {
                builds.push(Box::new(move |l, h, s, d| window_wide(level, l, h, s, d)));
            }
            for build in builds {
                let (mut l3, mut h3) = (edge(lk, lneed, lseen), edge(hk, hneed, hseen));
                let mut out = vec![7f32; vals.len()];
                for (s, d) in vals.chunks(777).zip(out.chunks_mut(777)) {
                    build(&mut l3, &mut h3, s, d);
                }
                assert_eq!(bits(&out), bits(&want));
                assert_eq!((l3.seen, h3.seen), (l.seen, h.seen));
            }
        }
    }
}
