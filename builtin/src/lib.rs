//! The platform's own programs, compiled by this crate's build script as static executables that run in any
//! root filesystem: the first process of every sandbox ([`INIT`], used by cloud-sandbox) and the built-in images,
//! OCI images every tenant can deploy: `hello` answers HTTP with the name and private IP of the instance that
//! served the request, and holds its program alone.

use cloud_oci::build::{self, LayerBuilder};
use cloud_oci::{Image, ImageConfig};

/// The first process of every sandbox (`programs/init.rs`): passes stop signals to the image's program, reaps
/// orphans, ends its sandbox when the agent is gone.
pub const INIT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/init"));

/// The `hello` program, as built for this platform.
const HELLO: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/hello"));

/// The port `hello` listens on unless `PORT` says otherwise.
pub const HELLO_PORT: u16 = 8080;

/// The `hello` image: `/hello`, listening on 8080.
pub fn hello() -> Image {
    let layer = LayerBuilder::new().file("hello", 0o755, HELLO).dir("tmp", 0o1777).into_tar();
    let config = ImageConfig {
        entrypoint: vec!["/hello".into()],
        cmd: Vec::new(),
        env: vec!["PATH=/".into()],
        working_dir: "/".into(),
        user: "65534:65534".into(),
        exposed_ports: vec![HELLO_PORT],
    };
    build::image(&config, &[layer])
}

#[cfg(test)]
mod tests {
    #[test]
    fn programs_are_static_and_images_stable() {
        for program in [super::HELLO, super::INIT] {
            assert_eq!(&program[..4], b"\x7fELF");
            // A dynamically linked program names its loader in a PT_INTERP header: a static one has none.
            assert!(!program.windows(12).any(|w| w == b"/lib64/ld-li"), "a program must not need a loader");
        }
        assert_eq!(super::hello().digest, super::hello().digest, "the same image every time");
    }
}
