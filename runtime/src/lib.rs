//! The node agent role: runs instances in network namespaces with private IPs and reports their state.
//!
//! Not implemented yet (issue 3). `cloudd node` says so and exits with an error rather than pretend.
