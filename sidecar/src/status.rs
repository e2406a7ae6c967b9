//! The one place that maps sidecar errors to gRPC status codes.
//!
//! The filter treats `UNAVAILABLE` as "keep the batch and retry later", so
//! every backend failure maps to it. `INVALID_ARGUMENT` signals that
//! resending the same request cannot succeed. Messages name the bad field
//! but carry no internal detail, which goes to the log instead.

use tonic::Status;
use tracing::error;

use crate::store::StoreError;

/// Errors a gRPC handler can return.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// A request field is invalid.
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// Path of the field in the request, such as `usage[3].customer`.
        field: String,
        /// Problem with the value and the allowed values.
        reason: String,
    },
    /// The usage store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The task that served the request ended without a result.
    #[error("the task that served the request ended early: {0}")]
    Task(String),
}

impl ServiceError {
    /// Builds a [`ServiceError::InvalidArgument`] for `field`.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ServiceError {
        ServiceError::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl From<ServiceError> for Status {
    fn from(err: ServiceError) -> Status {
        match err {
            ServiceError::InvalidArgument { .. } => Status::invalid_argument(err.to_string()),
            ServiceError::Store(source) => {
                // An operator must act: the store rejects writes or reads
                // (disk full, permissions, corruption) until fixed.
                error!(error = %source, cause = %root_cause(&source), "usage store failed");
                Status::unavailable("usage store unavailable; retry later")
            }
            ServiceError::Task(reason) => {
                error!(reason, "a request's task ended early");
                Status::unavailable("the request was not finished; retry it")
            }
        }
    }
}

fn root_cause(err: &dyn std::error::Error) -> String {
    let mut cause = err;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use tonic::Code;

    use super::*;

    #[test]
    fn invalid_argument_names_field() {
        let status = Status::from(ServiceError::invalid(
            "usage[2].customer",
            "must not be empty",
        ));

        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(
            status.message(),
            "invalid usage[2].customer: must not be empty"
        );
    }

    #[test]
    fn store_failure_is_unavailable_without_detail() {
        let source = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
            Some("database or disk is full at /secret/path".into()),
        );
        let err = ServiceError::Store(StoreError::Open {
            path: PathBuf::from("/secret/path"),
            source,
        });

        let status = Status::from(err);

        assert_eq!(status.code(), Code::Unavailable);
        assert!(
            !status.message().contains("/secret"),
            "{}",
            status.message()
        );
        assert!(!status.message().contains("full"), "{}", status.message());
    }
}
