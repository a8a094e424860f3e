//! The counting loops of the selection passes: pass 0's histogram of the keys' high 16 bits
//! ([`Lanes`]) and pass 1's packing of one bucket's keys ([`pack_bucket`]).

use super::BINS;

/// Counts of the keys' high 16 bits in four interleaved u32 histograms: keys that fall in the
/// same bin one after another (bfloat16 magnitudes do, by the thousand) then update different
/// counters, instead of each waiting for the previous increment's store.
pub(super) struct Lanes {
    counts: Vec<u32>,
    /// Keys counted since the last flush (a flush comes before any count could overflow).
    held: u64,
    /// The bins counted since the last flush lie in `[lo, hi]` (a flush reads only those).
    lo: usize,
    hi: usize,
}

impl Lanes {
    const N: usize = 4;

    pub(super) fn new() -> Self {
        Lanes {
            counts: vec![0; Self::N * BINS],
            held: 0,
            lo: BINS,
            hi: 0,
        }
    }

    /// [`Lanes::count`], and the OR of the keys' low 16 bits (a separate pass of ORs
    /// vectorises; the counting cannot); in the widest build the CPU runs (same counts:
    /// integer operations).
    pub(super) fn count_keys(&mut self, ks: &[u32], dense: &mut [u64]) -> u32 {
        count_keys_wide(crate::kernels::simd::level(), self, ks, dense)
    }

    #[inline(always)]
    pub(super) fn count_keys_base(&mut self, ks: &[u32], dense: &mut [u64]) -> u32 {
        let low = ks.iter().fold(0, |l, &k| l | (k & 0xffff));
        self.count(ks, dense);
        low
    }

    /// Adds the high 16 bits of `ks` (moving the counts into `dense` first if they could
    /// overflow).
    #[inline(always)]
    fn count(&mut self, ks: &[u32], dense: &mut [u64]) {
        if self.held + ks.len() as u64 > u64::from(u32::MAX) {
            self.flush(dense);
        }
        self.held += ks.len() as u64;
        let (lo, hi) = ks
            .iter()
            .fold((u32::MAX, 0), |(lo, hi), &k| (lo.min(k), hi.max(k)));
        self.lo = self.lo.min((lo >> 16) as usize);
        self.hi = self.hi.max((hi >> 16) as usize);
        let c: &mut [u32; Self::N * BINS] = match self.counts.as_mut_slice().try_into() {
            Ok(c) => c,
            Err(_) => unreachable!("the lanes are made N * BINS long"),
        };
        let quads = ks.chunks_exact(Self::N);
        let rest = quads.remainder();
        for q in quads {
            // a u32 >> 16 is below BINS: indexing the fixed-size array needs no bounds check
            c[(q[0] >> 16) as usize] += 1;
            c[BINS + (q[1] >> 16) as usize] += 1;
            c[2 * BINS + (q[2] >> 16) as usize] += 1;
            c[3 * BINS + (q[3] >> 16) as usize] += 1;
        }
        for &k in rest {
            c[(k >> 16) as usize] += 1;
        }
    }

    /// Moves the counts into `dense` and zeroes them.
    pub(super) fn flush(&mut self, dense: &mut [u64]) {
        if self.held == 0 {
            return;
        }
        let (lo, hi) = (self.lo, self.hi.min(BINS - 1));
        if lo <= hi {
            for lane in self.counts.chunks_exact_mut(BINS) {
                for (d, c) in dense[lo..=hi].iter_mut().zip(&mut lane[lo..=hi]) {
                    *d += u64::from(*c);
                    *c = 0;
                }
            }
        }
        (self.held, self.lo, self.hi) = (0, BINS, 0);
    }
}

/// Keys per block of [`pack_bucket`]'s test for a member of the bucket.
const PACK_BLOCK: usize = 16;

/// Packs the low 16 bits of the nonzero keys of `ks` whose high 16 bits are `b` into the front
/// of `low` (as long as `ks`), in order; returns how many. A bucket holds a small share of the
/// keys, so a block of [`PACK_BLOCK`] keys is first tested (a reduction, which vectorises) and
/// walked only when it holds one.
pub(super) fn pack_bucket(ks: &[u32], b: u32, low: &mut [u16]) -> usize {
    let mut n = 0usize;
    for blk in ks.chunks(PACK_BLOCK) {
        let hit = blk
            .iter()
            .fold(0u32, |h, &k| h | u32::from((k >> 16 == b) & (k != 0)));
        if hit == 0 {
            continue;
        }
        // branch-free: every key is stored, the count advances only for a member (`n` is at
        // most the keys walked before, so the store stays inside `low`)
        for &k in blk {
            low[n] = k as u16;
            n += usize::from((k >> 16 == b) & (k != 0));
        }
    }
    n
}

crate::kernels::simd::wide! {
    /// [`Lanes::count_keys_base`] built for `level`.
    pub(super) fn count_keys_wide(lanes: &mut Lanes, ks: &[u32], dense: &mut [u64]) -> u32
        => Lanes::count_keys_base
}
