//! Dates, times and timestamps in the one spelling every source renders them in.
//!
//! The contract ("Temporal values render alike from every source") fixes ISO 8601 whatever the
//! encoding, so one rules file gives one key whether a row came through Debezium's JSON (epoch
//! counts tagged `io.debezium.time.*` or Kafka Connect `Date`/`Time`/`Timestamp` in the schema,
//! ISO strings for the zoned types), through pgoutput's text, or through Avro logical types:
//!
//! | type | renders as |
//! |---|---|
//! | date | `2024-03-15` |
//! | time | `10:04:05`, with a fraction when non-zero: `10:04:05.25` (trailing zeros trimmed) |
//! | timestamp without zone | `2024-03-15T10:04:05`, fraction as for time |
//! | timestamp with zone | in UTC with `Z`: `2024-03-15T09:04:05Z`, fraction as for time |
//! | time with zone | in UTC with `Z`: `09:04:05Z` (not in the contract's table; the same rule) |
//!
//! Every function returns `None` for a value it cannot place (out of the years 0000-9999, a
//! malformed text, PostgreSQL's `infinity`): the caller then keeps the value as the source sent
//! it. That renders *something* stable rather than failing the event, and such values do not
//! occur in cache keys in practice.
//!
//! Kept free of any source's types so that an Avro decoder (its `date`, `time-micros`,
//! `timestamp-millis`, … logical types are the same counts) can call the same functions.

use std::fmt::Write as _;

const NANOS_PER_SECOND: i128 = 1_000_000_000;
const SECONDS_PER_DAY: i64 = 86_400;

/// Days since 1970-01-01 as `YYYY-MM-DD` (Debezium `Date`, Connect `Date`, Avro `date`).
pub(crate) fn date(days: i64) -> Option<String> {
    let (year, month, day) = civil_from_days(days)?;
    Some(format!("{year:04}-{month:02}-{day:02}"))
}

/// A calendar date given as its parts (`google.type.Date`, which the Protobuf converter writes
/// for a Connect `Date`) as `YYYY-MM-DD`; `None` for a date that does not exist.
pub(crate) fn civil_date(year: i64, month: i64, day: i64) -> Option<String> {
    if !(0..=9999).contains(&year) || !(1..=12).contains(&month) || !(1..=days_in_month(year, month)).contains(&day) {
        return None;
    }
    date(crate::calendar::days_from_civil(year, month, day))
}

/// A time of day given as a count of `unit_nanos` nanoseconds past midnight (Debezium `Time`
/// in ms, `MicroTime` in µs, `NanoTime` in ns; Connect `Time` in ms). Up to and including
/// 24:00:00, which PostgreSQL allows for `time` and prints as such.
pub(crate) fn time_of_day(count: i64, unit_nanos: i64) -> Option<String> {
    let nanos = i128::from(count).checked_mul(i128::from(unit_nanos))?;
    if !(0..=i128::from(SECONDS_PER_DAY) * NANOS_PER_SECOND).contains(&nanos) {
        return None;
    }
    let seconds = i64::try_from(nanos / NANOS_PER_SECOND).ok()?;
    let mut out = String::with_capacity(18);
    push_time(&mut out, seconds, (nanos % NANOS_PER_SECOND) as u32);
    Some(out)
}

/// A count of `unit_nanos` nanoseconds since the epoch as a timestamp: without a zone
/// (`2024-03-15T10:04:05`, Debezium `Timestamp`/`MicroTimestamp`/`NanoTimestamp` and Connect
/// `Timestamp`, which carry the wall-clock time as if it were UTC) or, with `utc`, with a `Z`.
pub(crate) fn timestamp(count: i64, unit_nanos: i64, utc: bool) -> Option<String> {
    let nanos = i128::from(count).checked_mul(i128::from(unit_nanos))?;
    timestamp_nanos(nanos, utc)
}

fn timestamp_nanos(nanos: i128, utc: bool) -> Option<String> {
    let seconds = i64::try_from(nanos.div_euclid(NANOS_PER_SECOND)).ok()?;
    // Below 10^9 and not negative: fits.
    let fraction = nanos.rem_euclid(NANOS_PER_SECOND) as u32;
    let days = seconds.div_euclid(SECONDS_PER_DAY);
    let mut out = date(days)?;
    out.push('T');
    push_time(&mut out, seconds.rem_euclid(SECONDS_PER_DAY), fraction);
    if utc {
        out.push('Z');
    }
    Some(out)
}

/// An ISO 8601 timestamp with an offset (`2024-03-15T10:04:05.250+01:00`, Debezium's
/// `ZonedTimestamp`; also PostgreSQL's `2024-03-15 10:04:05.25+01`) in UTC with `Z`.
pub(crate) fn zoned_timestamp(text: &str) -> Option<String> {
    let mut p = Parser(text.as_bytes());
    let days = p.date()?;
    if !(p.eat(b'T') || p.eat(b' ')) {
        return None;
    }
    let (seconds, fraction) = p.time()?;
    let offset = p.offset()?;
    p.end()?;
    let total = days.checked_mul(SECONDS_PER_DAY)?.checked_add(seconds)?.checked_sub(offset)?;
    timestamp_nanos(i128::from(total) * NANOS_PER_SECOND + i128::from(fraction), true)
}

/// An ISO 8601 time with an offset (`10:04:05+01:00`, Debezium's `ZonedTime`; PostgreSQL's
/// `timetz` text `10:04:05+01`) in UTC with `Z`, wrapping around midnight.
pub(crate) fn zoned_time(text: &str) -> Option<String> {
    let mut p = Parser(text.as_bytes());
    let (seconds, fraction) = p.time()?;
    let offset = p.offset()?;
    p.end()?;
    let mut out = String::with_capacity(19);
    push_time(&mut out, (seconds - offset).rem_euclid(SECONDS_PER_DAY), fraction);
    out.push('Z');
    Some(out)
}

/// Debezium's `IsoDate`, `IsoTime`, `IsoTimestamp` (`time.precision.mode=isostring`): a value
/// without a zone written with the UTC offset `Z` (`2017-09-15Z`, `04:05:11.789Z`,
/// `2019-07-09T02:28:57.123456Z`), which is dropped: the wall-clock value is what the column
/// holds and what pgoutput sends.
pub(crate) fn iso_local(text: &str, kind: IsoKind) -> Option<String> {
    let text = text.strip_suffix('Z')?;
    match kind {
        IsoKind::Date => pg_date(text),
        IsoKind::Time => pg_time(text),
        IsoKind::Timestamp => pg_timestamp(text),
    }
}

/// Which of the `isostring` types [`iso_local`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IsoKind {
    Date,
    Time,
    Timestamp,
}

/// PostgreSQL's text for a `date` (DateStyle ISO): validated and returned as is.
pub(crate) fn pg_date(text: &str) -> Option<String> {
    let mut p = Parser(text.as_bytes());
    let days = p.date()?;
    p.end()?;
    date(days)
}

/// PostgreSQL's text for a `time` (`10:04:05.25`).
pub(crate) fn pg_time(text: &str) -> Option<String> {
    let mut p = Parser(text.as_bytes());
    let (seconds, fraction) = p.time()?;
    p.end()?;
    let mut out = String::with_capacity(18);
    push_time(&mut out, seconds, fraction);
    Some(out)
}

/// PostgreSQL's text for a `timestamp` (`2024-03-15 10:04:05.25`, DateStyle ISO).
pub(crate) fn pg_timestamp(text: &str) -> Option<String> {
    let mut p = Parser(text.as_bytes());
    let days = p.date()?;
    if !(p.eat(b' ') || p.eat(b'T')) {
        return None;
    }
    let (seconds, fraction) = p.time()?;
    p.end()?;
    let total = days.checked_mul(SECONDS_PER_DAY)?.checked_add(seconds)?;
    timestamp_nanos(i128::from(total) * NANOS_PER_SECOND + i128::from(fraction), false)
}

/// `HH:MM:SS` and the fraction, trailing zeros trimmed, none when zero.
fn push_time(out: &mut String, seconds: i64, fraction: u32) {
    let _ = write!(out, "{:02}:{:02}:{:02}", seconds / 3600, seconds / 60 % 60, seconds % 60);
    if fraction != 0 {
        let digits = format!("{fraction:09}");
        out.push('.');
        out.push_str(digits.trim_end_matches('0'));
    }
}

/// Year, month, day of a day count since 1970-01-01, for the years 0000-9999 (proleptic
/// Gregorian, as Java's `LocalDate` and PostgreSQL use).
fn civil_from_days(days: i64) -> Option<(i64, i64, i64)> {
    // 0000-03-01 .. 9999-12-31: the only years an ISO 8601 date without a sign can spell.
    if !(-719_468..=2_932_896).contains(&days) {
        return None;
    }
    let (year, month, day) = crate::calendar::civil_from_days(days);
    (0..=9999).contains(&year).then_some((year, i64::from(month), i64::from(day)))
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// A strict reader of the ISO forms above.
struct Parser<'a>(&'a [u8]);

impl Parser<'_> {
    fn eat(&mut self, byte: u8) -> bool {
        match self.0.split_first() {
            Some((&first, rest)) if first == byte => {
                self.0 = rest;
                true
            }
            _ => false,
        }
    }

    fn end(&self) -> Option<()> {
        self.0.is_empty().then_some(())
    }

    /// Exactly `n` ASCII digits.
    fn digits(&mut self, n: usize) -> Option<i64> {
        let (head, rest) = (self.0.get(..n)?, self.0.get(n..)?);
        if !head.iter().all(u8::is_ascii_digit) {
            return None;
        }
        self.0 = rest;
        Some(head.iter().fold(0, |acc, d| acc * 10 + i64::from(d - b'0')))
    }

    /// `YYYY-MM-DD` as a day count.
    fn date(&mut self) -> Option<i64> {
        let year = self.digits(4)?;
        self.eat(b'-').then_some(())?;
        let month = self.digits(2)?;
        self.eat(b'-').then_some(())?;
        let day = self.digits(2)?;
        if !(1..=12).contains(&month) || !(1..=days_in_month(year, month)).contains(&day) {
            return None;
        }
        Some(crate::calendar::days_from_civil(year, month, day))
    }

    /// `HH:MM[:SS[.fraction]]` as seconds past midnight and nanoseconds.
    fn time(&mut self) -> Option<(i64, u32)> {
        let hours = self.digits(2)?;
        self.eat(b':').then_some(())?;
        let minutes = self.digits(2)?;
        let mut seconds = 0;
        let mut fraction = 0u32;
        if self.eat(b':') {
            seconds = self.digits(2)?;
            if self.eat(b'.') {
                let len = self.0.iter().take_while(|b| b.is_ascii_digit()).count();
                if len == 0 || len > 9 {
                    return None;
                }
                let value = u32::try_from(self.digits(len)?).ok()?;
                fraction = value * 10u32.pow(9 - len as u32);
            }
        }
        let total = hours * 3600 + minutes * 60 + seconds;
        // 24:00:00 is PostgreSQL's end of day; a leap second (:60) is not representable.
        if minutes > 59 || seconds > 59 || total > SECONDS_PER_DAY || (total == SECONDS_PER_DAY && fraction != 0) {
            return None;
        }
        Some((total, fraction))
    }

    /// `Z`, or `±HH[[:]MM[[:]SS]]`, as seconds east of UTC.
    fn offset(&mut self) -> Option<i64> {
        if self.eat(b'Z') {
            return Some(0);
        }
        let sign = if self.eat(b'+') {
            1
        } else if self.eat(b'-') {
            -1
        } else {
            return None;
        };
        let mut seconds = self.digits(2)? * 3600;
        for unit in [60, 1] {
            let colon = self.eat(b':');
            match self.digits(2) {
                Some(n) if n < 60 => seconds += n * unit,
                Some(_) => return None,
                None if colon => return None,
                None => break,
            }
        }
        Some(sign * seconds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_render_as_iso() {
        // 19797 days is 2024-03-15 (the example).
        assert_eq!(date(19_797).as_deref(), Some("2024-03-15"));
        assert_eq!(date(0).as_deref(), Some("1970-01-01"));
        assert_eq!(date(-1).as_deref(), Some("1969-12-31"));
        assert_eq!(date(11_016).as_deref(), Some("2000-02-29"));
        assert_eq!(date(i64::MAX), None);
        assert_eq!(time_of_day(36_245_000, 1_000_000).as_deref(), Some("10:04:05"));
        assert_eq!(time_of_day(36_245_250_000, 1_000).as_deref(), Some("10:04:05.25"));
        assert_eq!(time_of_day(36_245_000_000_001, 1).as_deref(), Some("10:04:05.000000001"));
        assert_eq!(time_of_day(86_400_000, 1_000_000).as_deref(), Some("24:00:00"));
        assert_eq!(time_of_day(86_400_001, 1_000_000), None);
        assert_eq!(time_of_day(-1, 1), None);
        let ms = 1_710_497_045_250; // 2024-03-15T10:04:05.25 as epoch ms
        assert_eq!(timestamp(ms, 1_000_000, false).as_deref(), Some("2024-03-15T10:04:05.25"));
        assert_eq!(timestamp(ms * 1000, 1_000, true).as_deref(), Some("2024-03-15T10:04:05.25Z"));
        assert_eq!(timestamp(-1, 1_000_000, false).as_deref(), Some("1969-12-31T23:59:59.999"));
        assert_eq!(timestamp(i64::MAX, 1_000_000, false), None);
    }

    #[test]
    fn zoned_texts_render_in_utc() {
        assert_eq!(zoned_timestamp("2024-03-15T10:04:05+01:00").as_deref(), Some("2024-03-15T09:04:05Z"));
        assert_eq!(zoned_timestamp("2024-03-15T10:04:05.250000Z").as_deref(), Some("2024-03-15T10:04:05.25Z"));
        assert_eq!(zoned_timestamp("2024-03-15 10:04:05.25+01").as_deref(), Some("2024-03-15T09:04:05.25Z"));
        assert_eq!(zoned_timestamp("2024-03-15 00:30:00-05:30").as_deref(), Some("2024-03-15T06:00:00Z"));
        assert_eq!(zoned_timestamp("2024-01-01T00:30:00+01:00").as_deref(), Some("2023-12-31T23:30:00Z"));
        assert_eq!(zoned_timestamp("1900-01-01 00:00:00+00:09:21").as_deref(), Some("1899-12-31T23:50:39Z"));
        assert_eq!(zoned_time("10:04:05+01:00").as_deref(), Some("09:04:05Z"));
        assert_eq!(zoned_time("00:30:00.5+01").as_deref(), Some("23:30:00.5Z"));
        for bad in ["", "infinity", "2024-02-30T00:00:00Z", "2024-03-15T10:04:05", "2024-03-15T25:00:00Z", "x"] {
            assert_eq!(zoned_timestamp(bad), None, "{bad}");
        }
    }

    #[test]
    fn postgres_texts_render_as_iso() {
        assert_eq!(pg_date("2024-03-15").as_deref(), Some("2024-03-15"));
        assert_eq!(pg_date("infinity"), None);
        assert_eq!(pg_date("0044-03-15 BC"), None);
        assert_eq!(pg_time("10:04:05.25").as_deref(), Some("10:04:05.25"));
        assert_eq!(pg_time("24:00:00").as_deref(), Some("24:00:00"));
        assert_eq!(pg_timestamp("2024-03-15 10:04:05").as_deref(), Some("2024-03-15T10:04:05"));
        assert_eq!(pg_timestamp("2024-03-15 10:04:05.123456").as_deref(), Some("2024-03-15T10:04:05.123456"));
        assert_eq!(pg_timestamp("-infinity"), None);
    }

    #[test]
    fn isostring_values_drop_their_utc_marker() {
        // postgresql.adoc, `time.precision.mode=isostring` examples.
        assert_eq!(iso_local("2017-09-15Z", IsoKind::Date).as_deref(), Some("2017-09-15"));
        assert_eq!(iso_local("04:05:11.789Z", IsoKind::Time).as_deref(), Some("04:05:11.789"));
        assert_eq!(
            iso_local("2019-07-09T02:28:57.123456Z", IsoKind::Timestamp).as_deref(),
            Some("2019-07-09T02:28:57.123456")
        );
        assert_eq!(iso_local("2019-07-09T02:28:57+01:00", IsoKind::Timestamp), None);
    }
}
