//! API errors: a stable code, a message a person can act on, the right HTTP status.
//!
//! Every failure leaves the server as `{"error": {"code": "...", "message": "..."}}`. The
//! codes are part of the API contract; messages may improve. Nothing here ever formats a
//! secret value: backend errors carry none by construction, and internal causes are
//! logged, not returned.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use custos_core::{BackendError, FieldError, PathError};
use serde::Serialize;

/// An error answer of the HTTP API.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn missing_token() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "missing_token",
            "this endpoint needs a token: send `Authorization: Bearer TOKEN` or \
             `X-Custos-Token: TOKEN`",
        )
    }

    pub fn invalid_token() -> Self {
        // Deliberately the same for unknown, malformed and revoked tokens.
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_token",
            "the token is not valid",
        )
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the request body is larger than the limit of {limit} bytes"),
        )
    }

    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "an internal error occurred; the broker's log has the cause under this request id",
        )
    }

    pub fn not_ready(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", message)
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: &self.message,
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response.extensions_mut().insert(ErrorCode(self.code));
        response
    }
}

/// The error code of a response, kept as an extension for logging.
#[derive(Debug, Clone, Copy)]
pub struct ErrorCode(pub &'static str);

impl From<PathError> for ApiError {
    fn from(error: PathError) -> Self {
        Self::bad_request("invalid_path", format!("invalid secret path: {error}"))
    }
}

impl From<FieldError> for ApiError {
    fn from(error: FieldError) -> Self {
        Self::bad_request("invalid_secret", error.to_string())
    }
}

impl From<BackendError> for ApiError {
    fn from(error: BackendError) -> Self {
        let message = error.to_string();
        let (status, code) = match &error {
            BackendError::NotFound => (StatusCode::NOT_FOUND, "secret_not_found"),
            BackendError::VersionNotFound { .. } => (StatusCode::NOT_FOUND, "version_not_found"),
            BackendError::VersionDeleted { .. } => (StatusCode::NOT_FOUND, "version_deleted"),
            BackendError::VersionDestroyed { .. } => (StatusCode::NOT_FOUND, "version_destroyed"),
            BackendError::Unsupported { .. } => {
                (StatusCode::METHOD_NOT_ALLOWED, "unsupported_operation")
            }
            BackendError::InvalidInput(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            BackendError::CheckAndSetMismatch { .. } => {
                (StatusCode::CONFLICT, "check_and_set_mismatch")
            }
            BackendError::KeyUnavailable { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "key_unavailable")
            }
            BackendError::DecryptionFailed { .. } => {
                (StatusCode::INTERNAL_SERVER_ERROR, "decryption_failed")
            }
            BackendError::Unavailable(_) => (StatusCode::BAD_GATEWAY, "backend_unavailable"),
            BackendError::StoreUnavailable => {
                (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable")
            }
            BackendError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "backend_timeout"),
            BackendError::PermissionDenied(_) => (StatusCode::BAD_GATEWAY, "backend_denied"),
            BackendError::Internal(_) => {
                tracing::error!(%error, "backend failed");
                return Self::internal();
            }
        };
        Self::new(status, code, message)
    }
}
