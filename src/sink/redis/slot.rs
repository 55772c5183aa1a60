//! Redis Cluster hash slots, computed here because the tag fan-out must name a pending set in
//! the same slot as a tag set, and keys are grouped by slot before they are sent.
//!
//! The algorithm is the one in the Redis Cluster specification ("Keys distribution model"):
//! CRC16 (XMODEM) of the key, or of its hash tag (the text between the first `{` and the next
//! `}`, when not empty), modulo 16384.

use std::sync::OnceLock;

pub(super) const SLOTS: usize = 16384;

/// CRC16-CCITT (XMODEM): polynomial 0x1021, initial value 0, no reflection.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in bytes {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

/// The part of a key that decides its slot.
fn hashed_part(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&b| b == b'{') {
        let rest = &key[open + 1..];
        if let Some(close) = rest.iter().position(|&b| b == b'}') {
            if close > 0 {
                return &rest[..close];
            }
        }
    }
    key
}

pub(super) fn slot(key: &[u8]) -> u16 {
    crc16(hashed_part(key)) % SLOTS as u16
}

/// For every slot, a short string whose hash is that slot: `{tag}` in a key name puts the key
/// in that slot whatever else the name holds. Found once by counting in base 36 (about 160k
/// CRCs, a few milliseconds).
fn slot_tags() -> &'static [String] {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    TAGS.get_or_init(|| {
        let mut tags: Vec<Option<String>> = vec![None; SLOTS];
        let mut left = SLOTS;
        let mut n: u64 = 0;
        while left > 0 {
            let tag = base36(n);
            let s = slot(tag.as_bytes()) as usize;
            if let Some(entry) = tags.get_mut(s) {
                if entry.is_none() {
                    *entry = Some(tag);
                    left -= 1;
                }
            }
            n += 1;
        }
        tags.into_iter().map(Option::unwrap_or_default).collect()
    })
}

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8_lossy(&out).into_owned()
}

/// A hash tag (`{...}`) that puts a key in `slot`.
pub(super) fn tag_for(slot: u16) -> &'static str {
    slot_tags().get(slot as usize).map(String::as_str).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Values from `CLUSTER KEYSLOT` (Redis documentation and the cluster spec's examples).
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"somekey"), 11058);
        assert_eq!(slot(b"{user1000}.following"), slot(b"{user1000}.followers"));
        assert_eq!(slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % 16384);
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
        assert_eq!(slot(b"foo{bar}{zap}"), slot(b"bar"));
    }

    #[test]
    fn every_slot_has_a_tag() {
        for s in [0u16, 1, 5000, 12182, 16383] {
            let key = format!("cdc-invalidator:pending:{{{}}}:whatever", tag_for(s));
            assert_eq!(slot(key.as_bytes()), s);
        }
        assert!(slot_tags().iter().all(|t| !t.is_empty()));
    }
}
