//! The platform's domain rules, as plain functions and types with no I/O.
//!
//! Everything a tenant can get wrong is decided here (names, port specs, domains, limits, state transitions), so
//! that the API, the CLI and the data plane agree on one grammar and one set of error messages; so is where
//! instances run. Storage and transport live in other crates; this crate only computes.

pub mod api;
pub mod autoscale;
pub mod domains;
pub mod duration;
pub mod exec;
pub mod generate;
pub mod int;
pub mod ipam;
pub mod join;
pub mod names;
pub mod placement;
pub mod ports;
pub mod service;
pub mod settings;
pub mod state;

/// `error: cause: cause...`, the whole chain of an error on one line, as logs and failure reasons show it.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}
