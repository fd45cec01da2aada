//! Filesystems and mounts, as a small typed layer over mkfs, mount, umount
//! and the grow tools, all through the command runner.

use std::path::{Path, PathBuf};

use crate::command::{Cmd, CommandError, Runner};
use crate::probe::parse_blkid;

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error("{device} holds {found}, not the {wanted} asked for")]
    OtherFilesystem {
        device: String,
        found: String,
        wanted: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{target} is already mounted from another device")]
    Busy { target: String },
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

/// What is mounted at `target`, if anything (the last mount wins).
pub fn mounted_at(target: &Path) -> Result<Option<MountPoint>, MountError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    Ok(parse_mountinfo(&text)
        .into_iter()
        .rev()
        .find(|mount| mount.target == target))
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

    /// The filesystem on `device`, if any.
    pub async fn filesystem(&self, device: &str) -> Result<Option<String>, MountError> {
        let (code, stdout, stderr) = self
            .runner
            .status(&Cmd::new("blkid", ["-p", "-o", "export", device]))
            .await?;
        match code {
            0 => Ok(parse_blkid(&stdout).1),
            2 => Ok(None),
            code => Err(CommandError::Failed {
                command: format!("blkid -p -o export {device}"),
                code,
                stderr,
            }
            .into()),
        }
    }

    /// Formats `device` with `fs_type` unless it already holds that
    /// filesystem; another filesystem is an error, never overwritten. Lazy
    /// inode tables and no discard keep the time independent of the size.
    pub async fn format_if_blank(&self, device: &str, fs_type: &str) -> Result<bool, MountError> {
        match self.filesystem(device).await? {
            Some(found) if found == fs_type => return Ok(false),
            Some(found) => {
                return Err(MountError::OtherFilesystem {
                    device: device.to_owned(),
                    found,
                    wanted: fs_type.to_owned(),
                });
            }
            None => {}
        }
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
        Ok(true)
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
            self.runner
                .run(&Cmd::new(
                    "mount",
                    ["-o", "remount,bind,ro", target.as_str()],
                ))
                .await?;
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
}
