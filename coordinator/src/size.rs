//! Byte sizes on the command line: mergekit's `5B`/`500M`/`1K` (decimal), and `64KiB`,
//! `512MiB`, `2GiB` (binary), `10MB`, `1GB` (decimal), or a plain number of bytes.

pub fn parse(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (examples: 5B, 500M, 64KiB, 2GiB, 1048576)"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "b" | "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024f64.powi(4),
        other => {
            return Err(format!(
                "`{s}`: unknown unit `{other}` (use K, M, B as mergekit does, or KiB, MiB, GiB)"
            ))
        }
    };
    let v = n * mult;
    if !(0.0..1.8e19).contains(&v) {
        return Err(format!("`{s}` is out of range"));
    }
    Ok(v as u64)
}

/// A size for people: 1.5 GiB.
pub fn human(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < units.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// A duration for people, with the digits it needs: `26 ms`, `3.2 s`, `2 min 5 s`.
pub fn duration(secs: f64) -> String {
    let secs = secs.max(0.0);
    if secs < 0.001 {
        "under 1 ms".into()
    } else if secs < 1.0 {
        format!("{:.0} ms", secs * 1000.0)
    } else if secs < 60.0 {
        format!("{secs:.1} s")
    } else {
        let whole = secs.round() as u64;
        format!("{} min {} s", whole / 60, whole % 60)
    }
}

/// `405.1 KiB in 26 ms (15.2 MiB/s)`: bytes moved in a time, and the rate from that same time
/// (none under a millisecond, where it would mean nothing).
pub fn bytes_in(bytes: u64, secs: f64) -> String {
    if secs < 0.001 {
        return format!("{} in {}", human(bytes), duration(secs));
    }
    format!(
        "{} in {} ({}/s)",
        human(bytes),
        duration(secs),
        human((bytes as f64 / secs) as u64)
    )
}

/// This process's peak resident memory (Linux: VmHWM), if known.
pub fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Large buffers go straight to `mmap` and back to the system when freed.
///
/// glibc's default raises its mmap threshold each time such a buffer is freed, after which
/// buffers of that size come from per-thread arenas that keep freed memory; a worker's resident
/// memory then grew with the number of tasks it ran, past `--memory-limit` (a ties merge of a
/// 92 MiB model under a 48 MiB limit peaked at 109 MiB; `coordinator/tests/memory.rs`). Task
/// buffers are reused from task to task (`shardmerge_worker::exec::Scratch`), so mapping them
/// afresh is rare. A fixed threshold also turns off glibc's adjustment.
pub fn return_large_buffers_to_the_system() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only sets a tuning parameter of glibc's allocator under the allocator's
    // own lock; it takes plain integers and touches no memory of ours. It runs first thing in
    // `cli::main`, before the program starts any thread. A return of 0 (rejected value) leaves
    // glibc's defaults in place, which is safe too.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse("5B").unwrap(), 5_000_000_000);
        assert_eq!(parse("500M").unwrap(), 500_000_000);
        assert_eq!(parse("64KiB").unwrap(), 65536);
        assert_eq!(parse("1048576").unwrap(), 1048576);
        assert_eq!(parse("1.5GiB").unwrap(), 1610612736);
        assert!(parse("12 parsecs").is_err());
        assert!(parse("").is_err());
        assert_eq!(human(1536), "1.5 KiB");
    }

    /// The summary once said "405.1 KiB in 0.0s (15.0 MiB/s)": a time rounded to nothing next
    /// to a rate from the unrounded one.
    #[test]
    fn a_short_time_keeps_its_digits_and_the_rate_agrees_with_it() {
        assert_eq!(bytes_in(414_822, 0.0264), "405.1 KiB in 26 ms (15.0 MiB/s)");
        assert_eq!(bytes_in(1 << 20, 2.0), "1.0 MiB in 2.0 s (512.0 KiB/s)");
        assert_eq!(bytes_in(100, 0.0), "100 B in under 1 ms");
        assert_eq!(duration(125.2), "2 min 5 s");
    }
}
