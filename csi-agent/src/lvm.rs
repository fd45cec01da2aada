//! lvm2, driven through the command runner: reports read as JSON in bytes,
//! the few commands that build volume groups, and the logical volume
//! commands. Building volume groups never passes `--yes` or `--force`:
//! should a disk gain data after discovery looked at it, LVM's own refusal is
//! the last line of defence. `--yes` appears only where it answers for space
//! that is already lvmlocal's: removing an LV that carries lvmlocal's tag.

use serde::Deserialize;

use crate::command::{Cmd, CommandError, Runner};
use crate::plan::{Action, LvmState, MEDIA_TAG, NewPv, Pv, SLOT_TAG, Vg};

#[derive(Debug, thiserror::Error)]
pub enum LvmError {
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error("parsing the report of `{command}`: {reason}")]
    Report { command: String, reason: String },
    #[error("LV {vg}/{name} is open (mounted or in use): it is neither erased nor removed")]
    Open { vg: String, name: String },
    #[error("LV {vg}/{name} is being removed; it cannot be used or made again until it is gone")]
    Removing { vg: String, name: String },
    #[error("LV {vg}/{name} carries the tag {tag}, a state this agent does not know; left alone")]
    UnknownState {
        vg: String,
        name: String,
        tag: String,
    },
    #[error("the change to volume {volume} was cut short by shutdown; it resumes on the next try")]
    Interrupted { volume: String },
}

const REPORT_ARGS: [&str; 4] = ["--reportformat", "json", "--units", "b"];

#[derive(Debug, Clone, Default)]
pub struct Lvm {
    runner: Runner,
}

impl Lvm {
    pub fn new(runner: Runner) -> Self {
        Self { runner }
    }

    /// Every PV and VG LVM knows on this node.
    pub async fn state(&self) -> Result<LvmState, LvmError> {
        let pvs = self
            .report(
                "pvs",
                "pv_name,vg_name,pv_tags,pv_size,pv_attr",
                "pv",
                parse_pv,
            )
            .await?;
        let vgs = self.vgs().await?;
        Ok(LvmState { pvs, vgs })
    }

    /// Every VG LVM knows on this node.
    pub async fn vgs(&self) -> Result<Vec<Vg>, LvmError> {
        self.report(
            "vgs",
            "vg_name,vg_tags,vg_size,vg_free,vg_extent_size,vg_missing_pv_count",
            "vg",
            parse_vg,
        )
        .await
    }

    async fn report<T>(
        &self,
        program: &str,
        fields: &str,
        kind: &str,
        parse: fn(&Row) -> Result<T, String>,
    ) -> Result<Vec<T>, LvmError> {
        let mut args: Vec<&str> = REPORT_ARGS.to_vec();
        args.extend(["--nosuffix", "-o", fields]);
        let cmd = Cmd::new(program, args);
        let out = self.runner.run(&cmd).await?;
        rows(&out, kind)
            .and_then(|rows| rows.iter().map(parse).collect())
            .map_err(|reason| LvmError::Report {
                command: cmd.to_string(),
                reason,
            })
    }

    /// Logical volumes of the volume group `vg` (all groups when None).
    pub async fn lvs(&self, vg: Option<&str>) -> Result<Vec<Lv>, LvmError> {
        let mut args: Vec<&str> = REPORT_ARGS.to_vec();
        args.extend([
            "--nosuffix",
            "-o",
            "lv_name,vg_name,lv_size,lv_tags,lv_attr,lv_path,lv_kernel_minor,pool_lv,\
             lv_metadata_size,data_percent,metadata_percent,lv_when_full",
        ]);
        args.extend(vg);
        let cmd = Cmd::new("lvs", args);
        let out = self.runner.run(&cmd).await?;
        rows(&out, "lv")
            .and_then(|rows| rows.iter().map(parse_lv).collect())
            .map_err(|reason| LvmError::Report {
                command: cmd.to_string(),
                reason,
            })
    }

    pub fn runner(&self) -> &Runner {
        &self.runner
    }

    /// `lvcreate` of `size_bytes` (LVM rounds up to whole extents) with
    /// `tags`. It neither wipes nor zeroes: the caller creates the LV in a
    /// recorded `creating` state and erases it itself (see `erase`), so
    /// the new LV is not used before that is done, even after a crash.
    pub async fn lvcreate(
        &self,
        vg: &str,
        name: &str,
        size_bytes: u64,
        tags: &[String],
    ) -> Result<(), LvmError> {
        self.runner
            .run(&lvcreate_cmd(vg, name, size_bytes, tags))
            .await?;
        Ok(())
    }

    /// Creates the thin pool `name` with `data_bytes` of data and
    /// `metadata_bytes` of metadata (and a spare of that size for repairs).
    /// New blocks are zeroed before a thin volume sees them, so a thin
    /// volume never shows an earlier tenant's data; a full pool fails
    /// writes at once instead of queueing them.
    pub async fn create_thin_pool(
        &self,
        vg: &str,
        name: &str,
        data_bytes: u64,
        metadata_bytes: u64,
    ) -> Result<(), LvmError> {
        self.runner
            .run(&thin_pool_cmd(vg, name, data_bytes, metadata_bytes))
            .await?;
        self.fail_writes_when_full(vg, name).await
    }

    /// Makes a full thin pool fail writes at once; by default it queues
    /// them for a minute, leaving the writer hung without a word.
    pub async fn fail_writes_when_full(&self, vg: &str, pool: &str) -> Result<(), LvmError> {
        let args = ["--errorwhenfull", "y", &format!("{vg}/{pool}")].map(str::to_owned);
        self.runner.run(&Cmd::new("lvchange", args)).await?;
        Ok(())
    }

    /// `lvcreate` of a thin volume of `size_bytes` in the pool `pool`.
    pub async fn lvcreate_thin(
        &self,
        vg: &str,
        pool: &str,
        name: &str,
        size_bytes: u64,
        tags: &[String],
    ) -> Result<(), LvmError> {
        self.runner
            .run(&thin_lvcreate_cmd(vg, pool, name, size_bytes, tags))
            .await?;
        Ok(())
    }

    /// A thin snapshot `name` of the thin LV `origin`: it shares the
    /// origin's blocks, so it takes no time and no space until either is
    /// written. Active (thin snapshots skip activation by default), and
    /// read-only if `read_only`.
    pub async fn thin_snapshot(
        &self,
        vg: &str,
        origin: &str,
        name: &str,
        read_only: bool,
        tags: &[String],
    ) -> Result<(), LvmError> {
        self.runner
            .run(&thin_snapshot_cmd(vg, origin, name, read_only, tags))
            .await?;
        Ok(())
    }

    /// Grows the metadata of the thin pool `pool` to `bytes`.
    pub async fn extend_pool_metadata(
        &self,
        vg: &str,
        pool: &str,
        bytes: u64,
    ) -> Result<(), LvmError> {
        let args = [
            "--poolmetadatasize".to_owned(),
            format!("{bytes}b"),
            format!("{vg}/{pool}"),
        ];
        self.runner.run(&Cmd::new("lvextend", args)).await?;
        Ok(())
    }

    pub async fn lvextend(&self, vg: &str, name: &str, size_bytes: u64) -> Result<(), LvmError> {
        let args = [
            "--size".to_owned(),
            format!("{size_bytes}b"),
            format!("{vg}/{name}"),
        ];
        self.runner.run(&Cmd::new("lvextend", args)).await?;
        Ok(())
    }

    /// Swaps the tag `old` for `new` on an LV.
    pub async fn retag_lv(
        &self,
        vg: &str,
        name: &str,
        old: &str,
        new: &str,
    ) -> Result<(), LvmError> {
        self.set_tags(vg, name, Some(old), new).await
    }

    /// Adds `new` to an LV's tags, dropping `old` (if any) in the same
    /// metadata commit.
    pub async fn set_tags(
        &self,
        vg: &str,
        name: &str,
        old: Option<&str>,
        new: &str,
    ) -> Result<(), LvmError> {
        let mut args = Vec::new();
        if let Some(old) = old {
            args.extend(["--deltag".to_owned(), old.to_owned()]);
        }
        args.extend([
            "--addtag".to_owned(),
            new.to_owned(),
            format!("{vg}/{name}"),
        ]);
        self.runner.run(&Cmd::new("lvchange", args)).await?;
        Ok(())
    }

    /// Activates an LV, so its device exists (after a boot without
    /// autoactivation, say).
    pub async fn activate(&self, vg: &str, name: &str) -> Result<(), LvmError> {
        let args = [
            "--activate".to_owned(),
            "y".to_owned(),
            format!("{vg}/{name}"),
        ];
        self.runner.run(&Cmd::new("lvchange", args)).await?;
        Ok(())
    }

    pub async fn add_lv_tag(&self, vg: &str, name: &str, tag: &str) -> Result<(), LvmError> {
        let args = [
            "--addtag".to_owned(),
            tag.to_owned(),
            format!("{vg}/{name}"),
        ];
        self.runner.run(&Cmd::new("lvchange", args)).await?;
        Ok(())
    }

    pub async fn lvremove(&self, vg: &str, name: &str) -> Result<(), LvmError> {
        let args = ["--yes".to_owned(), format!("{vg}/{name}")];
        self.runner.run(&Cmd::new("lvremove", args)).await?;
        Ok(())
    }

    /// The commands that carry out one planned action, in order.
    pub fn commands(action: &Action) -> Vec<Cmd> {
        let tag = |pvs: &[NewPv]| {
            pvs.iter()
                .map(|pv| {
                    Cmd::new(
                        "pvchange",
                        [
                            "--addtag".to_owned(),
                            format!("{SLOT_TAG}{}", pv.slot),
                            pv.device.clone(),
                        ],
                    )
                })
                .collect::<Vec<_>>()
        };
        let devices = |pvs: &[NewPv]| pvs.iter().map(|pv| pv.device.clone()).collect::<Vec<_>>();
        match action {
            Action::CreateVg { vg, media, pvs } => {
                let mut args = vec![
                    "--addtag".to_owned(),
                    format!("{MEDIA_TAG}{media}"),
                    vg.clone(),
                ];
                args.extend(devices(pvs));
                let mut cmds = vec![Cmd::new("vgcreate", args)];
                cmds.extend(tag(pvs));
                cmds
            }
            Action::ExtendVg { vg, pvs } => {
                let mut args = vec![vg.clone()];
                args.extend(devices(pvs));
                let mut cmds = vec![Cmd::new("vgextend", args)];
                cmds.extend(tag(pvs));
                cmds
            }
            Action::TagPv {
                device,
                slot,
                stale,
            } => {
                let mut args = Vec::new();
                for old in stale {
                    args.extend(["--deltag".to_owned(), old.clone()]);
                }
                args.extend([
                    "--addtag".to_owned(),
                    format!("{SLOT_TAG}{slot}"),
                    device.clone(),
                ]);
                vec![Cmd::new("pvchange", args)]
            }
        }
    }

    /// Carries out `action`. Stops at the first failing command; the next
    /// plan picks up from whatever state that left.
    pub async fn apply(&self, action: &Action) -> Result<(), LvmError> {
        for cmd in Self::commands(action) {
            self.runner.run(&cmd).await?;
        }
        Ok(())
    }
}

/// A logical volume as `lvs` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lv {
    pub name: String,
    pub vg: String,
    pub size_bytes: u64,
    pub tags: Vec<String>,
    /// `lv_attr`, e.g. `-wi-a-----`: type, permissions, allocation, fixed
    /// minor, state (`a` active), device open, target type, zeroing, health.
    pub attr: String,
    pub path: String,
    /// Minor number of its device-mapper device while active.
    pub kernel_minor: Option<u32>,
    /// The thin pool of a thin LV.
    pub pool: Option<String>,
    /// A thin pool's metadata size, and how full its data and metadata are
    /// in hundredths of a percent (0 to 10000).
    pub metadata_bytes: Option<u64>,
    pub data_percent: Option<u32>,
    pub metadata_percent: Option<u32>,
    /// A thin pool that fails writes when full rather than queueing them.
    pub errors_when_full: bool,
}

impl Lv {
    pub fn tag_value(&self, prefix: &str) -> Option<&str> {
        self.tags.iter().find_map(|tag| tag.strip_prefix(prefix))
    }

    pub fn active(&self) -> bool {
        self.attr.chars().nth(4) == Some('a')
    }

    /// Its device is held open: mounted, or used by a process.
    pub fn open(&self) -> bool {
        self.attr.chars().nth(5) == Some('o')
    }

    /// A thin pool (volume type `t`).
    pub fn thin_pool(&self) -> bool {
        self.attr.starts_with('t')
    }
}

fn thin_pool_cmd(vg: &str, name: &str, data_bytes: u64, metadata_bytes: u64) -> Cmd {
    let args = [
        "--type",
        "thin-pool",
        "--name",
        name,
        "--size",
        &format!("{data_bytes}b"),
        "--poolmetadatasize",
        &format!("{metadata_bytes}b"),
        "--zero",
        "y",
        vg,
    ]
    .map(str::to_owned);
    Cmd::new("lvcreate", args)
}

fn thin_snapshot_cmd(vg: &str, origin: &str, name: &str, read_only: bool, tags: &[String]) -> Cmd {
    let mut args = vec![
        "--snapshot".to_owned(),
        "--name".to_owned(),
        name.to_owned(),
        "--setactivationskip".to_owned(),
        "n".to_owned(),
        "--permission".to_owned(),
        if read_only { "r" } else { "rw" }.to_owned(),
    ];
    for tag in tags {
        args.extend(["--addtag".to_owned(), tag.clone()]);
    }
    args.push(format!("{vg}/{origin}"));
    Cmd::new("lvcreate", args)
}

fn thin_lvcreate_cmd(vg: &str, pool: &str, name: &str, size_bytes: u64, tags: &[String]) -> Cmd {
    let mut args = vec![
        "--name".to_owned(),
        name.to_owned(),
        "--virtualsize".to_owned(),
        format!("{size_bytes}b"),
        "--thinpool".to_owned(),
        pool.to_owned(),
    ];
    for tag in tags {
        args.extend(["--addtag".to_owned(), tag.clone()]);
    }
    args.push(vg.to_owned());
    Cmd::new("lvcreate", args)
}

fn lvcreate_cmd(vg: &str, name: &str, size_bytes: u64, tags: &[String]) -> Cmd {
    let mut args = vec![
        "--name".to_owned(),
        name.to_owned(),
        "--size".to_owned(),
        format!("{size_bytes}b"),
        "--wipesignatures".to_owned(),
        "n".to_owned(),
        "--zero".to_owned(),
        "n".to_owned(),
    ];
    for tag in tags {
        args.extend(["--addtag".to_owned(), tag.clone()]);
    }
    args.push(vg.to_owned());
    Cmd::new("lvcreate", args)
}

type Row = serde_json::Map<String, serde_json::Value>;

#[derive(Deserialize)]
struct Report {
    report: Vec<serde_json::Map<String, serde_json::Value>>,
}

/// The rows of `kind` (`pv`, `vg`, `lv`) from an lvm2 JSON report.
fn rows(json: &str, kind: &str) -> Result<Vec<Row>, String> {
    let report: Report = serde_json::from_str(json).map_err(|err| err.to_string())?;
    let mut rows = Vec::new();
    for section in report.report {
        if let Some(list) = section.get(kind) {
            let list: Vec<Row> =
                serde_json::from_value(list.clone()).map_err(|err| err.to_string())?;
            rows.extend(list);
        }
    }
    Ok(rows)
}

fn field<'a>(row: &'a Row, name: &str) -> Result<&'a str, String> {
    row.get(name)
        .and_then(|value| value.as_str())
        .ok_or_else(|| format!("field {name} missing"))
}

fn bytes(row: &Row, name: &str) -> Result<u64, String> {
    let text = field(row, name)?;
    text.trim()
        .parse()
        .map_err(|_| format!("{name} = {text:?} is not a byte count"))
}

fn tags(row: &Row, name: &str) -> Result<Vec<String>, String> {
    Ok(field(row, name)?
        .split(',')
        .filter(|tag| !tag.is_empty())
        .map(str::to_owned)
        .collect())
}

fn parse_pv(row: &Row) -> Result<Pv, String> {
    Ok(Pv {
        device: field(row, "pv_name")?.to_owned(),
        vg: field(row, "vg_name")?.to_owned(),
        tags: tags(row, "pv_tags")?,
        size_bytes: bytes(row, "pv_size")?,
        // pv_attr is e.g. "a--" or "a-m": the third letter marks a missing PV.
        missing: field(row, "pv_attr")?.chars().nth(2) == Some('m'),
    })
}

fn parse_lv(row: &Row) -> Result<Lv, String> {
    Ok(Lv {
        name: field(row, "lv_name")?.to_owned(),
        vg: field(row, "vg_name")?.to_owned(),
        size_bytes: bytes(row, "lv_size")?,
        tags: tags(row, "lv_tags")?,
        attr: field(row, "lv_attr")?.to_owned(),
        path: field(row, "lv_path")?.to_owned(),
        // -1 while inactive; absent from reports of older tools.
        kernel_minor: field(row, "lv_kernel_minor")
            .ok()
            .and_then(|minor| minor.parse().ok()),
        pool: field(row, "pool_lv")
            .ok()
            .filter(|pool| !pool.is_empty())
            .map(str::to_owned),
        metadata_bytes: field(row, "lv_metadata_size")
            .ok()
            .and_then(|bytes| bytes.trim().parse().ok()),
        data_percent: field(row, "data_percent").ok().and_then(hundredths),
        metadata_percent: field(row, "metadata_percent").ok().and_then(hundredths),
        errors_when_full: field(row, "lv_when_full").is_ok_and(|when| when == "error"),
    })
}

/// `12.50` (LVM prints two decimals) as 1250.
fn hundredths(percent: &str) -> Option<u32> {
    let (whole, fraction) = percent
        .trim()
        .split_once('.')
        .unwrap_or((percent.trim(), ""));
    let fraction = format!("{fraction:0<2}");
    let fraction: u32 = fraction.get(..2)?.parse().ok()?;
    Some(whole.parse::<u32>().ok()? * 100 + fraction)
}

fn parse_vg(row: &Row) -> Result<Vg, String> {
    Ok(Vg {
        name: field(row, "vg_name")?.to_owned(),
        tags: tags(row, "vg_tags")?,
        size_bytes: bytes(row, "vg_size")?,
        free_bytes: bytes(row, "vg_free")?,
        extent_bytes: bytes(row, "vg_extent_size")?,
        missing_pvs: field(row, "vg_missing_pv_count")?
            .parse()
            .map_err(|_| "vg_missing_pv_count is not a number".to_owned())?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use lvmlocal_proto::MediaClass;

    #[test]
    fn parses_reports() {
        let pvs = r#"{
          "report": [ { "pv": [
            {"pv_name":"/dev/nvme0n1", "vg_name":"lvmlocal-nvme", "pv_tags":"lvmlocal.io/slot=pci-0000:00:05.0-nvme-1", "pv_size":"1069547520", "pv_attr":"a--"},
            {"pv_name":"[unknown]", "vg_name":"lvmlocal-nvme", "pv_tags":"", "pv_size":"1069547520", "pv_attr":"a-m"}
          ] } ]
        }"#;
        let pvs: Vec<Pv> = rows(pvs, "pv")
            .unwrap()
            .iter()
            .map(parse_pv)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            pvs[0].tags,
            vec!["lvmlocal.io/slot=pci-0000:00:05.0-nvme-1"]
        );
        assert_eq!(pvs[0].size_bytes, 1_069_547_520);
        assert!(!pvs[0].missing);
        assert!(pvs[1].missing && pvs[1].tags.is_empty());

        let vgs = r#"{"report":[{"vg":[{"vg_name":"lvmlocal-ssd","vg_tags":"lvmlocal.io/media=ssd","vg_size":"2143289344","vg_free":"2143289344","vg_extent_size":"4194304","vg_missing_pv_count":"0"}]}]}"#;
        let vg = parse_vg(&rows(vgs, "vg").unwrap()[0]).unwrap();
        assert_eq!(vg.extent_bytes, 4 << 20);
        assert_eq!(vg.tags, vec!["lvmlocal.io/media=ssd"]);

        assert!(rows("not json", "pv").is_err());
        let bad = r#"{"report":[{"vg":[{"vg_name":"x","vg_tags":"","vg_size":"12B","vg_free":"0","vg_extent_size":"1","vg_missing_pv_count":"0"}]}]}"#;
        assert!(parse_vg(&rows(bad, "vg").unwrap()[0]).is_err());
    }

    #[test]
    fn actions_become_exact_command_lines() {
        let pv = |d: &str, s: &str| NewPv {
            device: d.into(),
            slot: s.into(),
        };
        let create = Action::CreateVg {
            vg: "lvmlocal-nvme".into(),
            media: MediaClass::Nvme,
            pvs: vec![pv("/dev/nvme0n1", "pci-0000:00:05.0-nvme-1")],
        };
        let lines: Vec<String> = Lvm::commands(&create)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            lines,
            [
                "vgcreate --addtag lvmlocal.io/media=nvme lvmlocal-nvme /dev/nvme0n1",
                "pvchange --addtag lvmlocal.io/slot=pci-0000:00:05.0-nvme-1 /dev/nvme0n1",
            ]
        );
        let retag = Action::TagPv {
            device: "/dev/sdb".into(),
            slot: "pci-0000:00:10.0-ata-2".into(),
            stale: vec!["lvmlocal.io/slot=pci-0000:00:10.0-ata-1".into()],
        };
        assert_eq!(
            Lvm::commands(&retag)[0].to_string(),
            "pvchange --deltag lvmlocal.io/slot=pci-0000:00:10.0-ata-1 --addtag lvmlocal.io/slot=pci-0000:00:10.0-ata-2 /dev/sdb"
        );
    }

    #[test]
    fn lvcreate_leaves_erasing_to_the_caller_and_never_answers_yes() {
        let tags = [
            "lvmlocal.io/volume".to_owned(),
            "lvmlocal.io/state=creating".to_owned(),
        ];
        assert_eq!(
            lvcreate_cmd("lvmlocal-nvme", "pvc-1", 1 << 30, &tags).to_string(),
            "lvcreate --name pvc-1 --size 1073741824b --wipesignatures n --zero n \
             --addtag lvmlocal.io/volume --addtag lvmlocal.io/state=creating lvmlocal-nvme"
        );
    }

    #[test]
    fn thin_pools_zero_new_blocks_and_fail_writes_when_full() {
        assert_eq!(
            thin_pool_cmd("lvmlocal-ssd", "lvmlocal_thinpool", 1 << 30, 4 << 20).to_string(),
            "lvcreate --type thin-pool --name lvmlocal_thinpool --size 1073741824b \
             --poolmetadatasize 4194304b --zero y lvmlocal-ssd"
        );
        assert_eq!(
            thin_lvcreate_cmd(
                "lvmlocal-ssd",
                "lvmlocal_thinpool",
                "pvc-1",
                2 << 30,
                &["lvmlocal.io/volume".to_owned()]
            )
            .to_string(),
            "lvcreate --name pvc-1 --virtualsize 2147483648b --thinpool lvmlocal_thinpool \
             --addtag lvmlocal.io/volume lvmlocal-ssd"
        );
        let lvs = r#"{"report":[{"lv":[
            {"lv_name":"lvmlocal_thinpool","vg_name":"lvmlocal-ssd","lv_size":"536870912","lv_tags":"","lv_attr":"twi-aotz--","lv_path":"","lv_kernel_minor":"2","pool_lv":"","lv_metadata_size":"4194304","data_percent":"12.50","metadata_percent":"10.84","lv_when_full":"error"},
            {"lv_name":"pvc-1","vg_name":"lvmlocal-ssd","lv_size":"1073741824","lv_tags":"lvmlocal.io/volume","lv_attr":"Vwi-a-tz--","lv_path":"/dev/lvmlocal-ssd/pvc-1","lv_kernel_minor":"4","pool_lv":"lvmlocal_thinpool","lv_metadata_size":"","data_percent":"6.25","metadata_percent":"","lv_when_full":""}
        ]}]}"#;
        let lvs: Vec<Lv> = rows(lvs, "lv")
            .unwrap()
            .iter()
            .map(parse_lv)
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(lvs[0].thin_pool() && !lvs[1].thin_pool());
        assert!(lvs[0].errors_when_full && !lvs[1].errors_when_full);
        assert_eq!(lvs[0].metadata_bytes, Some(4 << 20));
        assert_eq!(lvs[0].data_percent, Some(1250));
        assert_eq!(lvs[0].metadata_percent, Some(1084));
        assert_eq!(hundredths("100.00"), Some(10_000));
        assert_eq!(hundredths("0"), Some(0));
        assert_eq!(hundredths(""), None);
        assert_eq!(lvs[1].pool.as_deref(), Some("lvmlocal_thinpool"));
        assert_eq!(lvs[1].metadata_percent, None);
    }

    #[test]
    fn attr_says_active_and_open() {
        let lv = |attr: &str| Lv {
            name: "v".into(),
            vg: "g".into(),
            size_bytes: 1,
            tags: vec![],
            attr: attr.into(),
            path: "/dev/g/v".into(),
            kernel_minor: Some(3),
            pool: None,
            metadata_bytes: None,
            data_percent: None,
            metadata_percent: None,
            errors_when_full: false,
        };
        assert!(lv("-wi-ao----").active() && lv("-wi-ao----").open());
        assert!(lv("-wi-a-----").active() && !lv("-wi-a-----").open());
        assert!(!lv("-wi-------").active());
    }
}
