//! `cloudctl`, the platform's command-line client.
//!
//! Not implemented yet (issue 4): until then, use the HTTP API as the README shows. It exits with an error
//! rather than pretend.

fn main() {
    eprintln!("cloudctl is not implemented yet (issue 4); use the HTTP API as the README shows");
    std::process::exit(2);
}
