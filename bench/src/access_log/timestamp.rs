//! Timestamps in the Common Log Format, `10/Oct/2000:13:55:36 -0700`.

use std::fmt;

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// A log timestamp: the instant in Unix seconds plus the UTC offset the log wrote it with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LogTime {
    /// Seconds since 1970-01-01T00:00:00Z.
    pub unix_seconds: i64,
    /// Offset from UTC in seconds (`-0700` is `-25200`).
    pub offset_seconds: i32,
}

impl LogTime {
    /// Parses `dd/Mon/yyyy:HH:MM:SS +hhmm`, returning a reason on failure.
    pub fn parse(text: &str) -> Result<Self, String> {
        let invalid = || format!("invalid timestamp {text:?}, expected dd/Mon/yyyy:HH:MM:SS +hhmm");
        let (local, offset) = text.split_once(' ').ok_or_else(invalid)?;
        let bytes = local.as_bytes();
        if bytes.len() != 20 || bytes[2] != b'/' || bytes[6] != b'/' {
            return Err(invalid());
        }
        if bytes[11] != b':' || bytes[14] != b':' || bytes[17] != b':' {
            return Err(invalid());
        }

        let day = parse_digits(&local[0..2]).ok_or_else(invalid)?;
        let month = MONTHS
            .iter()
            .position(|name| *name == &local[3..6])
            .ok_or_else(invalid)? as i64
            + 1;
        let year = parse_digits(&local[7..11]).ok_or_else(invalid)?;
        let hour = parse_digits(&local[12..14]).ok_or_else(invalid)?;
        let minute = parse_digits(&local[15..17]).ok_or_else(invalid)?;
        let second = parse_digits(&local[18..20]).ok_or_else(invalid)?;
        if day == 0 || day > days_in_month(year, month) || hour > 23 || minute > 59 || second > 60 {
            return Err(invalid());
        }
        let offset_seconds = parse_offset(offset).ok_or_else(invalid)?;

        let local_seconds =
            days_from_civil(year, month, day) * 86_400 + hour * 3_600 + minute * 60 + second;
        Ok(LogTime {
            unix_seconds: local_seconds - i64::from(offset_seconds),
            offset_seconds,
        })
    }

    /// Builds a UTC timestamp (`+0000`) from Unix seconds.
    pub fn utc(unix_seconds: i64) -> Self {
        LogTime {
            unix_seconds,
            offset_seconds: 0,
        }
    }
}

impl fmt::Display for LogTime {
    /// Formats as the log wrote it, in the timestamp's own offset.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let local = self.unix_seconds + i64::from(self.offset_seconds);
        let (year, month, day) = civil_from_days(local.div_euclid(86_400));
        let second_of_day = local.rem_euclid(86_400);
        let sign = if self.offset_seconds < 0 { '-' } else { '+' };
        let offset_minutes = self.offset_seconds.unsigned_abs() / 60;
        let month_name = usize::try_from(month - 1)
            .ok()
            .and_then(|index| MONTHS.get(index))
            .ok_or(fmt::Error)?;
        write!(
            f,
            "{day:02}/{month_name}/{year:04}:{:02}:{:02}:{:02} {sign}{:02}{:02}",
            second_of_day / 3_600,
            second_of_day % 3_600 / 60,
            second_of_day % 60,
            offset_minutes / 60,
            offset_minutes % 60,
        )
    }
}

fn parse_digits(text: &str) -> Option<i64> {
    if text.bytes().all(|b| b.is_ascii_digit()) {
        text.parse().ok()
    } else {
        None
    }
}

fn parse_offset(text: &str) -> Option<i32> {
    let bytes = text.as_bytes();
    if bytes.len() != 5 {
        return None;
    }
    let sign = match bytes[0] {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let hours = parse_digits(&text[1..3])?;
    let minutes = parse_digits(&text[3..5])?;
    if hours > 23 || minutes > 59 {
        return None;
    }
    i32::try_from(sign * (hours * 3_600 + minutes * 60)).ok()
}

fn is_leap_year(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap_year(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_from_march = (month + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// Converts a day count since 1970-01-01 to `(year, month, day)`, the inverse of
/// [`days_from_civil`].
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let days = days + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_utc_timestamp() {
        let time = LogTime::parse("17/May/2015:10:05:03 +0000").unwrap();
        assert_eq!(time.unix_seconds, 1_431_857_103);
        assert_eq!(time.offset_seconds, 0);
    }

    #[test]
    fn applies_negative_offset() {
        let time = LogTime::parse("10/Oct/2000:13:55:36 -0700").unwrap();
        assert_eq!(time.unix_seconds, 971_211_336);
        assert_eq!(time.offset_seconds, -25_200);
    }

    #[test]
    fn formats_back_to_the_same_text() {
        for text in [
            "17/May/2015:10:05:03 +0000",
            "10/Oct/2000:13:55:36 -0700",
            "29/Feb/2024:23:59:59 +0530",
            "01/Jan/1970:00:00:00 +0000",
        ] {
            assert_eq!(LogTime::parse(text).unwrap().to_string(), text);
        }
    }

    #[test]
    fn rejects_invalid_timestamps() {
        for text in [
            "",
            "17/May/2015:10:05:03",
            "17/Mai/2015:10:05:03 +0000",
            "30/Feb/2015:10:05:03 +0000",
            "17/May/2015:24:05:03 +0000",
            "17/May/2015:10:05:03 0000",
            "7/May/2015:10:05:03 +0000",
            "17/May/2015 10:05:03 +0000",
        ] {
            assert!(LogTime::parse(text).is_err(), "{text:?} was accepted");
        }
    }
}
