//! Exact, order-independent summation of f64 values.
//!
//! Tensor statistics (norms, dot products, L1 sums) are computed over row ranges by different
//! tasks and reduced by the coordinator. Floating-point addition is not associative, so a plain
//! running sum would depend on how the tensor was cut. `ExactSum` keeps the sum exactly (a
//! signed integer per binary exponent) and rounds once, at the end: the result is the correctly
//! rounded sum whatever the order or grouping of the additions.

/// Exact sum of f64 values. Products of two f32 values are exact in f64, so sums of squares
/// and dot products of f32 data are exact too.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ExactSum {
    /// (exponent, signed sum of 53-bit mantissas at that exponent), sorted by exponent.
    buckets: Vec<(i32, i128)>,
    /// Index of the bucket used last: consecutive values mostly share an exponent.
    hint: usize,
    /// Set when a NaN or infinity was added.
    non_finite: Option<f64>,
}

impl ExactSum {
    pub fn new() -> Self {
        Self::default()
    }

    #[inline]
    pub fn add(&mut self, x: f64) {
        if x == 0.0 {
            return;
        }
        if !x.is_finite() {
            self.non_finite = Some(match self.non_finite {
                None => x,
                Some(y) => x + y,
            });
            return;
        }
        let bits = x.to_bits();
        let biased = ((bits >> 52) & 0x7ff) as i32;
        let frac = (bits & ((1u64 << 52) - 1)) as i128;
        let (m, e) = if biased == 0 {
            (frac, -1074)
        } else {
            (frac | (1i128 << 52), biased - 1075)
        };
        let m = if bits >> 63 == 1 { -m } else { m };
        self.add_bucket(e, m);
    }

    #[inline]
    pub(crate) fn add_bucket(&mut self, e: i32, m: i128) {
        if let Some(b) = self.buckets.get_mut(self.hint) {
            if b.0 == e {
                b.1 += m;
                return;
            }
        }
        match self.buckets.binary_search_by_key(&e, |b| b.0) {
            Ok(i) => {
                self.buckets[i].1 += m;
                self.hint = i;
            }
            Err(i) => {
                self.buckets.insert(i, (e, m));
                self.hint = i;
            }
        }
    }

    /// Adds every value of a slice.
    pub fn add_all(&mut self, xs: impl IntoIterator<Item = f64>) {
        for x in xs {
            self.add(x);
        }
    }

    /// Adds another exact sum into this one (exact, so associative and commutative).
    pub fn merge(&mut self, other: &ExactSum) {
        for &(e, m) in &other.buckets {
            self.add_bucket(e, m);
        }
        if let Some(v) = other.non_finite {
            self.non_finite = Some(self.non_finite.map_or(v, |w| w + v));
        }
    }

    /// The sum, correctly rounded to the nearest f64 (ties to even).
    pub fn value(&self) -> f64 {
        if let Some(v) = self.non_finite {
            return v;
        }
        let Some(&(lo_e, _)) = self.buckets.first() else {
            return 0.0;
        };
        let hi_e = self.buckets.last().map_or(lo_e, |b| b.0);
        // Two's complement bits of the total, from exponent lo_e upwards.
        let nbits = (hi_e - lo_e) as usize + 140;
        let mut bits = vec![0u64; nbits.div_ceil(64)];
        let mut carry: i128 = 0;
        let mut it = self.buckets.iter().peekable();
        for pos in 0..nbits {
            let e = lo_e + pos as i32;
            let mut v = carry;
            if let Some(&&(be, m)) = it.peek() {
                if be == e {
                    v += m;
                    it.next();
                }
            }
            if v & 1 != 0 {
                bits[pos / 64] |= 1 << (pos % 64);
            }
            carry = v >> 1;
        }
        let negative = carry < 0;
        if negative {
            // negate the two's complement bit string
            let mut c = 1u64;
            for w in bits.iter_mut() {
                let (s, o) = (!*w).overflowing_add(c);
                *w = s;
                c = o as u64;
            }
        }
        let Some(top) = (0..nbits)
            .rev()
            .find(|&p| bits[p / 64] >> (p % 64) & 1 == 1)
        else {
            return 0.0;
        };
        let bit = |p: usize| bits[p / 64] >> (p % 64) & 1;
        // Keep 53 significant bits, but never go below the subnormal exponent.
        let top_e = lo_e + top as i32;
        let low_e = (top_e - 52).max(-1074);
        let keep_from = (low_e - lo_e).max(0) as usize;
        let mut mant: u64 = 0;
        for p in (keep_from..=top).rev() {
            mant = (mant << 1) | bit(p);
        }
        if keep_from > 0 {
            let guard = bit(keep_from - 1);
            let sticky = (0..keep_from - 1).any(|p| bit(p) == 1);
            if guard == 1 && (sticky || mant & 1 == 1) {
                mant += 1;
            }
        }
        let exp = lo_e + keep_from as i32;
        let mag = ldexp(mant as f64, exp);
        if negative {
            -mag
        } else {
            mag
        }
    }

    /// (exponent, mantissa sum) pairs, for transport.
    pub fn buckets(&self) -> &[(i32, i128)] {
        &self.buckets
    }

    pub fn from_buckets(mut buckets: Vec<(i32, i128)>, non_finite: Option<f64>) -> Self {
        buckets.sort_by_key(|b| b.0);
        let mut s = ExactSum {
            buckets: Vec::with_capacity(buckets.len()),
            hint: 0,
            non_finite,
        };
        for (e, m) in buckets {
            s.add_bucket(e, m);
        }
        s
    }

    pub fn non_finite(&self) -> Option<f64> {
        self.non_finite
    }
}

/// An exact sum of f32 values, faster than [`ExactSum::add`] on each: one integer bucket per
/// f32 exponent, indexed directly (no search), folded into an [`ExactSum`] at the end. The
/// result is the same exact sum, so it rounds to the same value.
///
/// Neighbouring values mostly share an exponent, so one bucket array would chain every add
/// behind the previous one's store to the same bucket; values go round-robin to `LANES`
/// arrays instead, and the chains run side by side.
#[derive(Clone)]
pub struct F32Sum {
    /// Signed sums of 24-bit mantissas, by lane and biased f32 exponent (0: subnormals, same
    /// scale as 1).
    buckets: Box<[[i64; 256]; LANES]>,
    /// Values added since the last fold: a bucket holds 2^39 mantissas before it could overflow.
    pending: u64,
    /// The exact f64 sums of whole blocks ([`block_sum`]), by exponent: one indexed add per
    /// block, where [`ExactSum::add`] searches its buckets.
    blocks: F64Sum,
    /// NaNs and infinities go the slow way.
    rest: ExactSum,
}

const LANES: usize = 4;

/// Values per block of [`F32Sum::add_abs`]'s f64 path.
const BLOCK: usize = 64;
/// The most binary exponents the nonzero magnitudes of one such block may span.
const SPAN: u32 = 22;

/// The exact sum of the magnitudes of `c` ([`BLOCK`] values) as an f64, when none is a NaN
/// or an infinity and the nonzero ones span at most [`SPAN`] binary exponents (else None).
///
/// Why it is exact: with `e` the smallest (biased, at least 1) exponent among the nonzero
/// magnitudes, each is an integer multiple of 2^(e - 150) below 2^(24 + SPAN), so any partial
/// sum of the block is such a multiple below 64 · 2^46 = 2^52: an f64 holds each exactly,
/// whatever the order of the additions. The checks are min/max reductions and the sum
/// independent lanes, so the whole of it vectorises (the magnitudes are widened to f64 into an
/// array first: widening inside the sum's loop was built two lanes wide, at half the speed).
#[inline(always)]
fn block_sum(c: &[f32; BLOCK]) -> Option<f64> {
    let (mut hi, mut lo) = (0u32, u32::MAX);
    for &x in c {
        let b = x.to_bits() & 0x7fff_ffff;
        hi = hi.max(b);
        // (zeros add nothing: they do not count for the span)
        lo = lo.min(if b == 0 { u32::MAX } else { b });
    }
    if hi == 0 {
        return Some(0.0);
    }
    if hi >= 0x7f80_0000 || (hi >> 23) - (lo >> 23).max(1) > SPAN {
        return None;
    }
    let mut wide = [0f64; BLOCK];
    for (w, &x) in wide.iter_mut().zip(c) {
        *w = f64::from(x.abs());
    }
    let mut acc = [0f64; 8];
    for q in wide.chunks_exact(acc.len()) {
        for (a, &x) in acc.iter_mut().zip(q) {
            *a += x;
        }
    }
    Some(acc.iter().sum())
}

impl Default for F32Sum {
    fn default() -> Self {
        F32Sum {
            buckets: Box::new([[0; 256]; LANES]),
            pending: 0,
            blocks: F64Sum::new(),
            rest: ExactSum::new(),
        }
    }
}

impl F32Sum {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add_all(&mut self, xs: impl IntoIterator<Item = f32>) {
        let mut pending = self.pending;
        let mut lane = 0usize;
        for x in xs {
            let bits = x.to_bits();
            let biased = ((bits >> 23) & 0xff) as usize;
            if biased == 0xff {
                self.rest.add(x as f64);
                continue;
            }
            let m = (bits & 0x7f_ffff) as i64 | (i64::from(biased != 0) << 23);
            // branch-free sign: s is 0 or -1
            let s = i64::from((bits as i32) >> 31);
            self.buckets[lane][biased] += (m ^ s) - s;
            lane = (lane + 1) % LANES;
            pending += 1;
            if pending == 1 << 38 {
                self.fold();
                pending = 0;
            }
        }
        self.pending = pending;
    }

    /// [`F32Sum::add_all`] of the magnitudes `|x|` of `xs`: the same exact sum. A block of
    /// [`BLOCK`] values whose nonzero magnitudes span at most [`SPAN`] binary exponents is
    /// summed in f64, which is exact for them ([`block_sum`]), and added as one value; any
    /// other block goes by the buckets ([`F32Sum::add_abs_lanes`]).
    pub fn add_abs(&mut self, xs: &[f32]) {
        add_abs_wide(super::simd::level(), self, xs)
    }

    /// [`F32Sum::add_abs`] in the baseline build.
    #[inline(always)]
    fn add_abs_base(&mut self, xs: &[f32]) {
        let (blocks, rest) = xs.as_chunks::<BLOCK>();
        for c in blocks {
            match block_sum(c) {
                Some(s) => self.blocks.add(s),
                None => self.add_abs_lanes(c),
            }
        }
        self.add_abs_lanes(rest);
    }

    /// [`F32Sum::add_all`] of the magnitudes `|x|` of `xs`, the lanes unrolled (a block of
    /// `LANES` values at a time, its adds independent of each other): the same sum.
    fn add_abs_lanes(&mut self, xs: &[f32]) {
        let mut blocks = xs.chunks_exact(LANES);
        for c in &mut blocks {
            if c.iter().any(|x| !x.is_finite()) {
                self.add_all(c.iter().map(|x| x.abs()));
                continue;
            }
            for (lane, x) in self.buckets.iter_mut().zip(c) {
                let bits = x.to_bits() & 0x7fff_ffff;
                let biased = (bits >> 23) as usize;
                lane[biased] += i64::from(bits & 0x7f_ffff) | (i64::from(biased != 0) << 23);
            }
            self.pending += LANES as u64;
            if self.pending >= 1 << 38 {
                self.fold();
            }
        }
        self.add_all(blocks.remainder().iter().map(|x| x.abs()));
    }

    fn fold(&mut self) {
        for lane in self.buckets.iter_mut() {
            for (biased, m) in lane.iter_mut().enumerate() {
                if *m != 0 {
                    // value = mantissa · 2^(biased - 150); subnormals share biased 1's scale
                    let e = (biased as i32).max(1) - 150;
                    self.rest.add_bucket(e, *m as i128);
                    *m = 0;
                }
            }
        }
        self.pending = 0;
    }

    /// The exact sum.
    pub fn finish(mut self) -> ExactSum {
        self.fold();
        self.rest.merge(&self.blocks.finish());
        self.rest
    }
}

/// An exact sum of f64 values, faster than [`ExactSum::add`] on each when the values' exponents
/// vary (products, squares): one i128 bucket per f64 exponent, indexed directly (no search),
/// folded into an [`ExactSum`] at the end, so it rounds to the same value. A bucket holds 2^74
/// mantissas of 53 bits before it could overflow: more values than any tensor has.
#[derive(Clone)]
pub struct F64Sum {
    /// Signed sums of 53-bit mantissas by biased f64 exponent (0: subnormals, same scale as 1).
    buckets: Box<[i128; 2048]>,
    /// NaNs and infinities go the slow way.
    rest: ExactSum,
}

impl Default for F64Sum {
    fn default() -> Self {
        F64Sum {
            buckets: Box::new([0; 2048]),
            rest: ExactSum::new(),
        }
    }
}

impl F64Sum {
    pub fn new() -> Self {
        Self::default()
    }

    #[inline]
    pub fn add(&mut self, x: f64) {
        let bits = x.to_bits();
        let biased = ((bits >> 52) & 0x7ff) as usize;
        if biased == 0x7ff {
            self.rest.add(x);
            return;
        }
        let m = ((bits & ((1u64 << 52) - 1)) | (u64::from(biased != 0) << 52)) as i128;
        self.buckets[biased] += if bits >> 63 == 1 { -m } else { m };
    }

    /// The exact sum.
    pub fn finish(mut self) -> ExactSum {
        for (biased, &m) in self.buckets.iter().enumerate() {
            if m != 0 {
                // value = mantissa · 2^(biased - 1075); subnormals share biased 1's scale
                self.rest.add_bucket((biased as i32).max(1) - 1075, m);
            }
        }
        self.rest
    }
}

/// x * 2^e without intermediate overflow or underflow for the exponents used here.
fn ldexp(x: f64, e: i32) -> f64 {
    let mut x = x;
    let mut e = e;
    while e > 1000 {
        x *= 2f64.powi(1000);
        e -= 1000;
    }
    while e < -1000 {
        x *= 2f64.powi(-1000);
        e += 1000;
    }
    x * 2f64.powi(e)
}

super::simd::wide! {
    /// [`F32Sum::add_abs_base`] built for `level` (the same sum: integer reductions and exact
    /// f64 additions).
    fn add_abs_wide(sum: &mut F32Sum, xs: &[f32]) => F32Sum::add_abs_base
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks that take the f64 path (narrow spans of exponents, with zeros of both signs,
    /// subnormals, values at the span's edge) and blocks that do not (one magnitude too small
    /// or too large, a NaN, an infinity), mixed and cut at odd places: the same sum as
    /// [`F32Sum::add_all`], to the bit.
    #[test]
    fn add_abs_blocks_are_exact() {
        let s = super::super::rng::Stream::new(11, 12, 13);
        let mut vals: Vec<f32> = Vec::new();
        for block in 0..40u64 {
            // block `block`'s magnitudes span `span` exponents from 2^`low`
            let low = (block % 9) as i32 * 17 - 140;
            let span = [0, 5, 21, 22, 23, 30][(block % 6) as usize];
            for i in 0..BLOCK as u64 {
                let u = s.uniform(block * 1000 + i);
                let e = low + (u * (span as f64 + 1.0)) as i32;
                let mut v = (2f32.powi(e.clamp(-149, 127)) * (1.0 + u as f32)).min(f32::MAX);
                if i % 3 == 0 {
                    v = -v;
                }
                if i % 7 == 1 {
                    v = if i % 2 == 0 { 0.0 } else { -0.0 };
                }
                vals.push(v);
            }
        }
        // the same with a NaN in one block, and an infinity in another
        let mut nan = vals.clone();
        nan[3 * BLOCK + 5] = f32::NAN;
        let mut inf = vals.clone();
        inf[4 * BLOCK + 9] = f32::NEG_INFINITY;
        let narrow = vals
            .as_chunks::<BLOCK>()
            .0
            .iter()
            .filter(|c| block_sum(c).is_some())
            .count();
        assert!(
            (10..40).contains(&narrow),
            "{narrow} blocks took the f64 path"
        );
        assert!(
            nan.as_chunks::<BLOCK>()
                .0
                .iter()
                .filter(|c| block_sum(c).is_some())
                .count()
                < narrow
        );
        for v in [&vals[..], &vals[..BLOCK * 6], &nan, &inf] {
            let mut want = F32Sum::new();
            want.add_all(v.iter().map(|x| x.abs()));
            let want = want.finish();
            for cut in [0, 1, 63, 64, 65, 1000] {
                let cut = cut.min(v.len());
                let mut got = F32Sum::new();
                got.add_abs(&v[..cut]);
                got.add_abs(&v[cut..]);
                let got = got.finish();
                let (g, w) = (got.value(), want.value());
                assert_eq!(g.to_bits(), w.to_bits(), "cut at {cut}: {g} vs {w}");
                if g.is_finite() {
                    assert_eq!(difference(&got, &want), 0.0, "cut at {cut}");
                }
                // every build the CPU runs too (the dispatching one is the widest)
                for level in crate::kernels::simd::levels() {
                    let l = level.name();
                    let mut base = F32Sum::new();
                    add_abs_wide(level, &mut base, &v[..cut]);
                    add_abs_wide(level, &mut base, &v[cut..]);
                    let base = base.finish();
                    assert_eq!(base.value().to_bits(), w.to_bits(), "{l}, cut at {cut}");
                    if g.is_finite() {
                        assert_eq!(difference(&base, &want), 0.0, "{l}, cut at {cut}");
                    }
                }
            }
        }
        // a block at the span's edge sums exactly: every partial sum is below 2^52 units
        let edge: Vec<f32> = (0..BLOCK)
            .map(|i| {
                if i % 2 == 0 {
                    f32::from_bits(0x7f7f_ffff)
                } else {
                    2f32.powi(127 - SPAN as i32)
                }
            })
            .collect();
        let mut want = F32Sum::new();
        want.add_all(edge.iter().copied());
        let mut got = F32Sum::new();
        got.add_abs(&edge);
        let block: &[f32; BLOCK] = edge.as_slice().try_into().unwrap();
        assert!(block_sum(block).is_some());
        assert_eq!(difference(&got.finish(), &want.finish()), 0.0);
    }

    /// `a - b`, exactly (then rounded): 0 exactly when the two sums are the same number.
    fn difference(a: &ExactSum, b: &ExactSum) -> f64 {
        let minus_b: Vec<(i32, i128)> = b.buckets().iter().map(|&(e, m)| (e, -m)).collect();
        let mut d = a.clone();
        d.merge(&ExactSum::from_buckets(minus_b, None));
        d.value()
    }

    #[test]
    fn add_abs_equals_add_all_of_magnitudes() {
        let mut vals: Vec<f32> = (0..5003)
            .map(|i| ((i as f32) * 0.618_034).sin() * 10f32.powi(i % 40 - 20))
            .collect();
        vals.extend([f32::MIN_POSITIVE / 8.0, -f32::MAX, f32::MAX, -0.0]);
        for extra in [None, Some(f32::INFINITY), Some(f32::NAN)] {
            let mut v = vals.clone();
            v.extend(extra);
            v.extend([1.5, -2.25]);
            for cut in [0, 1, 3, 4, 4097] {
                let mut a = F32Sum::new();
                a.add_all(v.iter().map(|x| x.abs()));
                let mut b = F32Sum::new();
                b.add_abs(&v[..cut]);
                b.add_abs(&v[cut..]);
                let (a, b) = (a.finish().value(), b.finish().value());
                assert_eq!(a.to_bits(), b.to_bits(), "{extra:?} cut at {cut}");
            }
        }
    }

    #[test]
    fn f32_sum_equals_exact_sum() {
        let mut vals: Vec<f32> = (0..5000)
            .map(|i| {
                let x = ((i as f32) * 0.618_034).sin() * 10f32.powi(i % 40 - 20);
                if i % 3 == 0 {
                    -x
                } else {
                    x
                }
            })
            .collect();
        vals.extend([
            f32::MIN_POSITIVE,
            f32::MIN_POSITIVE / 8.0,
            -f32::from_bits(1),
            f32::MAX,
            -f32::MAX,
            0.0,
            -0.0,
        ]);
        let mut a = ExactSum::new();
        a.add_all(vals.iter().map(|&v| v as f64));
        let mut b = F32Sum::new();
        b.add_all(vals.iter().copied());
        let b = b.finish();
        assert_eq!(a.value(), b.value());
        assert_eq!(a.value().to_bits(), b.value().to_bits());
        let mut inf = F32Sum::new();
        inf.add_all([1.0, f32::INFINITY]);
        assert_eq!(inf.finish().value(), f64::INFINITY);
        let mut nan = F32Sum::new();
        nan.add_all([1.0, f32::NAN]);
        assert!(nan.finish().value().is_nan());
    }

    #[test]
    fn f64_sum_equals_exact_sum() {
        let mut vals: Vec<f64> = (0..5000)
            .map(|i| {
                let x = ((i as f64) * 0.618_034).sin() * 10f64.powi(i % 80 - 40);
                x * x * if i % 3 == 0 { -1.0 } else { 1.0 }
            })
            .collect();
        vals.extend([
            f64::MIN_POSITIVE,
            f64::MIN_POSITIVE / 8.0,
            -f64::from_bits(1),
            f64::MAX,
            -f64::MAX,
            1e300,
            0.0,
            -0.0,
        ]);
        let mut a = ExactSum::new();
        a.add_all(vals.iter().copied());
        let mut b = F64Sum::new();
        vals.iter().for_each(|&v| b.add(v));
        let b = b.finish();
        assert_eq!(a.value().to_bits(), b.value().to_bits());
        let mut inf = F64Sum::new();
        inf.add(1.0);
        inf.add(f64::NEG_INFINITY);
        assert_eq!(inf.finish().value(), f64::NEG_INFINITY);
    }

    #[test]
    fn exact_where_naive_is_not() {
        let mut s = ExactSum::new();
        s.add_all([1e20, 1.0, -1e20, 1.0]);
        assert_eq!(s.value(), 2.0);
    }

    #[test]
    fn order_independent() {
        let xs: Vec<f64> = (0..5000)
            .map(|i| (i as f64 * 0.7368).sin() * 10f64.powi(i % 13 - 6))
            .collect();
        let mut a = ExactSum::new();
        a.add_all(xs.iter().copied());
        let mut parts = Vec::new();
        for c in xs.chunks(333).rev() {
            let mut p = ExactSum::new();
            p.add_all(c.iter().rev().copied());
            parts.push(p);
        }
        let mut b = ExactSum::new();
        for p in &parts {
            b.merge(p);
        }
        assert_eq!(a.value().to_bits(), b.value().to_bits());
        let naive: f64 = xs.iter().sum();
        assert!((a.value() - naive).abs() <= naive.abs() * 1e-12 + 1e-12);
    }

    #[test]
    fn rounding_and_signs() {
        for v in [
            1.0,
            -1.0,
            0.1,
            -3.75e-300,
            5e-324,
            1.7976931348623157e308,
            -123456.789,
        ] {
            let mut s = ExactSum::new();
            s.add(v);
            assert_eq!(s.value(), v);
        }
        // 1 + 2^-53 rounds to even (1.0); 1 + 2^-53 + 2^-100 rounds up
        let mut s = ExactSum::new();
        s.add_all([1.0, 2f64.powi(-53)]);
        assert_eq!(s.value(), 1.0);
        s.add(2f64.powi(-100));
        assert_eq!(s.value(), 1.0 + 2f64.powi(-52));
        let mut s = ExactSum::new();
        s.add_all([-1.0, -2f64.powi(-53), -2f64.powi(-100)]);
        assert_eq!(s.value(), -(1.0 + 2f64.powi(-52)));
    }

    #[test]
    fn non_finite_propagates() {
        let mut s = ExactSum::new();
        s.add_all([1.0, f64::INFINITY]);
        assert_eq!(s.value(), f64::INFINITY);
        s.add(f64::NAN);
        assert!(s.value().is_nan());
    }
}
