//! Every error the API returns: `{"error": {"code": "...", "message": "..."}}` with the
//! matching status, and the extractors that turn axum's own rejections into that shape.

use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::store::StoreError;

/// An API error: a status, a stable machine-readable code and a message for people.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable code (`bad_parameter`, `not_found`, ...).
    pub code: &'static str,
    /// What went wrong, naming the parameter or resource.
    pub message: String,
}

/// The JSON body of an error.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// Code and message of an error.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable code: `unauthorized`, `bad_parameter`, `bad_body`, `not_found`, `conflict`,
    /// `method_not_allowed`, `unavailable` or `internal`.
    pub code: String,
    /// What went wrong.
    pub message: String,
}

impl ApiError {
    /// An error with this status and code.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// 400 for a query parameter, naming it.
    pub fn parameter(name: &str, reason: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "bad_parameter",
            format!("query parameter `{name}`: {reason}"),
        )
    }

    /// 400 for a request body.
    pub fn body(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_body", reason)
    }

    /// 404 naming what was not found.
    pub fn not_found(what: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", what)
    }

    /// 404 for a device the store does not know.
    pub fn unknown_device(id: &str) -> Self {
        Self::not_found(format!("no device {id:?}"))
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::warn!(error = %e, "API request failed in the store");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("store: {e}"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
            },
        };
        (self.status, axum::Json(body)).into_response()
    }
}

/// A JSON request body whose rejections are [`ApiError`]s.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Body(v)),
            // 415 without `Content-Type: application/json`, 413 when too large, else 400
            // (malformed JSON, or JSON of the wrong shape).
            Err(rejection) => {
                let status = match rejection.status() {
                    s @ (StatusCode::UNSUPPORTED_MEDIA_TYPE | StatusCode::PAYLOAD_TOO_LARGE) => s,
                    _ => StatusCode::BAD_REQUEST,
                };
                Err(ApiError::new(status, "bad_body", rejection.body_text()))
            }
        }
    }
}

/// 404 for a path no route serves.
pub async fn no_route(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("no route {}", uri.path()))
}

/// 405 for a method a route does not serve.
pub async fn wrong_method(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not served on {}", uri.path()),
    )
}
