//! Exact dot products of float32 vectors (Gram matrices, squared norms): the sums the
//! statistics passes and the merge report take of xᵢ·yᵢ.
//!
//! The product of two f32 values is exact in f64 and has at most 48 significant bits (two
//! 24-bit significands), so the five lowest bits of its 53-bit f64 significand are zero.
//! Shifted down those five bits, the signed significand fits 48 bits. [`DotSum`] takes the
//! products a block at a time: where a block's nonzero products span at most `SPAN`
//! exponents, their significands aligned to the least one are summed exactly in integer lanes
//! (`aligned`) and the block added as one value; otherwise each significand goes to the
//! i64 bucket of its exponent (2^15 of them fit), indexed directly, in a few lanes taken in
//! turn (so neighbouring products of one exponent do not wait on each other's store), and the
//! buckets are folded into an [`ExactSum`] before any could overflow. The result is the exact sum, so it
//! rounds to the same value as [`F64Sum`](super::exact::F64Sum) or [`ExactSum`] of the same
//! products, in any order.

use super::exact::ExactSum;

/// Bucket arrays taken in turn.
const LANES: usize = 4;
/// Products added between folds: each lane's buckets get a quarter, at most 2^14 each.
const FOLD: usize = 1 << 16;

/// An exact sum of products of f32 values (see the module's comment).
pub struct DotSum {
    buckets: Box<[[i64; 2048]; LANES]>,
    /// The exponents added to since the last fold: `[lo, hi]` (empty when lo > hi).
    lo: usize,
    hi: usize,
    pending: usize,
    /// Folded buckets, and the products that are not finite.
    total: ExactSum,
}

impl Default for DotSum {
    fn default() -> Self {
        DotSum {
            buckets: Box::new([[0; 2048]; LANES]),
            lo: usize::MAX,
            hi: 0,
            pending: 0,
            total: ExactSum::new(),
        }
    }
}

impl DotSum {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `x[k]·y[k]` for every `k` (the shorter length).
    pub fn add_products(&mut self, x: &[f32], y: &[f32]) {
        let n = x.len().min(y.len());
        let (x, y) = (&x[..n], &y[..n]);
        for (xc, yc) in x.chunks(FOLD).zip(y.chunks(FOLD)) {
            if self.pending + xc.len() > FOLD {
                self.fold();
            }
            self.add_chunk(xc, yc);
            self.pending += xc.len();
        }
    }

    /// Adds the products of `x` and `y` (at most [`FOLD`] since the last fold): their exponents
    /// and significands worked out a block at a time in vector registers, then each added to its
    /// bucket.
    fn add_chunk(&mut self, x: &[f32], y: &[f32]) {
        let mut es = [0u32; BLOCK];
        let mut ms = [0i64; BLOCK];
        let level = super::simd::level();
        for (xb, yb) in x.chunks(BLOCK).zip(y.chunks(BLOCK)) {
            let n = xb.len();
            let (lo, hi) = split_wide(level, xb, yb, &mut es[..n], &mut ms[..n]);
            if hi < 0x7ff && hi.saturating_sub(lo) <= SPAN {
                // one exact integer sum for the block, added at its least exponent
                let (h, l) = aligned_wide(level, &es[..n], &ms[..n], lo);
                let v = (i128::from(h) << 24) + i128::from(l);
                if v != 0 {
                    self.total.add_bucket(lo as i32 - 1075 + 5, v);
                }
                continue;
            }
            for (k, (&e, &m)) in es[..n].iter().zip(&ms[..n]).enumerate() {
                self.buckets[k % LANES][e as usize & 0x7ff] += m;
            }
            if hi == 0x7ff {
                // a NaN or an infinity (its significand was taken as 0): the slow way
                for (&a, &b) in xb.iter().zip(yb) {
                    let p = f64::from(a) * f64::from(b);
                    if !p.is_finite() {
                        self.total.add(p);
                    }
                }
            }
            (self.lo, self.hi) = (self.lo.min(lo as usize), self.hi.max(hi as usize));
        }
    }

    fn fold(&mut self) {
        if self.lo <= self.hi {
            for e in self.lo..=self.hi {
                let m: i128 = self.buckets.iter().map(|l| i128::from(l[e])).sum();
                for lane in self.buckets.iter_mut() {
                    lane[e] = 0;
                }
                if m != 0 && e != 0x7ff {
                    // value = significand · 2^(e - 1075), shifted down 5 bits (f64 products of
                    // f32 values are never subnormal: zero is the only one with e = 0)
                    self.total.add_bucket(e as i32 - 1075 + 5, m);
                }
            }
        }
        (self.lo, self.hi, self.pending) = (usize::MAX, 0, 0);
    }

    /// The exact sum so far; the sum starts again from zero.
    pub fn take(&mut self) -> ExactSum {
        self.fold();
        std::mem::replace(&mut self.total, ExactSum::new())
    }

    /// The exact sum.
    pub fn finish(mut self) -> ExactSum {
        self.fold();
        self.total
    }
}

/// Products worked out a block at a time.
const BLOCK: usize = 256;

/// The most exponents a block's nonzero products may span to be summed by [`aligned`].
const SPAN: u32 = 31;

/// Each product `x[k]·y[k]`'s f64 exponent into `es` and its signed significand, shifted down
/// its five zero bits, into `ms` (0 for a NaN or an infinity, which the caller adds on its
/// own); the least exponent of a nonzero product (`u32::MAX` for none) and the greatest
/// exponent. Independent lanes, so it vectorises.
#[inline(always)]
fn split(x: &[f32], y: &[f32], es: &mut [u32], ms: &mut [i64]) -> (u32, u32) {
    let (mut lo, mut hi) = (u32::MAX, 0u32);
    for (((&a, &b), e), m) in x.iter().zip(y).zip(es.iter_mut()).zip(ms.iter_mut()) {
        let bits = (f64::from(a) * f64::from(b)).to_bits();
        let ex = ((bits >> 52) & 0x7ff) as u32;
        let sig = ((bits & ((1 << 52) - 1)) | (u64::from(ex != 0) << 52)) >> 5;
        let sig = if ex == 0x7ff { 0 } else { sig as i64 };
        let s = (bits as i64) >> 63;
        *m = (sig ^ s) - s;
        *e = ex;
        // (a zero product has exponent 0 and adds nothing: it does not count for the span)
        lo = lo.min(if ex == 0 { u32::MAX } else { ex });
        hi = hi.max(ex);
    }
    (lo, hi)
}

/// The sum of the significands `ms`, each shifted up by its exponent in `es` less `lo` (at
/// most [`SPAN`]; zeros, whose exponent is 0, add nothing), as `(h, l)` with the sum
/// `h · 2^24 + l`: each significand split into its high part (`m >> 24`) and its low 24 bits,
/// both summed in i64. Exact: a part shifted is below 2^(24 + SPAN) = 2^55 in magnitude, and
/// [`BLOCK`] = 2^8 of them sum below 2^63. Independent lanes, so it vectorises.
#[inline(always)]
fn aligned(es: &[u32], ms: &[i64], lo: u32) -> (i64, i64) {
    let (mut h, mut l) = (0i64, 0i64);
    for (&e, &m) in es.iter().zip(ms) {
        let s = if e == 0 { 0 } else { e.wrapping_sub(lo) & 63 };
        h += (m >> 24) << s;
        l += (m & 0xff_ffff) << s;
    }
    (h, l)
}

super::simd::wide! {
    /// [`aligned`] built for `level`.
    fn aligned_wide(es: &[u32], ms: &[i64], lo: u32) -> (i64, i64) => aligned
}

super::simd::wide! {
    /// [`split`] built for `level`.
    fn split_wide(x: &[f32], y: &[f32], es: &mut [u32], ms: &mut [i64]) -> (u32, u32) => split
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::exact::F64Sum;

    fn by_f64sum(x: &[f32], y: &[f32]) -> ExactSum {
        let mut s = F64Sum::new();
        for (&a, &b) in x.iter().zip(y) {
            s.add(f64::from(a) * f64::from(b));
        }
        s.finish()
    }

    /// The same exact sum as adding each product to an [`F64Sum`]: magnitudes over the whole
    /// f32 range, subnormals, zeros and signed zeros, lengths that end mid-lane, and more
    /// products than one fold takes (all of one exponent: the buckets' worst case).
    #[test]
    fn the_same_sum_as_each_product_added_exactly() {
        let mut x: Vec<f32> = Vec::new();
        let mut y: Vec<f32> = Vec::new();
        let mut r = 0x9e37_79b9_u32;
        for k in 0..70_001u32 {
            r ^= r << 13;
            r ^= r >> 17;
            r ^= r << 5;
            let e = (r % 250) as i32 - 125;
            let v = (1.0 + f32::from((r >> 8) as u16) / 65536.0) * 2f32.powi(e);
            x.push(if r & 1 == 0 { v } else { -v });
            y.push(match k % 7 {
                0 => 0.0,
                1 => -0.0,
                2 => f32::from_bits(r >> 9), // subnormal or small
                _ => 1.0 / (1.0 + (k % 1000) as f32),
            });
        }
        for n in [0, 1, 3, 5, 4097, x.len()] {
            let mut d = DotSum::new();
            d.add_products(&x[..n], &y[..n]);
            assert_eq!(
                d.finish().value(),
                by_f64sum(&x[..n], &y[..n]).value(),
                "{n}"
            );
        }
        // 2^17 products of the largest significand and one exponent, in two calls
        let big = vec![f32::from_bits(0x3fff_ffff); 1 << 17];
        let mut d = DotSum::new();
        d.add_products(&big[..1000], &big[..1000]);
        d.add_products(&big[1000..], &big[1000..]);
        assert_eq!(d.finish().value(), by_f64sum(&big, &big).value());
    }

    /// Blocks summed whole ([`aligned`]): products spanning up to [`SPAN`] exponents, of both
    /// signs, with zeros, and the extreme block (the largest significands, all negative, half
    /// of them [`SPAN`] exponents above the others); and a block just past the span.
    #[test]
    fn blocks_of_close_exponents_sum_exactly() {
        let mut r = 0x1234_5677_u32;
        let mut next = || {
            r ^= r << 13;
            r ^= r >> 17;
            r ^= r << 5;
            r
        };
        for span in [0, 5, 15, 30] {
            let (x, y): (Vec<f32>, Vec<f32>) = (0..3000)
                .map(|k| {
                    let v = next();
                    let e = (v % (span / 2 + 1)) as i32 - 3;
                    let a = (1.0 + f32::from((v >> 8) as u16) / 65536.0) * 2f32.powi(e);
                    let a = if v & 1 == 0 { a } else { -a };
                    (
                        if k % 11 == 0 { 0.0 } else { a },
                        1.0 + (v >> 20) as f32 / 4096.0,
                    )
                })
                .unzip();
            let mut d = DotSum::new();
            d.add_products(&x, &y);
            assert_eq!(d.finish().value(), by_f64sum(&x, &y).value(), "span {span}");
        }
        let top = -f32::from_bits(0x3fff_ffff); // -(2 - 2^-23) · 2
        for (half, gap) in [(15, 15), (15, 16)] {
            // products 2^(2·gap) apart: within SPAN, then just past it
            let big = top * 2f32.powi(half);
            let x: Vec<f32> = (0..BLOCK)
                .map(|k| {
                    if k % 2 == 0 {
                        big
                    } else {
                        top * 2f32.powi(half - gap)
                    }
                })
                .collect();
            let y: Vec<f32> = x.iter().map(|v| v.abs()).collect();
            let mut d = DotSum::new();
            d.add_products(&x, &y);
            assert_eq!(d.finish().value(), by_f64sum(&x, &y).value(), "gap {gap}");
        }
    }

    #[test]
    fn non_finite_products_are_kept() {
        let mut d = DotSum::new();
        d.add_products(&[1.0, f32::INFINITY, 2.0], &[1.0, 1.0, 2.0]);
        assert_eq!(d.finish().value(), f64::INFINITY);
        let mut d = DotSum::new();
        d.add_products(&[f32::INFINITY, f32::NEG_INFINITY], &[1.0, 1.0]);
        assert!(d.finish().value().is_nan());
        let mut d = DotSum::new();
        d.add_products(&[f32::NAN, 3.0], &[1.0, 1.0]);
        assert!(d.finish().value().is_nan());
    }
}
