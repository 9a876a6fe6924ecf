//! The edge role: terminates TLS and routes by FQDN to instance private IPs.
//!
//! Not implemented yet (issue 5). `cloudd edge` says so and exits with an error rather than pretend.
