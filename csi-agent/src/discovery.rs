//! Which disks of a node lvmlocal may take, and for each one it may not,
//! exactly why. Pure: sysfs, blkid, the mount table and LVM are read
//! elsewhere and handed in.

use std::collections::BTreeMap;

use lvmlocal_proto::MediaClass;
use serde::Serialize;

use crate::config::DiscoveryConfig;
use crate::slot::Slot;
use crate::sysfs::BlockDevice;

/// What blkid and the mount table say about a disk and its partitions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Probe {
    /// Partition table type (`gpt`, `dos`), if any.
    pub partition_table: Option<String>,
    /// Filesystem, RAID or volume manager signature (`ext4`, `linux_raid_member`, ...).
    pub signature: Option<String>,
    /// Whether the disk or one of its partitions is mounted.
    pub mounted: bool,
}

/// Whether lvmlocal may take a disk, or the reason it may not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", rename_all = "kebab-case")]
pub enum Verdict {
    /// Blank: it joins the volume group of its class.
    Usable,
    /// Already a physical volume of this node's volume group `vg`.
    Member {
        vg: String,
    },
    /// Loop, RAM, zram, device-mapper, md, nbd and other virtual devices.
    NotADisk,
    Removable,
    ReadOnly,
    TooSmall {
        min_bytes: u64,
    },
    /// Left out by the configured slot allow and deny lists.
    Excluded,
    /// Its media class is not one this agent manages.
    ClassNotManaged,
    Partitioned {
        table: String,
    },
    /// Holds a filesystem, RAID member, foreign LVM or other signature.
    Signature {
        kind: String,
    },
    Mounted,
    /// In use by another device (device-mapper, md).
    Held {
        by: Vec<String>,
    },
    /// Attached nowhere this agent can name, so it could not recognise it after a reboot.
    NoSlot,
    /// Blank and would join `vg`, but claiming is not enabled on this node.
    NotClaimed {
        vg: String,
        why: String,
    },
}

impl Verdict {
    /// One line an operator reads in `csi-agent discover`.
    pub fn reason(&self) -> String {
        match self {
            Verdict::Usable => "blank, will join".into(),
            Verdict::Member { vg } => format!("in volume group {vg}"),
            Verdict::NotADisk => "not a disk (virtual device)".into(),
            Verdict::Removable => "removable media".into(),
            Verdict::ReadOnly => "read-only".into(),
            Verdict::TooSmall { min_bytes } => {
                format!("smaller than the minimum {min_bytes} bytes")
            }
            Verdict::Excluded => "excluded by the slot allow/deny lists".into(),
            Verdict::ClassNotManaged => "media class not managed by this agent".into(),
            Verdict::Partitioned { table } => format!("has a {table} partition table"),
            Verdict::Signature { kind } => format!("holds data: {kind} signature"),
            Verdict::Mounted => "mounted".into(),
            Verdict::Held { by } => format!("held by {}", by.join(", ")),
            Verdict::NoSlot => "no stable slot to identify it by".into(),
            Verdict::NotClaimed { vg, why } => format!("blank, would join {vg}, but {why}"),
        }
    }

    /// A short stable name, used as a metric label.
    pub fn name(&self) -> &'static str {
        match self {
            Verdict::Usable => "usable",
            Verdict::Member { .. } => "member",
            Verdict::NotADisk => "not-a-disk",
            Verdict::Removable => "removable",
            Verdict::ReadOnly => "read-only",
            Verdict::TooSmall { .. } => "too-small",
            Verdict::Excluded => "excluded",
            Verdict::ClassNotManaged => "class-not-managed",
            Verdict::Partitioned { .. } => "partitioned",
            Verdict::Signature { .. } => "signature",
            Verdict::Mounted => "mounted",
            Verdict::Held { .. } => "held",
            Verdict::NoSlot => "no-slot",
            Verdict::NotClaimed { .. } => "not-claimed",
        }
    }
}

/// One whole disk of the node, as the inventory reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Disk {
    pub name: String,
    pub slot: Option<Slot>,
    pub media: Option<MediaClass>,
    pub size_bytes: u64,
    pub serial: Option<String>,
    pub model: Option<String>,
    #[serde(flatten)]
    pub verdict: Verdict,
}

impl Disk {
    pub fn device(&self) -> String {
        format!("/dev/{}", self.name)
    }
}

/// Kernel name prefixes of devices that are never physical disks.
const VIRTUAL_PREFIXES: [&str; 8] = ["loop", "ram", "zram", "dm-", "md", "nbd", "sr", "fd"];

pub fn is_virtual(device: &BlockDevice) -> bool {
    device.device_path.starts_with("devices/virtual/")
        || VIRTUAL_PREFIXES
            .iter()
            .any(|prefix| device.name.starts_with(prefix))
}

/// The media class of a disk: NVMe by transport, else by the rotational
/// flag, unless the configuration overrides it for the disk's slot.
pub fn media_class(
    device: &BlockDevice,
    slot: Option<&Slot>,
    config: &DiscoveryConfig,
) -> MediaClass {
    if let Some(slot) = slot
        && let Some(media) = config.media_override(slot)
    {
        return media;
    }
    if device.device_path.contains("/nvme/") {
        MediaClass::Nvme
    } else if device.rotational {
        MediaClass::Hdd
    } else {
        MediaClass::Ssd
    }
}

/// Decides about one disk. `members` maps device paths (`/dev/nvme0n1`) of
/// this node's own physical volumes to their volume group.
pub fn classify(
    device: &BlockDevice,
    probe: &Probe,
    members: &BTreeMap<String, String>,
    config: &DiscoveryConfig,
) -> Disk {
    let slot = Slot::of(device);
    let virtual_device = is_virtual(device);
    let media = (!virtual_device).then(|| media_class(device, slot.as_ref(), config));
    let verdict = verdict(device, probe, members, config, slot.as_ref(), media);
    Disk {
        name: device.name.clone(),
        slot,
        media,
        size_bytes: device.size_bytes,
        serial: device.serial.clone(),
        model: device.model.clone(),
        verdict,
    }
}

fn verdict(
    device: &BlockDevice,
    probe: &Probe,
    members: &BTreeMap<String, String>,
    config: &DiscoveryConfig,
    slot: Option<&Slot>,
    media: Option<MediaClass>,
) -> Verdict {
    let Some(media) = media else {
        return Verdict::NotADisk;
    };
    // Ours first: our own PVs carry an LVM signature and holders by design.
    if let Some(vg) = members.get(&format!("/dev/{}", device.name)) {
        return Verdict::Member { vg: vg.clone() };
    }
    let Some(slot) = slot else {
        return Verdict::NoSlot;
    };
    if !config.slot_allowed(slot) {
        return Verdict::Excluded;
    }
    if !config.manages(media) {
        return Verdict::ClassNotManaged;
    }
    if device.removable {
        return Verdict::Removable;
    }
    if device.read_only {
        return Verdict::ReadOnly;
    }
    if device.size_bytes < config.min_disk_bytes {
        return Verdict::TooSmall {
            min_bytes: config.min_disk_bytes,
        };
    }
    if probe.mounted {
        return Verdict::Mounted;
    }
    if !device.holders.is_empty() {
        return Verdict::Held {
            by: device.holders.clone(),
        };
    }
    if let Some(table) = &probe.partition_table {
        return Verdict::Partitioned {
            table: table.clone(),
        };
    }
    if !device.partitions.is_empty() {
        return Verdict::Partitioned {
            table: "unknown".into(),
        };
    }
    if let Some(kind) = &probe.signature {
        return Verdict::Signature { kind: kind.clone() };
    }
    Verdict::Usable
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn nvme() -> BlockDevice {
        BlockDevice {
            name: "nvme0n1".into(),
            devno: "259:0".into(),
            device_path: "devices/pci0000:00/0000:00:05.0/nvme/nvme0/nvme0n1".into(),
            size_bytes: 4 * GIB,
            rotational: false,
            removable: false,
            read_only: false,
            nsid: Some(1),
            ata_port: None,
            sas_address: None,
            serial: Some("S1".into()),
            model: None,
            holders: vec![],
            partitions: vec![],
        }
    }

    fn verdict_of(device: &BlockDevice, probe: &Probe, config: &DiscoveryConfig) -> Verdict {
        classify(device, probe, &BTreeMap::new(), config).verdict
    }

    #[test]
    fn each_refusal_names_its_reason() {
        let config = DiscoveryConfig::default();
        let blank = Probe::default();
        assert_eq!(verdict_of(&nvme(), &blank, &config), Verdict::Usable);

        let cases: Vec<(BlockDevice, Probe, Verdict)> = vec![
            (
                BlockDevice {
                    removable: true,
                    ..nvme()
                },
                blank.clone(),
                Verdict::Removable,
            ),
            (
                BlockDevice {
                    read_only: true,
                    ..nvme()
                },
                blank.clone(),
                Verdict::ReadOnly,
            ),
            (
                BlockDevice {
                    size_bytes: GIB - 512,
                    ..nvme()
                },
                blank.clone(),
                Verdict::TooSmall { min_bytes: GIB },
            ),
            (
                nvme(),
                Probe {
                    mounted: true,
                    ..blank.clone()
                },
                Verdict::Mounted,
            ),
            (
                BlockDevice {
                    holders: vec!["md0".into()],
                    ..nvme()
                },
                blank.clone(),
                Verdict::Held {
                    by: vec!["md0".into()],
                },
            ),
            (
                nvme(),
                Probe {
                    partition_table: Some("gpt".into()),
                    ..blank.clone()
                },
                Verdict::Partitioned {
                    table: "gpt".into(),
                },
            ),
            (
                nvme(),
                Probe {
                    signature: Some("linux_raid_member".into()),
                    ..blank.clone()
                },
                Verdict::Signature {
                    kind: "linux_raid_member".into(),
                },
            ),
            (
                BlockDevice {
                    device_path: "devices/platform/foo/nvme0n1".into(),
                    ..nvme()
                },
                blank.clone(),
                Verdict::NoSlot,
            ),
            (
                BlockDevice {
                    name: "loop0".into(),
                    device_path: "devices/virtual/block/loop0".into(),
                    ..nvme()
                },
                blank.clone(),
                Verdict::NotADisk,
            ),
        ];
        for (device, probe, want) in cases {
            assert_eq!(
                verdict_of(&device, &probe, &config),
                want,
                "{device:?} {probe:?}"
            );
            assert!(!want.reason().is_empty());
        }
    }

    #[test]
    fn configuration_narrows_what_joins() {
        let deny = DiscoveryConfig {
            deny: vec![glob::Pattern::new("pci-0000:00:05.0-*").unwrap()],
            ..DiscoveryConfig::default()
        };
        assert_eq!(
            verdict_of(&nvme(), &Probe::default(), &deny),
            Verdict::Excluded
        );
        let ssd_only = DiscoveryConfig {
            classes: vec![MediaClass::Ssd],
            ..DiscoveryConfig::default()
        };
        assert_eq!(
            verdict_of(&nvme(), &Probe::default(), &ssd_only),
            Verdict::ClassNotManaged
        );
    }

    #[test]
    fn our_own_physical_volume_is_a_member_despite_its_signature() {
        let members = BTreeMap::from([("/dev/nvme0n1".to_string(), "lvmlocal-nvme".to_string())]);
        let probe = Probe {
            signature: Some("LVM2_member".into()),
            ..Probe::default()
        };
        let device = BlockDevice {
            holders: vec!["dm-0".into()],
            ..nvme()
        };
        let disk = classify(&device, &probe, &members, &DiscoveryConfig::default());
        assert_eq!(
            disk.verdict,
            Verdict::Member {
                vg: "lvmlocal-nvme".into()
            }
        );
    }

    #[test]
    fn media_by_transport_rotation_and_override() {
        let config = DiscoveryConfig::default();
        let sata = BlockDevice {
            name: "sda".into(),
            device_path: "devices/pci0000:00/0000:00:10.0/ata1/host0/target0:0:0/0:0:0:0/block/sda"
                .into(),
            nsid: None,
            ata_port: Some(1),
            ..nvme()
        };
        assert_eq!(
            classify(&nvme(), &Probe::default(), &BTreeMap::new(), &config).media,
            Some(MediaClass::Nvme)
        );
        assert_eq!(
            classify(&sata, &Probe::default(), &BTreeMap::new(), &config).media,
            Some(MediaClass::Ssd)
        );
        let spinning = BlockDevice {
            rotational: true,
            ..sata
        };
        assert_eq!(
            classify(&spinning, &Probe::default(), &BTreeMap::new(), &config).media,
            Some(MediaClass::Hdd)
        );
        let overridden = DiscoveryConfig {
            media_overrides: vec![(glob::Pattern::new("*-ata-1").unwrap(), MediaClass::Ssd)],
            ..DiscoveryConfig::default()
        };
        assert_eq!(
            classify(&spinning, &Probe::default(), &BTreeMap::new(), &overridden).media,
            Some(MediaClass::Ssd)
        );
    }
}
