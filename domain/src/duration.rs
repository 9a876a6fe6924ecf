//! Durations in configuration files, written as a number of seconds (or days) in keys named `..._seconds`
//! (`..._days`), as the file has always written them: `serde(with = "cloud_domain::duration::seconds")`.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A number, whole or not (`0.25` for 250 ms).
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum Number {
    Whole(u64),
    Fraction(f64),
}

fn to_number(d: Duration, unit: u64) -> Number {
    if d.subsec_nanos() == 0 && d.as_secs().is_multiple_of(unit) {
        Number::Whole(d.as_secs() / unit)
    } else {
        Number::Fraction(d.as_secs_f64() / unit as f64)
    }
}

fn from_number<'de, D: Deserializer<'de>>(d: D, unit: u64, what: &str) -> Result<Duration, D::Error> {
    match Number::deserialize(d)? {
        Number::Whole(n) => n
            .checked_mul(unit)
            .map(Duration::from_secs)
            .ok_or_else(|| serde::de::Error::custom(format!("{n} {what} is too long"))),
        Number::Fraction(f) => Duration::try_from_secs_f64(f * unit as f64)
            .map_err(|_| serde::de::Error::custom(format!("{f} is not a number of {what} (0 or more)"))),
    }
}

/// A duration as seconds.
pub mod seconds {
    use super::*;

    /// Writes whole seconds, or a fraction.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        to_number(*d, 1).serialize(s)
    }

    /// Reads a number of seconds.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        from_number(d, 1, "seconds")
    }
}

/// A duration as days.
pub mod days {
    use super::*;

    /// Writes whole days, or a fraction.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        to_number(*d, 86400).serialize(s)
    }

    /// Reads a number of days.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        from_number(d, 86400, "days")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct T {
        #[serde(with = "seconds")]
        s: Duration,
        #[serde(with = "days")]
        d: Duration,
    }

    #[test]
    fn whole_and_fractional_numbers_round_trip_and_negative_ones_are_refused() {
        let t: T = serde_json::from_str(r#"{"s": 0.25, "d": 30}"#).unwrap();
        assert_eq!(t, T { s: Duration::from_millis(250), d: Duration::from_secs(30 * 86400) });
        assert_eq!(serde_json::to_string(&t).unwrap(), r#"{"s":0.25,"d":30}"#);
        let err = serde_json::from_str::<T>(r#"{"s": -1, "d": 1}"#).unwrap_err().to_string();
        assert!(err.contains("-1 is not a number of seconds"), "{err}");
    }
}
