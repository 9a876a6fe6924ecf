//! The platform's domain rules, as plain functions and types with no I/O.
//!
//! Everything a tenant can get wrong is decided here (names, port specs, state transitions), so that the API,
//! the CLI and the data plane agree on one grammar and one set of error messages. Storage and transport live in
//! other crates; this crate only computes.

pub mod api;
pub mod generate;
pub mod ipam;
pub mod names;
pub mod ports;
pub mod state;
