//! The buffers a task slot reuses from one task to the next, and the helpers that hand them
//! out without copying or holding two at once.

/// The large buffers of one task slot, reused from one task to the next: the inputs decoded to
/// f32, the computed rows and the encoded output bytes.
///
/// Allocating them afresh for every task costs a page fault per 4 KiB when the allocator maps
/// them from the system, and when it keeps freed memory instead, glibc's per-thread arenas each
/// keep their own, so a worker's resident memory grew with the number of tasks it had run.
/// Reused, they stay within what one task needs: the planner cuts tasks to the slot's memory,
/// and buffers over `keep` bytes in all are let go after a task.
#[derive(Debug, Default)]
pub struct Scratch {
    pub(super) inputs: Vec<Vec<f32>>,
    /// Raw bytes of each input's current read piece.
    pub(super) pieces: Vec<Vec<u8>>,
    pub(super) out: Vec<f32>,
    pub(super) bytes: Vec<u8>,
    /// A sweep's points run together (exec/group.rs): each point's computed rows, and the
    /// output bytes of every point but the first (which uses `bytes`).
    pub(super) points: Vec<Vec<f32>>,
    pub(super) point_bytes: Vec<Vec<u8>>,
    keep: u64,
}

impl Scratch {
    /// Buffers for a slot that keeps at most `keep` bytes between tasks.
    pub fn new(keep: u64) -> Self {
        Scratch {
            keep,
            ..Default::default()
        }
    }

    /// Bytes held now.
    pub fn held(&self) -> u64 {
        let f = std::mem::size_of::<f32>();
        let inputs: usize = self.inputs.iter().map(|v| v.capacity() * f).sum();
        let pieces: usize = self.pieces.iter().map(Vec::capacity).sum();
        let points: usize = self.points.iter().map(|v| v.capacity() * f).sum();
        let point_bytes: usize = self.point_bytes.iter().map(Vec::capacity).sum();
        let one = self.out.capacity() * f + self.bytes.capacity();
        (inputs + pieces + one + points + point_bytes) as u64
    }

    /// Lets everything go when more than `keep` bytes are held.
    pub(super) fn trim(&mut self) {
        if self.held() > self.keep {
            *self = Scratch::new(self.keep);
        }
    }

    /// Input buffer `i` and its read buffer, for the caller to fill.
    pub(super) fn input(&mut self, i: usize) -> (Vec<f32>, Vec<u8>) {
        (
            self.inputs
                .get_mut(i)
                .map(std::mem::take)
                .unwrap_or_default(),
            self.piece(i),
        )
    }

    /// Input `i`'s read buffer, for the caller to fill.
    pub(super) fn piece(&mut self, i: usize) -> Vec<u8> {
        self.pieces
            .get_mut(i)
            .map(std::mem::take)
            .unwrap_or_default()
    }
}

/// Hands memory the allocator keeps but nothing uses back to the system: freed small
/// allocations stay in glibc's arenas otherwise, so a worker that ran thousands of tasks, or a
/// coordinator that dropped a large job, kept hundreds of megabytes while idle.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` walks glibc's own arenas under their locks and returns unused pages
    // to the system; it reads no memory of ours and leaves every live allocation where it is.
    // Its argument is a plain integer (the padding to keep) and its result only says whether
    // anything was returned.
    unsafe {
        libc::malloc_trim(0);
    }
}

impl Scratch {
    /// The output byte buffers of `n` tasks computed together (a sweep's points): `bytes` and
    /// `n - 1` of the kept point buffers (empty ones where too few are kept).
    pub(super) fn output_buffers(&mut self, n: usize) -> Vec<Vec<u8>> {
        let mut bufs = vec![std::mem::take(&mut self.bytes)];
        bufs.extend((1..n).map(|_| self.point_bytes.pop().unwrap_or_default()));
        bufs
    }

    /// Keeps the output buffers the stores handed back, for the slot's next tasks
    /// (`Scratch::output_buffers`).
    pub fn keep_outputs(&mut self, mut bufs: Vec<Vec<u8>>) {
        bufs.retain(|b| b.capacity() > 0);
        self.bytes = bufs.pop().unwrap_or_default();
        self.point_bytes.append(&mut bufs);
    }
}

/// Puts buffers back into their places in `slots`.
pub(super) fn give_back<T>(slots: &mut Vec<Vec<T>>, bufs: Vec<Vec<T>>) {
    if slots.len() < bufs.len() {
        slots.resize_with(bufs.len(), Vec::new);
    }
    for (slot, v) in slots.iter_mut().zip(bufs) {
        *slot = v;
    }
}

/// `v`, or an empty buffer in its place when it has no room for `n` elements: replaced rather
/// than grown, which would copy its old contents, and dropped first, so both are never held.
fn with_room<T>(v: Vec<T>, n: usize) -> Vec<T> {
    if v.capacity() < n {
        drop(v);
        return Vec::with_capacity(n);
    }
    v
}

/// `v` emptied, with room for `n` elements.
pub(super) fn emptied<T>(v: Vec<T>, n: usize) -> Vec<T> {
    let mut v = with_room(v, n);
    v.clear();
    v
}

/// `v` holding `n` elements, for a caller that overwrites every one: what it held stays (no
/// fill), only growth past its length is zeroed.
pub(super) fn sized<T: Copy + Default>(v: Vec<T>, n: usize) -> Vec<T> {
    let mut v = with_room(v, n);
    v.truncate(n);
    v.resize(n, T::default());
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_keeps_buffers_up_to_its_limit() {
        let mut s = Scratch::new(1 << 20);
        give_back(
            &mut s.inputs,
            vec![Vec::with_capacity(1000), Vec::with_capacity(2000)],
        );
        s.trim();
        assert_eq!(s.held(), 12_000);
        let (v, piece) = s.input(1);
        assert_eq!((v.capacity(), piece.capacity()), (2000, 0));
        give_back(&mut s.inputs, vec![Vec::new(), Vec::with_capacity(1 << 20)]);
        s.trim();
        assert_eq!(s.held(), 0, "over the limit: everything let go");
    }

    /// A group of `n` writes gets back the `n` buffers the last one kept: none is dropped
    /// and made again (a group once took `n` kept buffers and dropped one of them, so every
    /// sweep task allocated and page-faulted a fresh output buffer).
    #[test]
    fn output_buffers_come_back_to_the_next_group() {
        let mut s = Scratch::new(1 << 30);
        let bufs: Vec<Vec<u8>> = (1..=5).map(|k| vec![0u8; k * 100]).collect();
        let mut ptrs: Vec<*const u8> = bufs.iter().map(|b| b.as_ptr()).collect();
        s.keep_outputs(bufs);
        for _ in 0..3 {
            let got = s.output_buffers(5);
            let mut now: Vec<*const u8> = got.iter().map(|b| b.as_ptr()).collect();
            assert!(
                got.iter().all(|b| b.capacity() > 0),
                "a kept buffer was dropped"
            );
            ptrs.sort();
            now.sort();
            assert_eq!(now, ptrs, "the same allocations");
            s.keep_outputs(got);
        }
        assert_eq!(s.output_buffers(2).len(), 2);
    }

    #[test]
    fn emptied_reuses_or_replaces() {
        let v = emptied(vec![1u8, 2, 3], 2);
        assert!(v.is_empty() && v.capacity() >= 3);
        let v = emptied(v, 100);
        assert!(v.is_empty() && v.capacity() >= 100);
    }

    #[test]
    fn sized_keeps_contents_and_zeroes_growth() {
        let mut v = Vec::with_capacity(10);
        v.extend_from_slice(&[7u8, 8, 9]);
        let p = v.as_ptr();
        let v = sized(v, 2);
        assert_eq!(v, [7, 8]);
        let v = sized(v, 5);
        assert_eq!((v.as_slice(), v.as_ptr()), (&[7u8, 8, 0, 0, 0][..], p));
        let v = sized(v, 64);
        assert_eq!(v, vec![0u8; 64]);
    }
}
