//! Fuzzing on stable Rust: a deterministic mutation loop feeds the safetensors header parser,
//! the index parser and the recipe parser arbitrary and mutated bytes for a bounded time
//! (`SHARDMERGE_FUZZ_SECS` each, default 2), starting from the hostile corpus and valid
//! inputs. Each input must give Ok or an error: never a panic, and never an allocation out of
//! proportion to the input (a counting allocator measures the peak of every call).
//!
//! The seed of the mutation stream is `SHARDMERGE_FUZZ_SEED` (default fixed), printed on
//! failure with the input, so a failure reproduces.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use shardmerge::recipe::Recipe;
use shardmerge_worker::format::index::parse_index;
use shardmerge_worker::format::safetensors as st;

/// The system allocator, counting the bytes live and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to `System`, which upholds GlobalAlloc's contract;
// the counters are plain atomics and never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: `p` came from this allocator (so from `System`) with layout `l`.
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        // SAFETY: the caller's contract for `realloc` is passed on as is.
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            LIVE.fetch_sub(l.size(), Ordering::Relaxed);
            let now = LIVE.fetch_add(new, Ordering::Relaxed) + new;
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// Bytes a parser cares about: structure, digits, signs, quotes, YAML and JSON tokens.
const INTERESTING: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b":",
    b",",
    b"-",
    b".",
    b"e",
    b"9",
    b"0",
    b"\\",
    b"\n",
    b" ",
    b"&a",
    b"*a",
    b"!!",
    b".nan",
    b".inf",
    b"1e39",
    b"18446744073709551616",
    b"4294967296",
    b"\xff",
    b"\x00",
    b"__metadata__",
    b"data_offsets",
    b"shape",
    b"dtype",
    b"weight_map",
    b"../",
    b"layer_range",
    b"parameters",
    b"- ",
    b"filter",
    b"value",
];

const MAX_LEN: usize = 1 << 16;

fn mutate(rng: &mut Rng, seeds: &[Vec<u8>], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&seeds[rng.below(seeds.len())]);
    for _ in 0..1 + rng.below(8) {
        let n = out.len();
        match rng.below(9) {
            0 if n > 0 => {
                let i = rng.below(n);
                out[i] ^= 1 << rng.below(8);
            }
            1 if n > 0 => {
                let i = rng.below(n);
                out[i] = rng.next() as u8;
            }
            2 => {
                let tok = INTERESTING[rng.below(INTERESTING.len())];
                let i = rng.below(n + 1);
                out.splice(i..i, tok.iter().copied());
            }
            3 if n > 0 => {
                let i = rng.below(n);
                let j = (i + 1 + rng.below(64)).min(n);
                out.drain(i..j);
            }
            4 if n > 0 => {
                // repeat a chunk (deep nesting, long lists)
                let i = rng.below(n);
                let j = (i + 1 + rng.below(32)).min(n);
                let chunk = out[i..j].to_vec();
                for _ in 0..rng.below(64) {
                    out.splice(i..i, chunk.iter().copied());
                }
            }
            5 => out.truncate(rng.below(n + 1)),
            6 => {
                // splice in part of another seed
                let other = &seeds[rng.below(seeds.len())];
                let a = rng.below(other.len() + 1);
                let b = (a + rng.below(256)).min(other.len());
                let i = rng.below(n + 1);
                out.splice(i..i, other[a..b].iter().copied());
            }
            7 if n > 0 => {
                // a number somewhere becomes a big or negative one
                let i = rng.below(n);
                let num = ["-1", "0", "18446744073709551615", "1e308", "-0", "NaN"][rng.below(6)];
                out.splice(i..i, num.bytes());
            }
            _ => {
                let i = rng.below(n + 1);
                let b = rng.next() as u8;
                out.insert(i, b);
            }
        }
    }
    out.truncate(MAX_LEN);
}

fn files_under(dir: &Path, out: &mut Vec<Vec<u8>>, want: &dyn Fn(&Path) -> bool) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut paths: Vec<_> = rd.flatten().map(|e| e.path()).collect();
    paths.sort();
    for p in paths {
        if p.is_dir() {
            files_under(&p, out, want);
        } else if want(&p) {
            if let Ok(b) = std::fs::read(&p) {
                if b.len() <= MAX_LEN {
                    out.push(b);
                }
            }
        }
    }
}

/// Runs `parse` on mutated inputs for `secs`; returns how many ran. `parse` must not panic,
/// and its peak allocation must stay within `256 × input + 4 MiB`.
fn fuzz(name: &str, seeds: &[Vec<u8>], secs: f64, seed: u64, parse: &dyn Fn(&[u8]) -> bool) -> u64 {
    assert!(!seeds.is_empty(), "{name}: no seeds");
    let mut rng = Rng(seed | 1);
    let mut input = Vec::new();
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut runs = 0u64;
    let mut oks = 0u64;
    while Instant::now() < deadline {
        if runs.is_multiple_of(50) {
            // now and then, plain random bytes
            input.clear();
            let n = rng.below(512);
            input.extend((0..n).map(|_| rng.next() as u8));
        } else {
            mutate(&mut rng, seeds, &mut input);
        }
        let base = LIVE.load(Ordering::Relaxed);
        PEAK.store(base, Ordering::Relaxed);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| parse(&input)));
        let peak = PEAK.load(Ordering::Relaxed).saturating_sub(base);
        let shown = String::from_utf8_lossy(&input[..input.len().min(400)]).into_owned();
        match r {
            Ok(ok) => oks += u64::from(ok),
            Err(_) => panic!("{name}: panic on input #{runs} (seed {seed}): {shown:?}"),
        }
        let limit = 256 * input.len() + (4 << 20);
        assert!(
            peak <= limit,
            "{name}: input #{runs} of {} bytes (seed {seed}) allocated {peak} bytes at its peak: {shown:?}",
            input.len()
        );
        runs += 1;
    }
    eprintln!("{name}: {runs} inputs in {secs} s, {oks} accepted");
    assert!(runs > 100, "{name}: only {runs} inputs ran");
    runs
}

#[test]
fn parsers_survive_mutated_and_random_bytes() {
    let secs: f64 = std::env::var("SHARDMERGE_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    let seed: u64 = std::env::var("SHARDMERGE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_5eed);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    let hostile = root.join("hostile");

    // safetensors headers: the corpus, plus the golden models' first 64 KiB
    let mut seeds = Vec::new();
    files_under(&hostile.join("safetensors"), &mut seeds, &|_| true);
    for m in ["base", "instruct"] {
        if let Ok(b) = std::fs::read(root.join("golden/models").join(m).join("model.safetensors")) {
            let n = b.len().min(MAX_LEN);
            seeds.push(b[..n].to_vec());
        }
    }
    fuzz("safetensors header", &seeds, secs, seed, &|b| {
        // the file continues past what we have by a varying amount of data
        let size = b.len() as u64 + (b.len() as u64 % 7) * 4096;
        match st::header_len(b, size) {
            Ok(n) => {
                let end = (8 + n as usize).min(b.len());
                st::parse_header(&b[8.min(end)..end], size).is_ok()
            }
            Err(_) => false,
        }
    });

    let mut seeds = Vec::new();
    files_under(&hostile.join("index"), &mut seeds, &|p| {
        p.file_name()
            .is_some_and(|n| n == "model.safetensors.index.json")
    });
    seeds.push(
        br#"{"metadata":{"total_size":24},"weight_map":{"a":"model-00001-of-00002.safetensors","b":"model-00002-of-00002.safetensors"}}"#.to_vec(),
    );
    fuzz("index", &seeds, secs, seed ^ 1, &|b| parse_index(b).is_ok());

    let mut seeds = Vec::new();
    files_under(&hostile.join("recipes"), &mut seeds, &|_| true);
    files_under(&root.join("golden/cases"), &mut seeds, &|p| {
        p.extension().is_some_and(|e| e == "yml" || e == "yaml")
    });
    fuzz("recipe", &seeds, secs, seed ^ 2, &|b| {
        Recipe::parse(&String::from_utf8_lossy(b)).is_ok()
    });
}
