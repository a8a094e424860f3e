//! The mix step of generalized task arithmetic over one chunk: in f32, and op by op in a
//! 16-bit working dtype (each built for every vector width, [`crate::kernels::simd`]).

use super::fused::{mix_by_count, sum_rounded, sum_rounded_wide};
use super::*;
use crate::kernels::simd;

/// The mix of one chunk in f32: the weighted sum of the (agreeing, with `consensus`) deltas,
/// divided by the sum of their weights (or `total_w`) when `normalize`, times `lambda`, plus
/// the base. Loops ordered so that each element sees exactly the scalar sequence of
/// operations (bit-identical however the tensor is cut). `deltas` holds each model's chunk at
/// `j * CHUNK`; `scratch` is working space, reused across chunks.
#[inline(always)]
pub(super) fn mix_f32(
    plan: &Plan,
    consensus: bool,
    total_w: f32,
    deltas: &[f32],
    bc: &[f32],
    out: &mut [f32],
    scratch: &mut [[f32; CHUNK]; 3],
) {
    if mix_by_count::<0>(plan, consensus, total_w, deltas, bc, out) {
        return;
    }
    let len = out.len();
    let w = &plan.weights;
    let [sum, mixed, div] = scratch;
    let (sum, mixed, div) = (&mut sum[..len], &mut mixed[..len], &mut div[..len]);
    mixed.iter_mut().for_each(|m| *m = 0.0);
    if consensus {
        sum.iter_mut().for_each(|m| *m = 0.0);
        for (j, &wj) in w.iter().enumerate() {
            let d = &deltas[j * CHUNK..j * CHUNK + len];
            for (s, &d) in sum.iter_mut().zip(d) {
                *s += d * wj;
            }
        }
        div.iter_mut().for_each(|m| *m = 0.0);
        for (j, &wj) in w.iter().enumerate() {
            let d = &deltas[j * CHUNK..j * CHUNK + len];
            for (((m, dv), &s), &d) in mixed.iter_mut().zip(div.iter_mut()).zip(&*sum).zip(d) {
                let wd = d * wj;
                // torch.sign(0) == 0 matches neither majority. Adding +0.0 instead of
                // skipping is exact: `m` and `dv` start at +0.0 and only ever get
                // non-zero terms, so they are never -0.0 (the one value +0.0 changes).
                let agree = if s >= 0.0 { wd > 0.0 } else { wd < 0.0 };
                *m += if agree { wd } else { 0.0 };
                *dv += if agree { wj } else { 0.0 };
            }
        }
        for dv in div.iter_mut() {
            if *dv == 0.0 {
                *dv = 1.0;
            }
        }
    } else {
        for (j, &wj) in w.iter().enumerate() {
            let d = &deltas[j * CHUNK..j * CHUNK + len];
            for (m, &d) in mixed.iter_mut().zip(d) {
                *m += d * wj;
            }
        }
        div.iter_mut().for_each(|m| *m = total_w);
    }
    if plan.normalize {
        for (m, &dv) in mixed.iter_mut().zip(&*div) {
            *m /= dv;
        }
    }
    if plan.lambda != 1.0 {
        mixed.iter_mut().for_each(|m| *m *= plan.lambda);
    }
    for ((o, &b), &m) in out.iter_mut().zip(bc).zip(&*mixed) {
        *o = b + m;
    }
}

simd::wide! {
    /// [`mix_f32`] built for `level`.
    pub(super) fn mix_f32_wide(
        plan: &Plan,
        consensus: bool,
        total_w: f32,
        deltas: &[f32],
        bc: &[f32],
        out: &mut [f32],
        scratch: &mut [[f32; CHUNK]; 3],
    ) => mix_f32
}

/// The mix of one chunk in working dtype `K` ([`rk`]), op by op as mergekit's torch code:
/// weighted deltas rounded; the sign consensus from their rounded sum; the sum of the agreeing
/// (or all) weighted deltas and of their weights, each accumulated in f32 and rounded (a zero
/// divisor becomes 1, a plain one below 1e-8 too); then the quotient, the `lambda` product and
/// the sum with the base, each rounded. `deltas` holds each model's chunk at `j * CHUNK`, in
/// the working dtype; with the consensus it is overwritten with the weighted deltas (without,
/// [`sum_rounded`] reads it as it is); `base` is in the working dtype too ([`Work::rounded`]).
///
/// Inlined into each build of [`mix_rounded_wide`] (same bits: see [`crate::kernels::simd`]).
#[inline(always)]
pub(super) fn mix_rounded<const K: u8>(
    plan: &Plan,
    consensus: bool,
    deltas: &mut [f32],
    base: &[f32],
    out: &mut [f32],
) {
    if !consensus {
        return sum_rounded::<K>(plan, deltas, base, out);
    }
    // (up to four models in one loop; with the consensus the divisor `t` is not used)
    if mix_by_count::<K>(plan, true, 1.0, deltas, base, out) {
        return;
    }
    let len = out.len();
    let w = &plan.weights;
    // each weighted delta once (the consensus reads it twice). A weight of 1 changes no bit:
    // d · 1 is d, and d is already in the working dtype, so rounding it again is d too.
    for (j, &wj) in w.iter().enumerate() {
        if wj != 1.0 {
            let d = &mut deltas[j * CHUNK..j * CHUNK + len];
            d.iter_mut().for_each(|d| *d = rk::<K>(*d * wj));
        }
    }
    let deltas = &*deltas;
    let mut mixed = [0f32; CHUNK];
    let mut div = [0f32; CHUNK];
    let (mixed, div) = (&mut mixed[..len], &mut div[..len]);
    {
        let mut sign = [0f32; CHUNK];
        let sign = &mut sign[..len];
        for j in 0..w.len() {
            let wd = &deltas[j * CHUNK..j * CHUNK + len];
            for (s, &wd) in sign.iter_mut().zip(wd) {
                *s += wd;
            }
        }
        sign.iter_mut().for_each(|s| *s = rk::<K>(*s));
        for (j, &wj) in w.iter().enumerate() {
            let wd = &deltas[j * CHUNK..j * CHUNK + len];
            for (((m, dv), &s), &wd) in mixed.iter_mut().zip(div.iter_mut()).zip(&*sign).zip(wd) {
                // torch: sign(wd) == (sum >= 0 ? 1 : -1); a -0.0 sum counts as >= 0
                let agree = if s >= 0.0 { wd > 0.0 } else { wd < 0.0 };
                *m += if agree { wd } else { 0.0 };
                *dv += if agree { wj } else { 0.0 };
            }
        }
        for (m, dv) in mixed.iter_mut().zip(div.iter_mut()) {
            *m = rk::<K>(*m);
            *dv = rk::<K>(*dv);
            if *dv == 0.0 {
                *dv = 1.0;
            }
        }
    }
    if plan.normalize {
        for (m, &dv) in mixed.iter_mut().zip(&*div) {
            *m = rk::<K>(*m / dv);
        }
    }
    if plan.lambda != 1.0 {
        mixed
            .iter_mut()
            .for_each(|m| *m = rk::<K>(*m * plan.lambda));
    }
    for ((o, &b), &m) in out.iter_mut().zip(base).zip(&*mixed) {
        *o = rk::<K>(b + m);
    }
}

simd::wide! {
    /// [`mix_rounded`] built for `level`.
    pub(super) fn mix_rounded_wide<const K: u8>(
        plan: &Plan,
        consensus: bool,
        deltas: &mut [f32],
        base: &[f32],
        out: &mut [f32],
    ) => mix_rounded
}

/// The base's values, for [`Gta::mix_chunks`]: decoded already, or as stored.
#[derive(Clone, Copy)]
pub(super) enum Base<'a> {
    Decoded(&'a [f32]),
    Stored(Stored<'a>),
}

impl Base<'_> {
    /// Elements `[at, end)` (at most [`CHUNK`]): borrowed, or widened into `buf`.
    fn chunk<'b>(&'b self, at: usize, end: usize, buf: &'b mut [f32; CHUNK]) -> &'b [f32] {
        match self {
            Base::Decoded(v) => &v[at..end],
            Base::Stored(s) => {
                let b = &mut buf[..end - at];
                s.widen(at, b);
                b
            }
        }
    }
}

impl Gta {
    /// The mix of every model's sparsified delta over `out`'s elements: `fill(j, at, d)` writes
    /// model `j`'s sparsified (unscaled) delta of elements `[at, at + d.len())` into `d`, chunk
    /// by chunk in element order; the rescale factors `scales` apply after it.
    pub(super) fn mix_chunks(
        &self,
        plan: &Plan,
        scales: &[Option<f32>],
        base: Base,
        out: &mut [f32],
        mut fill: impl FnMut(usize, usize, &mut [f32]),
    ) {
        let n = out.len();
        // One chunk of every model's delta, then the mix over the chunk, loops ordered so
        // that each element sees exactly the scalar sequence of operations (bit-identical).
        let mut deltas = vec![0f32; plan.others.len() * CHUNK];
        let mut mixer = Mixer::new(plan);
        let (mut bbuf, mut wide) = ([0f32; CHUNK], [0f32; CHUNK]);
        for at in (0..n).step_by(CHUNK) {
            let end = (at + CHUNK).min(n);
            let len = end - at;
            for (j, scale) in scales.iter().enumerate() {
                let d = &mut deltas[j * CHUNK..j * CHUNK + len];
                fill(j, at, d);
                if let Some(s) = *scale {
                    plan.work.scale(d, s);
                }
            }
            // the base in the working dtype once (usually as read: only checked)
            let bc = plan.work.rounded(base.chunk(at, end, &mut wide), &mut bbuf);
            mixer.mix(self, plan, &mut deltas, bc, &mut out[at..end]);
        }
    }
}

/// The mix of one chunk (of at most [`CHUNK`] elements), with its working space (the f32
/// mix's; made at its first chunk: a Mixer is made for every kernel call, and exec/ calls the
/// kernel once per cache-sized block of rows, where zeroing 24 KiB for a 16-bit mix that never
/// uses it cost as much as the mix).
pub(super) struct Mixer {
    total_w: f32,
    scratch: Option<Box<[[f32; CHUNK]; 3]>>,
}

impl Mixer {
    pub(super) fn new(plan: &Plan) -> Mixer {
        let t: f32 = plan.weights.iter().sum();
        Mixer {
            total_w: if t.abs() < 1e-8 { 1.0 } else { t },
            scratch: None,
        }
    }

    /// Mixes one chunk into `o`: `deltas` holds each model's (sparsified, scaled) delta at
    /// `j * CHUNK` (overwritten by the 16-bit consensus mix), `bc` the base's chunk, already
    /// in the working dtype ([`Work::rounded`]).
    pub(super) fn mix(
        &mut self,
        g: &Gta,
        plan: &Plan,
        deltas: &mut [f32],
        bc: &[f32],
        o: &mut [f32],
    ) {
        if self.mix_shared(g, plan, deltas, bc, o) {
            return;
        }
        // the 16-bit mix with the sign consensus
        let level = simd::level();
        match plan.work {
            Work::BF16 => mix_rounded_wide::<1>(level, plan, true, deltas, bc, o),
            _ => mix_rounded_wide::<2>(level, plan, true, deltas, bc, o),
        }
    }

    /// [`Mixer::mix`] where it reads `deltas` without changing them (in f32, and in a 16-bit
    /// working dtype without the sign consensus), so that a sweep's points can mix the same
    /// deltas; false, having done nothing, where it would overwrite them.
    pub(super) fn mix_shared(
        &mut self,
        g: &Gta,
        plan: &Plan,
        deltas: &[f32],
        bc: &[f32],
        o: &mut [f32],
    ) -> bool {
        let level = simd::level();
        match plan.work {
            Work::F32 => {
                let (cons, t) = (g.cfg.consensus, self.total_w);
                let sc = self
                    .scratch
                    .get_or_insert_with(|| Box::new([[0f32; CHUNK]; 3]));
                mix_f32_wide(level, plan, cons, t, deltas, bc, o, sc)
            }
            _ if g.cfg.consensus => return false,
            Work::BF16 => sum_rounded_wide::<1>(level, plan, deltas, bc, o),
            _ => sum_rounded_wide::<2>(level, plan, deltas, bc, o),
        }
        true
    }
}
