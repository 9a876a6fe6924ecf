//! What a request that no route takes is told: `405 Method Not Allowed` with `Allow` when the path is served with
//! other methods, `404` otherwise. The table is read from the OpenAPI document, so the two cannot disagree.

use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, web};
use cloud_domain::api::ErrorCode;
use serde_json::Value;

use crate::error::{ApiError, ApiResult};

/// One segment of a path template.
#[derive(Debug, PartialEq, Eq)]
enum Segment {
    /// Must be exactly this.
    Literal(String),
    /// `{name}`: any one segment.
    Param,
}

/// The paths the API serves, with their methods.
#[derive(Debug, Default)]
pub(crate) struct RouteTable {
    routes: Vec<(Vec<Segment>, Vec<&'static str>)>,
}

impl RouteTable {
    /// Every path of the document, and the documentation pages (`/openapi.json`, `/docs`), which it does not list.
    pub fn new(doc: &Value) -> Self {
        const METHODS: [&str; 9] = ["GET", "PUT", "POST", "DELETE", "OPTIONS", "HEAD", "PATCH", "TRACE", "QUERY"];
        let mut table = Self::default();
        for (path, item) in doc["paths"].as_object().into_iter().flatten() {
            let declared = METHODS.iter().filter(|m| item.get(m.to_ascii_lowercase()).is_some()).copied().collect();
            table.add(path, declared);
        }
        table.add("/openapi.json", vec!["GET"]);
        table.add("/docs", vec!["GET"]);
        table
    }

    fn add(&mut self, template: &str, methods: Vec<&'static str>) {
        let segments = template
            .split('/')
            .map(|s| if s.starts_with('{') && s.ends_with('}') { Segment::Param } else { Segment::Literal(s.into()) })
            .collect();
        self.routes.push((segments, methods));
    }

    /// The methods served at `path` (`GET, POST`), or `None` for a path the API does not serve.
    pub fn allowed(&self, path: &str) -> Option<String> {
        // The documentation pages: everything under /docs/ is Swagger UI's.
        if path.starts_with("/docs/") {
            return Some("GET".into());
        }
        let parts: Vec<&str> = path.split('/').collect();
        let mut methods: Vec<&str> = Vec::new();
        for (segments, route_methods) in &self.routes {
            let matches = segments.len() == parts.len()
                && segments.iter().zip(&parts).all(|(s, p)| match s {
                    Segment::Literal(l) => l == p,
                    Segment::Param => !p.is_empty(),
                });
            if matches {
                for m in route_methods {
                    if !methods.contains(m) {
                        methods.push(m);
                    }
                }
            }
        }
        (!methods.is_empty()).then(|| methods.join(", "))
    }
}

/// The default service: no route took the request.
pub(crate) async fn unrouted(req: HttpRequest, table: web::Data<RouteTable>) -> ApiResult<HttpResponse> {
    match table.allowed(req.path()) {
        Some(allow) => {
            let mut e = ApiError::new(
                ErrorCode::MethodNotAllowed,
                format!("{} does not take {}; it takes {allow}", req.path(), req.method()),
            );
            if let Ok(value) = HeaderValue::from_str(&allow) {
                e.headers.push((header::ALLOW, value));
            }
            Err(e)
        }
        None => Err(ApiError::new(ErrorCode::RouteNotFound, format!("no route for {} {}", req.method(), req.path()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_of_the_document_allow_their_methods_and_others_are_unknown() {
        let table = RouteTable::new(&crate::openapi());
        assert_eq!(table.allowed("/v1/services").as_deref(), Some("GET, POST"));
        assert_eq!(table.allowed("/v1/services/web").as_deref(), Some("GET, DELETE, PATCH"));
        assert_eq!(table.allowed("/v1/services/web/domains/www.example.com/verify").as_deref(), Some("POST"));
        assert_eq!(table.allowed("/v1/instances/web-1/logs").as_deref(), Some("GET"));
        assert_eq!(table.allowed("/healthz").as_deref(), Some("GET"));
        assert_eq!(table.allowed("/openapi.json").as_deref(), Some("GET"));
        assert_eq!(table.allowed("/docs/index.html").as_deref(), Some("GET"));
        for unknown in ["/", "/v1", "/v1/nothing", "/v1/services/", "/v1/services/web/extra", "/v2/services"] {
            assert_eq!(table.allowed(unknown), None, "{unknown}");
        }
    }
}
