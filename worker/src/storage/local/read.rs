//! Reading byte ranges of an open local file.

use std::fs::File;
use std::ops::Range;

use super::super::{SResult, StorageError};
use super::io_err;

pub(super) fn read_err(path: &str, end: u64, e: std::io::Error) -> StorageError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        StorageError::new(
            format!("{path}: file ends before byte {end} (truncated?)"),
            false,
        )
    } else {
        io_err(path, "read", e)
    }
}

/// Reads exactly `range` of an open file.
pub(crate) fn read_exact_range(f: &File, path: &str, range: Range<u64>) -> SResult<Vec<u8>> {
    read_exact_range_into(f, path, range, Vec::new())
}

/// `read_exact_range` into `buf`, replacing its contents.
pub(crate) fn read_exact_range_into(
    f: &File,
    path: &str,
    range: Range<u64>,
    mut buf: Vec<u8>,
) -> SResult<Vec<u8>> {
    let len = usize::try_from(range.end.saturating_sub(range.start))
        .map_err(|_| StorageError::new(format!("{path}: read too large"), false))?;
    // read into the buffer's spare capacity: a reused buffer's length follows the last read,
    // so initialising its growth first wrote most reads' bytes twice
    buf.clear();
    buf.reserve(len);
    pread_exact(f, &mut buf.spare_capacity_mut()[..len], range.start)
        .map_err(|e| read_err(path, range.end, e))?;
    // SAFETY: `pread_exact` returned Ok, so it wrote every one of the first `len` bytes of the
    // spare capacity (which `reserve` made at least `len` long); the buffer was cleared, so
    // those bytes are exactly elements `0..len`
    unsafe { buf.set_len(len) };
    Ok(buf)
}

/// Reads exactly `dst.len()` bytes of `f` from `offset` into `dst` (possibly uninitialised),
/// as `FileExt::read_exact_at` does into initialised memory: retried when interrupted, an
/// `UnexpectedEof` error when the file ends first.
fn pread_exact(
    f: &File,
    mut dst: &mut [std::mem::MaybeUninit<u8>],
    mut offset: u64,
) -> std::io::Result<()> {
    use std::io::{Error, ErrorKind};
    use std::os::fd::AsRawFd;
    while !dst.is_empty() {
        let at = libc::off_t::try_from(offset)
            .map_err(|_| Error::new(ErrorKind::InvalidInput, "offset past the largest file"))?;
        // SAFETY: `pread` writes at most `dst.len()` bytes to `dst`'s memory, which the
        // exclusive borrow keeps valid and unaliased for writes of that many bytes; it reads
        // none of it, so that the bytes are uninitialised does not matter; the descriptor is
        // `f`'s, open for as long as `f` is borrowed.
        let n = unsafe { libc::pread(f.as_raw_fd(), dst.as_mut_ptr().cast(), dst.len(), at) };
        match n {
            n if n < 0 => {
                let e = Error::last_os_error();
                if e.kind() != ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            0 => return Err(Error::new(ErrorKind::UnexpectedEof, "file ends early")),
            n => {
                // (`n` is at most `dst.len()`: pread writes no more than it is asked to)
                let n = n as usize;
                dst = &mut dst[n..];
                offset += n as u64;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod read_tests {
    use super::*;
    use std::fs;

    /// Ranges read into one reused buffer (grown, shrunk, holding other bytes) give exactly
    /// the file's bytes; a range past the end is the truncation error, naming the file.
    #[test]
    fn reads_into_a_reused_buffer_are_exact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let want: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        fs::write(&path, &want).unwrap();
        let f = File::open(&path).unwrap();
        let p = path.to_str().unwrap();
        let mut buf = vec![0xee; 10];
        for (a, b) in [
            (0, 300_000),
            (5, 9),
            (100, 200_100),
            (299_999, 300_000),
            (7, 7),
        ] {
            buf = read_exact_range_into(&f, p, a..b, buf).unwrap();
            assert_eq!(&buf[..], &want[a as usize..b as usize], "{a}..{b}");
        }
        let e = read_exact_range_into(&f, p, 299_000..300_001, buf).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
    }
}
