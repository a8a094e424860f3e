//! Exact rank selection over a tensor cut into row ranges: radix selection on f32 bit patterns.
//!
//! Sparsifying methods keep the elements whose rank by some key (|delta|, a variance) falls in a
//! window, e.g. TIES keeps the k largest magnitudes. Elements are totally ordered by
//! (key, element index), so ties are broken the same way whatever the layout. A rank boundary
//! `p` splits the order into the `p` lowest elements and the rest; it is found exactly in two
//! statistics passes: a histogram of the keys' high 16 bits locates the bucket holding rank `p`,
//! then a histogram of the low 16 bits inside that bucket gives the exact key. The per-range
//! count of elements equal to that key tells each range how many of its ties fall below.
//!
//! Keys are `u32`s whose unsigned order is the order wanted; for non-negative floats
//! (magnitudes, variances) that is just `f32::to_bits`.

use super::stats::{Hist, Stats};
use super::{KResult, KernelError};

mod bracket;
mod capture;
mod count;
mod sample;
pub use bracket::{Brackets, TRY_SHARE};
pub use capture::Capture;
use count::{pack_bucket, Lanes};
pub use sample::Sample;

/// Passes a selection needs.
pub const PASSES: u32 = 2;

const BINS: usize = 1 << 16;

/// The sort key of a non-negative f32 (NaN sorts above everything).
#[inline]
pub fn key(x: f32) -> u32 {
    let b = x.to_bits() & 0x7fff_ffff;
    if b > 0x7f80_0000 {
        u32::MAX - 1
    } else {
        b
    }
}

/// `ks[i] = key(vs[i])` (as long as `vs`), in the widest build the CPU runs (same keys:
/// integer operations).
pub fn keys_into(vs: &[f32], ks: &mut [u32]) {
    keys_into_wide(super::simd::level(), vs, ks)
}

#[inline(always)]
fn keys_into_base(vs: &[f32], ks: &mut [u32]) {
    for (k, &v) in ks.iter_mut().zip(vs) {
        *k = key(v);
    }
}

super::simd::wide! {
    /// [`keys_into`] built for `level`.
    fn keys_into_wide(vs: &[f32], ks: &mut [u32]) => keys_into_base
}

/// How many elements of `n` a magnitude (TIES) trim at `density` keeps: mergekit's
/// `max(1, int(density·n))` largest (`int`: truncation), at most `n`. Used by the ties kernel
/// and the merge report.
pub fn magnitude_keep(density: f64, n: u64) -> u64 {
    (((density * n as f64).trunc() as i64).max(1) as u64).min(n)
}

/// A located rank boundary: an element with key `x` whose ties earlier in the tensor number
/// `seen` ranks below the boundary iff `x < key || (x == key && seen < need)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Boundary {
    pub key: u32,
    pub need: u64,
    /// For each row range: how many elements with key == `key` lie in earlier ranges.
    pub prefix: Vec<u64>,
}

/// Walks one row range's elements in order and says which rank below a boundary.
pub struct Cursor<'a> {
    b: &'a Boundary,
    seen: u64,
}

impl<'a> Cursor<'a> {
    pub fn new(b: &'a Boundary, range_index: u32) -> Self {
        let seen = b.prefix.get(range_index as usize).copied().unwrap_or(0);
        Cursor { b, seen }
    }

    /// Whether the next element (with key `k`) ranks below the boundary.
    #[inline]
    pub fn below(&mut self, k: u32) -> bool {
        if k < self.b.key {
            true
        } else if k == self.b.key {
            let r = self.seen < self.b.need;
            self.seen += 1;
            r
        } else {
            false
        }
    }
}

impl Cursor<'_> {
    /// [`Cursor::below`] of each of `keys` in turn, negated into `kept` (1: at or above the
    /// boundary). Where the boundary's rank does not fall among these keys, every key equal to
    /// the boundary's is kept, or none is: a comparison each.
    pub fn kept_into(&mut self, keys: &[u32], kept: &mut [u8]) {
        let (key, need) = (self.b.key, self.b.need);
        let level = super::simd::level();
        let equal = count_equal_wide(level, keys, key);
        if self.seen >= need || self.seen + equal <= need {
            compare_wide(level, keys, key, self.seen >= need, kept);
            self.seen += equal;
        } else {
            for (o, &k) in kept.iter_mut().zip(keys) {
                *o = u8::from(!self.below(k));
            }
        }
    }
}

#[inline(always)]
fn count_equal(keys: &[u32], key: u32) -> u64 {
    keys.iter().map(|&k| u64::from(k == key)).sum()
}

/// `kept[i] = keys[i] > key`, or `>=` with `or_equal`.
#[inline(always)]
fn compare(keys: &[u32], key: u32, or_equal: bool, kept: &mut [u8]) {
    let eq = u8::from(or_equal);
    for (o, &k) in kept.iter_mut().zip(keys) {
        *o = u8::from(k > key) | (eq & u8::from(k == key));
    }
}

super::simd::wide! {
    /// [`count_equal`] built for `level`.
    fn count_equal_wide(keys: &[u32], key: u32) -> u64 => count_equal
}

super::simd::wide! {
    /// [`compare`] built for `level`.
    fn compare_wide(keys: &[u32], key: u32, or_equal: bool, kept: &mut [u8]) => compare
}

/// Pass 0, one range: a histogram of the high 16 bits of each problem's keys.
pub fn partial0(keys: &[&[u32]]) -> Stats {
    partial0_with(keys.len(), &mut |j, f| f(keys[j]))
}

/// Streams a selection problem's keys: `keys(j, f)` calls `f` on the keys of problem `j`,
/// chunk by chunk, in element order.
pub type KeySource<'a> = dyn FnMut(usize, &mut dyn FnMut(&[u32])) + 'a;

/// [`partial0`] over streamed keys (`problems` problems).
pub fn partial0_with(problems: usize, keys: &mut KeySource) -> Stats {
    partial0_flagged_with(problems, keys).0
}

/// [`partial0_with`], also saying for each problem whether every key's low 16 bits were zero
/// (as they are for the magnitudes of bfloat16 values): then the high bucket is the key and
/// [`resolve0`] locates the boundaries without the second pass.
fn partial0_flagged_with(problems: usize, keys: &mut KeySource) -> (Stats, Vec<bool>) {
    let mut st = Stats::default();
    let mut flags = Vec::with_capacity(problems);
    let mut dense = vec![0u64; BINS];
    let mut lanes = Lanes::new();
    for j in 0..problems {
        dense.iter_mut().for_each(|d| *d = 0);
        let mut low = 0u32;
        keys(j, &mut |ks| low |= lanes.count_keys(ks, &mut dense));
        lanes.flush(&mut dense);
        st.hists.push(Hist::from_dense(&dense));
        flags.push(low == 0);
    }
    (st, flags)
}

/// Pass 0 for [`resolve0`]: [`partial0_with`]'s histograms, with one count per problem (1:
/// every key's low 16 bits were zero) after any counts the method keeps.
pub fn partial0_resolvable_with(problems: usize, keys: &mut KeySource) -> Stats {
    let (mut st, flags) = partial0_flagged_with(problems, keys);
    st.counts.extend(flags.iter().map(|&f| u64::from(f)));
    st
}

/// The state [`reduce1`] would give, from pass 0 alone, when every range of every problem had
/// keys whose low 16 bits are all zero ([`partial0_resolvable_with`], whose flags are the last
/// `ranks.len()` counts of each partial): every key in a bucket is then the same key, so the
/// rank within the bucket is the number of its ties that rank below, and each range's tie
/// prefix is the bucket's count in the earlier ranges. `state0` is [`reduce0`]'s result.
/// `None` when some range had other keys (the second pass is needed).
pub fn resolve0(state0: &Stats, partials: &[Stats], ranks: &[Vec<u64>]) -> Option<Stats> {
    let problems = ranks.len();
    let resolvable = partials.iter().all(|p| {
        p.counts.len() >= problems
            && p.counts[p.counts.len() - problems..]
                .iter()
                .all(|&f| f == 1)
    });
    if !resolvable {
        return None;
    }
    let mut out = Stats::default();
    let mut at = 0;
    for (j, rs) in ranks.iter().enumerate() {
        let mut child = Stats::default();
        for _ in rs {
            let bucket = *state0.counts.get(at * 3 + 1)?;
            let within = *state0.counts.get(at * 3 + 2)?;
            at += 1;
            let (key, need) = if bucket >= BINS as u64 {
                (u32::MAX, 0)
            } else {
                ((bucket as u32) << 16, within)
            };
            let mut acc = 0u64;
            child
                .counts
                .extend_from_slice(&[key as u64, need, partials.len() as u64]);
            for p in partials {
                child
                    .counts
                    .push(if bucket >= BINS as u64 { 0 } else { acc });
                acc += p.hists.get(j).map_or(0, |h| h.get(bucket as u32));
            }
        }
        out.children.push(child);
    }
    Some(out)
}

/// Reduces pass 0: for each problem `j` and each rank in `ranks[j]`, locates the high bucket.
/// `n[j]` is the number of elements of problem `j`.
pub fn reduce0(partials: &[Stats], ranks: &[Vec<u64>], n: &[u64]) -> KResult<Stats> {
    let mut st = Stats::default();
    let mut dense = vec![0u64; BINS];
    for (j, rs) in ranks.iter().enumerate() {
        dense.iter_mut().for_each(|d| *d = 0);
        for p in partials {
            p.hists
                .get(j)
                .ok_or_else(|| KernelError::missing("selection partial is missing a histogram"))?
                .add_to(&mut dense);
        }
        let total: u64 = dense.iter().sum();
        if total != n[j] {
            return Err(KernelError::internal(format!(
                "selection saw {total} elements, expected {}",
                n[j]
            )));
        }
        for &p in rs {
            // state per boundary: [rank, bucket, rank within bucket]; bucket = BINS for p == n
            let (bucket, within) = locate(&dense, p);
            st.counts.extend_from_slice(&[p, bucket, within]);
        }
    }
    Ok(st)
}

fn locate(dense: &[u64], p: u64) -> (u64, u64) {
    let mut before = 0u64;
    for (b, &c) in dense.iter().enumerate() {
        if p < before + c {
            return (b as u64, p - before);
        }
        before += c;
    }
    (dense.len() as u64, 0)
}

/// Pass 1, one range: for each boundary, a histogram of the low 16 bits of the keys in its
/// bucket. `keys[j]` are problem j's keys, `ranks[j]` its ranks (as given to `reduce0`).
pub fn partial1(state0: &Stats, keys: &[&[u32]], ranks: &[Vec<u64>]) -> Stats {
    partial1_with(state0, ranks, &mut |j, f| f(keys[j]))
}

/// [`partial1`] over streamed keys: one walk over each problem's keys fills the histograms of
/// all its boundaries.
pub fn partial1_with(state0: &Stats, ranks: &[Vec<u64>], keys: &mut KeySource) -> Stats {
    let mut st = Stats::default();
    for (j, (rs, live)) in ranks.iter().zip(live_buckets(state0, ranks)).enumerate() {
        let mut dense = vec![vec![0u64; BINS]; rs.len()];
        if !live.is_empty() {
            // Branch-free: the keys of the bucket are first packed into `low` (every key is
            // stored, the count advances only for a match), then counted. Keys of exactly 0,
            // common in a bf16 model's deltas, are counted in a register: incrementing one bin
            // over and over chains every increment behind the last one's store.
            let mut low: Vec<u16> = Vec::new();
            keys(j, &mut |ks| {
                low.resize(ks.len(), 0);
                for &(r, b) in &live {
                    let n = pack_bucket(ks, b, &mut low);
                    let d = &mut dense[r];
                    for &l in &low[..n] {
                        d[l as usize] += 1;
                    }
                    if b == 0 {
                        d[0] += ks.iter().map(|&k| u64::from(k == 0)).sum::<u64>();
                    }
                }
            });
        }
        st.hists.extend(dense.iter().map(|d| Hist::from_dense(d)));
    }
    st
}

/// Per problem, the boundaries (index among its ranks, high bucket) that pass 0 located in a
/// bucket (a rank equal to the element count has none): what pass 1 counts.
fn live_buckets(state0: &Stats, ranks: &[Vec<u64>]) -> Vec<Vec<(usize, u32)>> {
    let mut at = 0;
    ranks
        .iter()
        .map(|rs| {
            let live = (0..rs.len())
                .filter_map(|r| {
                    let b = state0.counts.get((at + r) * 3 + 1).copied();
                    b.filter(|&b| b < BINS as u64).map(|b| (r, b as u32))
                })
                .collect();
            at += rs.len();
            live
        })
        .collect()
}

/// Reduces pass 1 into the located boundaries, one child per problem, one [`Boundary`] per rank.
pub fn reduce1(state0: &Stats, partials: &[Stats], ranks: &[Vec<u64>]) -> KResult<Stats> {
    let mut out = Stats::default();
    let mut dense = vec![0u64; BINS];
    let mut at = 0;
    for rs in ranks {
        let mut child = Stats::default();
        for _ in rs {
            let bucket = *state0
                .counts
                .get(at * 3 + 1)
                .ok_or_else(|| KernelError::internal("selection state is short"))?;
            let within = *state0
                .counts
                .get(at * 3 + 2)
                .ok_or_else(|| KernelError::internal("selection state is short"))?;
            let b = if bucket >= BINS as u64 {
                Boundary {
                    key: u32::MAX,
                    need: 0,
                    prefix: vec![0; partials.len()],
                }
            } else {
                dense.iter_mut().for_each(|d| *d = 0);
                for p in partials {
                    p.hists
                        .get(at)
                        .ok_or_else(|| {
                            KernelError::missing("selection partial is missing a histogram")
                        })?
                        .add_to(&mut dense);
                }
                let (lo, need) = locate(&dense, within);
                if lo >= BINS as u64 {
                    return Err(KernelError::internal(
                        "selection bucket lost elements between passes",
                    ));
                }
                let key = ((bucket as u32) << 16) | lo as u32;
                let mut prefix = Vec::with_capacity(partials.len());
                let mut acc = 0u64;
                for p in partials {
                    prefix.push(acc);
                    acc += p.hists[at].get(lo as u32);
                }
                Boundary { key, need, prefix }
            };
            at += 1;
            child.counts.push(b.key as u64);
            child.counts.push(b.need);
            child.counts.push(b.prefix.len() as u64);
            child.counts.extend_from_slice(&b.prefix);
        }
        out.children.push(child);
    }
    Ok(out)
}

/// Decodes the boundaries of problem `j` from the state `reduce1` produced.
pub fn boundaries(state: &Stats, j: usize) -> Vec<Boundary> {
    let c = &state.child(j).counts;
    let mut out = Vec::new();
    let mut i = 0;
    while i + 3 <= c.len() {
        let (key, need, n) = (c[i] as u32, c[i + 1], c[i + 2] as usize);
        let prefix = c
            .get(i + 3..i + 3 + n)
            .map(<[u64]>::to_vec)
            .unwrap_or_default();
        out.push(Boundary { key, need, prefix });
        i += 3 + n;
    }
    out
}

/// Sorts `v` by the high 32 bits of each value, keeping the order of equal ones (a stable
/// LSD radix sort, a byte at a time; bytes that every value shares are skipped). For values
/// packed as `key << 32 | position` and given in position order, the result is the ascending
/// order of the values, as `sort_unstable` gives it, in linear time. `tmp` is scratch space.
pub fn radix_sort_high32(v: &mut Vec<u64>, tmp: &mut Vec<u64>) {
    let n = v.len();
    let mut counts = [[0u32; 256]; 4];
    for &x in v.iter() {
        for (b, c) in counts.iter_mut().enumerate() {
            c[((x >> (32 + 8 * b)) & 0xff) as usize] += 1;
        }
    }
    tmp.clear();
    tmp.resize(n, 0);
    for (b, c) in counts.iter().enumerate() {
        if c.iter().any(|&k| k as usize == n) {
            continue;
        }
        let mut start = [0u32; 256];
        let mut at = 0u32;
        for (s, &k) in start.iter_mut().zip(c.iter()) {
            *s = at;
            at += k;
        }
        let shift = 32 + 8 * b;
        for &x in v.iter() {
            let d = ((x >> shift) & 0xff) as usize;
            tmp[start[d] as usize] = x;
            start[d] += 1;
        }
        std::mem::swap(v, tmp);
    }
}

#[cfg(test)]
mod tests {
    /// `kept_into` over chunks of any size says what `below` says element by element, with
    /// the boundary's rank before, inside and after each chunk.
    #[test]
    fn kept_into_agrees_with_below() {
        let keys: Vec<u32> = (0..5000u32).map(|i| (i * 7919 % 13) / 3).collect();
        for need in [0, 1, 100, 383, 384, 1000, 5000] {
            let b = super::Boundary {
                key: 2,
                need,
                prefix: vec![0],
            };
            let (mut one, mut many) = (super::Cursor::new(&b, 0), super::Cursor::new(&b, 0));
            let want: Vec<u8> = keys.iter().map(|&k| u8::from(!one.below(k))).collect();
            let mut got = vec![0u8; keys.len()];
            let mut at = 0;
            for size in [1usize, 7, 64, 300, 2048].iter().cycle() {
                if at >= keys.len() {
                    break;
                }
                let end = (at + size).min(keys.len());
                many.kept_into(&keys[at..end], &mut got[at..end]);
                at = end;
            }
            assert_eq!(got, want, "need {need}");
        }
    }

    use super::*;

    /// Runs the two passes over `keys` cut at `cuts`, returns the boundaries for `ranks`.
    fn select(keys: &[u32], cuts: &[usize], ranks: &[u64]) -> (Vec<Boundary>, Vec<(usize, usize)>) {
        let mut ranges = Vec::new();
        let mut s = 0;
        for &c in cuts.iter().chain([keys.len()].iter()) {
            ranges.push((s, c));
            s = c;
        }
        let rk = vec![ranks.to_vec()];
        let p0: Vec<Stats> = ranges
            .iter()
            .map(|&(a, b)| partial0(&[&keys[a..b]]))
            .collect();
        let s0 = reduce0(&p0, &rk, &[keys.len() as u64]).unwrap();
        let p1: Vec<Stats> = ranges
            .iter()
            .map(|&(a, b)| partial1(&s0, &[&keys[a..b]], &rk))
            .collect();
        let s1 = reduce1(&s0, &p1, &rk).unwrap();
        (boundaries(&s1, 0), ranges)
    }

    fn below_set(keys: &[u32], b: &Boundary, ranges: &[(usize, usize)]) -> Vec<bool> {
        let mut out = Vec::new();
        for (i, &(a, e)) in ranges.iter().enumerate() {
            let mut c = Cursor::new(b, i as u32);
            out.extend(keys[a..e].iter().map(|&k| c.below(k)));
        }
        out
    }

    #[test]
    fn matches_sort_and_is_layout_independent() {
        let keys: Vec<u32> = (0..3000u32)
            .map(|i| key(((i as f32 * 0.37).sin() * 4.0).round() / 4.0))
            .collect();
        // reference: sort (key, index) and take ranks
        let mut order: Vec<usize> = (0..keys.len()).collect();
        order.sort_by_key(|&i| (keys[i], i));
        for p in [0u64, 1, 17, 1500, 2999, 3000] {
            let mut want = vec![false; keys.len()];
            for &i in &order[..p as usize] {
                want[i] = true;
            }
            let (b1, r1) = select(&keys, &[], &[p]);
            let (b2, r2) = select(&keys, &[1, 700, 701, 2048], &[p]);
            assert_eq!(below_set(&keys, &b1[0], &r1), want, "p={p}");
            assert_eq!(below_set(&keys, &b2[0], &r2), want, "p={p} cut");
        }
    }

    /// Pass 0 alone locates the boundaries [`reduce1`] gives when every key's low 16 bits
    /// are zero (bfloat16 magnitudes), cut or not; any other key makes it decline.
    #[test]
    fn resolve0_matches_the_second_pass() {
        let keys: Vec<u32> = (0..3000u32)
            .map(|i| key(((i as f32 * 0.37).sin() * 4.0).round() / 4.0) & 0xffff_0000)
            .collect();
        let rk = vec![vec![0u64, 17, 1500, 2999], vec![3000, 5]];
        for cuts in [&[][..], &[1, 700, 701, 2048]] {
            let mut ranges = Vec::new();
            let mut s = 0;
            for &c in cuts.iter().chain([keys.len()].iter()) {
                ranges.push((s, c));
                s = c;
            }
            let slices: Vec<[&[u32]; 2]> = ranges
                .iter()
                .map(|&(a, b)| [&keys[a..b], &keys[keys.len() - b..keys.len() - a]])
                .collect();
            let p0: Vec<Stats> = slices
                .iter()
                .map(|ks| partial0_resolvable_with(2, &mut |j, f| f(ks[j])))
                .collect();
            let n = [keys.len() as u64; 2];
            let s0 = reduce0(&p0, &rk, &n).unwrap();
            let p1: Vec<Stats> = slices.iter().map(|ks| partial1(&s0, ks, &rk)).collect();
            let want = reduce1(&s0, &p1, &rk).unwrap();
            assert_eq!(resolve0(&s0, &p0, &rk), Some(want), "cuts {cuts:?}");
            let mut odd = p0.clone();
            let last = odd.len() - 1;
            odd[last] = partial0_resolvable_with(2, &mut |_, f| f(&[1]));
            assert_eq!(resolve0(&s0, &odd, &rk), None);
        }
    }

    /// The packed keys of a bucket are its nonzero members in order, whatever the blocks
    /// hold (none, some, all; zeros in bucket 0) and however long the chunk.
    #[test]
    fn pack_bucket_keeps_the_members_in_order() {
        let s = crate::kernels::rng::Stream::new(7, 8, 9);
        for (len, spread) in [
            (0usize, 4u64),
            (1, 1),
            (15, 2),
            (16, 3),
            (1001, 3),
            (4096, 200),
        ] {
            let ks: Vec<u32> = (0..len as u64)
                .map(|i| {
                    let hi = (s.u64(i) % spread) as u32;
                    let lo = (s.u64(i + 9999) % 3) as u32 * 0x5555;
                    (hi << 16) | lo
                })
                .collect();
            for b in [0u32, 1, 2, 7] {
                let want: Vec<u16> = ks
                    .iter()
                    .filter(|&&k| k >> 16 == b && k != 0)
                    .map(|&k| k as u16)
                    .collect();
                let mut low = vec![0u16; ks.len()];
                let n = pack_bucket(&ks, b, &mut low);
                assert_eq!(&low[..n], &want[..], "len {len} spread {spread} bucket {b}");
            }
        }
    }

    #[test]
    fn lane_histograms_count_every_key_once() {
        // three problems in a row (the lanes are flushed and reused), keys bunched in a few
        // bins and spread over all of them, extremes included, streamed in odd-sized chunks
        let s = crate::kernels::rng::Stream::new(3, 4, 5);
        let problems: Vec<Vec<u32>> = vec![
            (0..10_001u64)
                .map(|i| 0x3c00_0000 + ((s.uniform(i) * 5.0) as u32) * 0x1_0000)
                .collect(),
            (0..7_003u64)
                .map(|i| (s.uniform(i + 50_000) * u32::MAX as f64) as u32)
                .chain([0, u32::MAX, u32::MAX - 1, 0xffff])
                .collect(),
            vec![0x4000_0000; 3],
        ];
        let st = partial0_with(problems.len(), &mut |j, f| {
            for c in problems[j].chunks(1000 + 13 * j) {
                f(c);
            }
        });
        for (j, keys) in problems.iter().enumerate() {
            let mut dense = vec![0u64; BINS];
            for &k in keys {
                dense[(k >> 16) as usize] += 1;
            }
            let want = Hist::from_dense(&dense);
            assert_eq!(st.hists[j].bins, want.bins, "problem {j}");
            assert_eq!(st.hists[j].counts, want.counts, "problem {j}");
        }
    }

    #[test]
    fn radix_sort_matches_sort_unstable() {
        let s = super::super::rng::Stream::new(3, 4, 5);
        let mut tmp = Vec::new();
        for (n, spread) in [
            (0usize, 1u64),
            (1, 1),
            (5000, 7),
            (5000, 1 << 20),
            (3000, 1 << 32),
        ] {
            // keys with many ties (a small spread) or few, in position order
            let mut v: Vec<u64> = (0..n as u64)
                .map(|i| ((s.u64(i) % spread) << 32) | i)
                .collect();
            let mut want = v.clone();
            want.sort_unstable();
            radix_sort_high32(&mut v, &mut tmp);
            assert_eq!(v, want, "n={n} spread={spread}");
        }
    }

    /// [`keys_into`] (the widest build the CPU runs, and every build) gives [`key`] of every value,
    /// edge classes included, at any length.
    #[test]
    fn keys_into_is_key_of_each() {
        let mut vs = vec![
            0.0f32,
            -0.0,
            f32::MIN_POSITIVE / 4.0,
            -1.5,
            f32::MAX,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7f80_0001),
        ];
        vs.extend((0..100).map(|i| (i as f32 * 0.37).sin() * 10f32.powi(i % 9 - 4)));
        for len in [0, 1, 7, 8, 9, vs.len()] {
            let mut ks = vec![0u32; len];
            keys_into(&vs[..len], &mut ks);
            let want: Vec<u32> = vs[..len].iter().map(|&v| key(v)).collect();
            assert_eq!(ks, want, "len {len}");
            for level in super::super::simd::levels() {
                keys_into_wide(level, &vs[..len], &mut ks);
                assert_eq!(ks, want, "len {len}, {}", level.name());
            }
        }
    }

    /// Pass 0's counts and low-bit flags are the same from every build the CPU runs as from
    /// the baseline one.
    #[test]
    fn count_keys_builds_agree() {
        let s = crate::kernels::rng::Stream::new(5, 5, 5);
        let ks: Vec<u32> = (0..5003u64)
            .map(|i| (s.u64(i) as u32 & 0x00ff_ffff) | 0x3c00_0000)
            .chain([0, u32::MAX, 0xffff_0000])
            .collect();
        let mut b = Lanes::new();
        let mut db = vec![0u64; BINS];
        let lb = b.count_keys_base(&ks, &mut db);
        b.flush(&mut db);
        for level in super::super::simd::levels() {
            let mut a = Lanes::new();
            let mut da = vec![0u64; BINS];
            let la = count::count_keys_wide(level, &mut a, &ks, &mut da);
            a.flush(&mut da);
            assert_eq!((la, &da), (lb, &db), "{}", level.name());
        }
    }

    #[test]
    fn nan_and_infinity_sort_last() {
        assert!(key(f32::INFINITY) < key(f32::NAN));
        assert!(key(3.0) < key(f32::INFINITY));
        assert_eq!(key(-2.0), key(2.0));
    }
}
