//! A local file's byte range mapped into memory ([`PositionedRead::map`]): a whole tensor that
//! a statistics method walks several times is read from the page cache in place instead of
//! copied into a buffer first. The copy cost a sixth of a TIES merge's CPU time, and the
//! buffer as much memory as the inputs: mapped, a tensor's inputs take page cache, which the
//! system reclaims as it needs, instead of the slot's memory.
//!
//! [`PositionedRead::map`]: super::super::PositionedRead::map

use std::fs::File;
use std::ops::{Deref, Range};

use memmap2::{Advice, Mmap, MmapOptions, UncheckedAdvice};

use super::super::{SResult, StorageError};

/// Bytes of a file, mapped read-only. Derefs to them.
#[derive(Debug)]
pub struct Mapped {
    map: Mmap,
}

impl Deref for Mapped {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.map
    }
}

impl Mapped {
    /// Bytes `range` of `file` (at `path`, for messages), mapped; None where the range is
    /// empty (nothing to map). An error when the file is shorter than the range (a truncated
    /// checkpoint: read, it would fail the same way) or the system refuses the mapping.
    pub(super) fn new(file: &File, path: &str, range: Range<u64>) -> SResult<Option<Mapped>> {
        let len = range.end.saturating_sub(range.start);
        if len == 0 {
            return Ok(None);
        }
        let size = file
            .metadata()
            .map_err(|e| StorageError::new(format!("{path}: stat: {e}"), false))?
            .len();
        if range.end > size {
            return Err(StorageError::new(
                format!(
                    "{path}: bytes {}..{} lie past its end ({size} bytes): the file is truncated",
                    range.start, range.end
                ),
                false,
            ));
        }
        let len = usize::try_from(len)
            .map_err(|_| StorageError::new(format!("{path}: a range too large to map"), false))?;
        // SAFETY: a read-only shared mapping of `len` bytes that lie inside the file (checked
        // just above), which memmap2 unmaps when `Mapped` is dropped; the slice it derefs to
        // lives no longer than the mapping. Rust requires the bytes not to change while they
        // are borrowed: shardmerge opens inputs read-only and never writes a file it reads (the
        // planner refuses an output that is one of the inputs), and every bit pattern is a valid
        // `u8`, so nothing the kernels do depends on the bytes for memory safety (they index by
        // lengths, not by values). What no reader can prevent is another process truncating or
        // rewriting a checkpoint mid-merge: a truncation then ends the worker with SIGBUS
        // instead of a read error, and a rewrite gives mixed values, as a read would have.
        let map = unsafe { MmapOptions::new().offset(range.start).len(len).map(file) }
            .map_err(|e| StorageError::new(format!("{path}: map: {e}"), false))?;
        // read front to back, once or a few times: read ahead
        let _ = map.advise(Advice::Sequential);
        Ok(Some(Mapped { map }))
    }

    /// Lets the system take back this process's pages of bytes `range` (page cache stays page
    /// cache; they are no longer counted in its resident set): for bytes read once and not
    /// soon again. Reading them again maps the file's pages again. Best effort.
    pub fn release(&self, range: Range<usize>) {
        let Some(len) = range.end.min(self.map.len()).checked_sub(range.start) else {
            return;
        };
        if len == 0 {
            return;
        }
        // SAFETY: MADV_DONTNEED on part of a shared, read-only mapping of a file only drops
        // this process's page-table entries for it: the next access maps the file's page again,
        // with the same bytes (nothing was written through the mapping, and a shared mapping
        // has no private copies to lose), so every live borrow of these bytes still reads what
        // it read before. The range lies inside the mapping (clamped above).
        let _ = unsafe {
            self.map
                .unchecked_advise_range(UncheckedAdvice::DontNeed, range.start, len)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A mapped range holds the file's bytes, at any offset (not only page-aligned ones);
    /// after its pages are let go it reads the same bytes again; an empty range maps nothing;
    /// a range past the end is the error a read would give, not a mapping that would end the
    /// process with SIGBUS when touched.
    #[test]
    fn maps_any_range_and_refuses_one_past_the_end() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let bytes: Vec<u8> = (0..3 * 4096 + 123).map(|i| (i * 7 % 251) as u8).collect();
        f.write_all(&bytes).unwrap();
        let file = f.reopen().unwrap();
        let n = bytes.len() as u64;
        for (a, b) in [(0, n), (1, n - 1), (4095, 8193), (4096, 4100), (n - 1, n)] {
            let m = Mapped::new(&file, "f", a..b).unwrap().unwrap();
            assert_eq!(&m[..], &bytes[a as usize..b as usize], "{a}..{b}");
            m.release(0..m.len() / 2);
            let (hi, lo) = (3, 2);
            m.release(hi..lo);
            m.release(0..usize::MAX);
            assert_eq!(
                &m[..],
                &bytes[a as usize..b as usize],
                "{a}..{b} after release"
            );
        }
        assert!(Mapped::new(&file, "f", 5..5).unwrap().is_none());
        let e = Mapped::new(&file, "f", 10..n + 1).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
    }
}
