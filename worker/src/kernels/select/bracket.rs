//! Selection in the same walk as the merge, for a whole tensor: before the walk, a sample of
//! each problem's keys brackets every rank boundary between two keys; the walk then counts the
//! keys below each bracket and keeps those inside it, and an element whose keys all lie outside
//! every bracket already has its verdicts (below a bracket: below the boundary; above: not).
//! After the walk the kept keys locate each boundary exactly, and only the elements with a key
//! inside some bracket (a few percent) are merged again. A sample that misled (a boundary
//! outside its bracket, or too many keys inside) is found out after the walk: the caller then
//! locates the boundaries with the radix passes instead. The boundaries are those the radix
//! passes give, so the verdicts, and every bit after them, are the same.

use super::{capture::bucket_range, Stats};

/// Elements a walk shows [`Brackets::see`] at a time, at most.
const CHUNK: usize = 2048;

/// A bracket's margin around a rank the sample locates, in standard deviations of a sampled
/// rank at the median (more elsewhere), plus 16 keys: a sample misleads it about once in
/// 10^9 tensors, and then costs only the walk.
const MARGIN: u64 = 6;

/// Keys kept per problem at most, as a share of its keys (1/8): past it the walk gives up.
const KEEP_SHARE: u64 = 8;

/// The share of the elements that [`Brackets::new`] is usually given: brackets are tried
/// only where the sample puts at most this share (1/16) of the elements inside them (the shares of each problem's keys, summed: an element is merged
/// again when any of its keys is inside). Merging an element again costs several times what
/// the walk saves on it.
pub const TRY_SHARE: f64 = 1.0 / 16.0;

/// One rank boundary of one problem.
enum Side {
    /// Rank 0 (nothing below: key 0, need 0) or rank n (everything: key `u32::MAX`).
    Fixed(u32),
    /// Keys `[lo, hi]` bracket rank `rank`; `below` keys seen were under `lo`, `noted`
    /// within, and `inside` are the keys of those ([`Brackets::keys_at`]).
    Open {
        rank: u64,
        lo: u32,
        hi: u32,
        below: u64,
        noted: u64,
        inside: Vec<u32>,
    },
}

/// The brackets of every selection problem's boundaries, and what the walk saw of them.
pub struct Brackets {
    /// Per problem, one side per rank (as `ranks[p]`).
    sides: Vec<Vec<Side>>,
    cap: u64,
    gave_up: bool,
    /// Working space of [`Brackets::see`].
    buf: Box<[u32; CHUNK]>,
}

impl Brackets {
    /// Brackets guessed from a sample of each problem's keys ([`super::Sample`]) for the
    /// ranks `ranks[p]` among its `n` keys; None when a problem's sample is empty, or puts more
    /// than `try_share` of the elements inside the brackets ([`TRY_SHARE`]).
    pub fn new(
        ranks: &[Vec<u64>],
        n: u64,
        sample: &super::Sample,
        try_share: f64,
    ) -> Option<Brackets> {
        let mut sides = Vec::with_capacity(ranks.len());
        let mut share = 0.0;
        for (p, rs) in ranks.iter().enumerate() {
            let (dense, sn) = sample.problem(p);
            let mut ss = Vec::with_capacity(rs.len());
            let mut inside = 0u64;
            for &rank in rs {
                ss.push(if rank == 0 {
                    Side::Fixed(0)
                } else if rank >= n {
                    Side::Fixed(u32::MAX)
                } else {
                    let (blo, bhi) = bucket_range(rank, n, dense, sn, MARGIN)?;
                    inside += (dense[blo as usize..=bhi as usize].iter())
                        .map(|&c| u64::from(c))
                        .sum::<u64>();
                    Side::Open {
                        rank,
                        lo: blo << 16,
                        hi: (bhi << 16) | 0xffff,
                        below: 0,
                        noted: 0,
                        inside: Vec::new(),
                    }
                });
            }
            share += inside as f64 / sn.max(1) as f64;
            sides.push(ss);
        }
        if share > try_share {
            // (e.g. a boundary among many equal keys, as the zeros of a bf16 delta, or two
            // boundaries per model): merging those elements again would cost more than the
            // walk saves
            return None;
        }
        Some(Brackets {
            sides,
            cap: n / KEEP_SHARE,
            gave_up: false,
            buf: Box::new([0; CHUNK]),
        })
    }

    /// The boundaries that give every element outside the brackets its verdicts (an open
    /// side's lower key, with no ties below), in the layout [`super::boundaries`] reads: one
    /// child per problem, the whole tensor one range.
    pub fn provisional(&mut self) -> Stats {
        self.state(|s| {
            Some(match s {
                Side::Fixed(k) => (*k, 0),
                Side::Open { lo, .. } => (*lo, 0),
            })
        })
        .unwrap_or_default()
    }

    /// Sees the keys `ks` of problem `p`'s elements `[at, at + ks.len())` (in element
    /// order): counts those below each bracket, notes the
    /// positions of those inside, and sets their bits in `mask` (bit `i` for element `at + i`).
    pub fn see(&mut self, p: usize, at: u32, ks: &[u32], mask: &mut [u64]) {
        if self.gave_up {
            return;
        }
        let Some(ss) = self.sides.get_mut(p) else {
            return;
        };
        let mut kept = 0u64;
        for s in ss.iter_mut() {
            if let Side::Open {
                lo,
                hi,
                below,
                noted,
                ..
            } = s
            {
                for (k, ks) in ks.chunks(CHUNK).enumerate() {
                    let from = at.wrapping_add((k * CHUNK) as u32);
                    let (b, c) = see_keys(ks, from, *lo, *hi, &mut self.buf);
                    *below += b;
                    for &i in &self.buf[..c] {
                        let i = i.wrapping_sub(at) as usize;
                        mask[i / 64] |= 1 << (i % 64);
                    }
                    *noted += c as u64;
                }
                kept += *noted;
            }
        }
        if kept > self.cap {
            // too many keys inside to be worth merging twice: the radix passes do it
            self.gave_up = true;
        }
    }

    /// Whether the walk gave up (too many keys inside the brackets).
    pub fn gave_up(&self) -> bool {
        self.gave_up
    }

    /// Sees problem `p`'s keys `ks` at some of the positions the walk noted, in element
    /// order (keys outside every bracket are passed over): each bracket keeps its own.
    pub fn keys_at(&mut self, p: usize, ks: &[u32]) {
        for s in self.sides.get_mut(p).into_iter().flatten() {
            if let Side::Open { lo, hi, inside, .. } = s {
                // branch-free: about one key in three here is inside (the others are another
                // problem's), a coin flip a branch would mispredict
                let (from, width) = (inside.len(), hi.wrapping_sub(*lo));
                inside.resize(from + ks.len(), 0);
                let mut c = from;
                for &k in ks {
                    inside[c] = k;
                    c += usize::from(k.wrapping_sub(*lo) <= width);
                }
                inside.truncate(c);
            }
        }
    }

    /// After the walk and [`Brackets::keys_at`]: the exact boundaries in
    /// [`Brackets::provisional`]'s layout, or None when a rank fell outside its bracket (or
    /// the walk gave up, or the keys seen are not those noted).
    pub fn resolve(&mut self) -> Option<Stats> {
        if self.gave_up {
            return None;
        }
        self.state(|s| match s {
            Side::Fixed(k) => Some((*k, 0)),
            Side::Open {
                rank,
                hi,
                below,
                inside,
                lo,
                noted,
            } => (*noted == inside.len() as u64)
                .then(|| locate(*rank, *lo, *hi, *below, inside))
                .flatten(),
        })
    }

    fn state(&mut self, mut f: impl FnMut(&mut Side) -> Option<(u32, u64)>) -> Option<Stats> {
        let mut st = Stats::default();
        for ss in &mut self.sides {
            let mut child = Stats::default();
            for s in ss.iter_mut() {
                let (key, need) = f(s)?;
                // [key, need, one range, no ties before it]
                child
                    .counts
                    .extend_from_slice(&[u64::from(key), need, 1, 0]);
            }
            st.children.push(child);
        }
        Some(st)
    }
}

/// The boundary at `rank` from the keys around it: `below` keys under `lo`, `inside` (in any
/// order: it is reordered) the keys in `[lo, hi]`. None when the rank is not among them.
fn locate(rank: u64, lo: u32, hi: u32, below: u64, inside: &mut [u32]) -> Option<(u32, u64)> {
    let m = inside.len() as u64;
    if rank < below || rank > below + m {
        return None;
    }
    if rank == below {
        return Some((lo, 0));
    }
    if rank == below + m {
        // every key up to `hi` ranks below, none above it
        return Some(hi.checked_add(1).map_or((u32::MAX, 0), |k| (k, 0)));
    }
    let at = (rank - below) as usize;
    let (less, &mut key, _) = inside.select_nth_unstable(at);
    let under = below + less.iter().filter(|&&k| k < key).count() as u64;
    // the ties of `key` that rank below: the first `rank - under` of them in element order
    Some((key, rank - under))
}

/// Counts the keys of `ks` (at most [`CHUNK`]) under `lo`, and writes the positions (`from`
/// for the first) of those in `[lo, hi]` to the front of `out`: (count below, positions).
fn see_keys(ks: &[u32], from: u32, lo: u32, hi: u32, out: &mut [u32; CHUNK]) -> (u64, usize) {
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::simd::level().avx512() {
        // SAFETY: `level` says the CPU runs AVX-512 (F), all `see_avx512` needs
        return unsafe { see_avx512(ks, from, lo, hi, out) };
    }
    see_scalar(ks, from, lo, hi, out)
}

/// [`see_keys`] one key at a time (a branch-free compaction: every position is written, the
/// count advances only for a member).
fn see_scalar(ks: &[u32], from: u32, lo: u32, hi: u32, out: &mut [u32]) -> (u64, usize) {
    let width = hi.wrapping_sub(lo);
    let (mut below, mut c) = (0u64, 0usize);
    for (i, &k) in ks.iter().enumerate() {
        below += u64::from(k < lo);
        // (c <= i < ks.len() <= out.len())
        out[c] = from.wrapping_add(i as u32);
        c += usize::from(k.wrapping_sub(lo) <= width);
    }
    (below, c)
}

/// [`see_keys`] 16 keys at a time: two compares to masks, and a compressing store of the
/// members' positions.
///
/// # Safety
///
/// The CPU must run AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn see_avx512(
    ks: &[u32],
    from: u32,
    lo: u32,
    hi: u32,
    out: &mut [u32; CHUNK],
) -> (u64, usize) {
    use std::arch::x86_64::*;
    let width = hi.wrapping_sub(lo);
    let (vlo, vw) = (
        _mm512_set1_epi32(lo as i32),
        _mm512_set1_epi32(width as i32),
    );
    let step = _mm512_set1_epi32(16);
    let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let mut pos = _mm512_add_epi32(_mm512_set1_epi32(from as i32), lanes);
    let (mut below, mut c) = (0u64, 0usize);
    let blocks = ks.chunks_exact(16);
    let rest = blocks.remainder();
    for b in blocks {
        // SAFETY: `b` holds 16 u32s, the 64 bytes an unaligned load reads
        let k = unsafe { _mm512_loadu_si512(b.as_ptr().cast()) };
        let under = _mm512_cmplt_epu32_mask(k, vlo);
        let inside = _mm512_cmple_epu32_mask(_mm512_sub_epi32(k, vlo), vw);
        below += u64::from(under.count_ones());
        // most blocks have no member (a bracket holds a few percent of the keys): skipping
        // them keeps the count off the loop's critical path
        if inside != 0 {
            // the members' positions packed to the low lanes, stored whole (a compressing
            // store to memory is microcoded, and slow, on many CPUs): the lanes past the
            // members are overwritten by the next block's, or left past the count
            let packed = _mm512_maskz_compress_epi32(inside, pos);
            let dst = &mut out[c..c + 16];
            // SAFETY: `dst` is 16 u32s, the 64 bytes an unaligned store writes; it is in
            // bounds (checked by the slice) because `c` counts the members of the blocks
            // before, at most their 16 keys each, so `c + 16` is at most the keys walked so
            // far, within `ks.len()`, which the caller keeps within `out.len()` (CHUNK)
            unsafe { _mm512_storeu_si512(dst.as_mut_ptr().cast(), packed) };
            c += inside.count_ones() as usize;
        }
        pos = _mm512_add_epi32(pos, step);
    }
    let done = ks.len() - rest.len();
    let mut tail = [0u32; 16];
    let (b, n) = see_scalar(rest, from.wrapping_add(done as u32), lo, hi, &mut tail);
    out[c..c + n].copy_from_slice(&tail[..n]);
    (below + b, c + n)
}

#[cfg(test)]
mod tests {
    use super::super::{
        boundaries, partial0, partial1, reduce0, reduce1, resolve0, Boundary, Cursor, Sample,
    };
    use super::*;

    /// Keys with many ties (an eleventh of them 0, the others of about 10,000 values): the
    /// capture's test keys with their low 12 bits cleared.
    fn keys(n: usize, seed: u64) -> Vec<u32> {
        let ks = super::super::capture::tests::keys(n, seed);
        ks.into_iter().map(|k| k & 0xffff_f000).collect()
    }

    /// The radix passes' boundaries (pass 1 skipped where pass 0 resolves them).
    fn radix(ks: &[&[u32]], ranks: &[Vec<u64>], n: u64) -> Vec<Vec<Boundary>> {
        let p0 = partial0(ks);
        let s0 = reduce0(std::slice::from_ref(&p0), ranks, &vec![n; ks.len()]).unwrap();
        let s1 = resolve0(&s0, &[p0], ranks)
            .unwrap_or_else(|| reduce1(&s0, &[partial1(&s0, ks, ranks)], ranks).unwrap());
        (0..ks.len()).map(|p| boundaries(&s1, p)).collect()
    }

    /// Walks `ks` as the one-walk kernel does: sees every chunk, then shows the keys at the
    /// noted positions; returns the mask of noted positions.
    fn walk(b: &mut Brackets, ks: &[Vec<u32>]) -> Vec<u64> {
        let n = ks[0].len();
        let mut mask = vec![0u64; n.div_ceil(64)];
        for (p, k) in ks.iter().enumerate() {
            for (c, ch) in k.chunks(2048).enumerate() {
                b.see(p, (c * 2048) as u32, ch, &mut mask[c * 32..]);
            }
        }
        let at: Vec<usize> = (0..n)
            .filter(|&i| mask[i / 64] >> (i % 64) & 1 == 1)
            .collect();
        for (p, k) in ks.iter().enumerate() {
            let seen: Vec<u32> = at.iter().map(|&i| k[i]).collect();
            b.keys_at(p, &seen[..seen.len() / 2]);
            b.keys_at(p, &seen[seen.len() / 2..]);
        }
        mask
    }

    /// The boundaries from the brackets give every element the radix passes' verdict, and
    /// the provisional ones do for every element the walk did not note (ranks 0, n, the
    /// median, both ends of a breadcrumbs window, and ranks inside a run of equal keys).
    #[test]
    fn brackets_give_the_radix_verdicts() {
        for (n, seed) in [(400_003usize, 1u64), (1_000_000, 2)] {
            let ks = [keys(n, seed), keys(n, seed + 10)];
            let n64 = n as u64;
            let ranks = vec![vec![n64 / 2, n64], vec![n64 / 5, n64 * 19 / 20]];
            let refs: Vec<&[u32]> = ks.iter().map(Vec::as_slice).collect();
            let want = radix(&refs, &ranks, n64);
            let s = Sample::new(2, &mut |p, f| {
                f(&ks[p].iter().step_by(16).copied().collect::<Vec<_>>())
            });
            let mut b = Brackets::new(&ranks, n64, &s, 1.0).unwrap();
            let prov = b.provisional();
            let mask = walk(&mut b, &ks);
            let got = b.resolve().expect("the sample brackets the ranks");
            let noted = |i: usize| mask[i / 64] >> (i % 64) & 1 == 1;
            for (p, k) in ks.iter().enumerate() {
                for (side, w) in boundaries(&got, p).iter().zip(&want[p]) {
                    let (mut a, mut e) = (Cursor::new(side, 0), Cursor::new(w, 0));
                    assert!(k.iter().all(|&x| a.below(x) == e.below(x)), "n {n} p {p}");
                }
                for (side, w) in boundaries(&prov, p).iter().zip(&want[p]) {
                    let (mut a, mut e) = (Cursor::new(side, 0), Cursor::new(w, 0));
                    for (i, &x) in k.iter().enumerate() {
                        let (va, ve) = (a.below(x), e.below(x));
                        assert!(noted(i) || va == ve, "n {n} p {p} at {i}");
                    }
                }
            }
            let share = (0..n).filter(|&i| noted(i)).count() as f64 / n as f64;
            assert!(share < 0.25, "n {n}: {share} of the elements noted");
        }
    }

    /// A sample from other keys misleads: resolve says so instead of giving wrong boundaries.
    #[test]
    fn a_misleading_sample_is_found_out() {
        let n = 100_000usize;
        let ks = keys(n, 4);
        let ranks = vec![vec![n as u64 / 2, n as u64]];
        let wrong: Vec<u32> = ks
            .iter()
            .step_by(16)
            .map(|&k| (f32::from_bits(k) * 10.0 + 1.0).to_bits())
            .collect();
        let s = Sample::new(1, &mut |_, f| f(&wrong));
        let mut b = Brackets::new(&ranks, n as u64, &s, 1.0).unwrap();
        walk(&mut b, &[ks]);
        assert!(b.resolve().is_none());
    }

    /// A boundary among many equal keys (an eleventh of them are 0, the rank at 5%) puts more
    /// keys inside its bracket than merging them again is worth: declined up front.
    #[test]
    fn declines_where_the_sample_puts_many_keys_inside() {
        let n = 400_000usize;
        let ks = keys(n, 5);
        let sample: Vec<u32> = ks.iter().step_by(16).copied().collect();
        let ranks = vec![vec![n as u64 / 20, n as u64]];
        let s = Sample::new(1, &mut |_, f| f(&sample));
        assert!(Brackets::new(&ranks, n as u64, &s, TRY_SHARE).is_none());
        let ranks = vec![vec![n as u64 / 2, n as u64]];
        assert!(Brackets::new(&ranks, n as u64, &s, TRY_SHARE).is_some());
    }

    #[test]
    fn see_builds_agree() {
        let ks = keys(2048, 9);
        for (lo, hi) in [(0, 0), (0x3f00_0000, 0x3f80_ffff), (0, u32::MAX), (5, 5)] {
            for len in [2048, 2047, 15, 0] {
                let ks = &ks[..len];
                let at: Vec<u32> = (0..len as u32)
                    .filter(|&i| (lo..=hi).contains(&ks[i as usize]))
                    .map(|i| i + 7)
                    .collect();
                let below = ks.iter().filter(|&&k| k < lo).count() as u64;
                let mut out = [0u32; CHUNK];
                let (b, c) = see_keys(ks, 7, lo, hi, &mut out);
                assert_eq!((b, &out[..c]), (below, &at[..]));
                let (b, c) = see_scalar(ks, 7, lo, hi, &mut out);
                assert_eq!((b, &out[..c]), (below, &at[..]));
            }
        }
    }
}
