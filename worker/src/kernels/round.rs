//! The dtype a kernel computes in, as mergekit's torch code does it.
//!
//! With a recipe `dtype` of bfloat16 or float16, mergekit loads every input in that dtype and
//! each torch operation rounds its result to it: an elementwise op computes in f32 and rounds
//! once, a `sum` over the models accumulates in f32 (torch's accumulation type for 16-bit
//! floats on CPU) and rounds once, a Python scalar operand (`lambda`) stays an f32. Kernels
//! follow the same steps on f32 values, rounding with [`Work::r`] where torch rounds; with
//! [`Work::F32`] that is the identity, so the f32 path is the plain arithmetic.

use half::f16;

use crate::format::dtype::bf16_bits;

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
            Work::BF16 => f32::from_bits((bf16_bits(x) as u32) << 16),
            Work::F16 => f16::from_f32(x).to_f32(),
        }
    }

    pub fn rounds(self) -> bool {
        self != Work::F32
    }

    /// `d = r(r(x) - r(b))` elementwise: a task vector, from inputs loaded in the working dtype.
    #[inline]
    pub fn sub_into(self, x: &[f32], b: &[f32], d: &mut [f32]) {
        match self {
            Work::F32 => {
                for ((d, &x), &b) in d.iter_mut().zip(x).zip(b) {
                    *d = x - b;
                }
            }
            w => {
                for ((d, &x), &b) in d.iter_mut().zip(x).zip(b) {
                    *d = w.r(w.r(x) - w.r(b));
                }
            }
        }
    }
}

/// [`Work::r`] with the dtype fixed at compile time (0: f32, 1: bfloat16, 2: float16), so
/// that loops over it vectorise.
#[inline(always)]
pub fn rk<const K: u8>(x: f32) -> f32 {
    match K {
        1 => f32::from_bits((bf16_bits(x) as u32) << 16),
        2 => f16::from_f32(x).to_f32(),
        _ => x,
    }
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
}
