//! A whole tensor's inputs as they are stored: the little-endian bytes of 16-bit floats,
//! widened to f32 a chunk at a time by the kernels that walk the tensor several times
//! ([`super::Method::whole_stored`]). Each walk then reads 2 bytes per value from memory
//! instead of the 4 of values decoded up front; widening is exact, so the kernel computes on
//! the same f32 values either way.

use half::f16;

use super::round::{rk_arith, Work};
use super::simd;

/// One input as stored.
#[derive(Clone, Copy, Debug)]
pub enum Stored<'a> {
    /// bfloat16 values, 2 bytes each, little-endian.
    Bf16(&'a [u8]),
    /// IEEE half-precision values, 2 bytes each, little-endian.
    F16(&'a [u8]),
}

impl Stored<'_> {
    /// Values held (a trailing odd byte is not one).
    pub fn len(&self) -> usize {
        self.bytes().len() / 2
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Stored::Bf16(b) | Stored::F16(b) => b,
        }
    }

    /// Values `[at, at + dst.len())` as f32, into `dst`.
    ///
    /// Panics when they run past the end (callers walk `0..len()`).
    pub fn widen(&self, at: usize, dst: &mut [f32]) {
        let src = &self.bytes()[2 * at..2 * (at + dst.len())];
        match self {
            Stored::Bf16(_) => bf16_widen_wide(simd::level(), src, dst),
            Stored::F16(_) => {
                for (d, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    *d = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
                }
            }
        }
    }

    /// This model's delta from `base` over values `[at, at + d.len())` in working dtype
    /// `work`, into `d`: `work.sub_in_place` of the widened values, in one loop where both are
    /// bfloat16 and `work` is f32 or bfloat16 (`tmp`, as long as `d`, is working space).
    pub fn delta(&self, base: &Stored, work: Work, at: usize, d: &mut [f32], tmp: &mut [f32]) {
        if let (Stored::Bf16(x), Stored::Bf16(b), Work::F32 | Work::BF16) = (self, base, work) {
            let r = 2 * at..2 * (at + d.len());
            let (x, b) = (&x[r.clone()], &b[r]);
            let level = simd::level();
            let exact = match work {
                Work::F32 => delta_bf16_wide::<0>(level, x, b, d),
                _ => delta_bf16_wide::<1>(level, x, b, d),
            };
            if exact {
                return;
            }
        }
        self.widen(at, d);
        base.widen(at, tmp);
        work.sub_in_place(d, tmp);
    }

    /// Appends the values at `pos`, in that order, as stored, to `buf`.
    ///
    /// Panics when a position is past the end.
    pub fn gather(&self, pos: &[u32], buf: &mut Vec<u8>) {
        let src = self.bytes();
        let from = buf.len();
        buf.resize(from + 2 * pos.len(), 0);
        for (o, &i) in buf[from..].chunks_exact_mut(2).zip(pos) {
            let i = 2 * i as usize;
            o.copy_from_slice(&src[i..i + 2]);
        }
    }

    /// Values stored as this input's are, in `bytes`.
    pub fn like<'b>(&self, bytes: &'b [u8]) -> Stored<'b> {
        match self {
            Stored::Bf16(_) => Stored::Bf16(bytes),
            Stored::F16(_) => Stored::F16(bytes),
        }
    }

    /// Whether every value is finite (no exponent of all ones).
    pub fn all_finite(&self) -> bool {
        let exp: u16 = match self {
            Stored::Bf16(_) => 0x7f80,
            Stored::F16(_) => 0x7c00,
        };
        all_finite_wide(simd::level(), self.bytes(), exp)
    }
}

/// bfloat16 bytes widened to f32: the bits shifted up.
#[inline(always)]
fn bf16_widen(src: &[u8], dst: &mut [f32]) {
    for (d, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *d = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
    }
}

/// `d = r(x - b)` of bfloat16 `x` and `b` widened, in f32 (`K` 0) or rounded to bfloat16
/// (`K` 1: then the result of [`Work::sub_in_place`] only when no `x` or `b` is a NaN, which
/// the rounding of an input would make quiet; false when one is).
#[inline(always)]
fn delta_bf16<const K: u8>(x: &[u8], b: &[u8], d: &mut [f32]) -> bool {
    let mut top = 0u32;
    for ((d, xc), bc) in d.iter_mut().zip(x.chunks_exact(2)).zip(b.chunks_exact(2)) {
        let xv = u32::from(u16::from_le_bytes([xc[0], xc[1]])) << 16;
        let bv = u32::from(u16::from_le_bytes([bc[0], bc[1]])) << 16;
        let r = f32::from_bits(xv) - f32::from_bits(bv);
        if K == 0 {
            *d = r;
        } else {
            top = top.max(xv & 0x7fff_ffff).max(bv & 0x7fff_ffff);
            *d = rk_arith::<1>(r);
        }
    }
    top <= 0x7f80_0000
}

/// Whether no 16-bit value of `src` has every bit of `exp` set.
#[inline(always)]
fn all_finite(src: &[u8], exp: u16) -> bool {
    // a fold without an early exit, so that it vectorises; by blocks, so that a NaN early
    // in a large tensor still ends the walk soon
    src.chunks(1 << 14).all(|b| {
        b.chunks_exact(2).fold(true, |ok, c| {
            ok & (u16::from_le_bytes([c[0], c[1]]) & exp != exp)
        })
    })
}

simd::wide! {
    /// [`bf16_widen`] built for `level`.
    fn bf16_widen_wide(src: &[u8], dst: &mut [f32]) => bf16_widen
}

simd::wide! {
    /// [`delta_bf16`] built for `level`.
    fn delta_bf16_wide<const K: u8>(x: &[u8], b: &[u8], d: &mut [f32]) -> bool => delta_bf16
}

simd::wide! {
    /// [`all_finite`] built for `level`.
    fn all_finite_wide(src: &[u8], exp: u16) -> bool => all_finite
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(v: &[u16]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn widens_exactly_from_any_offset() {
        let vals = [1.5f32, -0.0, 3.0e38, -2.5e-40, f32::INFINITY, 0.1, -7.0];
        let bf: Vec<u16> = vals
            .iter()
            .map(|&x| half::bf16::from_f32(x).to_bits())
            .collect();
        let hf: Vec<u16> = vals.iter().map(|&x| f16::from_f32(x).to_bits()).collect();
        let (bb, hb) = (bytes(&bf), bytes(&hf));
        for level in simd::levels() {
            for at in 0..vals.len() {
                let mut got = vec![f32::NAN; vals.len() - at];
                bf16_widen_wide(level, &bb[2 * at..], &mut got);
                let want: Vec<u32> = bf[at..]
                    .iter()
                    .map(|&b| half::bf16::from_bits(b).to_f32().to_bits())
                    .collect();
                assert_eq!(got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), want);
            }
        }
        let mut got = vec![0f32; 3];
        Stored::F16(&hb).widen(2, &mut got);
        let want: Vec<f32> = hf[2..5]
            .iter()
            .map(|&b| f16::from_bits(b).to_f32())
            .collect();
        assert_eq!(got, want);
        assert_eq!(Stored::Bf16(&bb).len(), vals.len());
    }

    /// The fused delta gives `Work::sub_in_place`'s bits on the widened values, in every
    /// build, for f32, bfloat16 and float16 work, with NaNs (signalling too), infinities,
    /// zeros of both signs and subnormals among model and base; and from float16 inputs.
    #[test]
    fn delta_is_sub_in_place_of_the_widened() {
        let specials = [
            0x7fc1u16, 0x7f81, 0xff80, 0x7f80, 0x8000, 0, 1, 0x8001, 0x3f80, 0x4049,
        ];
        let n = 300;
        let x: Vec<u16> = (0..n)
            .map(|i| match i % 17 {
                0 => specials[i % specials.len()],
                _ => ((i * 7919) % 65536) as u16 & 0xbfff,
            })
            .collect();
        let b: Vec<u16> = (0..n)
            .map(|i| match i % 13 {
                0 => specials[(i / 13) % specials.len()],
                _ => ((i * 104_729) % 65536) as u16 & 0xbfff,
            })
            .collect();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for (xb, bb) in [
            (bytes(&x), bytes(&b)),
            (bytes(&x[1..17]), bytes(&x[18..34])),
        ] {
            let len = xb.len() / 2;
            for (xs, bs) in [
                (Stored::Bf16(&xb), Stored::Bf16(&bb)),
                (Stored::F16(&xb), Stored::F16(&bb)),
                (Stored::Bf16(&xb), Stored::F16(&bb)),
            ] {
                for work in [Work::F32, Work::BF16, Work::F16] {
                    for at in [0, 3] {
                        let m = len - at;
                        let (mut want, mut wb) = (vec![0f32; m], vec![0f32; m]);
                        xs.widen(at, &mut want);
                        bs.widen(at, &mut wb);
                        work.sub_in_place(&mut want, &wb);
                        let (mut got, mut tmp) = (vec![f32::NAN; m], vec![0f32; m]);
                        xs.delta(&bs, work, at, &mut got, &mut tmp);
                        assert_eq!(bits(&got), bits(&want), "{xs:?} {work:?} at {at}");
                    }
                }
            }
            for level in simd::levels() {
                let mut d = vec![0f32; len];
                let clean = delta_bf16_wide::<1>(level, &xb, &bb, &mut d);
                assert_eq!(clean, len < 32, "a NaN among the 300, none among the 16");
            }
        }
    }

    #[test]
    fn finiteness_by_exponent() {
        let nan = half::bf16::NAN.to_bits();
        let ninf = half::bf16::NEG_INFINITY.to_bits();
        let max = half::bf16::MAX.to_bits();
        for level in simd::levels() {
            let mut v = vec![max; 40_000];
            assert!(all_finite_wide(level, &bytes(&v), 0x7f80));
            v[39_999] = nan;
            assert!(!all_finite_wide(level, &bytes(&v), 0x7f80));
            v[39_999] = max;
            v[3] = ninf;
            assert!(!all_finite_wide(level, &bytes(&v), 0x7f80));
        }
        let h = [f16::MAX.to_bits(), f16::INFINITY.to_bits()];
        assert!(!Stored::F16(&bytes(&h)).all_finite());
        assert!(Stored::F16(&bytes(&h[..1])).all_finite());
    }
}
