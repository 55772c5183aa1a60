//! FNV-1a, 64-bit: the cheap non-cryptographic hash used where the keys are fixed or the worst
//! case is harmless (the rules file's fingerprint, the rules' table index, the column-name
//! cache in `event`), never on keys an outsider can pick to flood a map.

const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const PRIME: u64 = 0x0000_0100_0000_01b3;

/// The hash of `bytes`.
pub(crate) fn hash(bytes: &[u8]) -> u64 {
    extend(OFFSET, bytes)
}

/// `hash` continued over `bytes` (for a `Hasher` fed in pieces).
pub(crate) fn extend(hash: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(hash, |h, &b| (h ^ u64::from(b)).wrapping_mul(PRIME))
}

/// A `std::hash::Hasher` computing FNV-1a, for maps whose keys are fixed at load.
pub(crate) struct Hasher(u64);

impl Default for Hasher {
    fn default() -> Hasher {
        Hasher(OFFSET)
    }
}

impl std::hash::Hasher for Hasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0 = extend(self.0, bytes);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn published_vectors() {
        // From the FNV reference test suite (Fowler, Noll, Vo): FNV-1a 64-bit of "", "a", "foobar".
        assert_eq!(super::hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(super::hash(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(super::hash(b"foobar"), 0x8594_4171_f739_67e8);
    }
}
