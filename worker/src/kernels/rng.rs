//! Random draws. Every draw is a pure function of the seed, the tensor, the input and the
//! element index, so the same `random_seed` gives the same bytes whatever the number of
//! workers, the task size, or how often a task was retried. Two generators:
//!
//! - [`Mode::Mergekit`] (the default): the draws mergekit makes on CPU with the same seed.
//!   mergekit seeds torch's MT19937 and takes one 32-bit output per element, tensor after
//!   tensor in a fixed order; the planner gives each (tensor, input) its position in that
//!   stream and a task jumps there ([`super::mt`]).
//! - [`Mode::Counter`]: a counter-based hash of (seed, tensor, input, element), no stream.

/// The 64-bit finaliser of MurmurHash3 / SplitMix64: a bijective avalanche mix.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A stable 64-bit key of a string (FNV-1a, then mixed).
pub fn key_of(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix64(h)
}

/// The random stream of one (seed, tensor, model): `u64(i)` is the i-th draw.
#[derive(Clone, Copy, Debug)]
pub struct Stream {
    key: u64,
}

impl Stream {
    pub fn new(seed: u64, tensor_key: u64, model_key: u64) -> Self {
        let k = mix64(seed ^ 0x9e37_79b9_7f4a_7c15);
        let k = mix64(k ^ tensor_key);
        let k = mix64(k ^ model_key.rotate_left(17));
        Stream { key: k }
    }

    /// 64 random bits for element `i`.
    #[inline]
    pub fn u64(&self, i: u64) -> u64 {
        mix64(mix64(i ^ self.key).wrapping_add(self.key))
    }

    /// A uniform draw in [0, 1) with 53 bits of precision for element `i`.
    #[inline]
    pub fn uniform(&self, i: u64) -> f64 {
        (self.u64(i) >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Which generator randomised methods draw from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    #[default]
    Mergekit,
    Counter,
}

/// The draws of one (tensor, input), one per element, in element order from a starting
/// element: `uniform()` is the next element's draw, `mask` applies a run of Bernoulli draws.
#[derive(Clone, Debug)]
pub enum Draws {
    Counter {
        s: Stream,
        next: u64,
    },
    /// torch's CPU Bernoulli: 24 bits of one MT19937 output, `u < p` in float.
    Torch(Box<super::mt::Mt19937>),
}

impl Draws {
    /// The next element's uniform draw in [0, 1).
    #[inline]
    pub fn uniform(&mut self) -> f64 {
        match self {
            Draws::Counter { s, next } => {
                let u = s.uniform(*next);
                *next += 1;
                u
            }
            Draws::Torch(g) => (g.next_u32() & 0x00ff_ffff) as f64 * (1.0 / (1u64 << 24) as f64),
        }
    }

    /// Draws for the next `d.len()` elements: each element not kept becomes `v * 0.0` (a zero
    /// of its sign), as `uniform() < p` one by one would decide. The comparison runs on
    /// integers: for a draw of `b` bits, `k / 2^b < p` exactly when `k < ceil(p · 2^b)`; the
    /// verdict multiplies (by 1 or 0) rather than selects, which would be a branch.
    pub fn mask(&mut self, p: f64, d: &mut [f32]) {
        match self {
            Draws::Counter { s, next } => {
                let t = (p.clamp(0.0, 1.0) * (1u64 << 53) as f64).ceil() as u64;
                for v in d.iter_mut() {
                    let keep = (s.u64(*next) >> 11) < t;
                    *next += 1;
                    *v *= f32::from(u8::from(keep));
                }
            }
            Draws::Torch(g) => {
                let t = (p.clamp(0.0, 1.0) * (1u64 << 24) as f64).ceil() as u32;
                torch_mask_wide(super::simd::level(), g, t, d);
            }
        }
    }
}

/// [`Draws::mask`] from torch's generator `g`, for the integer threshold `t` on 24 bits.
#[inline(always)]
fn torch_mask(g: &mut super::mt::Mt19937, t: u32, d: &mut [f32]) {
    let mut buf = [0u32; 512];
    for chunk in d.chunks_mut(buf.len()) {
        let r = &mut buf[..chunk.len()];
        g.fill_base(r);
        for (v, &r) in chunk.iter_mut().zip(r.iter()) {
            let keep = (r & 0x00ff_ffff) < t;
            *v *= f32::from(u8::from(keep));
        }
    }
}

super::simd::wide! {
    /// [`torch_mask`] built for `level`, the generator's steps inlined (integer operations
    /// and products by 0 or 1: the same bits in every build).
    fn torch_mask_wide(g: &mut super::mt::Mt19937, t: u32, d: &mut [f32]) => torch_mask
}

impl Drop for Draws {
    fn drop(&mut self) {
        // where these draws stopped is where the tensor's next range (or the same range's
        // next pass) starts: keep it for a short jump
        if let Draws::Torch(g) = self {
            super::mt::remember(g);
        }
    }
}

/// `x` rounded to bfloat16 (nearest, ties to even), as torch stores a bfloat16 fill value.
pub fn round_bf16(x: f64) -> f64 {
    let b = (x as f32).to_bits();
    let r = b.wrapping_add(0x7fff + ((b >> 16) & 1)) & 0xffff_0000;
    f32::from_bits(r) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pure_and_distinct() {
        let a = Stream::new(0, key_of("w"), key_of("m"));
        let b = Stream::new(0, key_of("w"), key_of("m"));
        assert_eq!(a.u64(7), b.u64(7));
        assert_ne!(a.u64(7), a.u64(8));
        assert_ne!(a.u64(7), Stream::new(1, key_of("w"), key_of("m")).u64(7));
        assert_ne!(a.u64(7), Stream::new(0, key_of("w"), key_of("n")).u64(7));
    }

    #[test]
    fn torch_bernoulli_draws() {
        // torch.manual_seed(0); torch.bernoulli(torch.full((4,), 0.5)) draws from the first
        // MT19937(0) outputs: 2357136044, 2546248239, 3071714933, 3626093760
        let mut d = Draws::Torch(Box::new(super::super::mt::Mt19937::new(0)));
        let u: Vec<f64> = (0..4).map(|_| d.uniform()).collect();
        let expect = [
            2_357_136_044u32,
            2_546_248_239,
            3_071_714_933,
            3_626_093_760,
        ]
        .map(|x| (x & 0xff_ffff) as f64 / (1u64 << 24) as f64);
        assert_eq!(u, expect);
    }

    #[test]
    fn mask_agrees_with_keep() {
        for p in [0.0, 0.3, 0.30078125, 0.5, 0.999, 1.0] {
            for d0 in [
                Draws::Torch(Box::new(super::super::mt::Mt19937::at(3, 1000))),
                Draws::Counter {
                    s: Stream::new(3, 4, 5),
                    next: 77,
                },
            ] {
                let (mut a, mut b) = (d0.clone(), d0);
                let mut v: Vec<f32> = (0..3000).map(|i| i as f32 - 1500.5).collect();
                let want: Vec<f32> = v
                    .iter()
                    .map(|&x| if a.uniform() < p { x } else { x * 0.0 })
                    .collect();
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                // every build the CPU runs, in uneven pieces (the dispatching one is the widest)
                if let Draws::Torch(g) = &b {
                    let t = (p * (1u64 << 24) as f64).ceil() as u32;
                    for level in crate::kernels::simd::levels() {
                        let (mut g, mut w) = (g.clone(), v.clone());
                        let (x, y) = w.split_at_mut(1001);
                        torch_mask_wide(level, &mut g, t, x);
                        torch_mask_wide(level, &mut g, t, y);
                        assert_eq!(bits(&w), bits(&want), "p {p}, {}", level.name());
                    }
                }
                b.mask(p, &mut v);
                assert_eq!(bits(&v), bits(&want), "p {p}");
            }
        }
    }

    #[test]
    fn bf16_rounding() {
        assert_eq!(round_bf16(0.3), 0.30078125);
        assert_eq!(round_bf16(0.5), 0.5);
        assert_eq!(round_bf16(0.4), 0.400390625);
    }

    #[test]
    fn roughly_uniform() {
        let s = Stream::new(42, 1, 2);
        let n = 200_000;
        let kept = (0..n).filter(|&i| s.uniform(i) < 0.3).count() as f64 / n as f64;
        assert!((kept - 0.3).abs() < 0.005, "{kept}");
        let mean = (0..n).map(|i| s.uniform(i)).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.005, "{mean}");
    }
}
