//! The certificate role: the platform CA and ACME orders for custom domains.
//!
//! Not implemented yet (issue 7). `cloudd certs` says so and exits with an error rather than pretend.
