//! One look at the node: sysfs, signatures, mounts and LVM, turned into the
//! disk inventory and the volume group plan. Reads only.

use std::fmt::Write as _;
use std::path::PathBuf;

use lvmlocal_proto::extent::human_bytes;
use serde::Serialize;

use crate::claim::{self, Claiming};
use crate::command::Runner;
use crate::config::DiscoveryConfig;
use crate::discovery::{self, Disk, Probe, Verdict};
use crate::lvm::{Lvm, LvmError};
use crate::plan::{self, LvmState, Plan};
use crate::sysfs;

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("reading block devices from {path}: {source}")]
    Sysfs {
        path: String,
        source: std::io::Error,
    },
    #[error("reading the mount table {path}: {source}")]
    Mounts {
        path: String,
        source: std::io::Error,
    },
    #[error("probing /dev/{disk}: {source}")]
    Probe {
        disk: String,
        source: crate::command::CommandError,
    },
    #[error("reading LVM state: {0}")]
    Lvm(#[from] LvmError),
}

/// Where the node's facts are read from; tests point these at fixtures.
#[derive(Debug, Clone)]
pub struct Sources {
    pub sysfs: PathBuf,
    pub mountinfo: PathBuf,
}

impl Default for Sources {
    fn default() -> Self {
        Self {
            sysfs: "/sys".into(),
            mountinfo: "/proc/self/mountinfo".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Inventory {
    pub disks: Vec<Disk>,
    pub lvm: LvmState,
    pub plan: Plan,
}

pub async fn take(
    sources: &Sources,
    runner: &Runner,
    lvm: &Lvm,
    config: &DiscoveryConfig,
    claiming: &Claiming,
) -> Result<Inventory, InventoryError> {
    let devices = sysfs::scan(&sources.sysfs).map_err(|source| InventoryError::Sysfs {
        path: sources.sysfs.display().to_string(),
        source,
    })?;
    let mountinfo =
        std::fs::read_to_string(&sources.mountinfo).map_err(|source| InventoryError::Mounts {
            path: sources.mountinfo.display().to_string(),
            source,
        })?;
    let mounted = crate::probe::mounted_devnos(&mountinfo);
    let lvm_state = lvm.state().await?;
    let members = lvm_state.own_members(config);

    let mut disks = Vec::with_capacity(devices.len());
    for device in &devices {
        // Virtual devices and our own PVs need no signature check.
        let probe = if discovery::is_virtual(device)
            || members.contains_key(&format!("/dev/{}", device.name))
        {
            Probe::default()
        } else {
            let mut probe = crate::probe::probe(runner, device, &mounted)
                .await
                .map_err(|source| InventoryError::Probe {
                    disk: device.name.clone(),
                    source,
                })?;
            name_foreign_vg(&mut probe, &device.name, &lvm_state);
            probe
        };
        disks.push(discovery::classify(device, &probe, &members, config));
    }
    claim::withhold(&mut disks, claiming, config);
    let plan = plan::plan(&disks, &lvm_state, config);
    Ok(Inventory {
        disks,
        lvm: lvm_state,
        plan,
    })
}

/// An LVM signature is someone else's PV: say whose.
fn name_foreign_vg(probe: &mut Probe, name: &str, lvm: &LvmState) {
    if probe.signature.as_deref() != Some("LVM2_member") {
        return;
    }
    let device = format!("/dev/{name}");
    if let Some(pv) = lvm.pvs.iter().find(|pv| pv.device == device) {
        probe.signature = Some(if pv.vg.is_empty() {
            "LVM2_member (a PV in no volume group)".to_owned()
        } else {
            format!("LVM2_member of volume group {}", pv.vg)
        });
    }
}

impl Inventory {
    /// The table `csi-agent discover` prints: real disks, then the plan.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let mut disks: Vec<&Disk> = self
            .disks
            .iter()
            .filter(|disk| disk.verdict != Verdict::NotADisk)
            .collect();
        // By slot: the order of the hardware, which kernel names do not keep.
        disks.sort_by(|a, b| a.slot.cmp(&b.slot));
        let rows: Vec<[String; 6]> = disks
            .into_iter()
            .map(|disk| {
                [
                    disk.slot.as_ref().map_or("-".into(), ToString::to_string),
                    disk.name.clone(),
                    disk.media.map_or("-".into(), |m| m.to_string()),
                    human_bytes(disk.size_bytes),
                    disk.serial.clone().unwrap_or_else(|| "-".into()),
                    disk.verdict.reason(),
                ]
            })
            .collect();
        let header = ["SLOT", "NAME", "MEDIA", "SIZE", "SERIAL", "VERDICT"].map(String::from);
        let mut widths = header.clone().map(|h| h.len());
        for row in &rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.len());
            }
        }
        for row in std::iter::once(&header).chain(&rows) {
            let line: Vec<String> = row
                .iter()
                .zip(widths)
                .map(|(cell, width)| format!("{cell:width$}"))
                .collect();
            let _ = writeln!(out, "{}", line.join("  ").trim_end());
        }
        out.push('\n');
        for group in &self.plan.groups {
            let state = match (&group.blocked, group.exists, group.degraded()) {
                (Some(why), _, _) => format!("blocked: {why}"),
                (None, true, true) => format!("degraded: {} PV(s) missing", group.missing_pvs),
                (None, true, false) => "present".into(),
                (None, false, _) => "absent".into(),
            };
            let size = self
                .lvm
                .vg(&group.vg)
                .map(|vg| {
                    format!(
                        ", {} total, {} free",
                        human_bytes(vg.size_bytes),
                        human_bytes(vg.free_bytes)
                    )
                })
                .unwrap_or_default();
            let _ = writeln!(out, "{:<5} {}: {state}{size}", group.media, group.vg);
        }
        out.push('\n');
        if self.plan.actions.is_empty() {
            out.push_str("plan: nothing to do\n");
        } else {
            out.push_str("plan:\n");
            for action in &self.plan.actions {
                for cmd in Lvm::commands(action) {
                    let _ = writeln!(out, "  {cmd}");
                }
            }
        }
        out
    }
}
