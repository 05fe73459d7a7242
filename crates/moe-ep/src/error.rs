//! The one error type of the library. Every variant names the argument (or config field), what was
//! expected and what was found, so a caller can fix the call without reading our source.

use std::time::Duration;

/// Result alias used throughout the crate.
pub type Result<T, E = EpError> = std::result::Result<T, E>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EpError {
    #[error("config `{field}`: expected {expected}, got {actual}")]
    InvalidConfig {
        field: &'static str,
        expected: String,
        actual: String,
    },

    #[error("`{arg}`: expected shape {expected}, got {actual}")]
    Shape {
        arg: &'static str,
        expected: String,
        actual: String,
    },

    #[error("`{arg}`: expected dtype {expected}, got {actual}")]
    DType {
        arg: &'static str,
        expected: String,
        actual: String,
    },

    #[error("`{arg}`: expected memory on {expected}, got memory on {actual}")]
    Device {
        arg: &'static str,
        expected: String,
        actual: String,
    },

    #[error("`{arg}`: expected an address aligned to {expected} bytes, got {actual:#x}")]
    Alignment {
        arg: &'static str,
        expected: usize,
        actual: usize,
    },

    #[error("`{arg}`: expected {expected}, got {actual}")]
    Presence {
        arg: &'static str,
        expected: &'static str,
        actual: &'static str,
    },

    #[error(
        "`{arg}`[{row}, {col}]: expected an expert id in [0, {num_experts}) or -1, got {value}"
    )]
    ExpertOutOfRange {
        arg: &'static str,
        row: usize,
        col: usize,
        value: i64,
        num_experts: usize,
    },

    #[error("`{arg}`: expected at most {max} tokens (max_tokens_per_rank), got {actual}")]
    TooManyTokens {
        arg: &'static str,
        max: usize,
        actual: usize,
    },

    #[error("`{arg}`: expected {expected} columns (topk), got {actual}")]
    TopkMismatch {
        arg: &'static str,
        expected: usize,
        actual: usize,
    },

    #[error("`handle`: expected a handle made by dispatcher #{expected}, got one made by dispatcher #{actual}")]
    ForeignHandle { expected: u64, actual: u64 },

    #[error("`handle`: expected a {expected} handle, got a {actual} handle")]
    HandleLayout {
        expected: &'static str,
        actual: &'static str,
    },

    #[error(
        "`{arg}`: expected {expected} rows (the token count recorded in the handle), got {actual}"
    )]
    CachedTokenCount {
        arg: &'static str,
        expected: usize,
        actual: usize,
    },

    #[error("rank {rank}: receive capacity exceeded: expected at most {capacity} rows, the call needs {need}")]
    CapacityExceeded {
        rank: usize,
        need: usize,
        capacity: usize,
    },

    #[error("rank {rank}: timed out after {waited:?} waiting for rank(s) {missing:?}; this dispatcher is poisoned")]
    Timeout {
        rank: usize,
        missing: Vec<usize>,
        waited: Duration,
    },

    #[error("rank {rank}: collective mismatch: expected every rank in `{expected}`, rank {peer} called `{actual}`")]
    CollectiveMismatch {
        rank: usize,
        peer: usize,
        expected: &'static str,
        actual: &'static str,
    },

    #[error("rank {rank}: config differs from rank {peer}: expected {expected}, rank {peer} has {actual}")]
    ConfigMismatch {
        rank: usize,
        peer: usize,
        expected: String,
        actual: String,
    },

    #[error("group `{arg}`: expected {expected}, got {actual}")]
    Group {
        arg: &'static str,
        expected: String,
        actual: String,
    },

    #[error("backend `{backend}` is unavailable: {reason}")]
    BackendUnavailable {
        backend: &'static str,
        reason: String,
    },
}

impl EpError {
    /// Errors after which the dispatcher cannot be used again (a peer may be stuck mid-collective).
    pub fn poisons(&self) -> bool {
        matches!(
            self,
            EpError::Timeout { .. } | EpError::CollectiveMismatch { .. }
        )
    }
}
