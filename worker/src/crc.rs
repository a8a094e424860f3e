//! CRC-32C arithmetic without the data: the CRC of two byte strings put end to end from their
//! CRCs (`combine`), and a CRC extended by zero bytes (`append_zeros`), each in a few
//! multiplications of polynomials modulo CRC-32C's (one per set bit of the length).
//!
//! The `crc32c` crate's `crc32c_combine` squares a 32 x 32 bit matrix for each bit of the
//! length on every call: a commit calls it once per part (33,563 times for a 70B merge), and
//! the check of a local file's holes once per MiB of zeros, which made both most of a
//! coordinator's CPU under load. The results are the same (tested against the crate).

/// CRC-32C's polynomial without its x^32 term, bit-reflected: bit 31 holds x^0, bit 0 x^31.
const POLY: u32 = 0x82F6_3B78;

/// `a * b` modulo the polynomial, both reflected as in [`POLY`].
const fn mul(a: u32, mut b: u32) -> u32 {
    let mut p = 0u32;
    let mut i = 32;
    // a's terms from x^0 (bit 31) up; b is multiplied by x after each
    while i > 0 {
        i -= 1;
        if (a >> i) & 1 == 1 {
            p ^= b;
        }
        b = if b & 1 == 1 { (b >> 1) ^ POLY } else { b >> 1 };
    }
    p
}

/// `POW2[k]` = x^(2^k) modulo the polynomial.
const POW2: [u32; 64] = {
    let mut t = [0u32; 64];
    t[0] = 1 << 30; // x^1
    let mut k = 1;
    while k < 64 {
        t[k] = mul(t[k - 1], t[k - 1]);
        k += 1;
    }
    t
};

/// x^(8 n) modulo the polynomial: what appending `n` zero bytes multiplies a CRC register by.
fn shift_bytes(n: u64) -> u32 {
    let mut p = 1u32 << 31; // x^0
    let mut k = 3; // 8 n = n << 3
    let mut n = n;
    while n != 0 {
        if n & 1 == 1 {
            p = mul(POW2[k % 64], p);
        }
        n >>= 1;
        k += 1;
    }
    p
}

/// The CRC-32C of `a` followed by `b`, from `crc_a`, `crc_b` and `b`'s length.
pub fn combine(crc_a: u32, crc_b: u32, len_b: u64) -> u32 {
    mul(shift_bytes(len_b), crc_a) ^ crc_b
}

/// The CRC-32C of the bytes `crc` covers followed by `n` zero bytes.
pub fn append_zeros(crc: u32, n: u64) -> u32 {
    !mul(shift_bytes(n), !crc)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(n: usize, seed: u32) -> Vec<u8> {
        let mut x = seed.wrapping_mul(2_654_435_761).max(1);
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    #[test]
    fn combine_is_the_crc_of_the_concatenation() {
        for (la, lb) in [(0, 0), (0, 7), (5, 0), (1, 1), (100, 4096), (4095, 65_537)] {
            let (a, b) = (bytes(la, 1), bytes(lb, 2));
            let whole = crc32c::crc32c(&[a.clone(), b.clone()].concat());
            let got = combine(crc32c::crc32c(&a), crc32c::crc32c(&b), lb as u64);
            assert_eq!(got, whole, "{la} + {lb} bytes");
        }
    }

    #[test]
    fn combine_agrees_with_the_crates_for_long_lengths() {
        for len in [1u64 << 20, (4 << 20) + 3, 5 << 30, (1 << 40) + 12_345] {
            let Ok(n) = usize::try_from(len) else {
                continue;
            };
            for (a, b) in [(0u32, 0u32), (0xDEAD_BEEF, 0x1234_5678), (u32::MAX, 1)] {
                assert_eq!(combine(a, b, len), crc32c::crc32c_combine(a, b, n), "{len}");
            }
        }
    }

    #[test]
    fn append_zeros_is_the_crc_of_the_zeros_appended() {
        for (la, n) in [(0, 0), (0, 1), (3, 0), (17, 4095), (1000, (1 << 20) + 5)] {
            let a = bytes(la, 3);
            let whole = crc32c::crc32c(&[a.clone(), vec![0u8; n]].concat());
            assert_eq!(
                append_zeros(crc32c::crc32c(&a), n as u64),
                whole,
                "{la} + {n}"
            );
        }
    }
}
