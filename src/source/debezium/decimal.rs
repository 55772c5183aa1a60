//! Kafka Connect decimals to plain decimal strings.
//!
//! With `decimal.handling.mode=precise` (the default) Debezium sends a `DECIMAL`/`NUMERIC`
//! column as the base64 of its unscaled value's big-endian two's-complement bytes, the scale
//! living in the schema (`org.apache.kafka.connect.data.Decimal`) or beside the bytes
//! (`io.debezium.data.VariableScaleDecimal`). A rule renders `{price}` from the number, not from
//! its encoding, so both become the string Java's `BigDecimal.toPlainString()` prints: the same
//! string `decimal.handling.mode=string` would have sent (`JxA=` scale 2 → `100.00`).

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

/// Bytes of an unscaled value we convert: 4 KiB is about 9,800 digits, more than any database
/// column in practice, and it bounds the quadratic base conversion to well under a millisecond.
const MAX_BYTES: usize = 4096;

/// The largest scale (either sign) we expand: PostgreSQL's limit on digits after the point.
/// It bounds the zeros a hostile scale could make us write.
const MAX_SCALE: i64 = 16_383;

/// Why a decimal column could not be decoded. Completes the sentence "column `price` is not a
/// valid decimal: …".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecimalError {
    #[error("its value is not valid base64")]
    Base64,
    #[error("its value holds no bytes")]
    Empty,
    #[error("its value is about {bytes} bytes long, more than the {MAX_BYTES} accepted")]
    TooLarge { bytes: usize },
    #[error("its scale {scale} is outside -{MAX_SCALE}..={MAX_SCALE}")]
    Scale { scale: i64 },
    #[error("its schema has no integer `scale` parameter")]
    NoScale,
    #[error("it is {found}, expected an object with an integer `scale` and a base64 `value`")]
    VariableShape { found: &'static str },
}

/// Decodes base64 `text` holding an unscaled value and formats it with `scale`.
pub(super) fn from_base64(text: &str, scale: i64) -> Result<String, DecimalError> {
    // Checked before decoding so an oversized value costs nothing.
    let bytes = text.len() / 4 * 3;
    if bytes > MAX_BYTES + 2 {
        return Err(DecimalError::TooLarge { bytes });
    }
    let unscaled = STANDARD.decode(text).map_err(|_| DecimalError::Base64)?;
    to_plain_string(&unscaled, scale)
}

/// Formats big-endian two's-complement `unscaled` bytes with `scale` digits after the point,
/// as `BigDecimal.toPlainString()` does: `10000`/2 → `100.00`, `5`/3 → `0.005`, `-5`/0 → `-5`,
/// `12`/-2 → `1200`.
pub(super) fn to_plain_string(unscaled: &[u8], scale: i64) -> Result<String, DecimalError> {
    let Some(&first) = unscaled.first() else {
        return Err(DecimalError::Empty);
    };
    if unscaled.len() > MAX_BYTES {
        return Err(DecimalError::TooLarge { bytes: unscaled.len() });
    }
    if !(-MAX_SCALE..=MAX_SCALE).contains(&scale) {
        return Err(DecimalError::Scale { scale });
    }
    let negative = first & 0x80 != 0;
    let digits = if unscaled.len() <= 16 {
        // The common case: the value fits an i128. Sign-extend, then take the magnitude.
        let mut value: i128 = if negative { -1 } else { 0 };
        for &byte in unscaled {
            value = (value << 8) | i128::from(byte);
        }
        value.unsigned_abs().to_string()
    } else {
        magnitude_digits(unscaled, negative)
    };
    // `unscaled` fits in usize since the check above; so does the bounded scale.
    let scale_digits = scale.unsigned_abs() as usize;

    let mut out = String::with_capacity(digits.len() + scale_digits + 3);
    if negative {
        out.push('-');
    }
    if scale > 0 {
        if digits.len() <= scale_digits {
            out.push_str("0.");
            out.extend(std::iter::repeat_n('0', scale_digits - digits.len()));
            out.push_str(&digits);
        } else {
            let (int, frac) = digits.split_at(digits.len() - scale_digits);
            out.push_str(int);
            out.push('.');
            out.push_str(frac);
        }
    } else {
        out.push_str(&digits);
        // A negative scale multiplies by a power of ten; zero stays "0" as in Java.
        if scale < 0 && digits != "0" {
            out.extend(std::iter::repeat_n('0', scale_digits));
        }
    }
    Ok(out)
}

/// Decimal digits of the magnitude of a two's-complement number of any length.
fn magnitude_digits(unscaled: &[u8], negative: bool) -> String {
    let mut magnitude = unscaled.to_vec();
    if negative {
        // Two's complement: invert every bit, then add one.
        let mut carry = true;
        for byte in magnitude.iter_mut().rev() {
            let (sum, overflow) = (!*byte).overflowing_add(u8::from(carry));
            *byte = sum;
            carry = overflow;
        }
    }
    // Little-endian u32 limbs.
    let mut limbs: Vec<u32> =
        magnitude.rchunks(4).map(|chunk| chunk.iter().fold(0u32, |acc, &b| (acc << 8) | u32::from(b))).collect();

    // Repeated division by 10^9, least significant chunk first.
    const CHUNK: u64 = 1_000_000_000;
    let mut chunks = Vec::new();
    loop {
        while limbs.last() == Some(&0) {
            limbs.pop();
        }
        if limbs.is_empty() {
            break;
        }
        let mut remainder = 0u64;
        for limb in limbs.iter_mut().rev() {
            let current = (remainder << 32) | u64::from(*limb);
            // current < CHUNK << 32, so the quotient fits in u32.
            *limb = (current / CHUNK) as u32;
            remainder = current % CHUNK;
        }
        chunks.push(remainder as u32);
    }
    let Some((most, rest)) = chunks.split_last() else {
        return "0".to_owned();
    };
    let mut digits = most.to_string();
    for chunk in rest.iter().rev() {
        digits.push_str(&format!("{chunk:09}"));
    }
    digits
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(unscaled: &[u8], scale: i64) -> String {
        match to_plain_string(unscaled, scale) {
            Ok(s) => s,
            Err(e) => panic!("{unscaled:?} scale {scale}: {e}"),
        }
    }

    #[test]
    fn fixture_prices() {
        assert_eq!(from_base64("JxA=", 2), Ok("100.00".to_owned()));
        assert_eq!(from_base64("H0A=", 2), Ok("80.00".to_owned()));
    }

    #[test]
    fn negative_values() {
        // -10000 = 0xD8F0
        assert_eq!(plain(&[0xD8, 0xF0], 2), "-100.00");
        assert_eq!(plain(&[0xFF], 0), "-1");
        assert_eq!(plain(&[0xFF], 3), "-0.001");
        assert_eq!(plain(&[0x80], 1), "-12.8");
        // i128::MIN: the magnitude overflows i128, not u128.
        let mut min = [0u8; 16];
        min[0] = 0x80;
        assert_eq!(plain(&min, 0), "-170141183460469231731687303715884105728");
    }

    #[test]
    fn zero_in_every_form() {
        assert_eq!(plain(&[0], 0), "0");
        assert_eq!(plain(&[0], 2), "0.00");
        assert_eq!(plain(&[0, 0, 0], 1), "0.0");
        assert_eq!(plain(&[0], -3), "0");
        assert_eq!(plain(&[0; 20], 2), "0.00");
    }

    #[test]
    fn scales() {
        assert_eq!(plain(&[0x30, 0x39], 0), "12345");
        assert_eq!(plain(&[0x30, 0x39], 2), "123.45");
        assert_eq!(plain(&[0x30, 0x39], 5), "0.12345");
        assert_eq!(plain(&[0x30, 0x39], 7), "0.0012345");
        assert_eq!(plain(&[12], -2), "1200");
        // A leading zero byte keeps 0x80 positive.
        assert_eq!(plain(&[0x00, 0x80], 0), "128");
    }

    #[test]
    fn large_precision_matches_the_i128_path() {
        // 10^38 - 1 (precision 38), as 17 bytes with a sign byte: the slow path.
        let n: i128 = 99_999_999_999_999_999_999_999_999_999_999_999_999;
        let mut bytes = vec![0u8];
        bytes.extend_from_slice(&n.to_be_bytes());
        assert_eq!(plain(&bytes, 4), "9999999999999999999999999999999999.9999");
        let mut negative = vec![0xFFu8];
        negative.extend_from_slice(&(-n).to_be_bytes());
        assert_eq!(plain(&negative, 0), "-99999999999999999999999999999999999999");
    }

    #[test]
    fn beyond_i128() {
        // 2^136 = 87112285931760246646623899502532662132736
        let mut bytes = vec![0u8; 18];
        bytes[0] = 0x01;
        assert_eq!(plain(&bytes, 0), "87112285931760246646623899502532662132736");
        assert_eq!(plain(&bytes, 3), "87112285931760246646623899502532662132.736");
        // -2^136: 0xFF followed by seventeen zero bytes
        let mut negative = vec![0u8; 18];
        negative[0] = 0xFF;
        assert_eq!(plain(&negative, 0), "-87112285931760246646623899502532662132736");
        // A value whose digits cross a 10^9 chunk boundary with inner zeros: 10^30.
        let ten_30: u128 = 1_000_000_000_000_000_000_000_000_000_000;
        let mut padded = vec![0u8; 4];
        padded.extend_from_slice(&ten_30.to_be_bytes());
        assert_eq!(plain(&padded, 0), ten_30.to_string());
    }

    #[test]
    fn rejects_what_it_cannot_represent() {
        assert_eq!(to_plain_string(&[], 2), Err(DecimalError::Empty));
        assert_eq!(from_base64("", 2), Err(DecimalError::Empty));
        assert_eq!(from_base64("not base64!", 2), Err(DecimalError::Base64));
        assert_eq!(to_plain_string(&[1], 20_000), Err(DecimalError::Scale { scale: 20_000 }));
        assert_eq!(to_plain_string(&[1], i64::MIN), Err(DecimalError::Scale { scale: i64::MIN }));
        let huge = "A".repeat(8000);
        assert!(matches!(from_base64(&huge, 0), Err(DecimalError::TooLarge { .. })));
        assert_eq!(DecimalError::Scale { scale: 20_000 }.to_string(), "its scale 20000 is outside -16383..=16383");
    }
}
