//! Whole-tensor statistics: the container methods keep them in, and its wire form.
//!
//! A method that needs statistics of a whole tensor (top-k thresholds, norms, angles) computes
//! them in passes: every row range of the tensor yields a *partial*, and `reduce` folds the
//! partials of all ranges, in range order, into the state the next pass (or `apply`) reads.
//! Every reduction here is exact (integer counts, [`ExactSum`]), so cutting a tensor into more
//! or fewer ranges never changes a single output bit.

use shardmerge_proto as pb;

use super::dot::DotSum;
use super::exact::ExactSum;

/// Counts per 16-bit bin, stored sparsely (bins ascending).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Hist {
    pub bins: Vec<u32>,
    pub counts: Vec<u64>,
}

impl Hist {
    /// Sparse copy of a dense histogram.
    pub fn from_dense(dense: &[u64]) -> Hist {
        let mut h = Hist::default();
        for (i, &c) in dense.iter().enumerate() {
            if c != 0 {
                h.bins.push(i as u32);
                h.counts.push(c);
            }
        }
        h
    }

    /// Adds this histogram into a dense one.
    pub fn add_to(&self, dense: &mut [u64]) {
        for (&b, &c) in self.bins.iter().zip(&self.counts) {
            if let Some(d) = dense.get_mut(b as usize) {
                *d += c;
            }
        }
    }

    pub fn get(&self, bin: u32) -> u64 {
        match self.bins.binary_search(&bin) {
            Ok(i) => self.counts[i],
            Err(_) => 0,
        }
    }
}

/// Statistics of a tensor, partial or reduced. What each field holds is the method's business;
/// `children` lets a method compose helpers (a selection, a set of sums) without sharing slots.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stats {
    pub sums: Vec<ExactSum>,
    pub hists: Vec<Hist>,
    pub values: Vec<f64>,
    pub counts: Vec<u64>,
    pub children: Vec<Stats>,
}

impl Stats {
    pub fn child(&self, i: usize) -> &Stats {
        static EMPTY: Stats = Stats {
            sums: Vec::new(),
            hists: Vec::new(),
            values: Vec::new(),
            counts: Vec::new(),
            children: Vec::new(),
        };
        self.children.get(i).unwrap_or(&EMPTY)
    }

    pub fn to_proto(&self) -> pb::StatsBlob {
        pb::StatsBlob {
            sums: self
                .sums
                .iter()
                .map(|s| {
                    let mut p = pb::ExactSumProto::default();
                    for &(e, m) in s.buckets() {
                        p.exponents.push(e);
                        p.hi.push((m >> 64) as i64);
                        p.lo.push(m as u64);
                    }
                    if let Some(v) = s.non_finite() {
                        // a non-finite sum travels as a bucket with exponent i32::MAX
                        p.exponents.push(i32::MAX);
                        p.hi.push(0);
                        p.lo.push(v.to_bits());
                    }
                    p
                })
                .collect(),
            hists: self
                .hists
                .iter()
                .map(|h| pb::HistogramProto {
                    bins: h.bins.clone(),
                    counts: h.counts.clone(),
                })
                .collect(),
            values: self.values.clone(),
            counts: self.counts.clone(),
            children: self.children.iter().map(Stats::to_proto).collect(),
        }
    }

    pub fn from_proto(p: &pb::StatsBlob) -> Stats {
        Stats {
            sums: p
                .sums
                .iter()
                .map(|s| {
                    let mut buckets = Vec::new();
                    let mut non_finite = None;
                    for ((&e, &hi), &lo) in s.exponents.iter().zip(&s.hi).zip(&s.lo) {
                        if e == i32::MAX {
                            non_finite = Some(f64::from_bits(lo));
                        } else {
                            buckets.push((e, ((hi as i128) << 64) | lo as i128));
                        }
                    }
                    ExactSum::from_buckets(buckets, non_finite)
                })
                .collect(),
            hists: p
                .hists
                .iter()
                .map(|h| Hist {
                    bins: h.bins.clone(),
                    counts: h.counts.clone(),
                })
                .collect(),
            values: p.values.clone(),
            counts: p.counts.clone(),
            children: p.children.iter().map(Stats::from_proto).collect(),
        }
    }
}

/// Element-wise merge of partial sums: `out.sums[i] += p.sums[i]` over all partials.
pub fn merge_sums(partials: &[Stats]) -> Vec<ExactSum> {
    let mut out: Vec<ExactSum> = Vec::new();
    for p in partials {
        if out.len() < p.sums.len() {
            out.resize(p.sums.len(), ExactSum::new());
        }
        for (o, s) in out.iter_mut().zip(&p.sums) {
            o.merge(s);
        }
    }
    out
}

/// Partial Gram matrix of `n` vectors of `len` elements: exact sums of xᵢ·xⱼ for i ≤ j,
/// upper triangle in row order (`n(n+1)/2` sums). `x(i, e)` is element `e` of vector `i`.
/// The vectors are taken a chunk at a time, each pair's products summed by a [`DotSum`].
pub fn gram_upper(n: usize, len: usize, x: impl Fn(usize, usize) -> f32) -> Stats {
    const CHUNK: usize = 1024;
    let mut sums: Vec<DotSum> = (0..n * (n + 1) / 2).map(|_| DotSum::new()).collect();
    let mut v = vec![0f32; n * CHUNK];
    for at in (0..len).step_by(CHUNK) {
        let m = CHUNK.min(len - at);
        for (i, vi) in v.chunks_exact_mut(CHUNK).enumerate() {
            for (e, ve) in vi[..m].iter_mut().enumerate() {
                *ve = x(i, at + e);
            }
        }
        let mut k = 0;
        for i in 0..n {
            for j in i..n {
                sums[k].add_products(&v[i * CHUNK..][..m], &v[j * CHUNK..][..m]);
                k += 1;
            }
        }
    }
    Stats {
        sums: sums.into_iter().map(DotSum::finish).collect(),
        ..Default::default()
    }
}

/// The usual one-pass reduction: merge every range's exact sums and keep their values.
pub fn sum_values(partials: &[Stats]) -> Stats {
    Stats {
        values: merge_sums(partials).iter().map(ExactSum::value).collect(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proto_roundtrip() {
        let mut s = ExactSum::new();
        s.add_all([1.5, -2.25e-30, 7e100]);
        let mut inf = ExactSum::new();
        inf.add(f64::NEG_INFINITY);
        let st = Stats {
            sums: vec![s, inf],
            hists: vec![Hist::from_dense(&[0, 3, 0, 9])],
            values: vec![0.5],
            counts: vec![1, 2],
            children: vec![Stats {
                counts: vec![9],
                ..Default::default()
            }],
        };
        let back = Stats::from_proto(&st.to_proto());
        assert_eq!(back.sums[0].value(), st.sums[0].value());
        assert_eq!(back.sums[1].value(), f64::NEG_INFINITY);
        assert_eq!(back.hists, st.hists);
        assert_eq!(back.children, st.children);
        assert_eq!(back.hists[0].get(3), 9);
    }
}
