//! Kernel uevents for block devices, so a disk plugged in joins without
//! waiting for the next periodic rescan. Kernel uevents reach only the host's
//! network namespace: in Kubernetes the agent needs `hostNetwork: true`.

use std::os::fd::AsRawFd;

use nix::sys::socket::{
    AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, socket,
};
use tokio::sync::mpsc;

/// Multicast group of the kernel's own uevents (udev's re-broadcasts are group 2).
const KERNEL_GROUP: u32 = 1;

/// Starts a thread that sends on `trigger` for every block device uevent.
/// The channel should hold one message: a burst of events then collapses
/// into one rescan.
pub fn watch(trigger: mpsc::Sender<()>) -> nix::Result<()> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkKObjectUEvent,
    )?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, KERNEL_GROUP))?;
    std::thread::Builder::new()
        .name("uevent".into())
        .spawn(move || {
            let mut buffer = vec![0u8; 16 * 1024];
            loop {
                let len = match recv(
                    fd.as_raw_fd(),
                    &mut buffer,
                    nix::sys::socket::MsgFlags::empty(),
                ) {
                    Ok(len) => len,
                    Err(nix::errno::Errno::EINTR | nix::errno::Errno::ENOBUFS) => continue,
                    Err(err) => {
                        tracing::warn!(error = %err, "uevent socket failed; periodic rescans only");
                        return;
                    }
                };
                if is_block_event(&buffer[..len]) {
                    match trigger.try_send(()) {
                        Ok(()) | Err(mpsc::error::TrySendError::Full(())) => {}
                        Err(mpsc::error::TrySendError::Closed(())) => return,
                    }
                }
            }
        })
        .map_err(|_| nix::errno::Errno::EAGAIN)?;
    Ok(())
}

/// A uevent is `action@devpath` then NUL-separated `KEY=value` pairs.
fn is_block_event(message: &[u8]) -> bool {
    let mut fields = message.split(|&b| b == 0);
    let header = fields.next().unwrap_or_default();
    let action = header.split(|&b| b == b'@').next().unwrap_or_default();
    matches!(action, b"add" | b"remove" | b"change")
        && fields.any(|field| field == b"SUBSYSTEM=block")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_block_events() {
        let add = b"add@/devices/pci0000:00/0000:00:06.0/nvme/nvme1/nvme1n1\0ACTION=add\0DEVPATH=/devices/pci0000:00/0000:00:06.0/nvme/nvme1/nvme1n1\0SUBSYSTEM=block\0DEVNAME=nvme1n1\0DEVTYPE=disk\0";
        assert!(is_block_event(add));
        let pci = b"add@/devices/pci0000:00/0000:00:06.0\0ACTION=add\0SUBSYSTEM=pci\0";
        assert!(!is_block_event(pci));
        let bind = b"bind@/devices/virtual/block/loop0\0ACTION=bind\0SUBSYSTEM=block\0";
        assert!(!is_block_event(bind));
        assert!(!is_block_event(b""));
    }
}
