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
