//! A layer-3 TUN device read and written from tokio: the kernel hands it the packets routed into the device and
//! takes the packets written to it as if they had arrived there.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use tokio::io::unix::AsyncFd;

/// An open TUN device; the kernel deletes it when this closes (it is not made persistent).
pub struct Device {
    fd: AsyncFd<File>,
}

impl Device {
    /// Creates the device `name` (at most 15 bytes), IPv4/IPv6 packets without a packet-information header.
    pub fn create(name: &str) -> io::Result<Self> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("device name {name:?}: 1 to 15 bytes")));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")?;
        set_interface(&file, name)?;
        Ok(Self { fd: register(file)? })
    }

    /// The next packet the kernel routed into the device.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut ready = self.fd.readable().await?;
            if let Ok(read) = ready.try_io(|f| f.get_ref().read(buf)) {
                return read;
            }
        }
    }

    /// Hands one packet to the kernel, as received on the device.
    pub async fn send(&self, packet: &[u8]) -> io::Result<()> {
        loop {
            let mut ready = self.fd.writable().await?;
            if let Ok(written) = ready.try_io(|f| f.get_ref().write(packet)) {
                return written.map(drop);
            }
        }
    }
}

/// TUNSETIFF: binds the open `/dev/net/tun` to a new device of that name.
#[allow(unsafe_code)]
fn set_interface(file: &File, name: &str) -> io::Result<()> {
    // SAFETY: ifreq is plain data (a name and a union of integers and byte arrays), valid zeroed; the name is
    // shorter than IFNAMSIZ, so it stays NUL-terminated; the kernel reads the struct during the call only.
    unsafe {
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
        if libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &req) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Hands the device's descriptor to tokio's reactor.
#[allow(unsafe_code)]
fn register(file: File) -> io::Result<AsyncFd<File>> {
    // SAFETY: the file owns its descriptor, and the AsyncFd owns the file: the descriptor is neither closed nor
    // replaced while registered.
    unsafe { AsyncFd::register(file) }.map_err(|e| e.into_parts().1)
}
