//! Unguessable ids (lease ids, output claim tokens): 128 random bits in hex.

use std::io::Read;

/// Bytes read from the operating system's generator at a time: one read serves 256 ids (a
/// lease id for every task handed out; an open and a read of /dev/urandom per id cost a
/// busy coordinator several percent of its CPU). Each byte is handed out once.
const POOL: usize = 4096;

/// OS random bytes not handed out yet: the buffer and how much of it is used.
static BITS: std::sync::Mutex<([u8; POOL], usize)> = std::sync::Mutex::new(([0; POOL], POOL));

/// 128 bits from the operating system's generator, in hex. `what` names the ids in the
/// warning logged when the generator cannot be read.
pub(crate) fn hex128(what: &str) -> String {
    let b = os_bits().unwrap_or_else(|e| {
        // Without the OS generator: keyed SipHash of a counter, under keys std draws from the
        // OS at start (still unpredictable to a peer, though not from /dev/urandom).
        tracing::warn!("{what}: /dev/urandom: {e}; using std's seeded hasher instead");
        fallback_bits()
    });
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(32);
    for x in b {
        s.push(HEX[usize::from(x >> 4)] as char);
        s.push(HEX[usize::from(x & 15)] as char);
    }
    s
}

/// The next 16 unused bytes of the pool, refilled from /dev/urandom when used up.
fn os_bits() -> std::io::Result<[u8; 16]> {
    let mut pool = BITS.lock().unwrap_or_else(|p| p.into_inner());
    let (buf, used) = &mut *pool;
    if *used + 16 > POOL {
        std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(buf))?;
        *used = 0;
    }
    let mut out = [0u8; 16];
    out.copy_from_slice(&buf[*used..*used + 16]);
    // (zeroed once handed out: the pool holds only ids not given yet)
    buf[*used..*used + 16].fill(0);
    *used += 16;
    Ok(out)
}

fn fallback_bits() -> [u8; 16] {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let mut out = [0u8; 16];
    for half in out.chunks_mut(8) {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(n);
        half.copy_from_slice(&h.finish().to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_are_32_hex_digits_and_differ() {
        let (a, b) = (super::hex128("test"), super::hex128("test"));
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        // past a refill of the pool, every id still differs
        let ids: std::collections::HashSet<String> =
            (0..600).map(|_| super::hex128("test")).collect();
        assert_eq!(ids.len(), 600);
        let (x, y) = (super::fallback_bits(), super::fallback_bits());
        assert_ne!(x, y);
    }
}
