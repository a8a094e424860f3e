//! Counter-based randomness: every random draw is a pure function of
//! (seed, tensor, model, element index), so the same `random_seed` gives the same bytes
//! whatever the number of workers, the task size, or how often a task was retried.

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

    /// True with probability `p` for element `i`.
    #[inline]
    pub fn bernoulli(&self, i: u64, p: f64) -> bool {
        self.uniform(i) < p
    }
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
    fn roughly_uniform() {
        let s = Stream::new(42, 1, 2);
        let n = 200_000;
        let kept = (0..n).filter(|&i| s.bernoulli(i, 0.3)).count() as f64 / n as f64;
        assert!((kept - 0.3).abs() < 0.005, "{kept}");
        let mean = (0..n).map(|i| s.uniform(i)).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.005, "{mean}");
    }
}
