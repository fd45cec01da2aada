//! Discovery and the volume group plan over a sysfs tree captured in the VM
//! test bed (scripts/capture-sysfs.sh) with: NVMe controllers at 0000:00:05.0
//! (one namespace) and 0000:00:06.0 (two), and on the AHCI controller at
//! 0000:00:10.0 an SSD (port 0), an SSD with a GPT partition (port 1), an HDD
//! (port 3) and an HDD holding a foreign volume group with an active LV (port 4).

use std::collections::BTreeMap;
use std::path::Path;

use csi_agent::config::DiscoveryConfig;
use csi_agent::discovery::{Disk, Probe, Verdict, classify};
use csi_agent::plan::{Action, LvmState, Pv, Vg, plan};
use csi_agent::sysfs::scan;
use lvmlocal_proto::MediaClass;

const GIB: u64 = 1 << 30;

fn fixture() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sysfs-vm")
}

fn inventory(members: &BTreeMap<String, String>) -> Vec<Disk> {
    scan(&fixture())
        .unwrap()
        .iter()
        .map(|device| {
            classify(
                device,
                &Probe::default(),
                members,
                &DiscoveryConfig::default(),
            )
        })
        .collect()
}

fn disk<'a>(disks: &'a [Disk], name: &str) -> &'a Disk {
    disks
        .iter()
        .find(|d| d.name == name)
        .unwrap_or_else(|| panic!("no {name}"))
}

#[test]
fn every_block_device_is_read() {
    let names: Vec<String> = scan(&fixture())
        .unwrap()
        .into_iter()
        .map(|d| d.name)
        .collect();
    assert_eq!(
        names,
        [
            "dm-0", "loop0", "loop1", "loop2", "loop3", "loop4", "loop5", "loop6", "loop7",
            "nvme0n1", "nvme1n1", "nvme1n2", "sda", "sdb", "sdc", "sdd"
        ]
    );
}

#[test]
fn slots_media_and_verdicts() {
    let disks = inventory(&BTreeMap::new());
    let expect = [
        (
            "nvme0n1",
            "pci-0000:00:05.0-nvme-1",
            MediaClass::Nvme,
            4 * GIB,
            Verdict::Usable,
        ),
        (
            "nvme1n1",
            "pci-0000:00:06.0-nvme-1",
            MediaClass::Nvme,
            2 * GIB,
            Verdict::Usable,
        ),
        (
            "nvme1n2",
            "pci-0000:00:06.0-nvme-2",
            MediaClass::Nvme,
            GIB,
            Verdict::Usable,
        ),
        (
            "sdd",
            "pci-0000:00:10.0-ata-1",
            MediaClass::Ssd,
            2 * GIB,
            Verdict::Usable,
        ),
        (
            "sda",
            "pci-0000:00:10.0-ata-2",
            MediaClass::Ssd,
            2 * GIB,
            Verdict::Partitioned {
                table: "unknown".into(),
            },
        ),
        (
            "sdb",
            "pci-0000:00:10.0-ata-4",
            MediaClass::Hdd,
            8 * GIB,
            Verdict::Usable,
        ),
        (
            "sdc",
            "pci-0000:00:10.0-ata-5",
            MediaClass::Hdd,
            8 * GIB,
            Verdict::Held {
                by: vec!["dm-0".into()],
            },
        ),
    ];
    for (name, slot, media, size, verdict) in expect {
        let d = disk(&disks, name);
        assert_eq!(d.slot.as_ref().map(|s| s.as_str()), Some(slot), "{name}");
        assert_eq!(d.media, Some(media), "{name}");
        assert_eq!(d.size_bytes, size, "{name}");
        assert_eq!(d.verdict, verdict, "{name}");
    }
    assert_eq!(disk(&disks, "nvme1n2").serial.as_deref(), Some("nvme-b"));
    assert_eq!(disk(&disks, "sdb").serial.as_deref(), Some("hdd-a"));
    for name in ["dm-0", "loop0", "loop7"] {
        assert_eq!(disk(&disks, name).verdict, Verdict::NotADisk, "{name}");
    }
}

#[test]
fn a_blank_node_plans_one_group_per_class() {
    let disks = inventory(&BTreeMap::new());
    let plan = plan(&disks, &LvmState::default(), &DiscoveryConfig::default());
    let summary: Vec<(String, Vec<String>)> = plan
        .actions
        .iter()
        .map(|action| match action {
            Action::CreateVg { vg, pvs, .. } => {
                (vg.clone(), pvs.iter().map(|pv| pv.device.clone()).collect())
            }
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        summary,
        [
            (
                "lvmlocal-nvme".to_string(),
                vec![
                    "/dev/nvme0n1".to_string(),
                    "/dev/nvme1n1".into(),
                    "/dev/nvme1n2".into()
                ]
            ),
            ("lvmlocal-ssd".into(), vec!["/dev/sdd".into()]),
            ("lvmlocal-hdd".into(), vec!["/dev/sdb".into()]),
        ]
    );
}

#[test]
fn a_built_node_plans_nothing() {
    let tagged = |device: &str, vg: &str, slot: &str| Pv {
        device: device.into(),
        vg: vg.into(),
        tags: vec![format!("lvmlocal.io/slot={slot}")],
        size_bytes: GIB,
        missing: false,
    };
    let group = |name: &str, media: &str| Vg {
        name: name.into(),
        tags: vec![format!("lvmlocal.io/media={media}")],
        size_bytes: 4 * GIB,
        free_bytes: 4 * GIB,
        extent_bytes: 4 << 20,
        missing_pvs: 0,
    };
    let lvm = LvmState {
        pvs: vec![
            tagged("/dev/nvme0n1", "lvmlocal-nvme", "pci-0000:00:05.0-nvme-1"),
            tagged("/dev/nvme1n1", "lvmlocal-nvme", "pci-0000:00:06.0-nvme-1"),
            tagged("/dev/nvme1n2", "lvmlocal-nvme", "pci-0000:00:06.0-nvme-2"),
            tagged("/dev/sdd", "lvmlocal-ssd", "pci-0000:00:10.0-ata-1"),
            tagged("/dev/sdb", "lvmlocal-hdd", "pci-0000:00:10.0-ata-4"),
        ],
        vgs: vec![
            group("lvmlocal-nvme", "nvme"),
            group("lvmlocal-ssd", "ssd"),
            group("lvmlocal-hdd", "hdd"),
        ],
    };
    let config = DiscoveryConfig::default();
    let disks = inventory(&lvm.own_members(&config));
    assert_eq!(
        disk(&disks, "sdb").verdict,
        Verdict::Member {
            vg: "lvmlocal-hdd".into()
        }
    );
    let plan = plan(&disks, &lvm, &config);
    assert_eq!(plan.actions, []);
    assert!(
        plan.groups
            .iter()
            .all(|g| g.exists && !g.degraded() && g.blocked.is_none())
    );
}
