//! Request validation with the domain rules, before anything touches the database.

use actix_web::error::JsonPayloadError;
use cloud_domain::api::{ErrorCode, PortInput};
use cloud_domain::names::{self, NameKind};
use cloud_domain::ports::{self, PortMapping, PortPolicy, PortSpec};
use cloud_store::{Cursor, Settings};
use serde::Deserialize;
use utoipa::IntoParams;

use crate::error::{ApiError, ApiResult};

/// Renders JSON body failures with the parser's own words.
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
    #[param(value_type = Option<u32>, minimum = 1, maximum = 500)]
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

/// The soft limit is at most the hard limit (each one's bounds were checked as the body was read).
pub(crate) fn limits(soft: Option<u32>, hard: Option<u32>) -> ApiResult<()> {
    if let (Some(s), Some(h)) = (soft, hard)
        && s > h
    {
        return Err(ApiError::new(ErrorCode::LimitsConflict, format!("soft_limit {s} must not exceed hard_limit {h}")));
    }
    Ok(())
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
    fn limits_are_ordered() {
        assert!(limits(Some(1), Some(1)).is_ok());
        assert!(limits(None, Some(5)).is_ok());
        assert!(limits(Some(6), Some(5)).unwrap_err().detail.contains("must not exceed"));
    }
}
