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

/// Starts a thread that sends on `trigger` for every uevent that may change
/// which disks the node has (see [`changes_disks`]). The channel should hold
/// one message: a burst of events then collapses into one rescan.
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
                if changes_disks(&buffer[..len]) {
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

/// Whether a uevent (`action@devpath`, then NUL-separated `KEY=value`
/// pairs) may change the node's disks: a block device with hardware behind
/// it came or went, or changed size or medium. Virtual devices (the
/// device-mapper devices of LVs, loops) and the bare `change` that udev
/// synthesizes after any write to a disk, LVM's own metadata included, are
/// left to the periodic rescan: they are the agent's own doing.
fn changes_disks(message: &[u8]) -> bool {
    let mut fields = message.split(|&b| b == 0);
    let header = fields.next().unwrap_or_default();
    let action = header.split(|&b| b == b'@').next().unwrap_or_default();
    let (mut block, mut hardware, mut resized) = (false, false, false);
    for field in fields {
        match field {
            b"SUBSYSTEM=block" => block = true,
            b"RESIZE=1" | b"DISK_MEDIA_CHANGE=1" => resized = true,
            _ => {
                if let Some(devpath) = field.strip_prefix(b"DEVPATH=") {
                    hardware = !devpath.starts_with(b"/devices/virtual/");
                }
            }
        }
    }
    block
        && hardware
        && match action {
            b"add" | b"remove" => true,
            b"change" => resized,
            _ => false,
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_that_come_go_or_change_size_start_a_rescan() {
        let add = b"add@/devices/pci0000:00/0000:00:06.0/nvme/nvme1/nvme1n1\0ACTION=add\0DEVPATH=/devices/pci0000:00/0000:00:06.0/nvme/nvme1/nvme1n1\0SUBSYSTEM=block\0DEVNAME=nvme1n1\0DEVTYPE=disk\0";
        assert!(changes_disks(add));
        let partition = b"remove@/devices/pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block/sda/sda1\0ACTION=remove\0DEVPATH=/devices/pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block/sda/sda1\0SUBSYSTEM=block\0DEVNAME=sda1\0DEVTYPE=partition\0";
        assert!(changes_disks(partition));
        let resized = b"change@/devices/pci0000:00/0000:00:05.0/nvme/nvme0/nvme0n1\0ACTION=change\0DEVPATH=/devices/pci0000:00/0000:00:05.0/nvme/nvme0/nvme0n1\0SUBSYSTEM=block\0RESIZE=1\0DEVNAME=nvme0n1\0DEVTYPE=disk\0";
        assert!(changes_disks(resized));
    }

    #[test]
    fn the_agents_own_volumes_and_writes_start_none() {
        for own in [
            // lvcreate: the LV's device-mapper device appears, then is loaded.
            &b"add@/devices/virtual/block/dm-3\0ACTION=add\0DEVPATH=/devices/virtual/block/dm-3\0SUBSYSTEM=block\0DEVNAME=dm-3\0DEVTYPE=disk\0"[..],
            b"change@/devices/virtual/block/dm-3\0ACTION=change\0DEVPATH=/devices/virtual/block/dm-3\0SUBSYSTEM=block\0DM_COOKIE=4194304\0DEVNAME=dm-3\0DEVTYPE=disk\0",
            b"remove@/devices/virtual/block/dm-3\0ACTION=remove\0DEVPATH=/devices/virtual/block/dm-3\0SUBSYSTEM=block\0DEVNAME=dm-3\0DEVTYPE=disk\0",
            b"add@/devices/virtual/block/loop0\0ACTION=add\0DEVPATH=/devices/virtual/block/loop0\0SUBSYSTEM=block\0DEVNAME=loop0\0",
            // udev's answer to LVM writing its metadata on a member disk.
            b"change@/devices/pci0000:00/0000:00:05.0/nvme/nvme0/nvme0n1\0ACTION=change\0DEVPATH=/devices/pci0000:00/0000:00:05.0/nvme/nvme0/nvme0n1\0SUBSYSTEM=block\0DEVNAME=nvme0n1\0DEVTYPE=disk\0",
        ] {
            assert!(!changes_disks(own), "{}", String::from_utf8_lossy(own));
        }
        let pci = b"add@/devices/pci0000:00/0000:00:06.0\0ACTION=add\0DEVPATH=/devices/pci0000:00/0000:00:06.0\0SUBSYSTEM=pci\0";
        assert!(!changes_disks(pci));
        let bind =
            b"bind@/devices/pci0000:00/0000:00:06.0/nvme/nvme1\0ACTION=bind\0SUBSYSTEM=block\0";
        assert!(!changes_disks(bind));
        assert!(!changes_disks(b""));
    }
}
