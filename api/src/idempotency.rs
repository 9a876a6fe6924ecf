//! `Idempotency-Key` on POST: a retried request gets the first response instead of acting twice.
//!
//! A response is replayed only to the token that got it, authenticated again in full (signature, record,
//! revocation, expiry: [`authenticate`]). That is the authorization the handler would apply too: what a token may
//! do is its record's tenant and scopes, which never change (a trigger refuses it), and the handler already judged
//! this same request for this same token when it produced the response. Any other caller (another token of the
//! tenant, one without a valid token) never reaches a stored response: it runs the handler, which refuses it or
//! answers it afresh. Stored bodies are sealed with the platform secret key, as they may hold secrets (the JWT of
//! a created token).

use actix_web::body::{BoxBody, MessageBody, to_bytes};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::{Method, StatusCode, header};
use actix_web::middleware::Next;
use actix_web::web::{self, Bytes};
use actix_web::{HttpResponse, ResponseError};
use cloud_domain::api::ErrorCode;
use cloud_store::IdempotencyBegin;
use sha2::{Digest, Sha256};

use crate::auth::{authenticate, bearer};
use crate::error::ApiError;
use crate::{AppState, Auth};

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
    // Keys are per token. Without a valid token there is nothing to key on, and nothing may be replayed: the
    // handler refuses the request with its own answer.
    let authenticated = match bearer(req.request()) {
        Ok(jwt) => authenticate(&state, jwt).await,
        Err(e) => Err(e),
    };
    let Ok(Auth { token_id: token, .. }) = authenticated else {
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

    let begin = match state.store.idempotency_begin(token, &key, &hash).await {
        Ok(b) => b,
        Err(e) => return Ok(req.into_response(ApiError::from(e).error_response())),
    };
    match begin {
        IdempotencyBegin::Replay { status, content_type, body } => {
            let body = match state.secret_key.open(&body) {
                Ok(body) => body,
                Err(e) => return Ok(req.into_response(ApiError::internal(&e).error_response())),
            };
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
            // A server fault is not an answer, nor is a failed registry (502): release the key so a retry runs the
            // request (as when the answer cannot be sealed, which only a failing random source causes).
            let answered = !status.is_server_error();
            let sealed = if answered { state.secret_key.seal(&bytes).ok() } else { None };
            let outcome = match sealed {
                None => state.store.idempotency_abandon(token, &key).await,
                Some(sealed) => {
                    let ct = res.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
                    state.store.idempotency_finish(token, &key, status.as_u16(), ct, &sealed).await
                }
            };
            if let Err(e) = outcome {
                tracing::warn!(error = %crate::error::chain(&e), "could not record an idempotency key");
            }
            Ok(ServiceResponse::new(http_req, res.set_body(bytes).map_into_boxed_body()))
        }
    }
}
