//! What the API checks of a request before the domain rules see it: the JSON body and the list parameters.

use actix_web::error::JsonPayloadError;
use cloud_domain::api::ErrorCode;
use cloud_store::Cursor;
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
