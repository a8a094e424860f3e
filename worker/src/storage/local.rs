//! Local (or shared) filesystem: positioned reads, and output files preallocated under a
//! temporary name, filled by positioned writes (their aligned middles past the page cache:
//! `direct`), then fsynced and renamed into place.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;

use super::{PositionedRead, Receipt, SResult, Storage, StorageError, Upload};

mod read;
use read::read_err;
pub(crate) use read::{read_exact_range, read_exact_range_into};

mod direct;
mod map;
mod owned;
pub use map::Mapped;
pub use owned::OwnedDir;

#[derive(Debug, Default)]
pub struct LocalStorage {
    /// Open read handles, so range reads of one shard don't reopen it each time.
    readers: Mutex<HashMap<String, Arc<File>>>,
}

fn io_err(path: &str, what: &str, e: std::io::Error) -> StorageError {
    if e.kind() == std::io::ErrorKind::NotFound {
        StorageError::not_found(format!("{path}: {what}: no such file"))
    } else {
        let retryable = matches!(
            e.kind(),
            std::io::ErrorKind::Interrupted
                | std::io::ErrorKind::TimedOut
                | std::io::ErrorKind::WouldBlock
        );
        StorageError::new(format!("{path}: {what}: {e}"), retryable)
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> SResult<T> + Send + 'static,
) -> SResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StorageError::new(format!("I/O task failed: {e}"), true))?
}

/// Reads and writes of at most this many bytes run on the calling thread: handing one to the
/// blocking pool (a wake-up there and one back) costs more than a read or write of that size
/// in the page cache, and small tasks paid it on every input and part.
const INLINE_IO: u64 = 64 << 10;

/// [`blocking`] for an operation on `len` bytes: on the calling thread when it is small.
async fn blocking_sized<T: Send + 'static>(
    len: u64,
    f: impl FnOnce() -> SResult<T> + Send + 'static,
) -> SResult<T> {
    if len <= INLINE_IO {
        f()
    } else {
        blocking(f).await
    }
}

impl LocalStorage {
    pub fn new() -> Self {
        Self::default()
    }

    fn reader(&self, path: &str) -> SResult<Arc<File>> {
        let mut r = self
            .readers
            .lock()
            .map_err(|_| StorageError::new("reader cache poisoned", false))?;
        if let Some(f) = r.get(path) {
            return Ok(f.clone());
        }
        let f = Arc::new(File::open(path).map_err(|e| io_err(path, "open", e))?);
        if r.len() > 256 {
            r.clear();
        }
        r.insert(path.to_string(), f.clone());
        Ok(f)
    }

    fn temp_path(path: &str) -> String {
        format!("{path}.partial")
    }
}

/// An exclusive `flock` on `f`, without waiting (std's `File::try_lock` is newer than this
/// crate's minimum Rust version).
pub fn try_lock(f: &std::fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor `f` owns and keeps open for the call; it reads or writes
    // no memory of ours. The lock lives with the open file description, so it lasts as long
    // as `f` (released when `f` is closed, or when the process dies).
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// An open input file's positioned reads ([`Storage::positioned`]).
struct Positioned {
    file: Arc<File>,
    path: String,
}

impl PositionedRead for Positioned {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> SResult<()> {
        let end = offset + buf.len() as u64;
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| read_err(&self.path, end, e))
    }

    fn map(&self, range: Range<u64>) -> SResult<Option<Mapped>> {
        Mapped::new(&self.file, &self.path, range)
    }

    fn will_need(&self, range: Range<u64>) {
        will_need(&self.file, range);
    }
}

/// `posix_fadvise(WILLNEED)` of bytes `range` of `f` (see [`PositionedRead::will_need`]).
#[cfg(target_os = "linux")]
fn will_need(f: &File, range: Range<u64>) {
    use std::os::fd::AsRawFd;
    let (Ok(at), Ok(n)) = (
        libc::off64_t::try_from(range.start),
        libc::off64_t::try_from(range.end.saturating_sub(range.start)),
    ) else {
        return;
    };
    // SAFETY: posix_fadvise on a descriptor `f` owns and keeps open for the call; it reads and
    // writes no memory of ours (it only asks the kernel to read the file's pages ahead).
    unsafe {
        libc::posix_fadvise64(f.as_raw_fd(), at, n, libc::POSIX_FADV_WILLNEED);
    }
}

#[cfg(not(target_os = "linux"))]
fn will_need(_f: &File, _range: Range<u64>) {}

/// Starts writing `len` bytes of `f` from `offset` back to the disk, without waiting for it:
/// the part's pages go to the disk while the job computes the next ones, and the fsync that
/// ends the file waits only for what is still in flight. (Left to the kernel, a file smaller
/// than its background dirty threshold, 10% of memory by default, is written only by that
/// fsync: seconds of waiting at the end of every merge.) Best effort: an error here is not
/// one of the write's; the fsync still reports any.
#[cfg(target_os = "linux")]
fn start_writeback(f: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(at), Ok(n)) = (
        libc::off64_t::try_from(offset),
        libc::off64_t::try_from(len),
    ) else {
        return;
    };
    // SAFETY: sync_file_range on a descriptor `f` owns and keeps open for the call; it reads
    // and writes no memory of ours (only the file's pages in the kernel).
    unsafe {
        libc::sync_file_range(f.as_raw_fd(), at, n, libc::SYNC_FILE_RANGE_WRITE);
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_f: &File, _offset: u64, _len: u64) {}

fn sync_dir(path: &str) {
    if let Some(dir) = Path::new(path).parent() {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

#[async_trait]
impl Storage for LocalStorage {
    fn scheme_root(&self) -> String {
        "file://".into()
    }

    fn is_local(&self) -> bool {
        true
    }

    fn positioned(&self, path: &str) -> Option<Arc<dyn PositionedRead>> {
        let file = self.reader(path).ok()?;
        Some(Arc::new(Positioned {
            file,
            path: path.to_string(),
        }))
    }

    async fn size(&self, path: &str) -> SResult<u64> {
        let p = path.to_string();
        blocking(move || {
            let m = fs::metadata(&p).map_err(|e| io_err(&p, "stat", e))?;
            if !m.is_file() {
                return Err(StorageError::not_found(format!("{p}: not a file")));
            }
            Ok(m.len())
        })
        .await
    }

    async fn exists(&self, path: &str) -> SResult<bool> {
        Ok(Path::new(path).exists())
    }

    async fn read_range(&self, path: &str, range: Range<u64>) -> SResult<Bytes> {
        let f = self.reader(path)?;
        let p = path.to_string();
        let len = range.end.saturating_sub(range.start);
        blocking_sized(len, move || {
            read_exact_range(&f, &p, range).map(Bytes::from)
        })
        .await
    }

    async fn read_range_into(
        &self,
        path: &str,
        range: Range<u64>,
        buf: Vec<u8>,
    ) -> SResult<Vec<u8>> {
        let f = self.reader(path)?;
        let p = path.to_string();
        let len = range.end.saturating_sub(range.start);
        blocking_sized(len, move || read_exact_range_into(&f, &p, range, buf)).await
    }

    async fn read_all(&self, path: &str) -> SResult<Bytes> {
        let p = path.to_string();
        blocking(move || {
            fs::read(&p)
                .map(Bytes::from)
                .map_err(|e| io_err(&p, "read", e))
        })
        .await
    }

    async fn put(&self, path: &str, data: Bytes) -> SResult<()> {
        let p = path.to_string();
        blocking(move || {
            if let Some(dir) = Path::new(&p).parent() {
                fs::create_dir_all(dir).map_err(|e| io_err(&p, "create folder", e))?;
            }
            let tmp = format!("{p}.tmp");
            let mut f = File::create(&tmp).map_err(|e| io_err(&tmp, "create", e))?;
            f.write_all(&data).map_err(|e| io_err(&tmp, "write", e))?;
            f.sync_all().map_err(|e| io_err(&tmp, "fsync", e))?;
            fs::rename(&tmp, &p).map_err(|e| io_err(&p, "rename", e))?;
            sync_dir(&p);
            Ok(())
        })
        .await
    }

    async fn list(&self, dir: &str) -> SResult<Vec<String>> {
        let d = dir.to_string();
        blocking(move || {
            let rd = fs::read_dir(&d).map_err(|e| io_err(&d, "list", e))?;
            let mut out = Vec::new();
            for e in rd.flatten() {
                if e.file_type().map(|t| t.is_file()).unwrap_or(false) {
                    out.push(e.file_name().to_string_lossy().into_owned());
                }
            }
            out.sort();
            Ok(out)
        })
        .await
    }

    async fn delete(&self, path: &str) -> SResult<()> {
        match fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(path, "delete", e)),
        }
    }

    async fn begin_upload(&self, path: &str, size: u64) -> SResult<Upload> {
        let p = path.to_string();
        let tmp = Self::temp_path(path);
        blocking(move || {
            if let Some(dir) = Path::new(&p).parent() {
                fs::create_dir_all(dir).map_err(|e| io_err(&p, "create folder", e))?;
            }
            let f = File::create(&tmp).map_err(|e| io_err(&tmp, "create", e))?;
            f.set_len(size)
                .map_err(|e| io_err(&tmp, "preallocate", e))?;
            Ok(Upload { path: p, id: tmp })
        })
        .await
    }

    async fn write_part(
        &self,
        upload: &Upload,
        part_index: u32,
        offset: u64,
        data: Bytes,
    ) -> SResult<Receipt> {
        let tmp = upload.id.clone();
        blocking_sized(data.len() as u64, move || {
            let f = OpenOptions::new()
                .write(true)
                .open(&tmp)
                .map_err(|e| io_err(&tmp, "open for writing", e))?;
            if direct::write_part_at(&f, &tmp, &data, offset)? {
                start_writeback(&f, offset, data.len() as u64);
            }
            Ok(Receipt {
                part_index,
                etag: String::new(),
                size: data.len() as u64,
                crc32c: crc32c::crc32c(&data),
            })
        })
        .await
    }

    /// The temporary file still has the length it was begun with (positioned writes past it
    /// would have grown it; a truncation would have shrunk it), and every part's receipt fits
    /// inside it.
    async fn check_upload(&self, upload: &Upload, parts: &[Receipt], size: u64) -> SResult<()> {
        let written: u64 = parts.iter().map(|p| p.size).sum();
        if written > size {
            return Err(StorageError::new(
                format!(
                    "{}: its parts' receipts add up to {written} bytes, more than the file's \
                     {size}",
                    upload.path
                ),
                false,
            ));
        }
        let len = self.size(&upload.id).await?;
        if len != size {
            return Err(StorageError::new(
                format!(
                    "{}: holds {len} bytes where {size} were planned (changed by something \
                     other than this job's workers?); submit the job again",
                    upload.id
                ),
                false,
            ));
        }
        let (tmp, parts) = (upload.id.clone(), parts.to_vec());
        blocking(move || unwritten_parts(&tmp, &parts)).await
    }

    async fn finish_upload(&self, upload: &Upload, _parts: &[Receipt]) -> SResult<()> {
        let up = upload.clone();
        blocking(move || {
            let f = OpenOptions::new()
                .write(true)
                .open(&up.id)
                .map_err(|e| io_err(&up.id, "open", e))?;
            f.sync_all().map_err(|e| io_err(&up.id, "fsync", e))?;
            fs::rename(&up.id, &up.path).map_err(|e| io_err(&up.path, "rename", e))?;
            sync_dir(&up.path);
            Ok(())
        })
        .await
    }

    async fn abort_upload(&self, upload: &Upload) -> SResult<()> {
        self.delete(&upload.id).await
    }
}

/// Every part was written: a part whose byte range holds a hole of the preallocated file (never
/// written, or only partly) is read back, and must then have the CRC-32C its receipt reports
/// (a part that is meant to be zeros may be a hole on some filesystems). `Err` names the first
/// part that does not; it is retryable: the file's tasks run again. Parts are in file order and
/// cover the file (header included) end to end.
pub(crate) fn unwritten_parts(tmp: &str, parts: &[Receipt]) -> SResult<()> {
    let f = File::open(tmp).map_err(|e| io_err(tmp, "open", e))?;
    let mut offset = 0u64;
    let mut buf = Vec::new();
    for p in parts {
        let end = offset + p.size;
        if p.size > 0 && first_hole(&f, offset).is_some_and(|h| h < end) {
            let crc = crc_of_range(&f, tmp, offset, end, &mut buf)?;
            if crc != p.crc32c {
                return Err(StorageError::new(
                    format!(
                        "{tmp}: part {} (bytes {offset}..{end}) was not written: storage holds \
                         bytes with CRC-32C {crc:08x}, its worker reported {:08x}",
                        p.part_index, p.crc32c
                    ),
                    true,
                ));
            }
        }
        offset = end;
    }
    Ok(())
}

/// The CRC-32C of bytes `[offset, end)` of `f`: its data read back, its holes (zeros) folded in
/// without reading them (a never-written 4 GiB file was 4 GiB of zeros copied and hashed).
fn crc_of_range(f: &File, tmp: &str, offset: u64, end: u64, buf: &mut Vec<u8>) -> SResult<u32> {
    let mut crc = 0u32;
    let mut at = offset;
    while at < end {
        // [at, data_end) is data (or of unknown kind: read), [data_end, zeros_end) a hole
        let data_end = first_hole(f, at).map_or(end, |h| h.clamp(at, end));
        while at < data_end {
            let n = (data_end - at).min(8 << 20) as usize;
            buf.resize(n, 0);
            f.read_exact_at(buf, at)
                .map_err(|e| io_err(tmp, "read back", e))?;
            crc = crc32c::crc32c_append(crc, buf);
            at += n as u64;
        }
        if at < end {
            let zeros_end = next_data(f, at).map_or(end, |d| d.clamp(at + 1, end));
            crc = crate::crc::append_zeros(crc, zeros_end - at);
            at = zeros_end;
        }
    }
    Ok(crc)
}

/// The first byte of data at or after `offset`; `None` when there is none (or the filesystem
/// cannot tell: then the rest is treated as the hole `first_hole` found).
#[cfg(target_os = "linux")]
fn next_data(f: &File, offset: u64) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let at = libc::off_t::try_from(offset).ok()?;
    // SAFETY: as in `first_hole`: lseek on a descriptor `f` keeps open, no memory of ours read.
    let r = unsafe { libc::lseek(f.as_raw_fd(), at, libc::SEEK_DATA) };
    u64::try_from(r).ok()
}

#[cfg(not(target_os = "linux"))]
fn next_data(_f: &File, _offset: u64) -> Option<u64> {
    None
}

/// The first hole at or after `offset` (the end of the file counts as one); `None` where the
/// filesystem cannot tell (then every part counts as written, as before).
#[cfg(target_os = "linux")]
fn first_hole(f: &File, offset: u64) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let at = libc::off_t::try_from(offset).ok()?;
    // SAFETY: lseek on a file descriptor `f` owns and keeps open for the call; it only moves
    // the descriptor's offset (this handle is used for positioned reads only) and reads no
    // memory of ours.
    let r = unsafe { libc::lseek(f.as_raw_fd(), at, libc::SEEK_HOLE) };
    u64::try_from(r).ok()
}

#[cfg(not(target_os = "linux"))]
fn first_hole(_f: &File, _offset: u64) -> Option<u64> {
    None
}

#[cfg(test)]
mod hole_tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// A part that is data, a hole and data again (and parts that are all hole, or end in
    /// one) has the CRC-32C of its bytes as read, zeros where the holes are.
    #[test]
    fn holes_count_as_zeros_without_reading_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        let len: u64 = 24 << 20;
        f.set_len(len).unwrap();
        f.write_all_at(&[7u8; 5000], 0).unwrap();
        f.write_all_at(&[9u8; 3000], 10 << 20).unwrap();
        let mut want = vec![0u8; len as usize];
        want[..5000].fill(7);
        want[10 << 20..(10 << 20) + 3000].fill(9);
        let path = path.to_str().unwrap();
        let mut buf = Vec::new();
        for (a, b) in [
            (0, len),
            (0, 5000),
            (4000, 12 << 20),
            (11 << 20, len),
            (3, 17),
        ] {
            let got = crc_of_range(&f, path, a, b, &mut buf).unwrap();
            assert_eq!(
                got,
                crc32c::crc32c(&want[a as usize..b as usize]),
                "{a}..{b}"
            );
        }
        let receipt = |part_index, size, crc32c| Receipt {
            part_index,
            etag: String::new(),
            size,
            crc32c,
        };
        let split = 12 << 20;
        let ok = [
            receipt(0, split, crc32c::crc32c(&want[..split as usize])),
            receipt(1, len - split, crc32c::crc32c(&want[split as usize..])),
        ];
        unwritten_parts(path, &ok).unwrap();
        let bad = [ok[0].clone(), receipt(1, len - split, 1)];
        assert!(unwritten_parts(path, &bad).is_err());
    }
}
