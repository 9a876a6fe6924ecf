//! `Idempotency-Key` on POST: a retried request gets the first response instead of acting twice.

use actix_web::body::{BoxBody, MessageBody, to_bytes};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::{Method, StatusCode, header};
use actix_web::middleware::Next;
use actix_web::web::{self, Bytes};
use actix_web::{HttpResponse, ResponseError};
use cloud_domain::api::ErrorCode;
use cloud_store::IdempotencyBegin;
use sha2::{Digest, Sha256};

use crate::AppState;
use crate::auth::bearer;
use crate::error::ApiError;

const HEADER: &str = "idempotency-key";

pub(crate) async fn middleware(
    mut req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let key = match req.headers().get(HEADER) {
        Some(k) if req.method() == Method::POST => k.to_str().unwrap_or("\u{0}").to_owned(),
        _ => {
            return next.call(req).await.map(ServiceResponse::map_into_boxed_body);
        }
    };
    let state = req.app_data::<web::Data<AppState>>().cloned().expect("AppState is registered");
    if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| b.is_ascii_graphic()) {
        let e = ApiError::new(ErrorCode::InvalidRequest, "Idempotency-Key must be 1 to 255 visible ASCII characters");
        return Ok(req.into_response(e.error_response()));
    }
    // Keys are per tenant. Without a valid token there is nothing to key on: the handler will refuse anyway.
    let Ok(claims) = bearer(req.request()).and_then(|jwt| state.signer.verify(jwt)) else {
        return next.call(req).await.map(ServiceResponse::map_into_boxed_body);
    };
    let body = match req.extract::<Bytes>().await {
        Ok(b) => b,
        Err(e) => {
            let e = ApiError::new(ErrorCode::PayloadTooLarge, format!("reading the body: {e}"));
            return Ok(req.into_response(e.error_response()));
        }
    };
    let mut hash = Sha256::new();
    hash.update(req.method().as_str());
    hash.update([0]);
    hash.update(req.uri().to_string());
    hash.update([0]);
    hash.update(&body);
    let hash = hex::encode(hash.finalize());
    req.set_payload(body.into());

    let begin = match state.store.idempotency_begin(claims.sub, &key, &hash).await {
        Ok(b) => b,
        Err(e) => return Ok(req.into_response(ApiError::from(e).error_response())),
    };
    match begin {
        IdempotencyBegin::Replay { status, content_type, body } => {
            let res = HttpResponse::build(StatusCode::from_u16(status).unwrap_or(StatusCode::OK))
                .content_type(content_type)
                .insert_header(("idempotent-replayed", "true"))
                .body(body);
            Ok(req.into_response(res))
        }
        IdempotencyBegin::InProgress => {
            let e = ApiError::new(
                ErrorCode::IdempotencyKeyInProgress,
                "a request with this Idempotency-Key is still being processed; retry shortly",
            );
            Ok(req.into_response(e.error_response()))
        }
        IdempotencyBegin::Mismatch => {
            let e = ApiError::new(
                ErrorCode::IdempotencyKeyReused,
                "this Idempotency-Key was used for a different request; use a new key",
            );
            Ok(req.into_response(e.error_response()))
        }
        IdempotencyBegin::Proceed => {
            let res = next.call(req).await?;
            let status = res.status();
            let (http_req, res) = res.into_parts();
            let (res, body) = res.into_parts();
            let bytes = to_bytes(body).await.unwrap_or_default();
            // A server fault is not an answer, nor is a failed registry (424): release the key so a retry runs
            // the request.
            let outcome = if status.is_server_error() || status == StatusCode::FAILED_DEPENDENCY {
                state.store.idempotency_abandon(claims.sub, &key).await
            } else {
                let ct = res.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
                state.store.idempotency_finish(claims.sub, &key, status.as_u16(), ct, &bytes).await
            };
            if let Err(e) = outcome {
                tracing::warn!(error = %crate::error::chain(&e), "could not record an idempotency key");
            }
            Ok(ServiceResponse::new(http_req, res.set_body(bytes).map_into_boxed_body()))
        }
    }
}
