//! Durations as written in the DSL: `500ms`, `30s`, `1m30s`, `2h`, `1d`.
//!
//! A duration is one or more `<integer><unit>` parts, units from largest to
//! smallest, each at most once: `1d2h3m4s5ms`. Fractions are not accepted: `1m30s`
//! says the same as `1.5m` without rounding questions.

use std::time::Duration;

/// The units, largest first, with their length in milliseconds.
const UNITS: [(&str, u64); 5] = [
    ("d", 86_400_000),
    ("h", 3_600_000),
    ("m", 60_000),
    ("s", 1_000),
    ("ms", 1),
];

/// Parses a DSL duration, or says why it is not one.
pub fn parse(text: &str) -> Result<Duration, String> {
    if text.is_empty() {
        return Err("empty duration".to_string());
    }
    if text.starts_with('-') {
        return Err(format!("negative duration `{text}`"));
    }
    let bytes = text.as_bytes();
    let mut at = 0;
    let mut total_ms: u64 = 0;
    // Index into UNITS of the previous part's unit: the next must be smaller.
    let mut previous: Option<usize> = None;
    while at < bytes.len() {
        let digits_start = at;
        while at < bytes.len() && bytes[at].is_ascii_digit() {
            at += 1;
        }
        if at == digits_start {
            return Err(if bytes[at].is_ascii_alphabetic() {
                format!("bad duration `{text}`: expected a number such as `30s`")
            } else {
                format!("bad duration `{text}`: unexpected `{}`", &text[at..])
            });
        }
        let digits = &text[digits_start..at];
        let unit_start = at;
        while at < bytes.len() && bytes[at].is_ascii_alphabetic() {
            at += 1;
        }
        let unit = &text[unit_start..at];
        if unit.is_empty() {
            return Err(match bytes.get(at) {
                Some(b'.') => format!("bad duration `{text}`: fractions are not supported"),
                Some(_) => format!("bad duration `{text}`: unexpected `{}`", &text[at..]),
                None => format!("bad duration `{text}`: missing unit after `{digits}`"),
            });
        }
        let Some(index) = UNITS.iter().position(|(name, _)| *name == unit) else {
            return Err(format!(
                "bad duration `{text}`: unknown unit `{unit}` (expected ms, s, m, h or d)"
            ));
        };
        if previous.is_some_and(|p| p >= index) {
            return Err(format!(
                "bad duration `{text}`: units must go from largest to smallest, each once"
            ));
        }
        previous = Some(index);
        let too_large = || format!("duration `{text}` is too large");
        let count: u64 = digits.parse().map_err(|_| too_large())?;
        let part = count.checked_mul(UNITS[index].1).ok_or_else(too_large)?;
        total_ms = total_ms.checked_add(part).ok_or_else(too_large)?;
    }
    Ok(Duration::from_millis(total_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Result<Duration, String> {
        Ok(Duration::from_millis(n))
    }

    #[test]
    fn valid() {
        let cases = [
            ("500ms", ms(500)),
            ("30s", ms(30_000)),
            ("1m30s", ms(90_000)),
            ("2h", ms(7_200_000)),
            ("1d", ms(86_400_000)),
            ("1h30m", ms(5_400_000)),
            ("0s", ms(0)),
            ("1d2h3m4s5ms", ms(93_784_005)),
            ("007s", ms(7_000)),
        ];
        for (text, expected) in cases {
            assert_eq!(parse(text), expected, "{text}");
        }
    }

    #[test]
    fn invalid() {
        let cases = [
            ("", "empty duration"),
            ("-5s", "negative duration `-5s`"),
            ("5", "bad duration `5`: missing unit after `5`"),
            (
                "5x",
                "bad duration `5x`: unknown unit `x` (expected ms, s, m, h or d)",
            ),
            (
                "5sec",
                "bad duration `5sec`: unknown unit `sec` (expected ms, s, m, h or d)",
            ),
            ("s", "bad duration `s`: expected a number such as `30s`"),
            ("1.5s", "bad duration `1.5s`: fractions are not supported"),
            ("1s 2ms", "bad duration `1s 2ms`: unexpected ` 2ms`"),
            ("+5s", "bad duration `+5s`: unexpected `+5s`"),
            ("5s!", "bad duration `5s!`: unexpected `!`"),
            (
                "30s1m",
                "bad duration `30s1m`: units must go from largest to smallest, each once",
            ),
            (
                "1s1s",
                "bad duration `1s1s`: units must go from largest to smallest, each once",
            ),
            (
                "99999999999999999999s",
                "duration `99999999999999999999s` is too large",
            ),
            (
                "213503982334601d",
                "duration `213503982334601d` is too large",
            ),
            (
                "18446744073709551615ms1ms",
                "bad duration `18446744073709551615ms1ms`: units must go from largest to smallest, each once",
            ),
            (
                "213503982334d18446744073709551615ms",
                "duration `213503982334d18446744073709551615ms` is too large",
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(parse(text), Err(expected.to_string()), "{text}");
        }
    }
}
