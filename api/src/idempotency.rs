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
            // A server fault is not an answer, nor is a failed registry (424): release the key so a retry runs the
            // request (as when the answer cannot be sealed, which only a failing random source causes).
            let answered = !status.is_server_error() && status != StatusCode::FAILED_DEPENDENCY;
            let sealed = if answered { state.secret_key.seal(&bytes).ok() } else { None };
            let ct = res.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
            let record =
                Record { store: state.store.clone(), token, key, answer: sealed.map(|s| (status.as_u16(), ct, s)) };
            if status == StatusCode::SERVICE_UNAVAILABLE {
                // Mostly PostgreSQL not answering, which the release would wait for too: the client is told to
                // retry later at once, and the key is released meanwhile.
                tokio::spawn(record.write_until_taken());
            } else if let Err(e) = record.write().await {
                if e.is_unavailable() {
                    // Left as it is, the claim would answer every retry with 409 for a day.
                    tokio::spawn(record.write_until_taken());
                } else {
                    tracing::warn!(error = %crate::error::chain(&e), "could not record an idempotency key");
                }
            }
            Ok(ServiceResponse::new(http_req, res.set_body(bytes).map_into_boxed_body()))
        }
    }
}

/// How long the end of a claimed key is retried while PostgreSQL does not answer.
const RECORD_RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(600);

/// The end of a claimed key: the response to replay (status, content type, sealed body), or none (released).
struct Record {
    store: cloud_store::Store,
    token: uuid::Uuid,
    key: String,
    answer: Option<(u16, String, Vec<u8>)>,
}

impl Record {
    async fn write(&self) -> Result<(), cloud_store::StoreError> {
        match &self.answer {
            None => self.store.idempotency_abandon(self.token, &self.key).await,
            Some((status, ct, body)) => self.store.idempotency_finish(self.token, &self.key, *status, ct, body).await,
        }
    }

    /// Writes, retrying with backoff (1 s doubling to 30 s) while PostgreSQL does not answer, for at most
    /// [`RECORD_RETRY_FOR`].
    async fn write_until_taken(self) {
        let deadline = tokio::time::Instant::now() + RECORD_RETRY_FOR;
        let mut wait = std::time::Duration::from_secs(1);
        loop {
            match self.write().await {
                Ok(()) => return,
                Err(e) if e.is_unavailable() && tokio::time::Instant::now() + wait < deadline => {
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(std::time::Duration::from_secs(30));
                }
                Err(e) => {
                    return tracing::warn!(error = %crate::error::chain(&e), "could not record an idempotency key");
                }
            }
        }
    }
}
