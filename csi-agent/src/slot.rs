//! A disk's slot: where it is plugged in, which survives reboots, unlike its
//! kernel name. Named the way udev names `/dev/disk/by-path` links, so an
//! operator can match a slot with what they already see on the node.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::sysfs::BlockDevice;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Slot(String);

impl Slot {
    /// `pci-0000:00:05.0-nvme-1` (controller and namespace),
    /// `pci-0000:00:10.0-ata-3` (controller and port),
    /// `pci-0000:03:00.0-sas-0x5000c500a1b2c3d4-lun-0` (HBA and end device),
    /// `pci-0000:00:07.0-scsi-0:0:1:0`, `pci-0000:00:04.0` (virtio-blk).
    /// None when the device hangs off no PCI function (nothing stable to name).
    pub fn of(device: &BlockDevice) -> Option<Self> {
        let pci = last_pci_function(&device.device_path)?;
        let slot = if let Some(nsid) = device
            .nsid
            .filter(|_| device.device_path.contains("/nvme/"))
        {
            format!("pci-{pci}-nvme-{nsid}")
        } else if let Some(port) = device.ata_port {
            format!("pci-{pci}-ata-{port}")
        } else if let Some(address) = &device.sas_address {
            let lun = scsi_address(&device.device_path)?.3;
            format!("pci-{pci}-sas-{address}-lun-{lun}")
        } else if let Some((_, channel, target, lun)) = scsi_address(&device.device_path) {
            format!("pci-{pci}-scsi-{channel}:{target}:{lun}")
        } else if device.device_path.contains("/virtio") {
            format!("pci-{pci}")
        } else {
            return None;
        };
        Some(Self(slot))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for Slot {
    fn from(text: &str) -> Self {
        Self(text.to_owned())
    }
}

/// The PCI function nearest to the device: behind bridges, the last one.
fn last_pci_function(path: &str) -> Option<&str> {
    path.split('/').rev().find(|part| is_pci_address(part))
}

/// `dddd:bb:dd.f`
fn is_pci_address(text: &str) -> bool {
    let bytes = text.as_bytes();
    bytes.len() == 12
        && bytes[4] == b':'
        && bytes[7] == b':'
        && bytes[10] == b'.'
        && bytes
            .iter()
            .enumerate()
            .all(|(i, b)| matches!(i, 4 | 7 | 10) || b.is_ascii_hexdigit())
}

/// The `host:channel:target:lun` directory of a SCSI disk.
fn scsi_address(path: &str) -> Option<(u32, u32, u32, u32)> {
    path.split('/').rev().find_map(|part| {
        let mut numbers = part.split(':').map(|n| n.parse::<u32>().ok());
        let address = (
            numbers.next()??,
            numbers.next()??,
            numbers.next()??,
            numbers.next()??,
        );
        numbers.next().is_none().then_some(address)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(path: &str) -> BlockDevice {
        BlockDevice {
            name: path.rsplit('/').next().unwrap().to_owned(),
            devno: "8:0".into(),
            device_path: path.into(),
            size_bytes: 1 << 30,
            rotational: false,
            removable: false,
            read_only: false,
            nsid: None,
            ata_port: None,
            sas_address: None,
            serial: None,
            model: None,
            holders: vec![],
            partitions: vec![],
        }
    }

    #[test]
    fn nvme_slot_is_controller_and_namespace() {
        let mut ns = device("devices/pci0000:00/0000:00:06.0/nvme/nvme1/nvme1n2");
        ns.nsid = Some(2);
        assert_eq!(Slot::of(&ns).unwrap().as_str(), "pci-0000:00:06.0-nvme-2");
    }

    #[test]
    fn nvme_behind_a_bridge_takes_the_nearest_function() {
        let mut ns = device("devices/pci0000:00/0000:00:01.1/0000:02:00.0/nvme/nvme0/nvme0n1");
        ns.nsid = Some(1);
        assert_eq!(Slot::of(&ns).unwrap().as_str(), "pci-0000:02:00.0-nvme-1");
    }

    #[test]
    fn sata_slot_is_controller_and_port() {
        let mut sd =
            device("devices/pci0000:00/0000:00:10.0/ata4/host3/target3:0:0/3:0:0:0/block/sdb");
        sd.ata_port = Some(4);
        assert_eq!(Slot::of(&sd).unwrap().as_str(), "pci-0000:00:10.0-ata-4");
    }

    #[test]
    fn sas_slot_is_hba_and_end_device() {
        let mut sd = device(
            "devices/pci0000:00/0000:00:03.0/0000:03:00.0/host0/port-0:0/end_device-0:0/target0:0:0/0:0:0:0/block/sda",
        );
        sd.sas_address = Some("0x5000c500a1b2c3d4".into());
        assert_eq!(
            Slot::of(&sd).unwrap().as_str(),
            "pci-0000:03:00.0-sas-0x5000c500a1b2c3d4-lun-0"
        );
    }

    #[test]
    fn other_scsi_and_virtio() {
        let sd =
            device("devices/pci0000:00/0000:00:07.0/virtio3/host2/target2:0:1/2:0:1:0/block/sdc");
        assert_eq!(
            Slot::of(&sd).unwrap().as_str(),
            "pci-0000:00:07.0-scsi-0:1:0"
        );
        let vd = device("devices/pci0000:00/0000:00:04.0/virtio1/block/vda");
        assert_eq!(Slot::of(&vd).unwrap().as_str(), "pci-0000:00:04.0");
    }

    #[test]
    fn virtual_devices_have_no_slot() {
        assert_eq!(Slot::of(&device("devices/virtual/block/loop0")), None);
        assert_eq!(Slot::of(&device("devices/virtual/block/dm-0")), None);
    }

    #[test]
    fn pci_address_shape() {
        assert!(is_pci_address("0000:00:05.0"));
        assert!(is_pci_address("0000:af:1f.7"));
        assert!(!is_pci_address("pci0000:00"));
        assert!(!is_pci_address("0000:00:05"));
        assert!(!is_pci_address("0000:0g:05.0"));
    }
}
