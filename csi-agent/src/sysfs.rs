//! Reads the whole block devices of a node from sysfs. The root is a
//! parameter so tests can read trees captured from real machines.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// What sysfs says about one whole block device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockDevice {
    /// Kernel name, e.g. `nvme0n1` or `sdb`: valid until the next reboot only.
    pub name: String,
    /// `major:minor`.
    pub devno: String,
    /// Path of the device below the sysfs root, e.g.
    /// `devices/pci0000:00/0000:00:05.0/nvme/nvme0/nvme0n1`.
    pub device_path: String,
    pub size_bytes: u64,
    pub rotational: bool,
    pub removable: bool,
    pub read_only: bool,
    /// Namespace id of an NVMe namespace.
    pub nsid: Option<u32>,
    /// 1-based port number of the ATA port the disk hangs off.
    pub ata_port: Option<u32>,
    /// SAS address of the end device, for SAS disks.
    pub sas_address: Option<String>,
    pub serial: Option<String>,
    pub model: Option<String>,
    /// Devices built on top of this one (device-mapper, md).
    pub holders: Vec<String>,
    pub partitions: Vec<Partition>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Partition {
    pub name: String,
    /// `major:minor`, to find it in the mount table.
    pub devno: String,
}

/// Every whole block device under `<root>/block`, sorted by kernel name.
pub fn scan(root: &Path) -> io::Result<Vec<BlockDevice>> {
    let mut devices = Vec::new();
    for entry in fs::read_dir(root.join("block"))? {
        let entry = entry?;
        // A device can vanish between listing and reading: skip it.
        match read_device(root, &entry.path()) {
            Ok(device) => devices.push(device),
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(err),
        }
    }
    devices.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(devices)
}

fn read_device(root: &Path, link: &Path) -> io::Result<BlockDevice> {
    let dir = fs::canonicalize(link)?;
    let root = fs::canonicalize(root)?;
    let name = file_name(&dir);
    let device_path = dir
        .strip_prefix(&root)
        .unwrap_or(&dir)
        .display()
        .to_string();
    let device = fs::canonicalize(dir.join("device")).ok();

    let sectors: u64 = parse(&dir.join("size"))?;
    let nsid = read_opt(&dir.join("nsid")).and_then(|s| s.parse().ok());
    let ata_port = ata_port(&root, &device_path);
    let (serial, model, sas_address) = match &device {
        Some(device) => (
            read_opt(&device.join("serial")).or_else(|| vpd_serial(&device.join("vpd_pg80"))),
            read_opt(&device.join("model")),
            read_opt(&device.join("sas_address")),
        ),
        None => (None, None, None),
    };
    Ok(BlockDevice {
        devno: read(&dir.join("dev"))?,
        size_bytes: sectors * 512,
        rotational: read_opt(&dir.join("queue/rotational")).as_deref() == Some("1"),
        removable: read_opt(&dir.join("removable")).as_deref() == Some("1"),
        read_only: read_opt(&dir.join("ro")).as_deref() == Some("1"),
        nsid,
        ata_port,
        sas_address,
        serial,
        model,
        holders: list(&dir.join("holders")),
        partitions: partitions(&dir),
        name,
        device_path,
    })
}

/// The `port_no` of the `ataN` directory on the device's path.
fn ata_port(root: &Path, device_path: &str) -> Option<u32> {
    let mut path = PathBuf::new();
    for part in Path::new(device_path).components() {
        path.push(part);
        let part = part.as_os_str().to_string_lossy();
        if part.starts_with("ata") && part[3..].chars().all(|c| c.is_ascii_digit()) {
            let port = root
                .join(&path)
                .join("ata_port")
                .join(&*part)
                .join("port_no");
            return read_opt(&port).and_then(|s| s.parse().ok());
        }
    }
    None
}

/// The unit serial number from a SCSI VPD page 0x80: a 4-byte header whose
/// last byte is the length, then the serial in ASCII.
fn vpd_serial(path: &Path) -> Option<String> {
    let page = fs::read(path).ok()?;
    let len = usize::from(*page.get(3)?);
    let serial = String::from_utf8_lossy(page.get(4..4 + len)?);
    let serial = serial.trim();
    (!serial.is_empty()).then(|| serial.to_owned())
}

fn partitions(dir: &Path) -> Vec<Partition> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<Partition> = entries
        .filter_map(Result::ok)
        .filter(|entry| entry.path().join("partition").is_file())
        .filter_map(|entry| {
            Some(Partition {
                name: entry.file_name().to_string_lossy().into_owned(),
                devno: read(&entry.path().join("dev")).ok()?,
            })
        })
        .collect();
    found.sort_by(|a, b| a.name.cmp(&b.name));
    found
}

fn list(dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn read(path: &Path) -> io::Result<String> {
    Ok(fs::read_to_string(path)?.trim().to_owned())
}

fn read_opt(path: &Path) -> Option<String> {
    read(path).ok().filter(|value| !value.is_empty())
}

fn parse<T: std::str::FromStr>(path: &Path) -> io::Result<T> {
    let text = read(path)?;
    text.parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {text:?} is not a number", path.display()),
        )
    })
}
