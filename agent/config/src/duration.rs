//! Durations as Istio reads them: Go's `time.ParseDuration` syntax (`500ms`, `0.5s`, `1h30m`), plus
//! the range checks Istio's validation applies (at least 1 ms, millisecond precision).

use std::time::Duration;

/// Why a duration string was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("invalid duration {0:?}: empty (use a Go duration such as 500ms, 1s or 1m30s)")]
    Empty(String),
    #[error("invalid duration {input:?}: missing unit after {number:?} (use ns, us, ms, s, m or h, e.g. 500ms)")]
    MissingUnit { input: String, number: String },
    #[error("invalid duration {input:?}: unknown unit {unit:?} (use ns, us, ms, s, m or h, with no spaces)")]
    UnknownUnit { input: String, unit: String },
    #[error(
        "invalid duration {0:?}: expected a number (use a Go duration such as 500ms, 1s or 1m30s)"
    )]
    Syntax(String),
    #[error("invalid duration {0:?}: negative durations are not allowed")]
    Negative(String),
    #[error("invalid duration {0:?}: too large")]
    Overflow(String),
}

const UNITS: &[(&str, u128)] = &[
    ("ns", 1),
    ("us", 1_000),
    ("\u{b5}s", 1_000),
    ("\u{3bc}s", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60_000_000_000),
    ("h", 3_600_000_000_000),
];

/// Parses a Go duration (`time.ParseDuration`): an optional sign, then one or more decimal numbers
/// each followed by a unit; `0` alone needs no unit. Negative values are rejected.
pub fn parse_duration(input: &str) -> Result<Duration, DurationError> {
    let mut s = input;
    if s.is_empty() {
        return Err(DurationError::Empty(input.to_string()));
    }
    let mut negative = false;
    if let Some(rest) = s.strip_prefix('-') {
        negative = true;
        s = rest;
    } else if let Some(rest) = s.strip_prefix('+') {
        s = rest;
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err(DurationError::Syntax(input.to_string()));
    }
    let mut total: u128 = 0;
    while !s.is_empty() {
        let int_len = s.bytes().take_while(u8::is_ascii_digit).count();
        let (int_part, rest) = s.split_at(int_len);
        let (frac_part, rest) = match rest.strip_prefix('.') {
            Some(r) => {
                let n = r.bytes().take_while(u8::is_ascii_digit).count();
                r.split_at(n)
            }
            None => ("", rest),
        };
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(DurationError::Syntax(input.to_string()));
        }
        let unit_len = rest
            .char_indices()
            .find(|(_, c)| c.is_ascii_digit() || *c == '.')
            .map_or(rest.len(), |(i, _)| i);
        let (unit, rest) = rest.split_at(unit_len);
        if unit.is_empty() {
            return Err(DurationError::MissingUnit {
                input: input.to_string(),
                number: s[..s.len() - rest.len()].to_string(),
            });
        }
        let scale = UNITS
            .iter()
            .find(|(name, _)| *name == unit)
            .map(|(_, scale)| *scale)
            .ok_or_else(|| DurationError::UnknownUnit {
                input: input.to_string(),
                unit: unit.to_string(),
            })?;
        let overflow = || DurationError::Overflow(input.to_string());
        let whole: u128 = if int_part.is_empty() {
            0
        } else {
            int_part.parse().map_err(|_| overflow())?
        };
        let mut nanos = whole.checked_mul(scale).ok_or_else(overflow)?;
        // Fraction digits beyond nanosecond resolution cannot change the result.
        let frac = &frac_part[..frac_part.len().min(20)];
        if !frac.is_empty() {
            let digits: u128 = frac.parse().map_err(|_| overflow())?;
            nanos += digits * scale / 10u128.pow(frac.len() as u32);
        }
        total = total.checked_add(nanos).ok_or_else(overflow)?;
        s = rest;
    }
    if negative && total > 0 {
        return Err(DurationError::Negative(input.to_string()));
    }
    let secs = u64::try_from(total / 1_000_000_000)
        .map_err(|_| DurationError::Overflow(input.to_string()))?;
    Ok(Duration::new(secs, (total % 1_000_000_000) as u32))
}

/// Istio's `ValidateDuration`: at least 1 ms, and a whole number of milliseconds.
pub fn check_istio_duration(d: Duration) -> Result<(), String> {
    if d < Duration::from_millis(1) {
        return Err("duration must be at least 1ms".to_string());
    }
    if !d.subsec_nanos().is_multiple_of(1_000_000) {
        return Err("only durations to millisecond precision are supported".to_string());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn go_syntax() {
        assert_eq!(parse_duration("1s"), Ok(ms(1000)));
        assert_eq!(parse_duration("0.5s"), Ok(ms(500)));
        assert_eq!(parse_duration(".5s"), Ok(ms(500)));
        assert_eq!(parse_duration("2.5s"), Ok(ms(2500)));
        assert_eq!(parse_duration("500ms"), Ok(ms(500)));
        assert_eq!(parse_duration("10m"), Ok(ms(600_000)));
        assert_eq!(parse_duration("2m"), Ok(ms(120_000)));
        assert_eq!(parse_duration("1h"), Ok(ms(3_600_000)));
        assert_eq!(parse_duration("1h30m"), Ok(ms(5_400_000)));
        assert_eq!(parse_duration("1m0.5s"), Ok(ms(60_500)));
        assert_eq!(parse_duration("+3s"), Ok(ms(3000)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("1500us"), Ok(Duration::from_micros(1500)));
        assert_eq!(parse_duration("1500µs"), Ok(Duration::from_micros(1500)));
        assert_eq!(parse_duration("7ns"), Ok(Duration::from_nanos(7)));
        assert_eq!(parse_duration("1.000000001s"), Ok(Duration::new(1, 1)));
    }

    #[test]
    fn rejects_what_go_rejects() {
        assert!(matches!(parse_duration(""), Err(DurationError::Empty(_))));
        assert!(matches!(
            parse_duration("5"),
            Err(DurationError::MissingUnit { .. })
        ));
        assert!(matches!(
            parse_duration("1s5"),
            Err(DurationError::MissingUnit { .. })
        ));
        assert!(matches!(
            parse_duration("5 s"),
            Err(DurationError::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse_duration("5sec"),
            Err(DurationError::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse_duration("1d"),
            Err(DurationError::UnknownUnit { .. })
        ));
        assert!(matches!(parse_duration("s"), Err(DurationError::Syntax(_))));
        assert!(matches!(parse_duration("."), Err(DurationError::Syntax(_))));
        assert!(matches!(parse_duration("-"), Err(DurationError::Syntax(_))));
        assert!(matches!(
            parse_duration("-1s"),
            Err(DurationError::Negative(_))
        ));
        assert!(matches!(
            parse_duration("99999999999999999999999h"),
            Err(DurationError::Overflow(_))
        ));
    }

    #[test]
    fn messages_are_actionable() {
        let e = parse_duration("5 s").unwrap_err().to_string();
        assert_eq!(
            e,
            "invalid duration \"5 s\": unknown unit \" s\" (use ns, us, ms, s, m or h, with no spaces)"
        );
    }

    #[test]
    fn istio_range() {
        assert!(check_istio_duration(ms(1)).is_ok());
        assert!(check_istio_duration(Duration::ZERO).is_err());
        assert!(check_istio_duration(Duration::from_micros(500)).is_err());
        assert!(check_istio_duration(Duration::from_micros(1500)).is_err());
    }
}
