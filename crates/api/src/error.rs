use crate::v1::ErrorBody;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use cluster::{ClusterError, ClusterErrorKind};
use store::{StoreError, StoreErrorKind};
use volume::{VolumeError, VolumeErrorKind};

/// An error a handler returns: a status and a message with the whole cause chain.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into() }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, message)
    }

    fn from_error(status: StatusCode, e: &dyn std::error::Error) -> Self {
        ApiError { status, message: chain(e) }
    }
}

/// "outer: cause: root cause", so a person sees why, not just what.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

impl From<ClusterError> for ApiError {
    fn from(e: ClusterError) -> Self {
        let status = match e.kind() {
            ClusterErrorKind::Invalid => StatusCode::BAD_REQUEST,
            ClusterErrorKind::NotFound => StatusCode::NOT_FOUND,
            ClusterErrorKind::Conflict => StatusCode::CONFLICT,
            ClusterErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ClusterErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::from_error(status, &e)
    }
}

impl From<VolumeError> for ApiError {
    fn from(e: VolumeError) -> Self {
        let status = match e.kind() {
            VolumeErrorKind::Invalid => StatusCode::BAD_REQUEST,
            VolumeErrorKind::Fenced => StatusCode::CONFLICT,
            VolumeErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        };
        Self::from_error(status, &e)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let status = match e.kind() {
            StoreErrorKind::InvalidRequest => StatusCode::BAD_REQUEST,
            StoreErrorKind::Full => StatusCode::INSUFFICIENT_STORAGE,
            StoreErrorKind::Device => StatusCode::BAD_REQUEST,
        };
        Self::from_error(status, &e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(ErrorBody { error: self.message })).into_response()
    }
}
