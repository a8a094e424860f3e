//! Positioned writes of an output part that bypass the page cache where they can.
//!
//! A buffered write copies every byte into freshly allocated page-cache pages, and the fsync
//! that ends the file then waits for all of them: on the bench machine writing and fsyncing
//! 1.5 GB that way took 1.9-4.7 s and 1.3-4 s of kernel CPU, against 1.0 s and 0.1 s with
//! `O_DIRECT` (`dd`, 4 MiB blocks). A part's middle, from its first to its last 4 KiB
//! boundary in the file, is written with `O_DIRECT` from an aligned copy; its ragged ends
//! (shared with the neighbouring parts' blocks) are written through the page cache, which the
//! fsync at the end of the file flushes as before. Where the filesystem refuses `O_DIRECT`
//! (tmpfs, some network filesystems) or the write's alignment, the middle is written through
//! the page cache too: the bytes in the file are the same either way.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use super::{io_err, SResult};

/// File offsets and memory addresses of direct writes are multiples of this (the largest
/// logical block size of common devices, so every smaller one divides it).
const ALIGN: u64 = 4096;

/// Parts whose aligned middle is shorter than this are written through the page cache alone
/// (a second open and a copy cost more than they save).
const DIRECT_MIN: u64 = 256 << 10;

/// Aligned copies kept for the next parts: at most as many as direct writes were ever in
/// flight at once ([`PEAK`]; a worker's slots, times the points of a sweep group, whose parts
/// are written together), so that the writes of the next groups copy into buffers already
/// mapped instead of each faulting in a fresh one.
static BOUNCES: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
/// Direct writes in flight now, and the most that ever were.
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// The most bytes one aligned copy holds (a multiple of [`ALIGN`]).
const BOUNCE: usize = 8 << 20;

/// The aligned middle `[a, b)` of the file range `[offset, offset + len)` (empty: a == b).
pub(super) fn middle(offset: u64, len: u64) -> (u64, u64) {
    let end = offset + len;
    let a = offset.div_ceil(ALIGN) * ALIGN;
    let b = end / ALIGN * ALIGN;
    if b > a {
        (a, b)
    } else {
        (offset, offset)
    }
}

/// Writes `data` at `offset` of the file `tmp` (open for writing as `f`): the aligned middle
/// directly when it is large enough and the filesystem allows it, the rest through `f`.
/// Returns whether a large middle went through the page cache (refused), for the caller to
/// start writing it back. A small part's bytes are left to the fsync that ends the file, which
/// writes neighbouring parts back together: started part by part, each was an I/O request of
/// its own (10,000 parts of 8 KiB: 10,000 requests).
pub(super) fn write_part_at(f: &File, tmp: &str, data: &[u8], offset: u64) -> SResult<bool> {
    let (a, b) = middle(offset, data.len() as u64);
    if b - a < DIRECT_MIN {
        buffered(f, tmp, data, offset)?;
        return Ok(false);
    }
    let (head, rest) = data.split_at((a - offset) as usize);
    let (mid, tail) = rest.split_at((b - a) as usize);
    buffered(f, tmp, head, offset)?;
    buffered(f, tmp, tail, b)?;
    if direct(tmp, mid, a).is_err() {
        // refused (EINVAL on open or write, ENOTSUP...): the same bytes, buffered
        buffered(f, tmp, mid, a)?;
        return Ok(true);
    }
    Ok(false)
}

fn buffered(f: &File, tmp: &str, data: &[u8], offset: u64) -> SResult<()> {
    if data.is_empty() {
        return Ok(());
    }
    f.write_all_at(data, offset)
        .map_err(|e| io_err(tmp, "write", e))
}

/// `mid` (a multiple of ALIGN long) at `at` (a multiple of ALIGN) through an `O_DIRECT`
/// handle, from an ALIGN-aligned copy of at most [`BOUNCE`] bytes at a time (a whole part's
/// copy took as much memory again as a 131 MB embedding's part, and the spares kept it).
#[cfg(target_os = "linux")]
fn direct(tmp: &str, mid: &[u8], at: u64) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    #[cfg(test)]
    if tests::REFUSE.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    let d = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(tmp)?;
    let now = IN_FLIGHT.fetch_add(1, Ordering::Relaxed) + 1;
    PEAK.fetch_max(now, Ordering::Relaxed);
    let spare = BOUNCES.lock().ok().and_then(|mut v| v.pop());
    let mut b = spare.unwrap_or_default();
    let need = mid.len().min(BOUNCE) + ALIGN as usize;
    if b.len() < need {
        b = vec![0u8; need];
    }
    let pad = b.as_ptr().align_offset(ALIGN as usize);
    let mut res = Ok(());
    // (pieces of BOUNCE bytes, a multiple of ALIGN: each starts aligned in the file)
    for (k, piece) in mid.chunks(BOUNCE).enumerate() {
        res = match b.get_mut(pad..pad + piece.len()) {
            Some(buf) => {
                buf.copy_from_slice(piece);
                d.write_all_at(buf, at + (k * BOUNCE) as u64)
            }
            None => Err(std::io::Error::other("bounce buffer too short")),
        };
        if res.is_err() {
            break;
        }
    }
    if let Ok(mut v) = BOUNCES.lock() {
        if v.len() < PEAK.load(Ordering::Relaxed) {
            v.push(b);
        }
    }
    IN_FLIGHT.fetch_sub(1, Ordering::Relaxed);
    res
}

#[cfg(not(target_os = "linux"))]
fn direct(_tmp: &str, _mid: &[u8], _at: u64) -> std::io::Result<()> {
    Err(std::io::Error::other("O_DIRECT is Linux-only here"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Set: `direct` fails as a filesystem that refuses `O_DIRECT` would (EINVAL).
    pub(super) static REFUSE: AtomicBool = AtomicBool::new(false);

    #[test]
    fn middles_are_aligned_and_inside() {
        assert_eq!(middle(0, 8192), (0, 8192));
        assert_eq!(middle(1, 8192), (4096, 8192));
        assert_eq!(middle(100, 10), (100, 100));
        assert_eq!(middle(4095, 4098), (4096, 8192));
        assert_eq!(middle(4097, 4094), (4097, 4097));
    }

    /// Parts written side by side, each with ragged ends and a direct middle, give exactly the
    /// bytes written (whether or not the filesystem under the temporary folder takes
    /// `O_DIRECT`: tmpfs does not, and the fallback must give the same file).
    #[test]
    fn parts_with_ragged_ends_give_the_bytes_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let tmp = path.to_str().unwrap();
        write_parts(&path, tmp);
    }

    /// Where `O_DIRECT` is refused, every byte goes through the page cache: the same file,
    /// and the parts with a large middle say so (to be written back); small parts never do
    /// (the file's fsync writes them back together).
    #[test]
    fn refused_direct_writes_fall_back_to_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let tmp = path.to_str().unwrap();
        REFUSE.store(true, Ordering::Relaxed);
        let parts = write_parts(&path, tmp);
        REFUSE.store(false, Ordering::Relaxed);
        assert!(parts.iter().all(|&(b, large)| b == large), "{parts:?}");
        assert!(
            parts.iter().any(|&(_, large)| !large),
            "a small part is tried"
        );
    }

    /// Writes five parts with ragged ends, last first (one with a middle of more than one
    /// aligned copy); for each, whether it asked to be written back and whether its aligned
    /// middle is large enough to be written directly.
    fn write_parts(path: &std::path::Path, tmp: &str) -> Vec<(bool, bool)> {
        let long = 2 * DIRECT_MIN as usize + 1 + BOUNCE + 9_000;
        let total = long + DIRECT_MIN as usize + 12_345;
        let f = File::create(path).unwrap();
        f.set_len(total as u64).unwrap();
        let want: Vec<u8> = (0..total).map(|i| (i * 31 % 251) as u8).collect();
        // cuts at odd offsets: every part has a ragged head and tail
        let cuts = [
            0,
            777,
            DIRECT_MIN as usize + 5000,
            2 * DIRECT_MIN as usize + 1,
            long,
            total,
        ];
        let mut buffered = Vec::new();
        for w in cuts.windows(2).rev() {
            let g = OpenOptions::new().write(true).open(path).unwrap();
            let (a, b) = middle(w[0] as u64, (w[1] - w[0]) as u64);
            let back = write_part_at(&g, tmp, &want[w[0]..w[1]], w[0] as u64).unwrap();
            buffered.push((back, b - a >= DIRECT_MIN));
        }
        assert_eq!(std::fs::read(path).unwrap(), want);
        buffered
    }
}
