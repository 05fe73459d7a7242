//! Naive oracle and backend-independent conformance suite for moe-ep.
//!
//! - [`oracle`]: the semantics contract as plain loops; bit-exact expected outputs.
//! - [`suite`]: cases run against any backend ([`suite::BackendUnderTest`]), one `#[test]` each
//!   through [`conformance_tests!`].

pub mod oracle;
