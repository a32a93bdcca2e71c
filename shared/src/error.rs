//! Error codes that travel between cerebrod and the extension.
//!
//! The codes are stable strings on the wire; the extension maps each one to a
//! SQLSTATE. Messages are for people and may change.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The peer speaks another protocol version.
    ProtocolMismatch,
    /// A message was well-framed but made no sense (wrong order, bad field).
    BadRequest,
    /// The model version named does not exist or has no artifact.
    ModelNotFound,
    /// The stored artifact could not be loaded by ONNX Runtime.
    ArtifactInvalid,
    /// A batch layout points outside its shared-memory region.
    BufferInvalid,
    /// ONNX Runtime failed while scoring a batch.
    ScoringFailed,
    /// The daemon cannot serve now (starting up, shutting down, no database).
    Unavailable,
    /// A transaction held a lock the daemon needed past its `lock_timeout`
    /// (reading an artifact a maintenance statement locked).
    LockNotAvailable,
    /// The model cannot do what the request asks (explain a model the
    /// engine does not run).
    Unsupported,
    /// Every connection cerebrod serves (`max_connections`) is in the
    /// middle of a request: none idle to close for this one.
    TooManyConnections,
    /// A bug: anything else.
    Internal,
    /// A code this side does not know (a newer peer's): read as Internal.
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::ProtocolMismatch => "protocol_mismatch",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::ModelNotFound => "model_not_found",
            ErrorCode::ArtifactInvalid => "artifact_invalid",
            ErrorCode::BufferInvalid => "buffer_invalid",
            ErrorCode::ScoringFailed => "scoring_failed",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::LockNotAvailable => "lock_not_available",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::TooManyConnections => "too_many_connections",
            ErrorCode::Internal => "internal",
            ErrorCode::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error as the daemon reports it to a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireError {
    pub code: ErrorCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

impl WireError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        WireError { code, message: message.into(), hint: None }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

impl std::error::Error for WireError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_stable_on_the_wire() {
        let json = serde_json::to_string(&ErrorCode::ModelNotFound).unwrap();
        assert_eq!(json, "\"model_not_found\"");
        let e = WireError::new(ErrorCode::BufferInvalid, "span out of range").with_hint("retry");
        let back: WireError = serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
        assert_eq!(back, e);
        assert_eq!(ErrorCode::BufferInvalid.to_string(), "buffer_invalid");
        // A code a newer peer added reads as one this side handles.
        let newer: ErrorCode = serde_json::from_str("\"a_code_from_the_future\"").unwrap();
        assert_eq!(newer, ErrorCode::Unknown);
    }
}
