//! `io-floor`: the plain-file-I/O lower bound for a merge. Reads every given file with a
//! buffered read loop, then writes `--bytes` bytes to `--out` and fsyncs it (`--direct`: past
//! the page cache, `O_DIRECT` from an aligned buffer, as the merges write their output parts).
//! Prints one line: `read_bytes written_bytes read_seconds write_seconds`.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "io-floor",
    about = "Read files and write N bytes with plain file I/O"
)]
struct Args {
    /// File to write (created or truncated).
    #[arg(long)]
    out: PathBuf,
    /// Bytes to write.
    #[arg(long)]
    bytes: u64,
    /// Buffer size in bytes.
    #[arg(long, default_value_t = 8 << 20)]
    buf: usize,
    /// Write with O_DIRECT (Linux; the last partial 4 KiB block through the page cache).
    #[arg(long)]
    direct: bool,
    /// Files to read.
    inputs: Vec<PathBuf>,
}

fn run(a: Args) -> io::Result<()> {
    let mut buf = vec![0u8; a.buf.max(4096)];
    let t0 = Instant::now();
    let mut read = 0u64;
    let mut x = 0u8;
    for p in &a.inputs {
        let mut f = File::open(p)?;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            // touch the data so the read cannot be skipped
            x ^= buf[n - 1];
            read += n as u64;
        }
    }
    let t1 = Instant::now();
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i as u8) ^ x;
    }
    let mut f = File::create(&a.out)?;
    let mut left = a.bytes;
    if a.direct {
        match write_direct(&a.out, &buf, left) {
            Ok(rest) => {
                left = rest;
                f = std::fs::OpenOptions::new().append(true).open(&a.out)?;
            }
            // (tmpfs and some network filesystems refuse O_DIRECT: the merges then write
            // through the page cache too, and so does the floor)
            Err(e) => {
                eprintln!("io-floor: O_DIRECT refused ({e}); writing through the page cache");
                f = File::create(&a.out)?;
            }
        }
    }
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.sync_all()?;
    let t2 = Instant::now();
    println!(
        "{read} {} {:.3} {:.3}",
        a.bytes,
        (t1 - t0).as_secs_f64(),
        (t2 - t1).as_secs_f64()
    );
    Ok(())
}

/// Writes the whole 4 KiB blocks of `bytes` to `out` with `O_DIRECT` from an aligned copy of
/// `buf`; returns the bytes left (under 4 KiB) for a buffered write.
#[cfg(target_os = "linux")]
fn write_direct(out: &std::path::Path, buf: &[u8], bytes: u64) -> io::Result<u64> {
    use std::os::unix::fs::OpenOptionsExt;
    const ALIGN: usize = 4096;
    let mut d = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(out)?;
    let len = buf.len() / ALIGN * ALIGN;
    let mut mem = vec![0u8; len + ALIGN];
    let pad = mem.as_ptr().align_offset(ALIGN);
    let aligned = &mut mem[pad..pad + len];
    aligned.copy_from_slice(&buf[..len]);
    let mut left = bytes / ALIGN as u64 * ALIGN as u64;
    while left > 0 {
        let n = left.min(len as u64) as usize;
        d.write_all(&aligned[..n])?;
        left -= n as u64;
    }
    Ok(bytes % ALIGN as u64)
}

#[cfg(not(target_os = "linux"))]
fn write_direct(_out: &std::path::Path, _buf: &[u8], _bytes: u64) -> io::Result<u64> {
    Err(io::Error::other("--direct is Linux-only"))
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("io-floor: {e}");
            ExitCode::FAILURE
        }
    }
}
