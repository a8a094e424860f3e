//! The mixes of [`super::mix`] as one loop over a chunk: each element's weighted deltas, sign,
//! sums, quotient and finish in registers, for up to four models, reading the deltas without
//! changing them. The same operations in the same order as the loops they replace (the tests
//! check them against each step rounded by `half`, and unrounded for f32). In a 16-bit
//! working dtype their roundings are [`rk_arith`]: every value they round is a result of
//! arithmetic on rounded values.

use super::*;
use crate::kernels::round::rk_arith;
use crate::kernels::simd;

/// The mix of one chunk in working dtype `K` (0: f32, [`rk`]'s 1 and 2: bfloat16, float16)
/// in one loop, with the sign consensus or without (then `t`, the weights' sum, divides when
/// `normalize`; in 16 bits it comes rounded); false, having done nothing, for more than four
/// models or none.
#[inline(always)]
pub(super) fn mix_by_count<const K: u8>(
    plan: &Plan,
    consensus: bool,
    t: f32,
    deltas: &[f32],
    base: &[f32],
    out: &mut [f32],
) -> bool {
    let f = Finish {
        t,
        lambda: plan.lambda,
    };
    let (d, b, o) = (deltas, base, out);
    // (one loop per case: with the tests inside, the vectorised loop computed every case;
    // called here, not through a pointer, so that they are inlined into the wide builds)
    match (consensus, plan.normalize, plan.lambda != 1.0) {
        (false, false, false) => by_count::<K, false, false, false>(plan, d, b, o, f),
        (false, true, false) => by_count::<K, false, true, false>(plan, d, b, o, f),
        (false, false, true) => by_count::<K, false, false, true>(plan, d, b, o, f),
        (false, true, true) => by_count::<K, false, true, true>(plan, d, b, o, f),
        (true, false, false) => by_count::<K, true, false, false>(plan, d, b, o, f),
        (true, true, false) => by_count::<K, true, true, false>(plan, d, b, o, f),
        (true, false, true) => by_count::<K, true, false, true>(plan, d, b, o, f),
        (true, true, true) => by_count::<K, true, true, true>(plan, d, b, o, f),
    }
}

/// The divisor without the consensus, and `lambda`.
#[derive(Clone, Copy)]
struct Finish {
    t: f32,
    lambda: f32,
}

/// [`mix_by_count`] with the model count fixed at compile time.
#[inline(always)]
fn by_count<const K: u8, const C: bool, const N: bool, const L: bool>(
    plan: &Plan,
    deltas: &[f32],
    base: &[f32],
    out: &mut [f32],
    f: Finish,
) -> bool {
    match *plan.weights {
        [a] => fused::<K, C, 1, N, L>([a], deltas, base, out, f),
        [a, b] => fused::<K, C, 2, N, L>([a, b], deltas, base, out, f),
        [a, b, c] => fused::<K, C, 3, N, L>([a, b, c], deltas, base, out, f),
        [a, b, c, d] => fused::<K, C, 4, N, L>([a, b, c, d], deltas, base, out, f),
        _ => return false,
    }
    true
}

/// `r(d · w)`; in 16 bits `d` itself for a weight of 1 (no bit changes: `d` is in the working
/// dtype), in f32 always the product (as the f32 mix computes it).
#[inline(always)]
fn weighted<const K: u8>(d: f32, w: f32) -> f32 {
    if K != 0 && w == 1.0 {
        d
    } else {
        rk_arith::<K>(d * w)
    }
}

/// [`mix_by_count`] of `J` models: the weighted deltas summed from +0.0 in model order (with
/// `C`, only those that agree with the sign of the rounded sum of all, and their weights'
/// rounded sum as the divisor, 1 for none; else `f.t`), rounded; divided with `N`, times
/// `lambda` with `L`, plus the base, each rounded.
#[inline(always)]
fn fused<const K: u8, const C: bool, const J: usize, const N: bool, const L: bool>(
    w: [f32; J],
    deltas: &[f32],
    base: &[f32],
    out: &mut [f32],
    f: Finish,
) {
    let len = out.len();
    let base = &base[..len];
    let ds: [&[f32]; J] = std::array::from_fn(|j| &deltas[j * CHUNK..j * CHUNK + len]);
    for (i, (o, &b)) in out.iter_mut().zip(base).enumerate() {
        let wd: [f32; J] = std::array::from_fn(|j| weighted::<K>(ds[j][i], w[j]));
        let mut s = 0.0f32;
        for &x in &wd {
            s += x;
        }
        let (mut m, mut dv) = (s, f.t);
        if C {
            let s = rk_arith::<K>(s);
            (m, dv) = (0.0, 0.0);
            for (&x, &wj) in wd.iter().zip(&w) {
                // torch: sign(wd) == (sum >= 0 ? 1 : -1); a -0.0 sum counts as >= 0, and
                // sign(0) matches neither majority
                let agree = if s >= 0.0 { x > 0.0 } else { x < 0.0 };
                m += if agree { x } else { 0.0 };
                dv += if agree { wj } else { 0.0 };
            }
            dv = rk_arith::<K>(dv);
            if dv == 0.0 {
                dv = 1.0;
            }
        }
        *o = finish::<K, N, L>(m, dv, f.lambda, b);
    }
}

/// `r(b + r(r(r(m) / dv) · lambda))`, the division only with `N`, the product only with `L`.
#[inline(always)]
fn finish<const K: u8, const N: bool, const L: bool>(m: f32, dv: f32, lambda: f32, b: f32) -> f32 {
    let mut m = rk_arith::<K>(m);
    if N {
        m = rk_arith::<K>(m / dv);
    }
    if L {
        m = rk_arith::<K>(m * lambda);
    }
    rk_arith::<K>(b + m)
}

/// [`super::mix::mix_rounded`] without the sign consensus, reading `deltas` and leaving them
/// as they are (a sweep's points mix the same deltas): [`mix_by_count`] for up to four models,
/// a loop per model beyond (the same operations).
#[inline(always)]
pub(super) fn sum_rounded<const K: u8>(plan: &Plan, deltas: &[f32], base: &[f32], out: &mut [f32]) {
    let w = &plan.weights;
    let t = rk::<K>(w.iter().sum());
    let t = if t.abs() < 1e-8 { 1.0 } else { t };
    if mix_by_count::<K>(plan, false, t, deltas, base, out) {
        return;
    }
    let len = out.len();
    out.fill(0.0);
    for (j, &wj) in w.iter().enumerate() {
        for (o, &d) in out.iter_mut().zip(&deltas[j * CHUNK..j * CHUNK + len]) {
            *o += weighted::<K>(d, wj);
        }
    }
    // (a divisor and a lambda of 1 change no bit of a rounded value: x / 1 and x · 1 are x)
    let dv = if plan.normalize { t } else { 1.0 };
    for (o, &b) in out.iter_mut().zip(base) {
        *o = finish::<K, true, true>(*o, dv, plan.lambda, b);
    }
}

simd::wide! {
    /// [`sum_rounded`] built for `level`.
    pub(super) fn sum_rounded_wide<const K: u8>(
        plan: &Plan,
        deltas: &[f32],
        base: &[f32],
        out: &mut [f32],
    ) => sum_rounded
}
