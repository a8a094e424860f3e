//! The dtype a kernel computes in, as mergekit's torch code does it.
//!
//! With a recipe `dtype` of bfloat16 or float16, mergekit loads every input in that dtype and
//! each torch operation rounds its result to it: an elementwise op computes in f32 and rounds
//! once, a `sum` over the models accumulates in f32 (torch's accumulation type for 16-bit
//! floats on CPU) and rounds once, a Python scalar operand (`lambda`) stays an f32. Kernels
//! follow the same steps on f32 values, rounding with [`Work::r`] where torch rounds; with
//! [`Work::F32`] that is the identity, so the f32 path is the plain arithmetic.

use super::simd;

/// The dtype every operation's result is rounded to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Work {
    /// float32: no rounding between operations (the output is rounded once, when written).
    #[default]
    F32,
    BF16,
    F16,
}

impl Work {
    /// `x` rounded to the working dtype (nearest even), as an f32.
    #[inline(always)]
    pub fn r(self, x: f32) -> f32 {
        match self {
            Work::F32 => x,
            Work::BF16 => rk::<1>(x),
            Work::F16 => rk::<2>(x),
        }
    }

    pub fn rounds(self) -> bool {
        self != Work::F32
    }

    /// `d = r(r(x) - r(b))` elementwise: a task vector, from inputs loaded in the working dtype.
    ///
    /// In bfloat16, one pass computes `r(x - b)` and checks that rounding leaves every `x` and
    /// `b` alone (inputs read from a bf16 checkpoint), in which case that is the answer; else
    /// a second pass rounds the inputs too.
    #[inline]
    pub fn sub_into(self, x: &[f32], b: &[f32], d: &mut [f32]) {
        match self {
            Work::F32 => sub_rounded_k::<0>(x, b, d),
            Work::BF16 => {
                if !sub_bf16_checked_wide(simd::level(), x, b, d) {
                    sub_into_k::<1>(x, b, d);
                }
            }
            Work::F16 => sub_into_k::<2>(x, b, d),
        }
    }

    /// [`Work::sub_into`] with the result over `x`: `x = r(r(x) - r(b))` elementwise (each
    /// element's result depends on its own `x` and `b` only, so the same bits); and whether
    /// every `x` was finite before (folded into a pass the subtraction makes anyway).
    #[inline]
    pub fn sub_in_place(self, x: &mut [f32], b: &[f32]) -> bool {
        match self {
            Work::F32 => sub_f32_in_place_wide(simd::level(), x, b),
            Work::BF16 => sub_bf16_in_place_wide(simd::level(), x, b),
            Work::F16 => {
                let mut c = Bf16Check::default();
                x.iter().for_each(|&v| c.see(v));
                sub_in_place_k::<2>(x, b);
                c.finite()
            }
        }
    }

    /// `xs` in the working dtype: `xs` itself when rounding would change no bit of it (as for
    /// inputs read from a checkpoint in that dtype, the usual case), else rounded into `buf`
    /// (which must then be at least as long as `xs`; f32 never touches it). Rounding is
    /// idempotent, so a kernel that rounds its inputs once this way and then skips [`Work::r`]
    /// on them gives the same bits.
    #[inline]
    pub(crate) fn rounded<'a>(self, xs: &'a [f32], buf: &'a mut [f32]) -> &'a [f32] {
        let buf = match self {
            Work::F32 => return xs,
            Work::BF16 if is_bf16_wide(simd::level(), xs) => return xs,
            _ => &mut buf[..xs.len()],
        };
        match self {
            Work::F16 => map_k::<2>(xs, buf),
            _ => map_k::<1>(xs, buf),
        }
        buf
    }

    /// `v = r(v)` elementwise.
    #[inline]
    pub(crate) fn round_in_place(self, v: &mut [f32]) {
        match self {
            Work::F32 => {}
            Work::BF16 => round_wide::<1>(simd::level(), v),
            Work::F16 => round_wide::<2>(simd::level(), v),
        }
    }

    /// `v = r(v · s)` elementwise (`s` an f32 scalar, as torch keeps a Python float).
    #[inline]
    pub(crate) fn scale(self, v: &mut [f32], s: f32) {
        match self {
            Work::F32 => scale_wide::<0>(simd::level(), v, s),
            Work::BF16 => scale_wide::<1>(simd::level(), v, s),
            Work::F16 => scale_wide::<2>(simd::level(), v, s),
        }
    }
}

/// [`Work::sub_into`] with the dtype fixed at compile time: one loop without a branch on the
/// dtype, which vectorises.
fn sub_into_k<const K: u8>(x: &[f32], b: &[f32], d: &mut [f32]) {
    for ((d, &x), &b) in d.iter_mut().zip(x).zip(b) {
        *d = rk::<K>(rk::<K>(x) - rk::<K>(b));
    }
}

#[inline(always)]
fn sub_in_place_k<const K: u8>(x: &mut [f32], b: &[f32]) {
    for (x, &b) in x.iter_mut().zip(b) {
        *x = rk::<K>(rk::<K>(*x) - rk::<K>(b));
    }
}

/// [`sub_in_place_k`] in bfloat16: when rounding leaves every `x` and `b` alone (inputs read
/// from a bf16 checkpoint; one pass of ORs and maxes, which vectorises), `r(x - b)` alone.
/// Whether every `x` was finite (that pass's max tells).
#[inline(always)]
fn sub_bf16_in_place(x: &mut [f32], b: &[f32]) -> bool {
    let mut c = Bf16Check::default();
    x.iter().for_each(|&v| c.see(v));
    if c.ok() && is_bf16(b) {
        for (x, &b) in x.iter_mut().zip(b) {
            *x = rk_arith::<1>(*x - b);
        }
    } else {
        sub_in_place_k::<1>(x, b);
    }
    c.finite()
}

/// `x = x - b` in f32, and whether every `x` was finite, in one loop.
#[inline(always)]
fn sub_f32_in_place(x: &mut [f32], b: &[f32]) -> bool {
    let mut c = Bf16Check::default();
    for (x, &b) in x.iter_mut().zip(b) {
        c.see(*x);
        *x -= b;
    }
    c.finite()
}

simd::wide! {
    /// [`sub_f32_in_place`] built for `level`.
    fn sub_f32_in_place_wide(x: &mut [f32], b: &[f32]) -> bool => sub_f32_in_place
}

simd::wide! {
    /// [`sub_bf16_in_place`] built for `level`.
    fn sub_bf16_in_place_wide(x: &mut [f32], b: &[f32]) -> bool => sub_bf16_in_place
}

fn sub_rounded_k<const K: u8>(x: &[f32], b: &[f32], d: &mut [f32]) {
    for ((d, &x), &b) in d.iter_mut().zip(x).zip(b) {
        *d = rk::<K>(x - b);
    }
}

fn map_k<const K: u8>(xs: &[f32], out: &mut [f32]) {
    for (o, &x) in out.iter_mut().zip(xs) {
        *o = rk::<K>(x);
    }
}

/// Whether values seen are bfloat16 values that [`rk`] leaves alone: their low 16 bits are
/// zero and none is a NaN (rounding makes a NaN quiet). Folded over the values with an OR and
/// a max (no compare per element), which vectorise.
#[derive(Clone, Copy, Default)]
struct Bf16Check {
    /// Every value's bits ORed.
    low: u32,
    /// The largest magnitude's bits (above infinity's: a NaN).
    top: u32,
}

impl Bf16Check {
    #[inline(always)]
    fn see(&mut self, x: f32) {
        let b = x.to_bits();
        self.low |= b;
        self.top = self.top.max(b & 0x7fff_ffff);
    }

    #[inline(always)]
    fn ok(self) -> bool {
        self.low & 0xffff == 0 && self.top <= 0x7f80_0000
    }

    /// No value seen was a NaN or an infinity.
    #[inline(always)]
    fn finite(self) -> bool {
        self.top < 0x7f80_0000
    }
}

/// Whether every value of `xs` is finite (no NaN, no infinity): [`Bf16Check`]'s max, one fold
/// that vectorises (`all` stops at the first miss, and a loop that may stop early does not),
/// in the widest build the CPU runs.
pub(crate) fn all_finite(xs: &[f32]) -> bool {
    all_finite_wide(simd::level(), xs)
}

#[inline(always)]
fn all_finite_base(xs: &[f32]) -> bool {
    let mut c = Bf16Check::default();
    xs.iter().for_each(|&x| c.see(x));
    c.finite()
}

simd::wide! {
    /// [`all_finite_base`] built for `level`.
    fn all_finite_wide(xs: &[f32]) -> bool => all_finite_base
}

/// Whether every element of `xs` is a bfloat16 value that [`rk`] leaves alone.
#[inline(always)]
fn is_bf16(xs: &[f32]) -> bool {
    let mut c = Bf16Check::default();
    xs.iter().for_each(|&x| c.see(x));
    c.ok()
}

simd::wide! {
    /// [`is_bf16`] built for `level` (SSE2 has no unsigned max).
    fn is_bf16_wide(xs: &[f32]) -> bool => is_bf16
}

simd::wide! {
    /// [`sub_bf16_checked`] built for `level`.
    fn sub_bf16_checked_wide(x: &[f32], b: &[f32], d: &mut [f32]) -> bool => sub_bf16_checked
}

/// `d = r(x - b)` in bfloat16, and whether every `x` and `b` is a bfloat16 value that
/// rounding leaves alone (then `d` is also `r(r(x) - r(b))`).
#[inline(always)]
fn sub_bf16_checked(x: &[f32], b: &[f32], d: &mut [f32]) -> bool {
    let mut c = Bf16Check::default();
    for ((d, &x), &b) in d.iter_mut().zip(x).zip(b) {
        c.see(x);
        c.see(b);
        // (the rounding without its NaN select: with no NaN among `x` and `b`, a NaN
        // difference is the default NaN; with one, the result is not used)
        *d = rk_arith::<1>(x - b);
    }
    c.ok()
}

#[inline(always)]
fn scale_k<const K: u8>(v: &mut [f32], s: f32) {
    v.iter_mut().for_each(|v| *v = rk::<K>(*v * s));
}

#[inline(always)]
fn round_k<const K: u8>(v: &mut [f32]) {
    v.iter_mut().for_each(|v| *v = rk::<K>(*v));
}

simd::wide! {
    /// [`round_k`] built for `level`.
    fn round_wide<const K: u8>(v: &mut [f32]) => round_k
}

simd::wide! {
    /// [`scale_k`] built for `level` (inlined into its callers it had their baseline build:
    /// a DARE rescale in bfloat16 took a tenth of dare_ties' time).
    fn scale_wide<const K: u8>(v: &mut [f32], s: f32) => scale_k
}

/// [`Work::r`] with the dtype fixed at compile time (0: f32, 1: bfloat16, 2: float16), so
/// that loops over it vectorise.
///
/// Both roundings are integer arithmetic on the f32 bits without a branch (the NaN and range
/// cases are selects), bit for bit what `half`'s `from_f32(x).to_f32()` gives for every f32
/// (the tests compare them on every edge class, and over all 2^32 values when asked).
#[inline(always)]
pub fn rk<const K: u8>(x: f32) -> f32 {
    match K {
        1 => round_bf16(x),
        2 => round_f16(x),
        _ => x,
    }
}

/// [`rk`] of a result of IEEE arithmetic on values `rk` gave: the same bits, without the NaN
/// select of the bfloat16 rounding. Every NaN such arithmetic makes is quiet with its low 16
/// bits clear (an operand's payload, made quiet, or the default NaN, on x86-64 and Arm
/// alike), and for those the rounding's addition of at most 0x8000 to the clear low half
/// carries nothing, so the mask gives the NaN back as `rk` does. Not for values read from a
/// file (an f32 NaN there may carry any payload): those go through `rk` or `Work::rounded`.
#[inline(always)]
pub fn rk_arith<const K: u8>(x: f32) -> f32 {
    match K {
        1 => {
            let b = x.to_bits();
            f32::from_bits(b.wrapping_add(0x7fff + ((b >> 16) & 1)) & 0xffff_0000)
        }
        _ => rk::<K>(x),
    }
}

/// `x` rounded to the nearest bfloat16 (ties to even), as an f32.
#[inline(always)]
fn round_bf16(x: f32) -> f32 {
    let b = x.to_bits();
    // adding 0x7fff plus the kept half's lowest bit carries into bit 16 exactly when the
    // dropped half is above the halfway point, or at it with an odd kept half; a finite value
    // rounding past the largest bfloat16 carries into the exponent and becomes infinity
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) & 0xffff_0000;
    // a NaN keeps its sign and top payload bits and is made quiet
    let nan = (b | 0x0040_0000) & 0xffff_0000;
    f32::from_bits(if (b & 0x7fff_ffff) > 0x7f80_0000 {
        nan
    } else {
        rounded
    })
}

/// The largest finite float16 (65504), as f32 bits.
const F16_MAX_BITS: u32 = 0x477f_e000;
/// The smallest normal float16 (2^-14), as f32 bits.
const F16_MIN_NORMAL_BITS: u32 = 0x3880_0000;

/// `x` rounded to the nearest float16 (ties to even), as an f32.
#[inline(always)]
fn round_f16(x: f32) -> f32 {
    let b = x.to_bits();
    let sign = b & 0x8000_0000;
    let a = b & 0x7fff_ffff;
    // normal range: keep 10 of the 23 fraction bits, as for bfloat16 above; past 65504 (from
    // 65520 on, infinity included) the result is infinity
    let normal = a.wrapping_add(0xfff + ((a >> 13) & 1)) & 0xffff_e000;
    let normal = if normal > F16_MAX_BITS {
        0x7f80_0000
    } else {
        normal
    };
    // below 2^-14 float16 is subnormal: multiples of 2^-24. Adding 0.5 gives a sum whose ulp
    // is 2^-24, so the addition itself rounds |x| to nearest even; subtracting 0.5 is exact.
    let tiny = ((f32::from_bits(a) + 0.5) - 0.5).to_bits();
    // a NaN keeps its top payload bits and is made quiet
    let nan = (a & 0xffff_e000) | 0x0040_0000;
    let m = if a > 0x7f80_0000 {
        nan
    } else if a < F16_MIN_NORMAL_BITS {
        tiny
    } else {
        normal
    };
    f32::from_bits(sign | m)
}

impl Work {
    /// The dtype's number for [`rk`].
    pub fn k(self) -> u8 {
        match self {
            Work::F32 => 0,
            Work::BF16 => 1,
            Work::F16 => 2,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding() {
        let x = 1.0f32 + 2f32.powi(-8) + 2f32.powi(-12);
        assert_eq!(Work::F32.r(x), x);
        assert_eq!(Work::BF16.r(x), 1.0 + 2f32.powi(-7));
        assert_eq!(Work::BF16.r(1.0 + 2f32.powi(-8)), 1.0);
        assert_eq!(Work::F16.r(1.0 + 2f32.powi(-11)), 1.0);
        assert_eq!(Work::F16.r(x), 1.0 + 2f32.powi(-8));
        let mut d = [0f32; 2];
        Work::BF16.sub_into(
            &[1.0 + 2f32.powi(-9), 3.0],
            &[0.0, 1.0 + 2f32.powi(-7)],
            &mut d,
        );
        // the input is rounded first (1 + 2^-9 -> 1), then the difference
        assert_eq!(d, [1.0, 2.0 - 2f32.powi(-7)]);
    }

    /// The reference roundings: through `half`'s 16-bit types and back.
    fn half_bf16(x: f32) -> f32 {
        half::bf16::from_f32(x).to_f32()
    }
    fn half_f16(x: f32) -> f32 {
        half::f16::from_f32(x).to_f32()
    }

    /// Calls `f` with f32 bit patterns covering every edge class of both roundings: for both
    /// signs and every exponent (zero and subnormals, the f16 subnormal range, the largest
    /// finite values that round to infinity, infinity, NaNs), fractions at each possible
    /// rounding position: exact ties with an even and an odd kept part, one ulp either side, and
    /// the same with every higher fraction bit set (the carry into the exponent); then an
    /// odd-stride sweep of all 2^32 patterns (every low-bit residue turns up).
    fn edge_patterns(mut f: impl FnMut(u32)) {
        for sign in [0u32, 0x8000_0000] {
            for e in 0..=255u32 {
                let top = sign | e << 23;
                f(top);
                f(top | 0x7f_ffff);
                for q in 0..23 {
                    let h = 1u32 << q; // the highest dropped bit when q + 1 bits are dropped
                    let high = 0x7f_ffff & !((h << 2) - 1);
                    for frac in [h, h - 1, h + 1, 3 * h, 3 * h - 1, 3 * h + 1] {
                        f(top | (frac & 0x7f_ffff));
                        f(top | ((frac | high) & 0x7f_ffff));
                    }
                }
            }
        }
        let mut b = 0u32;
        loop {
            f(b);
            match b.checked_add(251) {
                Some(n) => b = n,
                None => break,
            }
        }
    }

    fn check_against_half(b: u32) {
        let x = f32::from_bits(b);
        assert_eq!(
            rk::<1>(x).to_bits(),
            half_bf16(x).to_bits(),
            "bf16 of {b:#010x}"
        );
        assert_eq!(
            rk::<2>(x).to_bits(),
            half_f16(x).to_bits(),
            "f16 of {b:#010x}"
        );
    }

    #[test]
    fn fast_rounding_is_halfs_on_every_edge_class() {
        edge_patterns(check_against_half);
        // a few named float16 cases, spelled out
        let cases = [
            (65519.0, 65504.0),                     // below halfway to 65536: the max
            (65520.0, f32::INFINITY),               // a tie past the max: infinity
            (2f32.powi(-25), 0.0),                  // subnormal tie to even: zero
            (3.0 * 2f32.powi(-25), 2f32.powi(-23)), // subnormal tie to even: up
            (2f32.powi(-14) - 2f32.powi(-30), 2f32.powi(-14)), // up to the smallest normal
            (1.0 + 2f32.powi(-11), 1.0),            // normal tie to even
        ];
        for (x, want) in cases {
            assert_eq!(rk::<2>(x), want, "{x}");
            assert_eq!(rk::<2>(-x), -want, "{x}");
        }
        assert_eq!(rk::<1>(f32::MAX), f32::INFINITY);
        assert_eq!(rk::<2>(-0.0).to_bits(), (-0.0f32).to_bits());
        assert!(rk::<1>(f32::NAN).is_nan() && rk::<2>(f32::NAN).is_nan());
    }

    /// The rounding without its NaN select is [`rk`] on every value but a NaN, and on a NaN
    /// with its low 16 bits clear (what arithmetic on rounded values makes), made quiet.
    #[test]
    fn rounding_of_arithmetic_results_is_rk() {
        edge_patterns(|b| {
            let x = f32::from_bits(b);
            let nan_as_made = x.is_nan() && b & 0xffff == 0 && b & 0x0040_0000 != 0;
            if !x.is_nan() || nan_as_made {
                assert_eq!(
                    rk_arith::<1>(x).to_bits(),
                    rk::<1>(x).to_bits(),
                    "{b:#010x}"
                );
                assert_eq!(
                    rk_arith::<2>(x).to_bits(),
                    rk::<2>(x).to_bits(),
                    "{b:#010x}"
                );
            }
        });
        let made = [0.0f32 * f32::INFINITY, f32::INFINITY - f32::INFINITY];
        for n in made {
            assert_eq!(rk_arith::<1>(n).to_bits(), rk::<1>(n).to_bits());
        }
    }

    /// The subtraction in place gives [`Work::sub_into`]'s bits in every dtype and every build
    /// the CPU runs, and says whether every `x` was finite: edge patterns (NaNs, infinities,
    /// values with low bits set), and a bf16 run where one non-finite value sits anywhere.
    #[test]
    fn sub_in_place_gives_sub_into_and_finiteness() {
        let mut xs = Vec::new();
        edge_patterns(|b| xs.push(f32::from_bits(b)));
        let bs: Vec<f32> = xs.iter().rev().copied().collect();
        let bf: Vec<f32> = (0..300)
            .map(|i| half_bf16(i as f32 * 0.37 - 50.0))
            .collect();
        let mut cases = vec![(xs.clone(), bs.clone())];
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for at in [0, 1, 150, 299] {
                let mut x = bf.clone();
                x[at] = bad;
                cases.push((x, bf.iter().rev().copied().collect()));
            }
        }
        cases.push((bf.clone(), bf.iter().rev().copied().collect()));
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for (x, b) in &cases {
            for (xc, bc) in x.chunks(2048).zip(b.chunks(2048)) {
                let finite = xc.iter().all(|v| v.is_finite());
                for work in [Work::F32, Work::BF16, Work::F16] {
                    let mut want = vec![0f32; xc.len()];
                    work.sub_into(xc, bc, &mut want);
                    let mut got = xc.to_vec();
                    assert_eq!(work.sub_in_place(&mut got, bc), finite, "{work:?}");
                    assert_eq!(bits(&got), bits(&want), "{work:?}");
                    for level in simd::levels() {
                        let l = level.name();
                        let mut got = xc.to_vec();
                        let f = match work {
                            Work::F32 => sub_f32_in_place_wide(level, &mut got, bc),
                            Work::BF16 => sub_bf16_in_place_wide(level, &mut got, bc),
                            Work::F16 => continue,
                        };
                        assert_eq!(f, finite, "{work:?} {l}");
                        assert_eq!(bits(&got), bits(&want), "{work:?} {l}");
                    }
                }
            }
        }
    }

    /// A NaN or an infinity anywhere (each build's vector body or its tail) is seen.
    #[test]
    fn all_finite_sees_every_position() {
        let xs: Vec<f32> = (0..37).map(|i| i as f32 * -0.5).collect();
        assert!(all_finite(&xs));
        assert!(all_finite(&[
            f32::MAX,
            -f32::MAX,
            f32::MIN_POSITIVE / 2.0,
            -0.0
        ]));
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for at in 0..xs.len() {
                let mut v = xs.clone();
                v[at] = bad;
                assert!(!all_finite(&v), "{bad} at {at}");
                for level in simd::levels() {
                    assert!(
                        !all_finite_wide(level, &v),
                        "{bad} at {at}, {}",
                        level.name()
                    );
                }
            }
        }
    }

    /// Every build of the one-pass bf16 subtraction the CPU runs gives the baseline build's
    /// bits and verdict, on inputs in bf16 (the one-pass case) and not.
    #[test]
    fn sub_builds_agree() {
        let mut xs = Vec::new();
        edge_patterns(|b| xs.push(f32::from_bits(b)));
        let bs: Vec<f32> = xs.iter().rev().copied().collect();
        let round = |v: &[f32]| v.iter().map(|&x| half_bf16(x)).collect::<Vec<_>>();
        for (x, b) in [(xs.clone(), bs.clone()), (round(&xs), round(&bs))] {
            for (xc, bc) in x.chunks(2048).zip(b.chunks(2048)) {
                let (mut d1, mut d2) = (vec![0f32; xc.len()], vec![0f32; xc.len()]);
                let v1 = sub_bf16_checked(xc, bc, &mut d1);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                for level in simd::levels() {
                    let v2 = sub_bf16_checked_wide(level, xc, bc, &mut d2);
                    assert_eq!(v1, v2, "{}", level.name());
                    assert_eq!(bits(&d1), bits(&d2), "{}", level.name());
                    let mut x2 = xc.to_vec();
                    sub_bf16_in_place_wide(level, &mut x2, bc);
                    assert_eq!(
                        bits(&x2),
                        bits(&{
                            let mut x1 = xc.to_vec();
                            sub_bf16_in_place(&mut x1, bc);
                            x1
                        }),
                        "{} in place",
                        level.name()
                    );
                    assert_eq!(is_bf16_wide(level, xc), is_bf16(xc), "{}", level.name());
                }
            }
        }
    }

    /// Values already in bfloat16 are used as they are; a signalling NaN among them is not
    /// (rounding makes it quiet), nor is a value with low bits set.
    #[test]
    fn rounded_borrows_only_what_rounding_leaves_alone() {
        let xs = [
            1.0f32,
            -0.0,
            f32::INFINITY,
            -3.0e38,
            f32::from_bits(0x0001_0000),
            0.5,
        ];
        let xs: Vec<f32> = xs.iter().map(|&x| half_bf16(x)).collect();
        let mut buf = [0f32; 8];
        assert!(std::ptr::eq(Work::BF16.rounded(&xs, &mut buf), &xs[..]));
        assert!(std::ptr::eq(Work::F32.rounded(&xs, &mut buf), &xs[..]));
        for odd in [f32::from_bits(0x7f81_0000), f32::NAN, 1.0 + 2f32.powi(-10)] {
            let mut ys = xs.clone();
            ys[2] = odd;
            let got = Work::BF16.rounded(&ys, &mut buf).to_vec();
            let want: Vec<u32> = ys.iter().map(|&y| half_bf16(y).to_bits()).collect();
            assert_eq!(got.iter().map(|g| g.to_bits()).collect::<Vec<_>>(), want);
        }
    }

    /// Every one of the 2^32 f32 patterns (about 20 s in a release build):
    /// `cargo test --release -p shardmerge-worker --lib round -- --ignored`.
    #[test]
    #[ignore]
    fn fast_rounding_is_halfs_for_every_f32() {
        for b in 0..=u32::MAX {
            check_against_half(b);
        }
    }

    /// The slice helpers and [`Work::r`] for each dtype against the reference rounding applied
    /// step by step.
    #[test]
    fn slice_helpers_round_every_step() {
        let mut xs = Vec::new();
        let mut i = 0u32;
        edge_patterns(|b| {
            i += 1;
            if i.is_multiple_of(5) {
                xs.push(f32::from_bits(b));
            }
        });
        let bs: Vec<f32> = xs.iter().rev().copied().collect();
        type Reference = fn(f32) -> f32;
        let refs: [(Work, Reference); 3] = [
            (Work::F32, |x| x),
            (Work::BF16, half_bf16),
            (Work::F16, half_f16),
        ];
        for (w, r) in refs {
            let mut d = vec![0f32; xs.len()];
            w.sub_into(&xs, &bs, &mut d);
            for ((&d, &x), &b) in d.iter().zip(&xs).zip(&bs) {
                assert_eq!(d.to_bits(), r(r(x) - r(b)).to_bits(), "{w:?}: {x} - {b}");
                assert_eq!(w.r(x).to_bits(), r(x).to_bits(), "{w:?}: {x}");
            }
            let mut buf = vec![0f32; xs.len()];
            for (&rx, &x) in w.rounded(&xs, &mut buf).iter().zip(&xs) {
                assert_eq!(rx.to_bits(), r(x).to_bits(), "{w:?}: {x}");
            }
            // inputs already in the dtype (bf16's one-pass case), and chunks where a single
            // element is not (its second pass)
            let (rx, rb): (Vec<f32>, Vec<f32>) =
                xs.iter().zip(&bs).map(|(&x, &b)| (r(x), r(b))).unzip();
            for chunk in [rx.len(), 2048, 7] {
                for (i, (xc, bc)) in rx.chunks(chunk).zip(rb.chunks(chunk)).enumerate() {
                    let mut xc = xc.to_vec();
                    if i % 3 == 1 {
                        let mid = xc.len() / 2;
                        xc[mid] = f32::from_bits(0x3f80_8001); // 1.0039..., not a bf16 value
                    }
                    let mut d = vec![0f32; xc.len()];
                    w.sub_into(&xc, bc, &mut d);
                    for ((&d, &x), &b) in d.iter().zip(&xc).zip(bc) {
                        assert_eq!(d.to_bits(), r(r(x) - r(b)).to_bits(), "{w:?}: {x} - {b}");
                    }
                }
            }
            let s = 1.0 + 2f32.powi(-10);
            let mut v = xs.clone();
            w.round_in_place(&mut v);
            for (&v, &x) in v.iter().zip(&xs) {
                assert_eq!(v.to_bits(), r(x).to_bits(), "{w:?}: {x}");
            }
            let mut v = xs.clone();
            w.scale(&mut v, s);
            for (&v, &x) in v.iter().zip(&xs) {
                assert_eq!(v.to_bits(), r(x * s).to_bits(), "{w:?}: {x} * {s}");
            }
        }
    }
}
