//! A module per resource of the command line, each with its clap subcommand (or arguments) and its handler; the
//! top-level parsing and dispatch are in the crate root.

pub mod ca;
pub mod copy;
pub mod deploy;
pub mod exec;
pub mod image;
pub mod instance;
pub mod remote;
pub mod rollout;
pub mod secret;
pub mod service;
pub mod tenant;
pub mod token;
pub mod whoami;
