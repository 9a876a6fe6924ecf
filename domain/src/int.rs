//! Integers in request bodies, read as the OpenAPI document declares them: JSON Schema counts `5.0` as the integer
//! 5, so a client generated from the document may send it, and a value outside the declared bounds is refused by
//! name rather than stored as something else. Each field says its bounds twice, here for the server
//! (`deserialize_with = "int::exact::<_, _, MIN, MAX>"`) and in `#[schema(minimum, maximum)]` for the document;
//! schemathesis in `scripts/test` keeps the two in step.

use std::fmt;
use std::marker::PhantomData;

use serde::Deserializer;
use serde::de::{self, Visitor};

/// The largest integer every JSON client holds exactly (2^53 - 1, JavaScript's `Number.MAX_SAFE_INTEGER`): the
/// bound of fields without a smaller one of their own.
pub const MAX_SAFE: i64 = (1 << 53) - 1;

/// The largest value of a PostgreSQL `integer` column.
pub const MAX_I32: i64 = i32::MAX as i64;

struct Whole<T, const MIN: i64, const MAX: i64>(PhantomData<T>);

impl<T, const MIN: i64, const MAX: i64> Whole<T, MIN, MAX>
where
    T: TryFrom<i64>,
{
    fn checked<E: de::Error>(&self, v: i64, unexp: de::Unexpected<'_>) -> Result<T, E> {
        if (MIN..=MAX).contains(&v) {
            T::try_from(v).map_err(|_| E::invalid_value(unexp, self))
        } else {
            Err(E::invalid_value(unexp, self))
        }
    }
}

impl<'de, T, const MIN: i64, const MAX: i64> Visitor<'de> for Whole<T, MIN, MAX>
where
    T: TryFrom<i64>,
{
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "an integer from {MIN} to {MAX}")
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        self.checked(v, de::Unexpected::Signed(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        match i64::try_from(v) {
            Ok(i) => self.checked(i, de::Unexpected::Unsigned(v)),
            Err(_) => Err(E::invalid_value(de::Unexpected::Unsigned(v), &self)),
        }
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<T, E> {
        // Every bound is at most 2^53, where floats still hold each integer exactly.
        if v.fract() == 0.0 && v.abs() <= MAX_SAFE as f64 {
            self.checked(v as i64, de::Unexpected::Float(v))
        } else if v.is_finite() && v.fract() == 0.0 {
            Err(E::invalid_value(de::Unexpected::Float(v), &self))
        } else {
            Err(E::invalid_type(de::Unexpected::Float(v), &self))
        }
    }
}

/// A required (or defaulted) integer from `MIN` to `MAX`.
pub fn exact<'de, D, T, const MIN: i64, const MAX: i64>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<i64>,
{
    d.deserialize_any(Whole::<T, MIN, MAX>(PhantomData))
}

struct Maybe<T, const MIN: i64, const MAX: i64>(PhantomData<T>);

impl<'de, T, const MIN: i64, const MAX: i64> Visitor<'de> for Maybe<T, MIN, MAX>
where
    T: TryFrom<i64>,
{
    type Value = Option<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "an integer from {MIN} to {MAX}, or null")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Option<T>, E> {
        Ok(None)
    }

    fn visit_none<E: de::Error>(self) -> Result<Option<T>, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Option<T>, D::Error> {
        exact::<D, T, MIN, MAX>(d).map(Some)
    }
}

/// An optional integer from `MIN` to `MAX` (`null` is absent); use with `#[serde(default)]`.
pub fn optional<'de, D, T, const MIN: i64, const MAX: i64>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<i64>,
{
    d.deserialize_option(Maybe::<T, MIN, MAX>(PhantomData))
}

/// An integer from `MIN` to `MAX` that may be cleared: absent is `None` (with `#[serde(default)]`), `null` is
/// `Some(None)`.
pub fn clearable<'de, D, T, const MIN: i64, const MAX: i64>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<i64>,
{
    optional::<D, T, MIN, MAX>(d).map(Some)
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    struct Body {
        #[serde(deserialize_with = "super::exact::<_, _, 1, 65535>")]
        port: u16,
        #[serde(default, deserialize_with = "super::optional::<_, _, 0, { super::MAX_I32 }>")]
        quota: Option<u32>,
        #[serde(default, deserialize_with = "super::clearable::<_, _, 1, 10>")]
        limit: Option<Option<u32>>,
    }

    fn parse(json: &str) -> Result<Body, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    #[test]
    fn whole_floats_are_integers_and_bounds_are_kept() {
        assert_eq!(parse(r#"{"port": 443.0}"#).unwrap(), Body { port: 443, quota: None, limit: None });
        assert_eq!(
            parse(r#"{"port": 1, "quota": 2147483647, "limit": null}"#).unwrap(),
            Body { port: 1, quota: Some(i32::MAX as u32), limit: Some(None) }
        );
        assert_eq!(parse(r#"{"port": 1, "limit": 10.0}"#).unwrap().limit, Some(Some(10)));
        for (json, expected) in [
            (r#"{"port": 0}"#, "expected an integer from 1 to 65535"),
            (r#"{"port": 65536}"#, "invalid value: integer `65536`"),
            (r#"{"port": -1}"#, "invalid value: integer `-1`"),
            (r#"{"port": 443.5}"#, "invalid type: floating point `443.5`"),
            (r#"{"port": 1e300}"#, "invalid value: floating point"),
            (r#"{"port": "443"}"#, "invalid type: string"),
            (r#"{"port": 1, "quota": 2147483648}"#, "expected an integer from 0 to 2147483647"),
            (r#"{"port": 1, "quota": 18446744073709551615}"#, "invalid value: integer `18446744073709551615`"),
            (r#"{"port": 1, "limit": 0}"#, "expected an integer from 1 to 10"),
        ] {
            let e = parse(json).unwrap_err();
            assert!(e.contains(expected), "{json}: {e}");
        }
    }
}
