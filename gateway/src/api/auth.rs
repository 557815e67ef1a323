//! Bearer-token authentication of API requests.
//!
//! Every `/api/` route needs `Authorization: Bearer TOKEN`; `/healthz` and `/metrics` too
//! when `http.protect_all` is set. The live WebSocket also takes `?token=` because browsers
//! cannot set headers on a WebSocket. Tokens are compared in constant time (as SHA-256
//! digests, so not even the length leaks). A missing or wrong token is a 401 with a JSON
//! body and a `WWW-Authenticate` header; the token never appears in logs.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::ApiState;

/// The API token, kept as its digest.
pub struct Token([u8; 32]);

impl Token {
    /// Wraps the configured token.
    pub fn new(token: &str) -> Self {
        Self(Sha256::digest(token.trim().as_bytes()).into())
    }

    /// Whether `candidate` is the token, in constant time.
    pub fn matches(&self, candidate: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(candidate.as_bytes()).into();
        self.0.ct_eq(&digest).into()
    }
}

/// The token a request presents: the bearer header, or (live feed only) `?token=`.
fn presented(req: &Request) -> Option<String> {
    if let Some(value) = req.headers().get(header::AUTHORIZATION) {
        let value = value.to_str().ok()?;
        let (scheme, token) = value.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim().to_owned());
    }
    if req.uri().path() == "/api/v1/live" {
        let axum::extract::Query(pairs) =
            axum::extract::Query::<Vec<(String, String)>>::try_from_uri(req.uri()).ok()?;
        return pairs
            .into_iter()
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v);
    }
    None
}

/// Middleware: lets the request through only with the right token.
pub async fn require_token(
    State(state): State<Arc<ApiState>>,
    req: Request,
    next: Next,
) -> Response {
    match presented(&req) {
        Some(token) if state.token.matches(&token) => next.run(req).await,
        presented => {
            state.metrics.http_unauthorized.inc();
            let message = if presented.is_some() {
                "wrong API token"
            } else {
                "missing API token: send `Authorization: Bearer TOKEN` (the token is in the gateway's api.token file)"
            };
            let mut response =
                ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response();
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"gateway\""),
            );
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_same_token_matches() {
        let t = Token::new("0123456789abcdef0123\n");
        assert!(t.matches("0123456789abcdef0123"));
        assert!(!t.matches("0123456789abcdef012"));
        assert!(!t.matches(""));
    }
}
