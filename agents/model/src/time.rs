//! Instants as RFC 3339 text, in UTC, through one calendar library (jiff, which the Kubernetes
//! crates already use for their own timestamps).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jiff::Timestamp;

/// Milliseconds since the epoch as `YYYY-MM-DDTHH:MM:SS[.mmm]Z` (milliseconds only when not 0).
/// An instant outside jiff's range (years -9999..=9999) is clamped to it.
pub fn rfc3339_ms(ms: i64) -> String {
    let ts = Timestamp::from_millisecond(ms).unwrap_or(if ms < 0 {
        Timestamp::MIN
    } else {
        Timestamp::MAX
    });
    if ms.rem_euclid(1000) == 0 {
        ts.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
    } else {
        ts.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
    }
}

/// A system time as RFC 3339 in UTC with second precision (`2024-05-01T12:00:00Z`).
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    rfc3339_ms(
        i64::try_from(secs)
            .unwrap_or(i64::MAX / 1000)
            .saturating_mul(1000),
    )
}

/// Parses an RFC 3339 instant (`2026-11-26T09:30:00Z`, `…+02:00`, fractions allowed). The error
/// says what is expected; nothing panics on any input.
pub fn parse_rfc3339(text: &str) -> Result<SystemTime, String> {
    let bad = || format!("{text:?} is not an RFC 3339 time such as 2026-11-26T09:30:00Z");
    // jiff also reads a bare civil time with an offset-less zone; RFC 3339 needs the offset.
    let ts: Timestamp = text.trim().parse().map_err(|_| bad())?;
    let secs = u64::try_from(ts.as_second()).map_err(|_| bad())?;
    let nanos = u32::try_from(ts.subsec_nanosecond()).map_err(|_| bad())?;
    Ok(UNIX_EPOCH + Duration::new(secs, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_are_written_as_rfc3339_utc() {
        let table = [
            (0, "1970-01-01T00:00:00Z"),
            (1_500, "1970-01-01T00:00:01.500Z"),
            (951_782_400_000, "2000-02-29T00:00:00Z"),
            (1_709_251_199_999, "2024-02-29T23:59:59.999Z"),
            (1_735_689_600_000, "2025-01-01T00:00:00Z"),
            (-1, "1969-12-31T23:59:59.999Z"),
        ];
        for (ms, text) in table {
            assert_eq!(rfc3339_ms(ms), text, "{ms}");
        }
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_millis(1_735_689_600_999)),
            "2025-01-01T00:00:00Z"
        );
    }

    #[test]
    fn rfc3339_times_parse_and_bad_ones_are_errors() {
        let at = |s: &str| {
            parse_rfc3339(s).map(|t| {
                t.duration_since(UNIX_EPOCH)
                    .map(|d| d.as_millis())
                    .unwrap_or(0)
            })
        };
        assert_eq!(at("2025-01-01T00:00:00Z"), Ok(1_735_689_600_000));
        assert_eq!(at("2025-01-01T02:00:00+02:00"), Ok(1_735_689_600_000));
        assert_eq!(at("2025-01-01T00:00:00.250Z"), Ok(1_735_689_600_250));
        for bad in [
            "",
            "yesterday",
            "2025-13-01T00:00:00Z",
            "2025-02-30T00:00:00Z",
            "2025-01-01T00:00:00",
            "1960-01-01T00:00:00Z",
            "2025-01-01T00:00:00+0é:0",
            "2025-01-01T00:00:0é",
            "２０２５-01-01T00:00:00Z",
        ] {
            let err = parse_rfc3339(bad).expect_err(bad);
            assert!(err.contains("not an RFC 3339 time"), "{bad}: {err}");
        }
    }
}
