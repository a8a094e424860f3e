//! The float element types a merge reads and writes, and conversion to and from f32.

use half::f16;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// The name in a safetensors header.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
        }
    }

    /// The name in a recipe or config.json (`torch_dtype`).
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
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
        match self {
            DType::F32 => shardmerge_proto::Dtype::F32,
            DType::F16 => shardmerge_proto::Dtype::F16,
            DType::BF16 => shardmerge_proto::Dtype::Bf16,
        }
    }

    pub fn from_proto(v: i32) -> Option<DType> {
        match shardmerge_proto::Dtype::try_from(v).ok()? {
            shardmerge_proto::Dtype::F32 => Some(DType::F32),
            shardmerge_proto::Dtype::F16 => Some(DType::F16),
            shardmerge_proto::Dtype::Bf16 => Some(DType::BF16),
            shardmerge_proto::Dtype::Unspecified => None,
        }
    }
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
        DType::BF16 => {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
        }
        DType::F16 => {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
    }
}

/// Decodes little-endian elements of `dtype` from `src` onto the end of `dst`, without
/// first zero-filling the space (the buffers are large; the fill costs as much as the decode).
pub fn decode_extend(dtype: DType, src: &[u8], dst: &mut Vec<f32>) {
    match dtype {
        DType::F32 => dst.extend(
            src.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        DType::BF16 => dst.extend(
            src.chunks_exact(2)
                .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16)),
        ),
        DType::F16 => dst.extend(
            src.chunks_exact(2)
                .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()),
        ),
    }
}

/// The bf16 bits of `x`, rounded to nearest even: bit for bit what `half::bf16::from_f32`
/// gives (NaN keeps its sign and high payload with the quiet bit set), without branches, so
/// the encode loop vectorises.
#[inline(always)]
pub fn bf16_bits(x: f32) -> u16 {
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
        DType::BF16 => {
            for (c, s) in dst.chunks_exact_mut(2).zip(src) {
                let h = bf16_bits(*s);
                bad |= h & 0x7f80 == 0x7f80;
                c.copy_from_slice(&h.to_le_bytes());
            }
        }
        DType::F16 => {
            for (c, s) in dst.chunks_exact_mut(2).zip(src) {
                let h = f16::from_f32(*s).to_bits();
                bad |= h & 0x7c00 == 0x7c00;
                c.copy_from_slice(&h.to_le_bytes());
            }
        }
    }
    !bad
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
    fn bf16_rounds_to_nearest_even() {
        // 1 + 2^-8 is halfway between two bf16 values; ties go to the even mantissa (1.0)
        let x = 1.0f32 + 2f32.powi(-8);
        let mut b = [0u8; 2];
        encode(DType::BF16, &[x], &mut b);
        assert_eq!(u16::from_le_bytes(b), 0x3f80);
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
