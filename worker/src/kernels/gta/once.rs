//! A whole tensor from its inputs as stored in one walk, where its statistics are magnitude
//! selections alone (ties, breadcrumbs*): the mix runs while the selection is still being
//! counted ([`select::Brackets`]). A sample brackets each rank boundary between two keys; the
//! walk mixes every element with the verdicts the brackets already give, and notes the
//! elements with a key inside one. Once the walk has located the boundaries, those elements
//! (a few percent) are mixed again with the exact verdicts. Every step of the mix works on one
//! element at a time, so mixing an element among others gives it the bits it gets in place,
//! and the boundaries are the radix passes': the output is [`super::stored`]'s, bit for bit,
//! for one walk over the inputs instead of two or three.

use std::cell::OnceCell;

use super::stored::{sampled, Deltas};
use super::*;

impl Gta {
    /// `out` from `t` in one walk; false (with `out` partly written) where it does not apply,
    /// the sample (taken into `sample` where there is none) puts more than `try_share` of the
    /// elements inside the brackets ([`select::TRY_SHARE`]) or misled, and the radix passes
    /// must locate the boundaries.
    pub(super) fn whole_in_one_walk(
        &self,
        plan: &Plan,
        ctx: &TensorCtx,
        t: &Deltas,
        out: &mut [f32],
        (sample, try_share): (&OnceCell<select::Sample>, f64),
    ) -> KResult<bool> {
        let n = out.len();
        let windows_only = plan
            .keep
            .iter()
            .all(|k| matches!(k, Keep::Window { .. } | Keep::All | Keep::Nothing));
        if plan.l1_passes > 0 || !windows_only || n < 16 * CHUNK || u32::try_from(n).is_err() {
            return Ok(false);
        }
        let sample = sampled(sample, plan, t);
        let Some(br) = select::Brackets::new(&plan.ranks, n as u64, sample, try_share) else {
            return Ok(false);
        };
        SCRATCH.with_borrow_mut(|s| {
            s.again.clear();
            s.bufs.resize_with(t.models.len() + 1, Vec::new);
            s.bufs.iter_mut().for_each(Vec::clear);
            s.mixed.clear();
            // room for the most elements the walk notes, taken once (growing by doubling
            // would hold the old and the new buffer at once); pages only as they are written
            let most = n / NOTED_SHARE + CHUNK;
            s.again.reserve(most);
            s.bufs.iter_mut().for_each(|b| b.reserve(2 * most));
            s.mixed.reserve(most);
            let r = self.walk(plan, ctx, (t, out), br, s);
            // a thread keeps the buffers of layer-sized tensors (fresh pages for each cost
            // page faults), not those of an embedding: every thread of the pool would
            let bufs: usize = s.bufs.iter().map(Vec::capacity).sum();
            let kept = 4 * (s.again.capacity() + s.mixed.capacity()) + bufs;
            if kept > KEEP_SCRATCH {
                *s = Scratch::default();
            }
            r
        })
    }

    /// [`Gta::whole_in_one_walk`] with its brackets, in working space `s` (empty).
    fn walk(
        &self,
        plan: &Plan,
        ctx: &TensorCtx,
        (t, out): (&Deltas, &mut [f32]),
        mut br: select::Brackets,
        s: &mut Scratch,
    ) -> KResult<bool> {
        let problem: Vec<Option<usize>> = (plan.keep.iter())
            .map(|k| match k {
                Keep::Window { sel, .. } => Some(*sel),
                _ => None,
            })
            .collect();
        let mut sparse = sparse_each(plan, ctx, &br.provisional())?;
        let (mut d, mut b, mut ks) = ([0f32; CHUNK], [0f32; CHUNK], [0u32; CHUNK]);
        // the elements with a key in a bracket, in element order (the exact windows count
        // the ties of each boundary in that order, and every tie is among them), and their
        // inputs as stored, copied while the chunk is in cache
        let Scratch { again, bufs, .. } = s;
        let mut here = Vec::with_capacity(CHUNK);
        let mut mask = [0u64; CHUNK / 64];
        let last = t.models.len().saturating_sub(1);
        let (cap, mut over) = (out.len() / NOTED_SHARE, false);
        self.mix_chunks(
            plan,
            &unscaled(t),
            Base::Stored(t.base),
            out,
            |j, at, dst| {
                let delta = t.chunk(j, at, &mut d[..dst.len()], &mut b);
                if let Some(p) = problem[j] {
                    let k = &mut ks[..delta.len()];
                    select::keys_into(delta, k);
                    // (at < n, which fits a u32)
                    br.see(p, at as u32, k, &mut mask);
                }
                sparse[j].sparsify_from(at, delta, dst);
                if j == last && !br.gave_up() && !over {
                    here.clear();
                    set_bits(&mask, at as u32, &mut here);
                    mask = [0; CHUNK / 64];
                    let inputs = std::iter::once(&t.base).chain(&t.models);
                    inputs
                        .zip(bufs.iter_mut())
                        .for_each(|(x, buf)| x.gather(&here, buf));
                    again.extend_from_slice(&here);
                    over = again.len() > cap;
                }
                if j == last {
                    (t.let_go)(at..at + dst.len());
                }
            },
        );
        if br.gave_up() || over {
            return Ok(false);
        }
        self.mix_again(plan, ctx, out, (t, &problem), br, s)
    }

    /// After the walk: the boundaries from the keys of the elements the walk noted, and
    /// those elements mixed again with them, into `out`; false where the sample misled.
    /// `t` holds the inputs, `problem` each model's selection problem.
    fn mix_again(
        &self,
        plan: &Plan,
        ctx: &TensorCtx,
        out: &mut [f32],
        (t, problem): (&Deltas, &[Option<usize>]),
        mut br: select::Brackets,
        s: &mut Scratch,
    ) -> KResult<bool> {
        let Scratch { again, bufs, mixed } = s;
        let (mut d, mut b, mut ks) = ([0f32; CHUNK], [0f32; CHUNK], [0u32; CHUNK]);
        let base = t.base.like(&bufs[0]);
        let models = (t.models.iter().zip(&bufs[1..]))
            .map(|(m, buf)| m.like(buf))
            .collect();
        let sub = Deltas {
            work: t.work,
            base,
            models,
            let_go: &|_| {},
        };
        for (j, p) in problem.iter().enumerate() {
            if let Some(p) = *p {
                sub.each(j, |_, dc| {
                    let k = &mut ks[..dc.len()];
                    select::keys_into(dc, k);
                    br.keys_at(p, k);
                });
            }
        }
        let Some(exact) = br.resolve() else {
            return Ok(false);
        };
        let mut sparse = sparse_each(plan, ctx, &exact)?;
        mixed.clear();
        mixed.resize(again.len(), 0.0);
        self.mix_chunks(
            plan,
            &unscaled(t),
            Base::Stored(base),
            mixed,
            |j, at, dst| {
                let delta = sub.chunk(j, at, &mut d[..dst.len()], &mut b);
                sparse[j].sparsify_from(at, delta, dst);
            },
        );
        for (&i, &v) in again.iter().zip(mixed.iter()) {
            out[i as usize] = v;
        }
        Ok(true)
    }
}

/// No rescaling of any model (a method whose statistics are its selections alone).
fn unscaled(t: &Deltas) -> Vec<Option<f32>> {
    vec![None; t.models.len()]
}

/// Appends the positions of the bits set in `mask` to `out`, in order, from `at` for bit 0.
fn set_bits(mask: &[u64], at: u32, out: &mut Vec<u32>) {
    for (w, &bits) in mask.iter().enumerate() {
        let mut m = bits;
        while m != 0 {
            // (a position of an element of a tensor of at most u32::MAX elements)
            out.push(at + (w * 64) as u32 + m.trailing_zeros());
            m &= m - 1;
        }
    }
}

/// Working space of [`Gta::whole_in_one_walk`], kept between tensors on a thread: fresh
/// pages for each tensor's buffers cost more system time than the walk saves. It holds a few
/// percent of the largest whole tensor's elements (at most an eighth per model).
#[derive(Default)]
struct Scratch {
    /// The positions of the elements mixed again.
    again: Vec<u32>,
    /// Their inputs as stored: the base, then each model.
    bufs: Vec<Vec<u8>>,
    /// Their mix.
    mixed: Vec<f32>,
}

/// The walk notes at most one element in this many (else the radix passes run): its working
/// space is then at most `(8 + 2 * inputs) / NOTED_SHARE` bytes an element (a position, each
/// input's 2 bytes, the mix again), which is what the planner charges for it.
pub const NOTED_SHARE: usize = 8;

/// The most bytes of working space a thread keeps between tensors.
const KEEP_SCRATCH: usize = 64 << 20;

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

/// Each model's sparsification over the whole tensor, with the selection state `sel`.
fn sparse_each(plan: &Plan, ctx: &TensorCtx, sel: &Stats) -> KResult<Vec<Sparse>> {
    let whole = RowRange {
        start: 0,
        end: ctx.rows,
        index: 0,
    };
    (0..plan.others.len())
        .map(|j| Sparse::new(plan, ctx, sel, whole, &[], j))
        .collect()
}
