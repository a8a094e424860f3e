//! Unguessable ids (lease ids, output claim tokens): 128 random bits in hex.

use std::io::Read;

/// 128 bits from the operating system's generator, in hex. `what` names the ids in the
/// warning logged when the generator cannot be read.
pub(crate) fn hex128(what: &str) -> String {
    let mut b = [0u8; 16];
    if let Err(e) = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)) {
        // Without the OS generator: keyed SipHash of a counter, under keys std draws from the
        // OS at start (still unpredictable to a peer, though not from /dev/urandom).
        tracing::warn!("{what}: /dev/urandom: {e}; using std's seeded hasher instead");
        b = fallback_bits();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
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
        let (x, y) = (super::fallback_bits(), super::fallback_bits());
        assert_ne!(x, y);
    }
}
