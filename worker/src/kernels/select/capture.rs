//! The second selection pass without a second walk, for a whole tensor: before pass 0, a
//! sample of each problem's keys says which high buckets its boundaries probably fall in;
//! pass 0 keeps the keys of those buckets as it counts them; after pass 0, when every located
//! bucket is among those kept, pass 1's histograms are counted from the kept keys alone. Pass
//! 1 counts only the keys of the located buckets, so the histograms, and every bit after them,
//! are those of a walk over all the keys. A sample that misled (or kept too many keys) only
//! costs the walk it would have saved.

use super::{live_buckets, partial1_with, Stats, BINS};

/// Keys kept per problem at most, as a share of its keys (1/8): past it the capture gives up.
const KEEP_SHARE: u64 = 8;

/// The keys of a guessed range of high buckets, per selection problem.
pub struct Capture {
    /// Per problem: the inclusive range of high buckets kept, None when none is.
    windows: Vec<Option<(u32, u32)>>,
    keys: Vec<Vec<u32>>,
    cap: u64,
}

impl Capture {
    /// Windows guessed from a sample of each problem's keys ([`super::Sample`]), for the
    /// ranks `ranks[p]` among its `n` keys.
    pub fn new(ranks: &[Vec<u64>], n: u64, sample: &super::Sample) -> Capture {
        let windows = (ranks.iter().enumerate())
            .map(|(p, rs)| {
                let (dense, sn) = sample.problem(p);
                window(rs, n, dense, sn)
            })
            .collect();
        Capture {
            windows,
            keys: vec![Vec::new(); ranks.len()],
            cap: n / KEEP_SHARE,
        }
    }

    /// Sees the next keys of problem `p` (in element order): keeps those in its window.
    pub fn see(&mut self, p: usize, ks: &[u32]) {
        let Some(&Some((lo, hi))) = self.windows.get(p) else {
            return;
        };
        let kept = &mut self.keys[p];
        keep_range(ks, lo, hi, kept);
        if kept.len() as u64 > self.cap {
            // too many to be worth keeping: pass 1 walks the keys
            self.windows[p] = None;
            *kept = Vec::new();
        }
    }

    /// Pass 1's partial from the kept keys, when every bucket `state0` (pass 0's reduced state)
    /// located lies in its problem's window; else None.
    pub fn partial1(&self, state0: &Stats, ranks: &[Vec<u64>]) -> Option<Stats> {
        let live = live_buckets(state0, ranks);
        let covered = live.iter().zip(&self.windows).all(|(bs, w)| {
            bs.iter()
                .all(|&(_, b)| matches!(w, Some((lo, hi)) if (*lo..=*hi).contains(&b)))
        });
        covered.then(|| partial1_with(state0, ranks, &mut |p, f| f(&self.keys[p])))
    }
}

/// The range of high buckets that the boundaries at `ranks` (among `n` keys) fall in, as a
/// sample of `sn` keys with high-bucket counts `dense` locates them ([`bucket_range`]); None
/// without a boundary to locate.
fn window(ranks: &[u64], n: u64, dense: &[u32], sn: u64) -> Option<(u32, u32)> {
    let mut live = ranks.iter().filter(|&&r| r < n).peekable();
    live.peek()?;
    live.map(|&r| bucket_range(r, n, dense, sn, 10))
        .try_fold((u32::MAX, 0), |(lo, hi), w| {
            w.map(|(l, h)| (lo.min(l), hi.max(h)))
        })
}

/// The range of high buckets that the boundary at rank `r` (among `n` keys) falls in, as a
/// sample of `sn` keys with high-bucket counts `dense` locates it, widened by a margin for
/// the sample's error: `sigmas` standard deviations of a sampled rank at the median (more
/// elsewhere), and 16 keys; None from an empty sample.
pub(super) fn bucket_range(
    r: u64,
    n: u64,
    dense: &[u32],
    sn: u64,
    sigmas: u64,
) -> Option<(u32, u32)> {
    if sn == 0 || n == 0 {
        return None;
    }
    // (the standard deviation at the median is sqrt(sn) / 2)
    let margin = sigmas * (sn as f64).sqrt() as u64 / 2 + 16;
    let at = |r: u64| -> u32 {
        let mut before = 0;
        for (b, &c) in dense.iter().enumerate() {
            before += u64::from(c);
            if r < before {
                return b as u32;
            }
        }
        (BINS - 1) as u32
    };
    let q = ((r as u128 * sn as u128) / n as u128) as u64;
    Some((at(q.saturating_sub(margin)), at((q + margin).min(sn - 1))))
}

/// Appends the keys of `ks` whose high 16 bits lie in `[lo, hi]` to `out`, in order. A
/// window holds a small share of the keys: each block of 64 is first turned into a mask of its
/// members (compares, which vectorise), and only the members are walked.
#[inline(always)]
fn keep_range_base(ks: &[u32], lo: u32, hi: u32, out: &mut Vec<u32>) {
    let width = hi.wrapping_sub(lo);
    for blk in ks.chunks(64) {
        let mut m = blk.iter().enumerate().fold(0u64, |m, (i, &k)| {
            m | (u64::from((k >> 16).wrapping_sub(lo) <= width) << i)
        });
        while m != 0 {
            out.push(blk[m.trailing_zeros() as usize]);
            m &= m - 1;
        }
    }
}

crate::kernels::simd::wide! {
    /// [`keep_range_base`] built for `level`.
    fn keep_range_wide(ks: &[u32], lo: u32, hi: u32, out: &mut Vec<u32>) => keep_range_base
}

fn keep_range(ks: &[u32], lo: u32, hi: u32, out: &mut Vec<u32>) {
    keep_range_wide(crate::kernels::simd::level(), ks, lo, hi, out)
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::{partial0, reduce0};
    use super::*;

    /// Keys with many ties, from a few hundred distinct values, in `n` elements.
    pub(in crate::kernels::select) fn keys(n: usize, seed: u64) -> Vec<u32> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let v = (x % 50_000) as f32 * 1e-4 - 2.5;
                if x.is_multiple_of(11) {
                    0
                } else {
                    v.abs().to_bits()
                }
            })
            .collect()
    }

    /// Pass 1 from the kept keys equals pass 1 over all keys wherever the capture says it
    /// covers (as it does from a sample of every 16th key of a large problem); a sample from
    /// elsewhere (here: of other keys) makes it decline, not err.
    #[test]
    fn kept_keys_give_pass_one() {
        for (n, seed) in [(70_000usize, 1u64), (400_003, 2), (5_000, 3)] {
            let ks = [keys(n, seed), keys(n, seed + 10)];
            let ranks = vec![
                vec![n as u64 / 2, n as u64],
                vec![n as u64 * 9 / 10, n as u64],
            ];
            let refs: Vec<&[u32]> = ks.iter().map(Vec::as_slice).collect();
            let state0 = reduce0(&[partial0(&refs)], &ranks, &[n as u64; 2]).unwrap();
            let want = super::super::partial1(&state0, &refs, &ranks);
            let sample: Vec<Vec<u32>> = ks
                .iter()
                .map(|k| k.iter().step_by(16).copied().collect())
                .collect();
            let s = super::super::Sample::new(2, &mut |p, f| f(&sample[p]));
            let mut c = Capture::new(&ranks, n as u64, &s);
            for (p, k) in ks.iter().enumerate() {
                k.chunks(2048).for_each(|ch| c.see(p, ch));
            }
            match c.partial1(&state0, &ranks) {
                Some(got) => assert_eq!(got, want, "n {n}"),
                // a small sample's margin spans more keys than are worth keeping
                None => assert!(n < 100_000, "n {n}: the sample locates the buckets"),
            }
            // a sample of keys ten times larger: its window misses
            let wrong: Vec<Vec<u32>> = sample
                .iter()
                .map(|s| {
                    s.iter()
                        .map(|&k| (f32::from_bits(k) * 10.0 + 1.0).to_bits())
                        .collect()
                })
                .collect();
            let s = super::super::Sample::new(2, &mut |p, f| f(&wrong[p]));
            let mut c = Capture::new(&ranks, n as u64, &s);
            for (p, k) in ks.iter().enumerate() {
                c.see(p, k);
            }
            assert!(c.partial1(&state0, &ranks).is_none(), "n {n}");
        }
    }

    #[test]
    fn keep_range_builds_agree() {
        let ks = keys(5000, 9);
        for (lo, hi) in [(0, 0), (0x3f00, 0x3f80), (0, u32::MAX >> 16), (5, 5)] {
            let want: Vec<u32> = ks
                .iter()
                .copied()
                .filter(|&k| (lo..=hi).contains(&(k >> 16)))
                .collect();
            for level in crate::kernels::simd::levels() {
                let mut got = vec![7];
                keep_range_wide(level, &ks[..4999], lo, hi, &mut got);
                keep_range_wide(level, &ks[4999..], lo, hi, &mut got);
                assert_eq!(got[0], 7);
                assert_eq!(&got[1..], &want[..]);
            }
        }
    }
}
