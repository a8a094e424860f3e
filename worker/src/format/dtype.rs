//! The element types a merge reads and writes, and conversion to and from f32.
//!
//! Merges compute on the float types. The others (booleans and integers: buffers such as
//! GPT-NeoX's causal mask) are never merged: their bytes are copied from the base model, so
//! their f32 conversions here only serve tests and tools.

use std::mem::MaybeUninit;

use half::f16;

use crate::kernels::simd;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    Bool,
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
}

/// Every element type, floats first.
pub(crate) const ALL: [DType; 12] = [
    DType::F32,
    DType::F16,
    DType::BF16,
    DType::Bool,
    DType::U8,
    DType::I8,
    DType::U16,
    DType::I16,
    DType::U32,
    DType::I32,
    DType::U64,
    DType::I64,
];

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::Bool | DType::U8 | DType::I8 => 1,
            DType::F16 | DType::BF16 | DType::U16 | DType::I16 => 2,
            DType::F32 | DType::U32 | DType::I32 => 4,
            DType::U64 | DType::I64 => 8,
        }
    }

    /// Whether merges compute on it (the others are copied).
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }

    /// The name in a safetensors header.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::Bool => "BOOL",
            DType::U8 => "U8",
            DType::I8 => "I8",
            DType::U16 => "U16",
            DType::I16 => "I16",
            DType::U32 => "U32",
            DType::I32 => "I32",
            DType::U64 => "U64",
            DType::I64 => "I64",
        }
    }

    /// Parses a safetensors header's dtype name (those of this type; not F64 or 8-bit floats).
    pub fn from_st_name(s: &str) -> Option<DType> {
        ALL.into_iter().find(|d| d.name() == s)
    }

    /// The name in a recipe or config.json (`torch_dtype`).
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::Bool => "bool",
            DType::U8 => "uint8",
            DType::I8 => "int8",
            DType::U16 => "uint16",
            DType::I16 => "int16",
            DType::U32 => "uint32",
            DType::I32 => "int32",
            DType::U64 => "uint64",
            DType::I64 => "int64",
        }
    }

    /// Parses the names mergekit accepts for `dtype` / `out_dtype`.
    pub fn from_recipe(s: &str) -> Option<DType> {
        Some(match s {
            "float32" | "fp32" | "f32" | "float" => DType::F32,
            "float16" | "fp16" | "f16" | "half" => DType::F16,
            "bfloat16" | "bf16" => DType::BF16,
            _ => return None,
        })
    }

    pub fn to_proto(self) -> shardmerge_proto::Dtype {
        use shardmerge_proto::Dtype as P;
        match self {
            DType::F32 => P::F32,
            DType::F16 => P::F16,
            DType::BF16 => P::Bf16,
            DType::Bool => P::Bool,
            DType::U8 => P::U8,
            DType::I8 => P::I8,
            DType::U16 => P::U16,
            DType::I16 => P::I16,
            DType::U32 => P::U32,
            DType::I32 => P::I32,
            DType::U64 => P::U64,
            DType::I64 => P::I64,
        }
    }

    pub fn from_proto(v: i32) -> Option<DType> {
        let p = shardmerge_proto::Dtype::try_from(v).ok()?;
        ALL.into_iter().find(|d| d.to_proto() == p)
    }
}

/// Decodes one little-endian element of a non-float type as f32 (rounded for wide integers).
fn int_to_f32(dtype: DType, c: &[u8]) -> f32 {
    let mut b = [0u8; 8];
    b[..c.len()].copy_from_slice(c);
    let u = u64::from_le_bytes(b);
    match dtype {
        DType::Bool => (u != 0) as u8 as f32,
        DType::U8 | DType::U16 | DType::U32 | DType::U64 => u as f32,
        DType::I8 => c[0] as i8 as f32,
        DType::I16 => u as u16 as i16 as f32,
        DType::I32 => u as u32 as i32 as f32,
        DType::I64 => u as i64 as f32,
        DType::F32 | DType::F16 | DType::BF16 => f32::NAN,
    }
}

/// Encodes `x` as one little-endian element of a non-float type (saturating; NaN gives 0).
fn f32_to_int(dtype: DType, x: f32, c: &mut [u8]) {
    let v: u64 = match dtype {
        DType::Bool => (x != 0.0 && !x.is_nan()) as u64,
        DType::U8 => x as u8 as u64,
        DType::U16 => x as u16 as u64,
        DType::U32 => x as u32 as u64,
        DType::U64 => x as u64,
        DType::I8 => x as i8 as u8 as u64,
        DType::I16 => x as i16 as u16 as u64,
        DType::I32 => x as i32 as u32 as u64,
        DType::I64 => x as i64 as u64,
        DType::F32 | DType::F16 | DType::BF16 => 0,
    };
    let n = c.len();
    c.copy_from_slice(&v.to_le_bytes()[..n]);
}

/// Decodes little-endian elements of `dtype` from `src` into `dst` (`dst.len()` elements).
pub fn decode(dtype: DType, src: &[u8], dst: &mut [f32]) {
    debug_assert_eq!(src.len(), dst.len() * dtype.size());
    match dtype {
        DType::F32 => {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::BF16 => bf16_decode_wide(simd::level(), src, dst),
        DType::F16 => {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        _ => {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(dtype.size())) {
                *d = int_to_f32(dtype, c);
            }
        }
    }
}

/// bfloat16 bytes to f32: each value's bits in the high half.
#[inline(always)]
fn bf16_decode(src: &[u8], dst: &mut [f32]) {
    for (d, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *d = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
    }
}

simd::wide! {
    /// [`bf16_decode`] built for `level` (the blocked path decodes every bf16 input with it: in
    /// the baseline build it was an eighth of a task arithmetic merge's time).
    fn bf16_decode_wide(src: &[u8], dst: &mut [f32]) => bf16_decode
}

/// Decodes little-endian elements of `dtype` from `src` onto the end of `dst`, without
/// first zero-filling the space (the buffers are large; the fill costs as much as the decode).
pub(crate) fn decode_extend(dtype: DType, src: &[u8], dst: &mut Vec<f32>) {
    match dtype {
        DType::F32 => dst.extend(
            src.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        DType::BF16 => {
            let n = src.len() / 2;
            dst.reserve(n);
            bf16_widen_wide(simd::level(), src, &mut dst.spare_capacity_mut()[..n]);
            let len = dst.len() + n;
            // SAFETY: the `n` elements past the old length were just written (`bf16_widen`
            // writes one element for each of its `n` pairs of bytes), within the capacity
            // that `reserve` made
            unsafe { dst.set_len(len) };
        }
        DType::F16 => dst.extend(
            src.chunks_exact(2)
                .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()),
        ),
        _ => dst.extend(src.chunks_exact(dtype.size()).map(|c| int_to_f32(dtype, c))),
    }
}

/// bfloat16 bytes widened to f32 (exact: the bits shifted up), into uninitialised space (as
/// long as `src` has pairs of bytes).
#[inline(always)]
fn bf16_widen(src: &[u8], dst: &mut [MaybeUninit<f32>]) {
    for (d, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
        d.write(f32::from_bits(
            (u16::from_le_bytes([c[0], c[1]]) as u32) << 16,
        ));
    }
}

simd::wide! {
    /// [`bf16_widen`] built for `level`.
    fn bf16_widen_wide(src: &[u8], dst: &mut [MaybeUninit<f32>]) => bf16_widen
}

/// The bf16 bits of `x`, rounded to nearest even: bit for bit what `half::bf16::from_f32`
/// gives (NaN keeps its sign and high payload with the quiet bit set), without branches, so
/// the encode loop vectorises.
#[inline(always)]
pub(crate) fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    // adding 0x7fff plus the kept part's lowest bit carries into bit 16 exactly when the
    // dropped half is above the halfway point, or at it with an odd kept part
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    let nan = (b & 0x7fff_ffff) > 0x7f80_0000;
    (if nan { (b >> 16) | 0x0040 } else { rounded }) as u16
}

/// [`encode`], also telling whether every encoded element is finite (no NaN, no infinity,
/// including an f32 value too large for f16 or bf16). The check is folded into the encode loop
/// (one OR per element), so the executor gets it for free on the pass it makes anyway.
pub fn encode_finite(dtype: DType, src: &[f32], dst: &mut [u8]) -> bool {
    debug_assert_eq!(dst.len(), src.len() * dtype.size());
    // an element is not finite when its exponent bits are all ones
    let mut bad = false;
    match dtype {
        DType::F32 => {
            for (c, s) in dst.chunks_exact_mut(4).zip(src) {
                let b = s.to_bits();
                bad |= b & 0x7f80_0000 == 0x7f80_0000;
                c.copy_from_slice(&b.to_le_bytes());
            }
        }
        DType::BF16 => return bf16_finite_wide(simd::level(), src, dst),
        DType::F16 => {
            for (c, s) in dst.chunks_exact_mut(2).zip(src) {
                let h = f16::from_f32(*s).to_bits();
                bad |= h & 0x7c00 == 0x7c00;
                c.copy_from_slice(&h.to_le_bytes());
            }
        }
        // integer and boolean outputs are copies, never computed: nothing can turn non-finite
        _ => encode(dtype, src, dst),
    }
    !bad
}

/// [`encode_finite`] to bfloat16, built for each vector width by [`bf16_finite_wide`] (the
/// same integer operations, so the same bytes; it encodes every output of a bf16 merge).
#[inline(always)]
fn bf16_finite(src: &[f32], dst: &mut [u8]) -> bool {
    let mut bad = 0u16;
    for (c, s) in dst.chunks_exact_mut(2).zip(src) {
        let h = bf16_bits(*s);
        bad |= u16::from(h & 0x7f80 == 0x7f80);
        c.copy_from_slice(&h.to_le_bytes());
    }
    bad == 0
}

simd::wide! {
    /// [`bf16_finite`] built for `level`.
    fn bf16_finite_wide(src: &[f32], dst: &mut [u8]) -> bool => bf16_finite
}

/// Encodes `src` as little-endian `dtype` into `dst` (round to nearest even, as torch does).
pub fn encode(dtype: DType, src: &[f32], dst: &mut [u8]) {
    debug_assert_eq!(dst.len(), src.len() * dtype.size());
    match dtype {
        DType::F32 => {
            for (c, s) in dst.chunks_exact_mut(4).zip(src) {
                c.copy_from_slice(&s.to_le_bytes());
            }
        }
        DType::BF16 => {
            for (c, s) in dst.chunks_exact_mut(2).zip(src) {
                c.copy_from_slice(&bf16_bits(*s).to_le_bytes());
            }
        }
        DType::F16 => {
            for (c, s) in dst.chunks_exact_mut(2).zip(src) {
                c.copy_from_slice(&f16::from_f32(*s).to_bits().to_le_bytes());
            }
        }
        _ => {
            for (c, s) in dst.chunks_exact_mut(dtype.size()).zip(src) {
                f32_to_int(dtype, *s, c);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    #[test]
    fn decode_extend_equals_decode() {
        let bytes: Vec<u8> = (0..4000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for dt in [DType::F32, DType::F16, DType::BF16] {
            let n = bytes.len() / dt.size();
            let mut a = vec![0f32; n];
            decode(dt, &bytes, &mut a);
            let mut b = vec![7.0f32];
            decode_extend(dt, &bytes, &mut b);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&b[1..]), bits(&a), "{dt:?}");
        }
        // every build of the bf16 widening, odd lengths (a last lone byte is not an element)
        for len in [0, 1, 2, 3, 31, 33, bytes.len() - 1] {
            let n = len / 2;
            let mut want = vec![0f32; n];
            decode(DType::BF16, &bytes[..2 * n], &mut want);
            for level in simd::levels() {
                let mut got: Vec<f32> = Vec::with_capacity(n);
                bf16_widen_wide(level, &bytes[..len], &mut got.spare_capacity_mut()[..n]);
                // SAFETY: `bf16_widen` wrote the `n` elements, within the capacity
                unsafe { got.set_len(n) };
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{len} {}", level.name());
            }
        }
    }

    #[test]
    fn roundtrip_all_dtypes() {
        let v = [0.0f32, -1.5, 3.25, 1e-3, -65504.0];
        for dt in [DType::F32, DType::F16, DType::BF16] {
            let mut b = vec![0u8; v.len() * dt.size()];
            encode(dt, &v, &mut b);
            let mut back = vec![0f32; v.len()];
            decode(dt, &b, &mut back);
            for (a, b) in v.iter().zip(&back) {
                assert!((a - b).abs() <= a.abs() * 1e-2 + 1e-6, "{dt:?} {a} {b}");
            }
        }
    }

    #[test]
    fn bf16_bits_matches_half() {
        let check = |b: u32| {
            let x = f32::from_bits(b);
            assert_eq!(bf16_bits(x), bf16::from_f32(x).to_bits(), "bits {b:#010x}");
        };
        // a dense sample of all 2^32 patterns (the stride is odd, so every low-bit residue
        // and rounding case turns up) ...
        let mut b = 0u32;
        loop {
            check(b);
            match b.checked_add(251) {
                Some(n) => b = n,
                None => break,
            }
        }
        // ... and every pattern around the interesting exponents, both signs: zero and
        // subnormals, one, the largest finite values rounding to infinity, infinity and NaN
        for sign in [0u32, 0x8000_0000] {
            for hi in [
                0x0000u32, 0x0001, 0x007f, 0x0080, 0x3f80, 0x7f7f, 0x7f80, 0x7fc0, 0x7fff,
            ] {
                for lo in 0..=0xffffu32 {
                    check(sign | hi << 16 | lo);
                }
            }
        }
    }

    #[test]
    fn non_float_types() {
        for dt in ALL {
            assert_eq!(DType::from_st_name(dt.name()), Some(dt));
            assert_eq!(DType::from_proto(dt.to_proto() as i32), Some(dt));
        }
        assert_eq!(DType::from_st_name("F64"), None);
        assert!(!DType::Bool.is_float() && DType::BF16.is_float());
        // small integers go through f32 exactly, both ways
        let v = [0.0f32, 1.0, -3.0, 100.0, -128.0];
        for dt in [DType::I8, DType::I16, DType::I32, DType::I64] {
            let mut b = vec![0u8; v.len() * dt.size()];
            encode(dt, &v, &mut b);
            let mut back = vec![0f32; v.len()];
            decode(dt, &b, &mut back);
            assert_eq!(back, v, "{dt:?}");
        }
        let mut b = [0u8; 3];
        encode(DType::Bool, &[0.0, 2.0, f32::NAN], &mut b);
        assert_eq!(b, [0, 1, 0]);
        let mut back = Vec::new();
        decode_extend(DType::Bool, &[0, 1, 7], &mut back);
        assert_eq!(back, [0.0, 1.0, 1.0]);
        let mut b = [0u8; 2];
        encode(DType::I16, &[-2.0], &mut b);
        assert_eq!(i16::from_le_bytes(b), -2);
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        // 1 + 2^-8 is halfway between two bf16 values; ties go to the even mantissa (1.0)
        let x = 1.0f32 + 2f32.powi(-8);
        let mut b = [0u8; 2];
        encode(DType::BF16, &[x], &mut b);
        assert_eq!(u16::from_le_bytes(b), 0x3f80);
    }

    /// The bf16 encoding as run (its widest build the CPU runs), and every build, give the plain loop's
    /// bytes and verdict, and half's bytes: every kind of bit pattern, odd lengths.
    #[test]
    fn bf16_encode_builds_agree() {
        let all: Vec<f32> = (0..100_003u32)
            .map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761)))
            .collect();
        let finite: Vec<f32> = all
            .iter()
            .map(|x| if x.is_finite() { *x } else { 1.5 })
            .collect();
        for src in [&all, &finite] {
            for n in [0, 1, 7, 33, 4099, src.len()] {
                let (mut a, mut b) = (vec![0u8; 2 * n], vec![0u8; 2 * n]);
                let ok = encode_finite(DType::BF16, &src[..n], &mut a);
                for level in simd::levels() {
                    let l = level.name();
                    assert_eq!(ok, bf16_finite_wide(level, &src[..n], &mut b), "{n} {l}");
                    assert_eq!(a, b, "{n} {l}");
                }
                assert_eq!(ok, bf16_finite(&src[..n], &mut b), "{n}");
                assert_eq!(ok, src[..n].iter().all(|x| bf16::from_f32(*x).is_finite()));
                let half: Vec<u8> = src[..n]
                    .iter()
                    .flat_map(|x| bf16::from_f32(*x).to_bits().to_le_bytes())
                    .collect();
                assert_eq!((&a, &b), (&half, &half), "{n}");
            }
        }
    }

    #[test]
    fn encode_finite_spots_non_finite_outputs() {
        for dt in [DType::F32, DType::F16, DType::BF16] {
            let mut b = vec![0u8; 3 * dt.size()];
            assert!(encode_finite(dt, &[1.0, -2.5, 0.0], &mut b), "{dt:?}");
            let mut plain = vec![0u8; 3 * dt.size()];
            encode(dt, &[1.0, -2.5, 0.0], &mut plain);
            assert_eq!(b, plain, "same bytes as encode");
            for x in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                assert!(!encode_finite(dt, &[1.0, x, 0.0], &mut b), "{dt:?} {x}");
            }
        }
        // finite in f32, infinite once rounded to f16 (bf16 has f32's range)
        let mut b = vec![0u8; 2];
        assert!(!encode_finite(DType::F16, &[1e6], &mut b));
        assert!(encode_finite(DType::BF16, &[1e6], &mut b));
        assert!(encode_finite(DType::F32, &[f32::MAX], &mut [0u8; 4]));
    }
}
