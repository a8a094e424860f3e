//! The 16-bit mixes of [`super::mix`] as one loop over a chunk: each element's weighted
//! deltas, sums and roundings in registers, for up to four models, reading the deltas without
//! changing them. The same operations in the same order as the loops they replace (the tests
//! check them against each step rounded by `half`). Their roundings are [`rk_arith`]: every
//! value they round is a result of arithmetic on rounded values.

use super::*;
use crate::kernels::round::rk_arith;

/// [`super::mix::mix_rounded`] with the sign consensus of up to four models in one loop over the chunk
/// (each element's weighted deltas, sign, sums and quotient in registers), reading `deltas`
/// without changing them; false, having done nothing, for more models.
#[inline(always)]
pub(super) fn consensus_by_count<const K: u8, const N: bool, const L: bool>(
    w: &[f32],
    deltas: &[f32],
    base: &[f32],
    out: &mut [f32],
    lambda: f32,
) -> bool {
    match *w {
        [a] => consensus_fused::<K, 1, N, L>([a], deltas, base, out, lambda),
        [a, b] => consensus_fused::<K, 2, N, L>([a, b], deltas, base, out, lambda),
        [a, b, c] => consensus_fused::<K, 3, N, L>([a, b, c], deltas, base, out, lambda),
        [a, b, c, d] => consensus_fused::<K, 4, N, L>([a, b, c, d], deltas, base, out, lambda),
        _ => return false,
    }
    true
}

/// [`consensus_by_count`] of `J` models: the same operations in the same order as the loops
/// of [`super::mix::mix_rounded`], element by element.
#[inline(always)]
fn consensus_fused<const K: u8, const J: usize, const N: bool, const L: bool>(
    w: [f32; J],
    deltas: &[f32],
    base: &[f32],
    out: &mut [f32],
    lambda: f32,
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
        let s = rk_arith::<K>(s);
        let (mut m, mut dv) = (0.0f32, 0.0f32);
        for (&x, &wj) in wd.iter().zip(&w) {
            // torch: sign(wd) == (sum >= 0 ? 1 : -1); a -0.0 sum counts as >= 0
            let agree = if s >= 0.0 { x > 0.0 } else { x < 0.0 };
            m += if agree { x } else { 0.0 };
            dv += if agree { wj } else { 0.0 };
        }
        let mut m = rk_arith::<K>(m);
        if N {
            let dv = rk_arith::<K>(dv);
            m = rk_arith::<K>(m / if dv == 0.0 { 1.0 } else { dv });
        }
        if L {
            m = rk_arith::<K>(m * lambda);
        }
        *o = rk_arith::<K>(b + m);
    }
}

/// [`super::mix::mix_rounded`] without the sign consensus, reading `deltas` and leaving them as they are
/// (a sweep's points mix the same deltas): each weighted delta `r(d · w)` (`d` itself for a
/// weight of 1), summed in f32 from +0.0 in model order, rounded; divided by the rounded sum
/// of the weights when `normalize` (below 1e-8: by 1), times `lambda`, plus the base, each
/// rounded. One loop over the chunk for up to four models (the sum of an element in registers),
/// a loop per model beyond.
#[inline(always)]
pub(super) fn sum_rounded<const K: u8>(plan: &Plan, deltas: &[f32], base: &[f32], out: &mut [f32]) {
    let w = &plan.weights;
    let t = rk::<K>(w.iter().sum());
    let t = if t.abs() < 1e-8 { 1.0 } else { t };
    let f = Finish {
        t,
        lambda: plan.lambda,
    };
    // (one loop per case: with the tests inside, the vectorised loop computed every case)
    match (plan.normalize, plan.lambda != 1.0) {
        (false, false) => by_count::<K, false, false>(w, deltas, base, out, f),
        (true, false) => by_count::<K, true, false>(w, deltas, base, out, f),
        (false, true) => by_count::<K, false, true>(w, deltas, base, out, f),
        (true, true) => by_count::<K, true, true>(w, deltas, base, out, f),
    }
}

/// The divisor and `lambda` of [`finish`].
#[derive(Clone, Copy)]
struct Finish {
    t: f32,
    lambda: f32,
}

/// [`sum_rounded`] with the model count fixed at compile time where it is small.
#[inline(always)]
fn by_count<const K: u8, const N: bool, const L: bool>(
    w: &[f32],
    deltas: &[f32],
    base: &[f32],
    out: &mut [f32],
    f: Finish,
) {
    match *w {
        [a] => fused::<K, 1, N, L>([a], deltas, base, out, f),
        [a, b] => fused::<K, 2, N, L>([a, b], deltas, base, out, f),
        [a, b, c] => fused::<K, 3, N, L>([a, b, c], deltas, base, out, f),
        [a, b, c, d] => fused::<K, 4, N, L>([a, b, c, d], deltas, base, out, f),
        _ => {
            let len = out.len();
            out.fill(0.0);
            for (j, &wj) in w.iter().enumerate() {
                for (o, &d) in out.iter_mut().zip(&deltas[j * CHUNK..j * CHUNK + len]) {
                    *o += weighted::<K>(d, wj);
                }
            }
            for (o, &b) in out.iter_mut().zip(base) {
                *o = finish::<K, N, L>(*o, b, f);
            }
        }
    }
}

/// `r(d · w)`, or `d` for a weight of 1 (no bit changes: `d` is in the working dtype).
#[inline(always)]
fn weighted<const K: u8>(d: f32, w: f32) -> f32 {
    if w == 1.0 {
        d
    } else {
        rk_arith::<K>(d * w)
    }
}

/// [`sum_rounded`] of `J` models in one loop.
#[inline(always)]
fn fused<const K: u8, const J: usize, const N: bool, const L: bool>(
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
        // +0.0 first, as a sum into zeros: a lone -0.0 delta sums to +0.0
        let mut s = 0.0f32;
        for j in 0..J {
            s += weighted::<K>(ds[j][i], w[j]);
        }
        *o = finish::<K, N, L>(s, b, f);
    }
}

/// `r(b + r(r(r(s) / t) · lambda))`, the division only with `N`, the product only with `L`
/// ([`sum_rounded`]).
#[inline(always)]
fn finish<const K: u8, const N: bool, const L: bool>(s: f32, b: f32, f: Finish) -> f32 {
    let mut m = rk_arith::<K>(s);
    if N {
        m = rk_arith::<K>(m / f.t);
    }
    if L {
        m = rk_arith::<K>(m * f.lambda);
    }
    rk_arith::<K>(b + m)
}

/// [`sum_rounded`] built with AVX2.
///
/// # Safety
/// The CPU must support AVX2 ([`crate::kernels::round::has_avx2`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn sum_rounded_avx2<const K: u8>(
    plan: &Plan,
    deltas: &[f32],
    base: &[f32],
    out: &mut [f32],
) {
    sum_rounded::<K>(plan, deltas, base, out)
}

/// Never called: `has_avx2` is false off x86-64.
#[cfg(not(target_arch = "x86_64"))]
pub(super) unsafe fn sum_rounded_avx2<const K: u8>(
    plan: &Plan,
    deltas: &[f32],
    base: &[f32],
    out: &mut [f32],
) {
    sum_rounded::<K>(plan, deltas, base, out)
}

/// [`super::mix::mix_f32`] of up to four models in one loop over the chunk; false, having done
/// nothing, for more models.
#[inline(always)]
pub(super) fn f32_by_count(
    plan: &Plan,
    consensus: bool,
    total_w: f32,
    deltas: &[f32],
    base: &[f32],
    out: &mut [f32],
) -> bool {
    let f = Finish {
        t: total_w,
        lambda: plan.lambda,
    };
    // (one loop per case; called here, not through a pointer, so that they are inlined into
    // the AVX2 build)
    match (consensus, plan.normalize, plan.lambda != 1.0) {
        (false, false, false) => f32_count::<false, false, false>(plan, deltas, base, out, f),
        (false, true, false) => f32_count::<false, true, false>(plan, deltas, base, out, f),
        (false, false, true) => f32_count::<false, false, true>(plan, deltas, base, out, f),
        (false, true, true) => f32_count::<false, true, true>(plan, deltas, base, out, f),
        (true, false, false) => f32_count::<true, false, false>(plan, deltas, base, out, f),
        (true, true, false) => f32_count::<true, true, false>(plan, deltas, base, out, f),
        (true, false, true) => f32_count::<true, false, true>(plan, deltas, base, out, f),
        (true, true, true) => f32_count::<true, true, true>(plan, deltas, base, out, f),
    }
}

#[inline(always)]
fn f32_count<const C: bool, const N: bool, const L: bool>(
    plan: &Plan,
    deltas: &[f32],
    base: &[f32],
    out: &mut [f32],
    f: Finish,
) -> bool {
    match *plan.weights {
        [a] => f32_fused::<C, 1, N, L>([a], deltas, base, out, f),
        [a, b] => f32_fused::<C, 2, N, L>([a, b], deltas, base, out, f),
        [a, b, c] => f32_fused::<C, 3, N, L>([a, b, c], deltas, base, out, f),
        [a, b, c, d] => f32_fused::<C, 4, N, L>([a, b, c, d], deltas, base, out, f),
        _ => return false,
    }
    true
}

/// [`f32_by_count`] of `J` models: the weighted sum (with `C`, of the deltas that agree with
/// the sign of the sum of all, and their weights' sum as the divisor, 1 for none; else
/// `f.t`), divided with `N`, times `lambda` with `L`, plus the base; in the order of
/// [`super::mix::mix_f32`]'s loops.
#[inline(always)]
fn f32_fused<const C: bool, const J: usize, const N: bool, const L: bool>(
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
        let wd: [f32; J] = std::array::from_fn(|j| ds[j][i] * w[j]);
        let mut s = 0.0f32;
        for &x in &wd {
            s += x;
        }
        let (mut m, mut dv) = (s, f.t);
        if C {
            (m, dv) = (0.0, 0.0);
            for (&x, &wj) in wd.iter().zip(&w) {
                // torch.sign(0) matches neither majority
                let agree = if s >= 0.0 { x > 0.0 } else { x < 0.0 };
                m += if agree { x } else { 0.0 };
                dv += if agree { wj } else { 0.0 };
            }
            if dv == 0.0 {
                dv = 1.0;
            }
        }
        if N {
            m /= dv;
        }
        if L {
            m *= f.lambda;
        }
        *o = b + m;
    }
}
