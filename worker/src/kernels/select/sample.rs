//! A sample of each selection problem's keys, kept as counts of their high 16 bits: what
//! [`super::Capture`] and [`super::Brackets`] guess their key ranges from (taken once per
//! tensor when the one walk declines and the capture then tries).

use super::{KeySource, BINS};

pub struct Sample {
    /// Per problem: the sampled keys counted by high bucket, and how many there were.
    problems: Vec<(Vec<u32>, u64)>,
}

impl Sample {
    /// The keys `sample(p, f)` gives `f` for each of `problems` problems (every element of
    /// problem `p` equally likely to be among them).
    pub fn new(problems: usize, sample: &mut KeySource) -> Sample {
        let problems = (0..problems)
            .map(|p| {
                let mut dense = vec![0u32; BINS];
                let mut sn = 0u64;
                sample(p, &mut |ks| {
                    sn += ks.len() as u64;
                    ks.iter().for_each(|&k| dense[(k >> 16) as usize] += 1);
                });
                (dense, sn)
            })
            .collect();
        Sample { problems }
    }

    /// Problem `p`'s counts by high bucket, and its number of sampled keys (none for a
    /// problem past those sampled).
    pub(super) fn problem(&self, p: usize) -> (&[u32], u64) {
        self.problems
            .get(p)
            .map_or((&[], 0), |(d, n)| (d.as_slice(), *n))
    }
}
