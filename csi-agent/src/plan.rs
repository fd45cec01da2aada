//! The volume group plan: from the disks of a node and what LVM already has,
//! the LVM actions that bring every usable disk into the volume group of its
//! class. Pure; it never destroys, and a node already built plans nothing.

use std::collections::BTreeMap;

use lvmlocal_proto::MediaClass;
use serde::Serialize;

use crate::config::DiscoveryConfig;
use crate::discovery::{Disk, Verdict};
use crate::slot::Slot;

/// Tag on the volume groups lvmlocal made: `lvmlocal.io/media=nvme`.
pub const MEDIA_TAG: &str = "lvmlocal.io/media=";
/// Tag on each of their physical volumes: `lvmlocal.io/slot=<slot>`.
pub const SLOT_TAG: &str = "lvmlocal.io/slot=";

/// A physical volume as `pvs` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pv {
    /// `/dev/nvme0n1`, or `[unknown]` for a missing one.
    pub device: String,
    /// Empty for a PV in no volume group.
    pub vg: String,
    pub tags: Vec<String>,
    pub size_bytes: u64,
    pub missing: bool,
}

/// A volume group as `vgs` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Vg {
    pub name: String,
    pub tags: Vec<String>,
    pub size_bytes: u64,
    pub free_bytes: u64,
    pub extent_bytes: u64,
    pub missing_pvs: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LvmState {
    pub pvs: Vec<Pv>,
    pub vgs: Vec<Vg>,
}

impl LvmState {
    pub fn vg(&self, name: &str) -> Option<&Vg> {
        self.vgs.iter().find(|vg| vg.name == name)
    }

    /// Device path → volume group, for the PVs of the volume groups lvmlocal made.
    pub fn own_members(&self, config: &DiscoveryConfig) -> BTreeMap<String, String> {
        let own: Vec<String> = config
            .classes
            .iter()
            .map(|media| config.vg_name(*media))
            .filter(|name| self.vg(name).is_some_and(is_own))
            .collect();
        self.pvs
            .iter()
            .filter(|pv| own.contains(&pv.vg))
            .map(|pv| (pv.device.clone(), pv.vg.clone()))
            .collect()
    }
}

fn is_own(vg: &Vg) -> bool {
    vg.tags.iter().any(|tag| tag.starts_with(MEDIA_TAG))
}

/// A disk to become a physical volume, and the slot recorded on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NewPv {
    pub device: String,
    pub slot: Slot,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Action {
    /// `vgcreate --addtag lvmlocal.io/media=<media> <vg> <devices>`, then tag each PV.
    CreateVg {
        vg: String,
        media: MediaClass,
        pvs: Vec<NewPv>,
    },
    /// `vgextend <vg> <devices>`, then tag each PV.
    ExtendVg { vg: String, pvs: Vec<NewPv> },
    /// Record (or correct) the slot of a PV: after an interrupted run, or
    /// when a disk was moved to another slot.
    TagPv {
        device: String,
        slot: Slot,
        stale: Vec<String>,
    },
}

/// What the plan found about one media class's volume group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GroupState {
    pub media: MediaClass,
    pub vg: String,
    pub exists: bool,
    /// Physical volumes whose disk is gone: the group is degraded.
    pub missing_pvs: u32,
    /// Why nothing can be done for this class, e.g. a foreign VG of that name.
    pub blocked: Option<String>,
}

impl GroupState {
    pub fn degraded(&self) -> bool {
        self.missing_pvs > 0
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub groups: Vec<GroupState>,
    pub actions: Vec<Action>,
}

pub fn plan(disks: &[Disk], lvm: &LvmState, config: &DiscoveryConfig) -> Plan {
    let mut groups = Vec::new();
    let mut actions = Vec::new();
    for &media in &config.classes {
        let vg_name = config.vg_name(media);
        let existing = lvm.vg(&vg_name);
        let mut group = GroupState {
            media,
            vg: vg_name.clone(),
            exists: existing.is_some(),
            missing_pvs: existing.map_or(0, |vg| vg.missing_pvs),
            blocked: None,
        };
        if let Some(vg) = existing
            && !is_own(vg)
        {
            group.blocked = Some(format!(
                "volume group {vg_name} exists but was not made by lvmlocal (no {MEDIA_TAG}{media} tag)"
            ));
            groups.push(group);
            continue;
        }

        actions.extend(retags(disks, lvm, &vg_name));

        let mut pvs: Vec<NewPv> = disks
            .iter()
            .filter(|disk| disk.verdict == Verdict::Usable && disk.media == Some(media))
            .filter_map(|disk| {
                Some(NewPv {
                    device: disk.device(),
                    slot: disk.slot.clone()?,
                })
            })
            .collect();
        pvs.sort_by(|a, b| a.slot.cmp(&b.slot));
        if !pvs.is_empty() {
            match existing {
                None => actions.push(Action::CreateVg {
                    vg: vg_name,
                    media,
                    pvs,
                }),
                // LVM refuses to change a VG with missing PVs; say so instead of failing.
                Some(_) if group.degraded() => {
                    group.blocked = Some(format!(
                        "{} physical volume(s) missing: new disks wait until the group is repaired",
                        group.missing_pvs
                    ));
                }
                Some(_) => actions.push(Action::ExtendVg { vg: vg_name, pvs }),
            }
        }
        groups.push(group);
    }
    Plan { groups, actions }
}

/// PVs of `vg` whose slot tag is absent or names another slot than where
/// the disk is now.
fn retags(disks: &[Disk], lvm: &LvmState, vg: &str) -> Vec<Action> {
    let mut actions = Vec::new();
    for pv in lvm.pvs.iter().filter(|pv| pv.vg == vg && !pv.missing) {
        let Some(slot) = disks
            .iter()
            .find(|disk| disk.device() == pv.device)
            .and_then(|disk| disk.slot.clone())
        else {
            continue;
        };
        let want = format!("{SLOT_TAG}{slot}");
        if pv.tags.contains(&want) {
            continue;
        }
        let stale = pv
            .tags
            .iter()
            .filter(|tag| tag.starts_with(SLOT_TAG))
            .cloned()
            .collect();
        actions.push(Action::TagPv {
            device: pv.device.clone(),
            slot,
            stale,
        });
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn disk(name: &str, slot: &str, media: MediaClass, verdict: Verdict) -> Disk {
        Disk {
            name: name.into(),
            slot: Some(slot.into()),
            media: Some(media),
            size_bytes: GIB,
            serial: None,
            model: None,
            verdict,
        }
    }

    fn vg(name: &str, tags: &[&str], missing_pvs: u32) -> Vg {
        Vg {
            name: name.into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            size_bytes: GIB,
            free_bytes: GIB,
            extent_bytes: 4 << 20,
            missing_pvs,
        }
    }

    fn pv(device: &str, vg: &str, tags: &[&str]) -> Pv {
        Pv {
            device: device.into(),
            vg: vg.into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            size_bytes: GIB,
            missing: false,
        }
    }

    fn member(vg: &str) -> Verdict {
        Verdict::Member { vg: vg.into() }
    }

    #[test]
    fn a_new_disk_extends_its_group() {
        let disks = [
            disk(
                "nvme0n1",
                "pci-0000:00:05.0-nvme-1",
                MediaClass::Nvme,
                member("lvmlocal-nvme"),
            ),
            disk(
                "nvme1n1",
                "pci-0000:00:06.0-nvme-1",
                MediaClass::Nvme,
                Verdict::Usable,
            ),
        ];
        let lvm = LvmState {
            pvs: vec![pv(
                "/dev/nvme0n1",
                "lvmlocal-nvme",
                &["lvmlocal.io/slot=pci-0000:00:05.0-nvme-1"],
            )],
            vgs: vec![vg("lvmlocal-nvme", &["lvmlocal.io/media=nvme"], 0)],
        };
        let plan = plan(&disks, &lvm, &DiscoveryConfig::default());
        assert_eq!(
            plan.actions,
            [Action::ExtendVg {
                vg: "lvmlocal-nvme".into(),
                pvs: vec![NewPv {
                    device: "/dev/nvme1n1".into(),
                    slot: "pci-0000:00:06.0-nvme-1".into()
                }],
            }]
        );
    }

    #[test]
    fn a_foreign_group_with_our_name_is_never_touched() {
        let disks = [disk(
            "sda",
            "pci-0000:00:10.0-ata-1",
            MediaClass::Ssd,
            Verdict::Usable,
        )];
        let lvm = LvmState {
            pvs: vec![],
            vgs: vec![vg("lvmlocal-ssd", &[], 0)],
        };
        let plan = plan(&disks, &lvm, &DiscoveryConfig::default());
        assert_eq!(plan.actions, []);
        let ssd = plan
            .groups
            .iter()
            .find(|g| g.media == MediaClass::Ssd)
            .unwrap();
        assert!(
            ssd.blocked
                .as_deref()
                .unwrap()
                .contains("not made by lvmlocal")
        );
        assert!(
            LvmState {
                pvs: vec![pv("/dev/sdb", "lvmlocal-ssd", &[])],
                ..lvm
            }
            .own_members(&DiscoveryConfig::default())
            .is_empty()
        );
    }

    #[test]
    fn a_degraded_group_waits_and_destroys_nothing() {
        let disks = [disk(
            "sdb",
            "pci-0000:00:10.0-ata-2",
            MediaClass::Hdd,
            Verdict::Usable,
        )];
        let lvm = LvmState {
            pvs: vec![Pv {
                missing: true,
                ..pv(
                    "[unknown]",
                    "lvmlocal-hdd",
                    &["lvmlocal.io/slot=pci-0000:00:10.0-ata-1"],
                )
            }],
            vgs: vec![vg("lvmlocal-hdd", &["lvmlocal.io/media=hdd"], 1)],
        };
        let plan = plan(&disks, &lvm, &DiscoveryConfig::default());
        assert_eq!(plan.actions, []);
        let hdd = plan
            .groups
            .iter()
            .find(|g| g.media == MediaClass::Hdd)
            .unwrap();
        assert!(hdd.degraded());
        assert!(hdd.blocked.as_deref().unwrap().contains("missing"));
    }

    #[test]
    fn a_moved_or_untagged_pv_gets_its_slot_recorded() {
        let disks = [
            disk(
                "sda",
                "pci-0000:00:10.0-ata-2",
                MediaClass::Ssd,
                member("lvmlocal-ssd"),
            ),
            disk(
                "sdb",
                "pci-0000:00:10.0-ata-3",
                MediaClass::Ssd,
                member("lvmlocal-ssd"),
            ),
        ];
        let lvm = LvmState {
            pvs: vec![
                pv(
                    "/dev/sda",
                    "lvmlocal-ssd",
                    &["lvmlocal.io/slot=pci-0000:00:10.0-ata-1", "other"],
                ),
                pv("/dev/sdb", "lvmlocal-ssd", &[]),
            ],
            vgs: vec![vg("lvmlocal-ssd", &["lvmlocal.io/media=ssd"], 0)],
        };
        let plan = plan(&disks, &lvm, &DiscoveryConfig::default());
        assert_eq!(
            plan.actions,
            [
                Action::TagPv {
                    device: "/dev/sda".into(),
                    slot: "pci-0000:00:10.0-ata-2".into(),
                    stale: vec!["lvmlocal.io/slot=pci-0000:00:10.0-ata-1".into()],
                },
                Action::TagPv {
                    device: "/dev/sdb".into(),
                    slot: "pci-0000:00:10.0-ata-3".into(),
                    stale: vec![],
                },
            ]
        );
    }

    #[test]
    fn only_managed_classes_are_planned() {
        let disks = [
            disk(
                "nvme0n1",
                "pci-0000:00:05.0-nvme-1",
                MediaClass::Nvme,
                Verdict::Usable,
            ),
            disk(
                "sda",
                "pci-0000:00:10.0-ata-1",
                MediaClass::Hdd,
                Verdict::Usable,
            ),
        ];
        let config = DiscoveryConfig {
            classes: vec![MediaClass::Nvme],
            ..DiscoveryConfig::default()
        };
        let plan = plan(&disks, &LvmState::default(), &config);
        assert_eq!(plan.groups.len(), 1);
        assert!(matches!(
            &plan.actions[..],
            [Action::CreateVg {
                media: MediaClass::Nvme,
                ..
            }]
        ));
    }
}
