//! Request validation with the domain rules, before anything touches the database.

use actix_web::error::JsonPayloadError;
use cloud_domain::api::{ErrorCode, PortInput};
use cloud_domain::names::{self, NameKind};
use cloud_domain::ports::{self, PortMapping, PortPolicy, PortSpec};
use cloud_store::{Cursor, Settings};
use serde::Deserialize;
use utoipa::IntoParams;

use crate::error::{ApiError, ApiResult};

/// Renders JSON body failures with the parser's own words (which name the field and position).
pub(crate) fn json_error(e: JsonPayloadError) -> ApiError {
    match e {
        JsonPayloadError::Overflow { limit } | JsonPayloadError::OverflowKnownLength { limit, .. } => {
            ApiError::new(ErrorCode::PayloadTooLarge, format!("the JSON body exceeds the limit of {limit} bytes"))
        }
        JsonPayloadError::ContentType => ApiError::new(
            ErrorCode::UnsupportedMediaType,
            "the body must be JSON with 'Content-Type: application/json'",
        ),
        JsonPayloadError::Deserialize(e) => ApiError::new(ErrorCode::InvalidJson, format!("invalid JSON body: {e}")),
        other => ApiError::new(ErrorCode::InvalidJson, format!("invalid JSON body: {other}")),
    }
}

/// Pagination parameters of every list.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    /// Page size, 1 to 500 (default 50). Parsed here rather than by serde so errors name the parameter.
    #[param(value_type = Option<u32>)]
    pub limit: Option<String>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

impl ListQuery {
    /// The decoded cursor and page size.
    pub fn parse(&self) -> ApiResult<(Option<Cursor>, usize)> {
        let limit = match self.limit.as_deref() {
            None => 50,
            Some(text) => text.parse::<u32>().ok().filter(|l| (1..=500).contains(l)).ok_or_else(|| {
                ApiError::new(ErrorCode::InvalidQuery, format!("limit must be a number from 1 to 500, got \"{text}\""))
            })?,
        };
        let cursor = match &self.cursor {
            None => None,
            Some(c) => Some(Cursor::decode(c).ok_or_else(|| {
                ApiError::new(ErrorCode::InvalidCursor, "the cursor is not one this API issued; start without one")
            })?),
        };
        Ok((cursor, limit as usize))
    }
}

/// Validates a resource name.
pub(crate) fn name(kind: NameKind, name: &str) -> ApiResult<()> {
    Ok(names::validate_name(kind, name)?)
}

/// Parses and expands port inputs (strings or objects) with every port rule.
pub(crate) fn ports(inputs: &[PortInput], settings: &Settings) -> ApiResult<Vec<PortMapping>> {
    let specs = inputs
        .iter()
        .map(|p| match p {
            PortInput::Spec(s) => s.parse::<PortSpec>(),
            PortInput::Object(o) => Ok(o.clone()),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ports::expand(&specs, &PortPolicy { tcp_ports: settings.tcp_ports.clone() })?)
}

/// Soft and hard limits must be positive, and soft at most hard.
pub(crate) fn limits(soft: Option<u32>, hard: Option<u32>) -> ApiResult<()> {
    for (what, v) in [("soft_limit", soft), ("hard_limit", hard)] {
        if v == Some(0) || v.is_some_and(|v| v > i32::MAX as u32) {
            return Err(ApiError::new(ErrorCode::InvalidRequest, format!("{what} must be between 1 and {}", i32::MAX)));
        }
    }
    if let (Some(s), Some(h)) = (soft, hard)
        && s > h
    {
        return Err(ApiError::new(ErrorCode::InvalidRequest, format!("soft_limit {s} must not exceed hard_limit {h}")));
    }
    Ok(())
}

/// The most a service may idle before scaling to zero: a week.
const MAX_SCALE_TO_ZERO_AFTER: u32 = 7 * 24 * 3600;

/// A scale-to-zero idle time is between one second and a week.
pub(crate) fn scale_to_zero(after: Option<u32>) -> ApiResult<()> {
    match after {
        Some(s) if s == 0 || s > MAX_SCALE_TO_ZERO_AFTER => Err(ApiError::new(
            ErrorCode::InvalidRequest,
            format!("scale_to_zero_after {s} must be between 1 and {MAX_SCALE_TO_ZERO_AFTER} seconds"),
        )),
        _ => Ok(()),
    }
}

/// Resolves domain inputs to (fully qualified name, custom) with the rules of `cloud_domain::domains`: `name` is
/// a platform subdomain `name.<region>.<base_domain>`; `www.example.com.` (trailing dot) is a custom domain.
pub(crate) fn domains(inputs: &[String], settings: &Settings) -> ApiResult<Vec<(String, bool)>> {
    Ok(cloud_domain::domains::resolve_domains(inputs, &settings.zone(), &settings.base_domain)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_resolve_platform_and_custom_names() {
        let s = Settings::default();
        let got =
            domains(&["shop".into(), "www.example.com.".into(), "api2.dev.cloud.localhost.".into(), "shop".into()], &s)
                .unwrap();
        assert_eq!(
            got,
            [
                ("shop.dev.cloud.localhost".to_owned(), false),
                ("www.example.com".to_owned(), true),
                ("api2.dev.cloud.localhost".to_owned(), false)
            ]
        );
        for bad in [
            "a.b.dev.cloud.localhost.",
            "dev.cloud.localhost.",
            "prod.cloud.localhost.",
            "*.cloud.localhost.",
            "cloud.localhost.",
            "www.example.com",
            "Shop",
            "-x.",
        ] {
            let e = domains(&[bad.into()], &s).unwrap_err();
            assert_eq!((e.status.as_u16(), e.code), (400, ErrorCode::InvalidDomain), "{bad}: {e}");
        }
        let many: Vec<String> = (0..51).map(|i| format!("d{i}.example.com.")).collect();
        let e = domains(&many, &s).unwrap_err();
        assert_eq!((e.status.as_u16(), e.code), (400, ErrorCode::TooManyDomains), "{e}");
    }

    #[test]
    fn limits_are_positive_and_ordered() {
        assert!(limits(Some(1), Some(1)).is_ok());
        assert!(limits(None, Some(5)).is_ok());
        assert!(limits(Some(0), None).unwrap_err().detail.contains("soft_limit must be"));
        assert!(limits(Some(6), Some(5)).unwrap_err().detail.contains("must not exceed"));
    }
}
