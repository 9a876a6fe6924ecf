//! The authoritative DNS role for the public service zone and the private `internal` zone.
//!
//! Not implemented yet (issue 6). `cloudd dns` says so and exits with an error rather than pretend.
