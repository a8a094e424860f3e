//! MT19937, the generator behind PyTorch's CPU random numbers, with jump-ahead.
//!
//! mergekit seeds torch with `random_seed` and draws DARE/DELLA masks from torch's global CPU
//! generator: one 32-bit MT19937 output per element, tensor after tensor. To reproduce those
//! masks without replaying the whole stream, a task needs the generator's state at an
//! arbitrary position `J`. MT19937 is linear over GF(2): the state after `J` steps is
//! `A^J · s₀`, and `A^J = g(A)` with `g(x) = x^J mod φ(x)`, where `φ` is the (degree 19937)
//! characteristic polynomial of the transition `A`. We find `φ` once per process by
//! Berlekamp–Massey on an output bit sequence, keep `x^(2^k) mod φ` for every `k`, and apply
//! one of those polynomials to the state per set bit of `J` (low bits are stepped directly).
//! A jump costs a few milliseconds; everything else is the ordinary generator.
//!
//! The state here is a *window*: the 624 most recently generated raw words, oldest first, with
//! the next word computed from the window's words 0, 1 and 397. It is the standard state array
//! right before a twist. The low 31 bits of the oldest word never affect anything (only its
//! top bit is read), so the jumped state may differ from the stepped one there and nowhere
//! that matters.

use std::sync::{Mutex, OnceLock};

const N: usize = 624;
const M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER: u32 = 0x8000_0000;
const LOWER: u32 = 0x7fff_ffff;
/// Degree of MT19937's characteristic polynomial.
const DEG: usize = 19937;
/// Words of a polynomial of degree < DEG.
const PW: usize = DEG.div_ceil(64);
/// Jumps shorter than this are stepped, not computed.
const STEP_BELOW: u64 = 1 << 17;

#[inline(always)]
fn next_word(w0: u32, w1: u32, wm: u32) -> u32 {
    let y = (w0 & UPPER) | (w1 & LOWER);
    wm ^ (y >> 1) ^ ((y & 1).wrapping_neg() & MATRIX_A)
}

#[inline(always)]
fn temper(mut y: u32) -> u32 {
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c_5680;
    y ^= (y << 15) & 0xefc6_0000;
    y ^ (y >> 18)
}

/// An MT19937 generator (the same outputs as C++'s `std::mt19937` and torch's CPU generator).
#[derive(Clone)]
pub struct Mt19937 {
    w: Box<[u32; N]>,
    /// Next word of `w` to output; `N`: a twist is due.
    i: usize,
    /// The seed, and how many outputs have been taken since seeding (for [`remember`]).
    seed: u64,
    pos: u64,
}

impl std::fmt::Debug for Mt19937 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mt19937 {{ seed: {}, pos: {} }}", self.seed, self.pos)
    }
}

/// Generators recently positioned in this process, by (seed, position). A task's ranges are
/// drawn twice (statistics pass, then apply) and a tensor's next range starts where the last
/// one ended, so most positions asked for are at or just after one of these: starting from the
/// nearest one below makes the jump short or empty. Only a shortcut: the state at a position
/// is the same however it was reached.
struct Memo {
    slots: Vec<Mt19937>,
    next: usize,
}

const MEMO_SLOTS: usize = 64;

fn memo() -> &'static Mutex<Memo> {
    static M: OnceLock<Mutex<Memo>> = OnceLock::new();
    M.get_or_init(|| {
        Mutex::new(Memo {
            slots: Vec::with_capacity(MEMO_SLOTS),
            next: 0,
        })
    })
}

/// Keeps `g`'s state for later [`Mt19937::at`] calls.
pub fn remember(g: &Mt19937) {
    let mut m = memo().lock().unwrap_or_else(|p| p.into_inner());
    if m.slots.iter().any(|s| s.seed == g.seed && s.pos == g.pos) {
        return;
    }
    if m.slots.len() < MEMO_SLOTS {
        m.slots.push(g.clone());
    } else {
        let k = m.next;
        m.slots[k] = g.clone();
        m.next = (k + 1) % MEMO_SLOTS;
    }
}

impl Mt19937 {
    /// Seeded as `torch.manual_seed(seed)` seeds the CPU generator (the low 32 bits count,
    /// as in torch's `mt19937(seed)`).
    pub fn new(seed: u64) -> Mt19937 {
        let mut w = Box::new([0u32; N]);
        w[0] = seed as u32;
        for j in 1..N {
            let p = w[j - 1];
            w[j] = 1_812_433_253u32
                .wrapping_mul(p ^ (p >> 30))
                .wrapping_add(j as u32);
        }
        Mt19937 {
            w,
            i: N,
            seed,
            pos: 0,
        }
    }

    /// The generator `seed` would be after `skip` outputs (starting from the nearest
    /// remembered state below, if any).
    pub fn at(seed: u64, skip: u64) -> Mt19937 {
        let near = {
            let m = memo().lock().unwrap_or_else(|p| p.into_inner());
            m.slots
                .iter()
                .filter(|s| s.seed == seed && s.pos <= skip)
                .max_by_key(|s| s.pos)
                .cloned()
        };
        let mut g = near.unwrap_or_else(|| Mt19937::new(seed));
        if g.pos < skip {
            g.skip(skip - g.pos);
            remember(&g);
        }
        g
    }

    /// The next `N` raw words, in place: word `k` from words `k` and `k + 1` and the word `M`
    /// places on, that is, past the window's end, the new word `N - M` places back. (The same
    /// as `w[k] = next_word(w[k], w[k + 1], w[(k + M) % N])` for `k` in order, the last with
    /// `w[0]` for `w[k + 1]`; split into slices that do not overlap where a word comes from
    /// another part of the window, so that each loop vectorises.)
    #[inline(always)]
    fn twist(&mut self) {
        const A: usize = N - M; // 227 words from old ones only
        let w = &mut *self.w;
        let (lo, hi) = w.split_at_mut(A);
        let far = &hi[M - A..];
        for k in 0..A - 1 {
            lo[k] = next_word(lo[k], lo[k + 1], far[k]);
        }
        lo[A - 1] = next_word(lo[A - 1], hi[0], far[A - 1]);
        // words A..2A from the new words 0..A, then words 2A..N-1 from the new words A..N-A-1
        for k in 0..A {
            hi[k] = next_word(hi[k], hi[k + 1], lo[k]);
        }
        let (mid, top) = hi.split_at_mut(A);
        for j in 0..top.len() - 1 {
            top[j] = next_word(top[j], top[j + 1], mid[j]);
        }
        w[N - 1] = next_word(w[N - 1], w[0], w[M - 1]);
        self.i = 0;
    }

    /// The next 32-bit output.
    #[inline]
    pub fn next_u32(&mut self) -> u32 {
        if self.i >= N {
            self.twist();
        }
        let y = self.w[self.i];
        self.i += 1;
        self.pos += 1;
        temper(y)
    }

    /// The next `out.len()` outputs, in the widest build the CPU runs (integer operations: the
    /// same words).
    pub fn fill(&mut self, out: &mut [u32]) {
        fill_wide(super::simd::level(), self, out)
    }

    /// [`Mt19937::fill`] inlined into its caller's build (for a caller that is itself built
    /// for the CPU's SIMD level).
    #[inline(always)]
    pub(super) fn fill_base(&mut self, out: &mut [u32]) {
        let mut k = 0;
        while k < out.len() {
            if self.i >= N {
                self.twist();
            }
            let take = (N - self.i).min(out.len() - k);
            for (o, &w) in out[k..k + take]
                .iter_mut()
                .zip(&self.w[self.i..self.i + take])
            {
                *o = temper(w);
            }
            self.i += take;
            k += take;
        }
        self.pos += out.len() as u64;
    }

    /// Advances by `n` outputs.
    pub fn skip(&mut self, n: u64) {
        self.pos += n;
        // finish the current block, so the state is a window (i == N)
        let left = (N - self.i.min(N)) as u64;
        if n <= left {
            self.i += n as usize;
            return;
        }
        let mut n = n - left;
        self.i = N;
        if n >= STEP_BELOW {
            let high = n & !(STEP_BELOW - 1);
            n -= high;
            let t = tables();
            for (k, poly) in t.pow2.iter().enumerate() {
                if high >> k & 1 == 1 {
                    apply(poly, &mut self.w);
                }
            }
        }
        while n >= N as u64 {
            self.twist();
            self.i = N;
            n -= N as u64;
        }
        if n > 0 {
            self.twist();
            self.i = n as usize;
        }
    }
}

super::simd::wide! {
    /// [`Mt19937::fill_base`] built for `level` (its twists too).
    fn fill_wide(mt: &mut Mt19937, out: &mut [u32]) => Mt19937::fill_base
}

/// Sets `w` (a window) to `g(A)·w`: the XOR of the windows `A^i·w` over the set bits `i` of
/// `g`, found by generating the sequence once.
fn apply(g: &[u64], w: &mut [u32; N]) {
    let mut seq = vec![0u32; N + DEG];
    seq[..N].copy_from_slice(w);
    for k in N..seq.len() {
        seq[k] = next_word(seq[k - N], seq[k - N + 1], seq[k - N + M]);
    }
    let mut acc = [0u32; N];
    for (wi, &word) in g.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let i = wi * 64 + bits.trailing_zeros() as usize;
            bits &= bits - 1;
            for (a, s) in acc.iter_mut().zip(&seq[i..i + N]) {
                *a ^= s;
            }
        }
    }
    *w = acc;
}

struct Tables {
    /// `x^(2^k) mod φ`, indexed by bit `k` of the jump (bits below `STEP_BELOW` are stepped).
    pow2: Vec<Vec<u64>>,
}

fn tables() -> &'static Tables {
    static T: OnceLock<Tables> = OnceLock::new();
    T.get_or_init(|| {
        let phi = char_poly();
        let red = Reducer::new(&phi);
        let mut pow2 = Vec::with_capacity(64);
        // x^1, then square
        let mut cur = vec![0u64; PW];
        cur[0] = 2;
        for _k in 0..64 {
            pow2.push(cur.clone());
            cur = red.square(&cur);
        }
        Tables { pow2 }
    })
}

/// φ, the characteristic polynomial of the MT19937 transition, as DEG + 1 coefficient bits
/// (bit i: coefficient of x^i), by Berlekamp–Massey over the low bit of the raw words.
fn char_poly() -> Vec<u64> {
    let len = 2 * DEG;
    let mut g = Mt19937::new(5489);
    // raw (untempered) words after the first twist: a sequence of the linear recurrence
    let mut bits = vec![false; len];
    let mut k = 0;
    while k < len {
        g.twist();
        for &w in g.w.iter() {
            if k < len {
                bits[k] = w & 1 == 1;
                k += 1;
            }
        }
    }
    let c = berlekamp_massey(&bits);
    let l = c.len() - 1;
    // c(x) = 1 + c1 x + … + cL x^L with s[n] = Σ c_i s[n-i]; φ(x) = x^L c(1/x)
    let mut phi = vec![0u64; (l + 1).div_ceil(64) + 1];
    for (i, &ci) in c.iter().enumerate() {
        if ci {
            let j = l - i;
            phi[j / 64] |= 1 << (j % 64);
        }
    }
    assert_eq!(l, DEG, "MT19937's recurrence must have degree {DEG}");
    phi
}

/// The shortest linear recurrence of a bit sequence: connection polynomial coefficients
/// `c[0..=L]` with `c[0] = 1`.
fn berlekamp_massey(s: &[bool]) -> Vec<bool> {
    let n = s.len();
    let words = n / 64 + 2;
    // packed polynomials
    let mut c = vec![0u64; words];
    let mut b = vec![0u64; words];
    c[0] = 1;
    b[0] = 1;
    // the sequence reversed and packed, so that Σ c_i s[n-i] is a masked parity of a window
    let mut rev = vec![0u64; words + 1];
    for (i, &bit) in s.iter().enumerate() {
        if bit {
            let r = n - 1 - i;
            rev[r / 64] |= 1 << (r % 64);
        }
    }
    let window = |start: usize, w: usize| -> u64 {
        // 64 bits of `rev` from bit `start + 64 w`
        let bit = start + 64 * w;
        let (q, r) = (bit / 64, bit % 64);
        let lo = rev.get(q).copied().unwrap_or(0) >> r;
        let hi = if r == 0 {
            0
        } else {
            rev.get(q + 1).copied().unwrap_or(0) << (64 - r)
        };
        lo | hi
    };
    let (mut l, mut m) = (0usize, 1usize);
    for i in 0..n {
        // d = Σ_{j=0..L} c_j s[i-j] ; s[i-j] = rev[n-1-i+j]
        let start = n - 1 - i;
        let mut acc = 0u64;
        for (w, &cw) in c.iter().enumerate().take(l / 64 + 1) {
            let mut cw = cw;
            if w == l / 64 {
                let keep = l % 64 + 1;
                if keep < 64 {
                    cw &= (1u64 << keep) - 1;
                }
            }
            acc ^= cw & window(start, w);
        }
        // bits of s beyond index i (j > i) are zero in `rev` only if start + j < n: they are
        // outside the sequence, and c_j = 0 for j > L anyway since L <= i
        let d = acc.count_ones() & 1 == 1;
        if !d {
            m += 1;
            continue;
        }
        let t = c.clone();
        // c += x^m b
        let (q, r) = (m / 64, m % 64);
        for w in (0..words).rev() {
            if w < q {
                break;
            }
            let src = w - q;
            let mut v = b[src] << r;
            if r != 0 && src > 0 {
                v |= b[src - 1] >> (64 - r);
            }
            c[w] ^= v;
        }
        if 2 * l <= i {
            l = i + 1 - l;
            b = t;
            m = 1;
        } else {
            m += 1;
        }
    }
    (0..=l).map(|i| c[i / 64] >> (i % 64) & 1 == 1).collect()
}

/// Reduction modulo φ with 64 pre-shifted copies of φ, so each step is an aligned XOR.
struct Reducer {
    shifted: Vec<Vec<u64>>,
}

impl Reducer {
    fn new(phi: &[u64]) -> Reducer {
        let words = PW + 1;
        let shifted = (0..64)
            .map(|s| {
                let mut v = vec![0u64; words];
                for (w, &p) in phi.iter().enumerate().take(words) {
                    v[w] |= p << s;
                    if s != 0 && w + 1 < words {
                        v[w + 1] |= p >> (64 - s);
                    }
                }
                v
            })
            .collect();
        Reducer { shifted }
    }

    /// `a² mod φ` for `a` of degree < DEG.
    fn square(&self, a: &[u64]) -> Vec<u64> {
        let mut sq = vec![0u64; 2 * PW + 2];
        for (i, &w) in a.iter().enumerate() {
            sq[2 * i] = spread(w as u32);
            sq[2 * i + 1] = spread((w >> 32) as u32);
        }
        self.reduce(&mut sq);
        sq.truncate(PW);
        sq
    }

    /// Reduces `v` in place to degree < DEG.
    fn reduce(&self, v: &mut [u64]) {
        let top = v.len() * 64;
        for d in (DEG..top).rev() {
            if v[d / 64] >> (d % 64) & 1 == 1 {
                let shift = d - DEG;
                let (q, s) = (shift / 64, shift % 64);
                let p = &self.shifted[s];
                for (x, y) in v[q..].iter_mut().zip(p) {
                    *x ^= y;
                }
            }
        }
    }
}

/// Bit i of `x` moved to bit 2i.
fn spread(x: u32) -> u64 {
    let mut v = x as u64;
    v = (v | (v << 16)) & 0x0000_ffff_0000_ffff;
    v = (v | (v << 8)) & 0x00ff_00ff_00ff_00ff;
    v = (v | (v << 4)) & 0x0f0f_0f0f_0f0f_0f0f;
    v = (v | (v << 2)) & 0x3333_3333_3333_3333;
    (v | (v << 1)) & 0x5555_5555_5555_5555
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_std_mt19937() {
        // the reference values of std::mt19937: the first output for the default seed 5489,
        // and the 10000th (the C++ standard's conformance check)
        let mut g = Mt19937::new(5489);
        assert_eq!(g.next_u32(), 3_499_211_612);
        let mut g = Mt19937::new(5489);
        for _ in 0..9999 {
            g.next_u32();
        }
        assert_eq!(g.next_u32(), 4_123_659_995);
    }

    /// Every build of `fill` the CPU runs gives the outputs `next_u32` gives one by one,
    /// across several twists and from odd starting points.
    #[test]
    fn fill_builds_give_the_stream() {
        let mut one = Mt19937::new(77);
        let want: Vec<u32> = (0..5 * N + 13).map(|_| one.next_u32()).collect();
        for level in crate::kernels::simd::levels() {
            let mut g = Mt19937::new(77);
            let mut got = vec![0u32; want.len()];
            let mut at = 0;
            for len in [1, 623, 624, 625, 7, 2000].iter().cycle() {
                if at == got.len() {
                    break;
                }
                let end = (at + len).min(got.len());
                fill_wide(level, &mut g, &mut got[at..end]);
                at = end;
            }
            assert!(got == want, "{}", level.name());
        }
    }

    #[test]
    fn char_poly_has_full_degree() {
        let phi = char_poly();
        let top = DEG;
        assert_eq!(phi[top / 64] >> (top % 64) & 1, 1);
        assert_eq!(phi[0] & 1, 1, "φ(0) = 1 for an invertible transition");
    }

    #[test]
    fn jumps_equal_stepping() {
        let seq: Vec<u32> = {
            let mut g = Mt19937::new(0);
            (0..(3 << 17) + 6000).map(|_| g.next_u32()).collect()
        };
        for skip in [
            0u64,
            1,
            623,
            624,
            625,
            1000,
            STEP_BELOW - 1,
            STEP_BELOW,
            STEP_BELOW + 1,
            2 * STEP_BELOW + 624 * 3 + 17,
            3 * STEP_BELOW + 4321,
        ] {
            let mut g = Mt19937::at(0, skip);
            for k in 0..700u64 {
                assert_eq!(
                    g.next_u32(),
                    seq[(skip + k) as usize],
                    "skip {skip}, output {k}"
                );
            }
        }
        // bulk outputs across block boundaries
        let mut g = Mt19937::at(0, 5);
        let mut buf = vec![0u32; 2000];
        g.fill(&mut buf[..10]);
        g.fill(&mut buf[10..]);
        assert_eq!(buf[..], seq[5..2005]);
        // skipping in pieces, from the middle of a block
        let mut g = Mt19937::new(0);
        for _ in 0..100 {
            g.next_u32();
        }
        g.skip(STEP_BELOW + 77);
        g.skip(300);
        assert_eq!(g.next_u32(), seq[100 + STEP_BELOW as usize + 77 + 300]);
    }

    #[test]
    fn long_jumps_compose() {
        // jumping J1 then J2 equals jumping J1 + J2, for jumps too long to check by stepping
        let (j1, j2) = (5_000_000_123u64, 987_654_321_000u64);
        let mut a = Mt19937::at(7, j1);
        a.skip(j2);
        let mut b = Mt19937::at(7, j1 + j2);
        for _ in 0..1000 {
            assert_eq!(a.next_u32(), b.next_u32());
        }
    }
}
