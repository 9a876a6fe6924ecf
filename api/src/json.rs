//! JSON request bodies, read as the OpenAPI document describes them: an object where it declares an object (serde
//! would also take a struct written as an array, `[null, null]`), and a refusal that names the field it is about
//! (`invalid JSON body at quotas.max_images: ...`), which actix's extractor cannot: serde_json only reports a line
//! and column.

use actix_web::dev::Payload;
use actix_web::error::JsonPayloadError;
use actix_web::http::header;
use actix_web::{FromRequest, HttpRequest, web};
use cloud_domain::api::ErrorCode;
use futures_util::StreamExt;
use futures_util::future::LocalBoxFuture;
use serde::de::value::{MapDeserializer, SeqDeserializer};
use serde::de::{self, DeserializeOwned, IntoDeserializer, Visitor};
use serde_json::Value;

use crate::error::{ApiError, ApiResult};
use crate::{ApiConfig, AppState};

/// A JSON request body (`application/json` or `application/*+json`, at most `api.max_json_bytes`).
#[derive(Debug)]
pub(crate) struct Json<T>(pub T);

impl<T> Json<T> {
    /// The body.
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> std::ops::Deref for Json<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: DeserializeOwned + 'static> FromRequest for Json<T> {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let limit = req
            .app_data::<web::Data<AppState>>()
            .map_or(ApiConfig::default().max_json_bytes, |s| s.config.max_json_bytes);
        let content_type = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        let is_json =
            essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"));
        let mut payload = payload.take();
        Box::pin(async move {
            if !is_json {
                return Err(crate::validate::json_error(JsonPayloadError::ContentType));
            }
            let mut body = web::BytesMut::new();
            while let Some(chunk) = payload.next().await {
                let chunk =
                    chunk.map_err(|e| ApiError::new(ErrorCode::InvalidJson, format!("reading the body: {e}")))?;
                if body.len() + chunk.len() > limit {
                    return Err(crate::validate::json_error(JsonPayloadError::Overflow { limit }));
                }
                body.extend_from_slice(&chunk);
            }
            parse(&body).map(Json)
        })
    }
}

/// Parses a whole JSON document into `T`, naming the path of the value it fails on.
pub(crate) fn parse<T: DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::new(ErrorCode::InvalidJson, format!("invalid JSON body: {e}")))?;
    serde_path_to_error::deserialize(Strict(value)).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match path.as_str() {
            "." | "" => ApiError::new(ErrorCode::InvalidJson, format!("invalid JSON body: {inner}")),
            _ => ApiError::new(ErrorCode::InvalidJson, format!("invalid JSON body at {path}: {inner}")),
        }
    })
}

/// A JSON value read the way the document declares it: structs only from objects, enums only from strings.
struct Strict(Value);

impl<'de> IntoDeserializer<'de, serde_json::Error> for Strict {
    type Deserializer = Self;

    fn into_deserializer(self) -> Self {
        self
    }
}

impl<'de> de::Deserializer<'de> for Strict {
    type Error = serde_json::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match self.0 {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(b),
            Value::Number(n) => {
                if let Some(u) = n.as_u64() {
                    visitor.visit_u64(u)
                } else if let Some(i) = n.as_i64() {
                    visitor.visit_i64(i)
                } else {
                    visitor.visit_f64(n.as_f64().unwrap_or(f64::NAN))
                }
            }
            Value::String(s) => visitor.visit_string(s),
            Value::Array(items) => {
                let mut seq = SeqDeserializer::new(items.into_iter().map(Strict));
                let value = visitor.visit_seq(&mut seq)?;
                seq.end()?;
                Ok(value)
            }
            Value::Object(map) => {
                let mut map = MapDeserializer::new(map.into_iter().map(|(k, v)| (k, Strict(v))));
                let value = visitor.visit_map(&mut map)?;
                map.end()?;
                Ok(value)
            }
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match self.0 {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        match self.0 {
            Value::Object(_) => self.deserialize_any(visitor),
            other => Err(de::Error::invalid_type(unexpected(&other), &"an object")),
        }
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        match self.0 {
            Value::String(s) => visitor.visit_enum(s.into_deserializer()),
            other => Err(de::Error::invalid_type(unexpected(&other), &"a string")),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        visitor.visit_newtype_struct(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf unit unit_struct seq
        tuple tuple_struct map identifier ignored_any
    }
}

fn unexpected(v: &Value) -> de::Unexpected<'_> {
    match v {
        Value::Null => de::Unexpected::Unit,
        Value::Bool(b) => de::Unexpected::Bool(*b),
        Value::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => de::Unexpected::Unsigned(u),
            (_, Some(i)) => de::Unexpected::Signed(i),
            _ => de::Unexpected::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => de::Unexpected::Str(s),
        Value::Array(_) => de::Unexpected::Seq,
        Value::Object(_) => de::Unexpected::Map,
    }
}

#[cfg(test)]
mod tests {
    use cloud_domain::api::{CreateInstance, CreateToken, UpdateService, UpdateTenant};

    use super::*;

    fn refusal<T: DeserializeOwned + std::fmt::Debug>(json: &str) -> String {
        parse::<T>(json.as_bytes()).unwrap_err().detail
    }

    #[test]
    fn refusals_name_the_field_and_structs_are_objects() {
        let e = refusal::<UpdateTenant>(r#"{"quotas": {"max_images": 2147483648}}"#);
        assert_eq!(
            e,
            "invalid JSON body at quotas.max_images: invalid value: integer `2147483648`, expected an integer from 0 \
             to 2147483647"
        );
        assert!(refusal::<CreateToken>("[null, null]").contains("expected an object"), "arrays are not structs");
        assert!(refusal::<UpdateTenant>(r#"{"quotas": [null]}"#).starts_with("invalid JSON body at quotas:"));
        let e = refusal::<CreateInstance>(r#"{"image": "hello", "ports": [{"port": 443, "destination_port": 0}]}"#);
        assert!(e.starts_with("invalid JSON body at ports[0].destination_port:"), "{e}");
        let e = refusal::<CreateInstance>(r#"{"image": "hello", "restart_policy": "Never"}"#);
        assert!(e.starts_with("invalid JSON body at restart_policy: unknown variant `Never`"), "{e}");
        assert!(refusal::<CreateInstance>(r#"{"image": "hello", "extra": 1}"#).contains("unknown field `extra`"));
        assert!(refusal::<CreateInstance>(r#"{"image": "hello"} x"#).starts_with("invalid JSON body: trailing"));

        let ok: UpdateService = parse(br#"{"soft_limit": null, "hard_limit": 5.0}"#).unwrap();
        assert_eq!((ok.soft_limit, ok.hard_limit), (Some(None), Some(Some(5))));
        let ok: CreateInstance = parse(br#"{"image": "hello", "replicas": 2.0, "port": 8080}"#).unwrap();
        assert_eq!((ok.replicas, ok.port), (2, Some(8080)));
    }
}
