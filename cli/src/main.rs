//! `cloudctl`: see the library for the commands.

fn main() {
    cloudctl::main();
}
