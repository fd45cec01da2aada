//! Filesystems and mounts, as a small typed layer over wipefs, mkfs, mount,
//! umount and the grow tools, all through the command runner; and the one
//! rule for when a volume may be formatted.

use std::path::{Path, PathBuf};

use crate::command::{Cmd, CommandError, Runner};

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error("{device} holds {found}, not the {wanted} asked for; it will not be formatted")]
    OtherFilesystem {
        device: String,
        found: String,
        wanted: String,
    },
    #[error(
        "{device} holds {found}, which is not an empty volume: it will not be formatted \
         (remove it with wipefs only if that data is not wanted)"
    )]
    UnknownData { device: String, found: String },
    #[error(
        "{device} was formatted {fs} by lvmlocal but no filesystem is found on it now: \
         it needs repair ({repair}), it will not be formatted again"
    )]
    NeedsRepair {
        device: String,
        fs: String,
        repair: &'static str,
    },
    #[error("{device} was formatted {recorded} by lvmlocal, not the {wanted} asked for")]
    RecordedOther {
        device: String,
        recorded: String,
        wanted: String,
    },
    #[error("{device} cannot be read ({source}): not probing, formatting or mounting it")]
    Unreadable {
        device: String,
        source: std::io::Error,
    },
    #[error("{device}: cannot parse `wipefs --no-act --json`: {reason}")]
    Probe { device: String, reason: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{target} is already mounted from another device")]
    Busy { target: String },
    #[error(
        "{target}: the read-only remount failed ({remount}) and undoing the read-write \
         bind failed too ({undo}): it is still mounted read-write"
    )]
    ReadOnlyStuck {
        target: String,
        remount: String,
        undo: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> MountError + '_ {
    move |source| MountError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountPoint {
    /// `major:minor` of the mounted device.
    pub devno: String,
    /// Path inside the mounted filesystem that is mounted (`/` for a whole one).
    pub root: String,
    pub target: PathBuf,
    pub options: Vec<String>,
    pub fs_type: String,
}

impl MountPoint {
    pub fn read_only(&self) -> bool {
        self.options.iter().any(|option| option == "ro")
    }
}

/// Parses mountinfo; octal escapes (`\040` for a space) are undone.
pub fn parse_mountinfo(text: &str) -> Vec<MountPoint> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let right: Vec<&str> = right.split(' ').collect();
            Some(MountPoint {
                devno: (*left.get(2)?).to_owned(),
                root: unescape(left.get(3)?),
                target: PathBuf::from(unescape(left.get(4)?)),
                options: left.get(5)?.split(',').map(str::to_owned).collect(),
                fs_type: (*right.first()?).to_owned(),
            })
        })
        .collect()
}

fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && let Ok(code) = u8::from_str_radix(&field[i + 1..i + 4], 8)
        {
            out.push(code);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every mount of this mount namespace, in mount order.
pub fn mounts() -> Result<Vec<MountPoint>, MountError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    Ok(parse_mountinfo(&text))
}

/// What is mounted at `target`, if anything (the last mount wins).
pub fn mounted_at(target: &Path) -> Result<Option<MountPoint>, MountError> {
    Ok(mounts()?
        .into_iter()
        .rev()
        .find(|mount| mount.target == target))
}

/// Where the device `devno` is mounted other than at `except`: bind mounts
/// of it, of a directory in it, or a second mount of the device.
pub fn mounted_elsewhere(mounts: &[MountPoint], devno: &str, except: &Path) -> Vec<PathBuf> {
    let mut targets: Vec<PathBuf> = mounts
        .iter()
        .filter(|mount| mount.devno == devno && mount.target != except)
        .map(|mount| mount.target.clone())
        .collect();
    targets.sort_unstable();
    targets.dedup();
    targets
}

/// Paths for a message, comma-separated.
pub fn comma_separated(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|path| path.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// What a low-level probe found on a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Contents {
    /// Not a single signature.
    Nothing,
    /// The signatures of one filesystem, and nothing else.
    Filesystem(String),
    /// Anything else (a partition table, a RAID or LVM member, swap, two
    /// filesystems), described for a message.
    Unknown(String),
}

#[derive(serde::Deserialize)]
struct WipefsReport {
    signatures: Vec<WipefsSignature>,
}

#[derive(serde::Deserialize)]
struct WipefsSignature {
    #[serde(rename = "type")]
    kind: String,
    usage: Option<String>,
    offset: Option<String>,
}

/// Reads `wipefs --no-act --json --output TYPE,USAGE,OFFSET`: every
/// signature libblkid sees at every offset, where `blkid -p` stops at the
/// first or reports nothing when two disagree.
pub fn parse_wipefs(json: &str) -> Result<Contents, String> {
    let report: WipefsReport = serde_json::from_str(json).map_err(|err| err.to_string())?;
    let Some(first) = report.signatures.first() else {
        return Ok(Contents::Nothing);
    };
    let one_filesystem = report.signatures.iter().all(|signature| {
        signature.kind == first.kind && signature.usage.as_deref() == Some("filesystem")
    });
    if one_filesystem {
        return Ok(Contents::Filesystem(first.kind.clone()));
    }
    let found = report
        .signatures
        .iter()
        .map(|signature| {
            format!(
                "{} ({}) at {}",
                signature.kind,
                signature.usage.as_deref().unwrap_or("unknown use"),
                signature.offset.as_deref().unwrap_or("?"),
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    Ok(Contents::Unknown(found))
}

/// What NodeStageVolume does with a volume's device before mounting it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preparation {
    /// Never formatted by lvmlocal, and positively blank.
    Format,
    /// Holds the filesystem lvmlocal recorded making.
    Mount,
    /// Holds the filesystem asked for, made before formats were recorded:
    /// record it, then mount.
    RecordAndMount,
}

/// The one rule for formatting: only a volume lvmlocal never formatted
/// (`recorded` is None) whose probe found nothing at all. A recorded
/// volume whose filesystem is gone is damaged, and damage is repaired,
/// never formatted over.
pub fn prepare(
    device: &str,
    recorded: Option<&str>,
    found: &Contents,
    wanted: &str,
) -> Result<Preparation, MountError> {
    if let Some(recorded) = recorded
        && recorded != wanted
    {
        return Err(MountError::RecordedOther {
            device: device.to_owned(),
            recorded: recorded.to_owned(),
            wanted: wanted.to_owned(),
        });
    }
    match (recorded, found) {
        (None, Contents::Nothing) => Ok(Preparation::Format),
        (Some(_), Contents::Filesystem(fs)) if fs == wanted => Ok(Preparation::Mount),
        (None, Contents::Filesystem(fs)) if fs == wanted => Ok(Preparation::RecordAndMount),
        (Some(fs), Contents::Nothing) => Err(MountError::NeedsRepair {
            device: device.to_owned(),
            fs: fs.to_owned(),
            repair: repair_hint(fs),
        }),
        (_, Contents::Filesystem(found)) => Err(MountError::OtherFilesystem {
            device: device.to_owned(),
            found: found.clone(),
            wanted: wanted.to_owned(),
        }),
        (_, Contents::Unknown(found)) => Err(MountError::UnknownData {
            device: device.to_owned(),
            found: found.clone(),
        }),
    }
}

fn repair_hint(fs: &str) -> &'static str {
    match fs {
        "xfs" => "xfs_repair, which finds a secondary superblock",
        _ => "e2fsck with a backup superblock: e2fsck -b 32768, or -b 8193 below 512 MiB",
    }
}

/// How much of each end of a device must read back before it is probed.
const READ_CHECK_BYTES: u64 = 1 << 20;

/// Reads the first and the last MiB of `device`. libblkid's probes treat a
/// read error as "no signature here", so an unreadable device would look
/// blank to them.
pub async fn check_readable(device: &str) -> Result<(), MountError> {
    use std::io::{Read, Seek, SeekFrom};
    let path = device.to_owned();
    let read = move || -> std::io::Result<()> {
        let mut file = std::fs::File::open(&path)?;
        let size = file.seek(SeekFrom::End(0))?;
        if size == 0 {
            return Err(std::io::Error::other("the device has no size"));
        }
        let len = size.min(READ_CHECK_BYTES);
        let mut buffer = vec![0; len as usize];
        for start in [0, size - len] {
            file.seek(SeekFrom::Start(start))?;
            file.read_exact(&mut buffer)?;
        }
        Ok(())
    };
    tokio::task::spawn_blocking(read)
        .await
        .map_err(std::io::Error::other)
        .and_then(|result| result)
        .map_err(|source| MountError::Unreadable {
            device: device.to_owned(),
            source,
        })
}

/// `major:minor` of a block device file.
pub fn devno(device: &Path) -> Result<String, MountError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(device).map_err(io(device))?;
    let rdev = meta.rdev();
    Ok(format!(
        "{}:{}",
        nix::sys::stat::major(rdev),
        nix::sys::stat::minor(rdev)
    ))
}

#[derive(Debug, Clone, Default)]
pub struct Mounter {
    runner: Runner,
}

impl Mounter {
    pub fn new(runner: Runner) -> Self {
        Self { runner }
    }

    /// Every signature on `device`, read by a low-level probe that bypasses
    /// blkid's cache; a device it cannot open is an error, not a blank.
    pub async fn probe(&self, device: &str) -> Result<Contents, MountError> {
        let cmd = Cmd::new(
            "wipefs",
            [
                "--no-act",
                "--json",
                "--output",
                "TYPE,USAGE,OFFSET",
                device,
            ],
        );
        let stdout = self.runner.run(&cmd).await?;
        parse_wipefs(&stdout).map_err(|reason| MountError::Probe {
            device: device.to_owned(),
            reason,
        })
    }

    /// Makes `fs_type` on a device [`prepare`] found blank. `mkfs.xfs`
    /// without `-f` refuses any signature it finds. mke2fs asks before
    /// overwriting a filesystem only on a terminal (and proceeds without
    /// one), so for ext4 the probe just before is the guard, besides
    /// mke2fs's own refusal of a mounted device. Lazy inode tables and no
    /// discard keep the time independent of the size.
    pub async fn format(&self, device: &str, fs_type: &str) -> Result<(), MountError> {
        let cmd = match fs_type {
            "xfs" => Cmd::new("mkfs.xfs", ["-q", "-K", device]),
            _ => Cmd::new(
                "mkfs.ext4",
                [
                    "-q",
                    "-E",
                    "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
                    device,
                ],
            ),
        };
        self.runner.run(&cmd).await?;
        Ok(())
    }

    pub async fn mount(
        &self,
        device: &str,
        target: &Path,
        fs_type: &str,
        options: &[String],
    ) -> Result<(), MountError> {
        let mut args = vec!["-t".to_owned(), fs_type.to_owned()];
        if !options.is_empty() {
            args.extend(["-o".to_owned(), options.join(",")]);
        }
        args.extend([device.to_owned(), target.display().to_string()]);
        self.runner.run(&Cmd::new("mount", args)).await?;
        Ok(())
    }

    /// Bind-mounts `source` at `target`; a read-only bind needs a remount.
    pub async fn bind(
        &self,
        source: &Path,
        target: &Path,
        read_only: bool,
    ) -> Result<(), MountError> {
        let (source, target) = (source.display().to_string(), target.display().to_string());
        self.runner
            .run(&Cmd::new(
                "mount",
                ["--bind", source.as_str(), target.as_str()],
            ))
            .await?;
        if read_only {
            let remount = self
                .runner
                .run(&Cmd::new(
                    "mount",
                    ["-o", "remount,bind,ro", target.as_str()],
                ))
                .await;
            if let Err(remount) = remount {
                // A read-write bind left behind would give the pod writes it did not ask for.
                return match self.unmount(Path::new(&target)).await {
                    Ok(()) => Err(remount.into()),
                    Err(undo) => Err(MountError::ReadOnlyStuck {
                        target,
                        remount: remount.to_string(),
                        undo: undo.to_string(),
                    }),
                };
            }
        }
        Ok(())
    }

    /// Unmounts `target` until nothing is mounted there any more.
    pub async fn unmount(&self, target: &Path) -> Result<(), MountError> {
        while mounted_at(target)?.is_some() {
            self.runner
                .run(&Cmd::new("umount", [target.display().to_string()]))
                .await?;
        }
        Ok(())
    }

    /// Grows the filesystem to fill its device, online.
    pub async fn grow(
        &self,
        device: &str,
        mounted_at: &Path,
        fs_type: &str,
    ) -> Result<(), MountError> {
        let cmd = match fs_type {
            "xfs" => Cmd::new("xfs_growfs", [mounted_at.display().to_string()]),
            _ => Cmd::new("resize2fs", [device.to_owned()]),
        };
        self.runner.run(&cmd).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines() {
        let text = "\
36 25 253:1 / /var/lib/kubelet/plugins/kubernetes.io/csi/lvmlocal.io/abc/globalmount rw,relatime shared:9 - ext4 /dev/mapper/lvmlocal--nvme-pvc--1 rw
37 25 253:1 / /var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/pvc-1/mount ro,relatime shared:9 - ext4 /dev/mapper/lvmlocal--nvme-pvc--1 rw
38 25 0:5 /dm-2 /var/lib/kubelet/a\\040b rw - devtmpfs udev rw
";
        let mounts = parse_mountinfo(text);
        assert_eq!(mounts.len(), 3);
        assert_eq!(mounts[0].devno, "253:1");
        assert_eq!(mounts[0].fs_type, "ext4");
        assert!(!mounts[0].read_only());
        assert!(mounts[1].read_only());
        assert_eq!(mounts[2].target, PathBuf::from("/var/lib/kubelet/a b"));
        assert_eq!(mounts[2].root, "/dm-2");
    }

    #[test]
    fn binds_of_the_same_device_are_found_elsewhere() {
        let text = "\
36 25 253:1 / /k/globalmount rw - ext4 /dev/mapper/a rw
37 25 253:1 / /k/pods/u/mount rw - ext4 /dev/mapper/a rw
38 25 253:1 /sub /k/pods/w/mount rw - ext4 /dev/mapper/a rw
39 25 253:2 / /k/other rw - ext4 /dev/mapper/b rw
40 25 253:1 / /k/globalmount rw - ext4 /dev/mapper/a rw
";
        let mounts = parse_mountinfo(text);
        let staging = Path::new("/k/globalmount");
        assert_eq!(
            mounted_elsewhere(&mounts, "253:1", staging),
            [PathBuf::from("/k/pods/u/mount"), "/k/pods/w/mount".into()]
        );
        assert!(mounted_elsewhere(&mounts, "253:2", Path::new("/k/other")).is_empty());
        assert!(mounted_elsewhere(&mounts, "253:9", staging).is_empty());
    }

    #[test]
    fn wipefs_reports() {
        let report = |signatures: &str| format!(r#"{{"signatures": [{signatures}]}}"#);
        let ext4 = r#"{"type":"ext4","usage":"filesystem","offset":"0x438"}"#;
        let dos = r#"{"type":"dos","usage":"partition-table","offset":"0x1fe"}"#;
        let xfs = r#"{"type":"xfs","usage":"filesystem","offset":"0x0"}"#;
        let lvm = r#"{"type":"LVM2_member","usage":"raid","offset":"0x218"}"#;
        assert_eq!(parse_wipefs(&report("")), Ok(Contents::Nothing));
        assert_eq!(
            parse_wipefs(&report(ext4)),
            Ok(Contents::Filesystem("ext4".into()))
        );
        assert_eq!(
            parse_wipefs(&report(&format!("{ext4},{ext4}"))),
            Ok(Contents::Filesystem("ext4".into()))
        );
        assert_eq!(
            parse_wipefs(&report(dos)),
            Ok(Contents::Unknown("dos (partition-table) at 0x1fe".into()))
        );
        for other in [format!("{ext4},{dos}"), format!("{ext4},{xfs}"), lvm.into()] {
            assert!(
                matches!(parse_wipefs(&report(&other)), Ok(Contents::Unknown(_))),
                "{other}"
            );
        }
        // No report is no answer, never a blank.
        assert!(parse_wipefs("").is_err());
        assert!(parse_wipefs("wipefs: error").is_err());
    }

    #[test]
    fn only_a_never_formatted_positively_blank_volume_is_formatted() {
        use Preparation::*;
        let nothing = Contents::Nothing;
        let ext4 = Contents::Filesystem("ext4".into());
        let xfs = Contents::Filesystem("xfs".into());
        let table = Contents::Unknown("dos (partition-table) at 0x1fe".into());
        let refused = |kind: &str| Err(kind.to_owned());
        let cases: [(Option<&str>, &Contents, Result<Preparation, String>); 12] = [
            (None, &nothing, Ok(Format)),
            (None, &ext4, Ok(RecordAndMount)),
            (None, &xfs, refused("OtherFilesystem")),
            (None, &table, refused("UnknownData")),
            (Some("ext4"), &nothing, refused("NeedsRepair")),
            (Some("ext4"), &ext4, Ok(Mount)),
            (Some("ext4"), &xfs, refused("OtherFilesystem")),
            (Some("ext4"), &table, refused("UnknownData")),
            (Some("xfs"), &nothing, refused("RecordedOther")),
            (Some("xfs"), &ext4, refused("RecordedOther")),
            (Some("xfs"), &xfs, refused("RecordedOther")),
            (Some("xfs"), &table, refused("RecordedOther")),
        ];
        for (recorded, found, want) in cases {
            let got = prepare("/dev/vg/v", recorded, found, "ext4").map_err(|err| {
                format!("{err:?}")
                    .split([' ', '{'])
                    .next()
                    .unwrap_or_default()
                    .to_owned()
            });
            assert_eq!(got, want, "recorded {recorded:?}, found {found:?}");
        }
    }

    #[test]
    fn a_damaged_volume_is_sent_to_repair() {
        let err = prepare("/dev/vg/v", Some("ext4"), &Contents::Nothing, "ext4").unwrap_err();
        let message = err.to_string();
        assert!(message.contains("e2fsck -b 32768"), "{message}");
        assert!(message.contains("will not be formatted"), "{message}");
        let err = prepare("/dev/vg/v", Some("xfs"), &Contents::Nothing, "xfs").unwrap_err();
        assert!(err.to_string().contains("xfs_repair"), "{err}");
    }

    #[tokio::test]
    async fn a_device_must_read_back_at_both_ends() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("image");
        std::fs::write(&image, vec![7u8; 3 << 20]).unwrap();
        check_readable(image.to_str().unwrap()).await.unwrap();
        let small = dir.path().join("small");
        std::fs::write(&small, [1u8; 4096]).unwrap();
        check_readable(small.to_str().unwrap()).await.unwrap();

        let empty = dir.path().join("empty");
        std::fs::write(&empty, []).unwrap();
        let missing = dir.path().join("missing");
        for path in [empty, missing] {
            let err = check_readable(path.to_str().unwrap()).await.unwrap_err();
            assert!(matches!(err, MountError::Unreadable { .. }), "{err}");
        }
    }
}
