//! Signatures (blkid) and mounts (mountinfo): what sysfs cannot tell about
//! whether a disk holds somebody's data.

use std::collections::BTreeSet;

use crate::command::{Cmd, CommandError, Runner};
use crate::discovery::Probe;
use crate::sysfs::BlockDevice;

/// blkid's exit status when it found no signature at all.
const BLKID_NOTHING_FOUND: i32 = 2;
/// ... and when it found several that contradict each other.
const BLKID_AMBIVALENT: i32 = 8;

/// `major:minor` of every mounted block device, from `/proc/self/mountinfo`.
pub fn mounted_devnos(mountinfo: &str) -> BTreeSet<String> {
    mountinfo
        .lines()
        .filter_map(|line| line.split_whitespace().nth(2))
        .filter(|devno| !devno.starts_with("0:"))
        .map(str::to_owned)
        .collect()
}

/// `(partition table type, signature type)` from `blkid -p -o export`.
pub fn parse_blkid(export: &str) -> (Option<String>, Option<String>) {
    let mut table = None;
    let mut signature = None;
    for line in export.lines() {
        match line.split_once('=') {
            Some(("PTTYPE", value)) => table = Some(value.to_owned()),
            Some(("TYPE", value)) => signature = Some(value.to_owned()),
            _ => {}
        }
    }
    (table, signature)
}

/// Low-level probe of the whole disk, bypassing blkid's cache.
pub async fn probe(
    runner: &Runner,
    device: &BlockDevice,
    mounted: &BTreeSet<String>,
) -> Result<Probe, CommandError> {
    let path = format!("/dev/{}", device.name);
    let (code, stdout, stderr) = runner
        .status(&Cmd::new("blkid", ["-p", "-o", "export", path.as_str()]))
        .await?;
    let (partition_table, signature) = match code {
        0 => parse_blkid(&stdout),
        BLKID_NOTHING_FOUND => (None, None),
        BLKID_AMBIVALENT => (None, Some("several conflicting signatures".to_owned())),
        code => {
            return Err(CommandError::Failed {
                command: format!("blkid -p -o export {path}"),
                code,
                stderr,
            });
        }
    };
    let is_mounted = mounted.contains(&device.devno)
        || device
            .partitions
            .iter()
            .any(|partition| mounted.contains(&partition.devno));
    Ok(Probe {
        partition_table,
        signature,
        mounted: is_mounted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_devnos() {
        let mountinfo = "\
22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme2n1p2 rw
23 22 0:21 / /proc rw shared:2 - proc proc rw
40 22 8:17 / /data rw - xfs /dev/sdb1 rw
";
        let devnos = mounted_devnos(mountinfo);
        assert_eq!(devnos.into_iter().collect::<Vec<_>>(), ["259:2", "8:17"]);
    }

    #[test]
    fn blkid_export() {
        assert_eq!(
            parse_blkid("DEVNAME=/dev/sdb\nPTUUID=1234\nPTTYPE=gpt\n"),
            (Some("gpt".into()), None)
        );
        assert_eq!(
            parse_blkid("DEVNAME=/dev/sdc\nUUID=abc\nVERSION=1.0\nTYPE=ext4\nUSAGE=filesystem\n"),
            (None, Some("ext4".into()))
        );
        assert_eq!(parse_blkid(""), (None, None));
    }
}
