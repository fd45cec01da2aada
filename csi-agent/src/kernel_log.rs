//! Filesystem and I/O errors the kernel logs about the node's devices, read
//! from `/dev/kmsg`. ext4 and XFS say there what is wrong with a mounted
//! filesystem (`EXT4-fs error (device dm-3): …`, `XFS (dm-3): Corruption
//! detected …`, `… Shutting down filesystem`) and the block layer says which
//! device failed a read or write; nothing in sysfs says it for both. A
//! reader that opens the log gets every record still in the ring buffer, so
//! errors logged before the agent started count too.

use std::collections::HashMap;
use std::fs::File;
use std::io::{ErrorKind, Read};
use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

/// What the kernel logged about one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceErrors {
    pub count: u64,
    /// The latest such message, as logged.
    pub last: String,
}

/// The errors logged so far, by kernel device name (`dm-3`).
#[derive(Debug, Clone, Default)]
pub struct KernelErrors {
    devices: Arc<Mutex<HashMap<String, DeviceErrors>>>,
}

impl KernelErrors {
    /// What was logged about `device` (its kernel name), if anything.
    pub fn of(&self, device: &str) -> Option<DeviceErrors> {
        self.devices
            .lock()
            .expect("kernel errors poisoned")
            .get(device)
            .cloned()
    }

    /// Forgets what was logged about `device`, once it is gone.
    pub fn forget(&self, device: &str) {
        self.devices
            .lock()
            .expect("kernel errors poisoned")
            .remove(device);
    }

    /// Counts one record; whether it was an error about a device.
    pub fn record(&self, record: &str) -> bool {
        let Some((device, message)) = device_error(record) else {
            return false;
        };
        let mut devices = self.devices.lock().expect("kernel errors poisoned");
        let entry = devices.entry(device.to_owned()).or_insert(DeviceErrors {
            count: 0,
            last: String::new(),
        });
        entry.count += 1;
        entry.last = message.to_owned();
        true
    }
}

/// Reads `path` (`/dev/kmsg`) on a thread of its own for as long as the
/// process lives, counting into `errors` and sending `trigger` after each
/// new error, so that a rescan tells the cluster.
pub fn watch(path: &Path, errors: KernelErrors, trigger: mpsc::Sender<()>) -> std::io::Result<()> {
    let mut log = File::open(path)?;
    std::thread::Builder::new()
        .name("kernel-log".into())
        .spawn(move || {
            // One read returns one whole record; a record never exceeds this.
            let mut buffer = vec![0u8; 8192];
            loop {
                let len = match log.read(&mut buffer) {
                    Ok(0) => return,
                    Ok(len) => len,
                    // The ring buffer overwrote records before they were read.
                    Err(err) if err.raw_os_error() == Some(nix::libc::EPIPE) => continue,
                    Err(err) if err.kind() == ErrorKind::Interrupted => continue,
                    Err(err) => {
                        tracing::warn!(error = %err, "kernel log failed; filesystem errors go unseen");
                        return;
                    }
                };
                let record = String::from_utf8_lossy(&buffer[..len]);
                if errors.record(&record) {
                    tracing::warn!(record = %record.trim_end(), "the kernel logged a device error");
                    match trigger.try_send(()) {
                        Ok(()) | Err(mpsc::error::TrySendError::Full(())) => {}
                        Err(mpsc::error::TrySendError::Closed(())) => return,
                    }
                }
            }
        })?;
    Ok(())
}

/// The device and message of a record (`prio,seq,usec,flags;message`, then
/// continuation lines) that reports a filesystem or I/O error.
fn device_error(record: &str) -> Option<(&str, &str)> {
    let (_, message) = record.split_once(';')?;
    let message = message.lines().next()?.trim_end();
    let device = if let Some(rest) = message.strip_prefix("EXT4-fs error (device ") {
        rest.split_once(')')?.0
    } else if let Some(rest) = message.strip_prefix("XFS (") {
        let (device, said) = rest.split_once("): ")?;
        let trouble = [
            "Corruption",
            "corrupt",
            "I/O error",
            "Internal error",
            "Shutting down filesystem",
            "shut down",
        ];
        if !trouble.iter().any(|word| said.contains(word)) {
            return None;
        }
        device
    } else if let Some(rest) = message.strip_prefix("Buffer I/O error on dev ") {
        rest.split_once(',')?.0
    } else if let Some((_, rest)) = message.split_once("I/O error, dev ") {
        rest.split_once(',')?.0
    } else {
        return None;
    };
    (!device.is_empty()).then_some((device, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_counted_by_device() {
        let errors = KernelErrors::default();
        let records = [
            "3,812,93512345,-;EXT4-fs error (device dm-3): ext4_lookup:1855: inode #2: comm ls: iget: checksum invalid\n",
            "3,813,93512399,-;EXT4-fs error (device dm-3): trigger_test_error:123: comm sh: boom\n SUBSYSTEM=block\n",
            "1,900,1,-;XFS (dm-4): Corruption detected. Unmount and run xfs_repair\n",
            "4,901,2,-;XFS (dm-5): User initiated shutdown received.\n",
            "1,902,3,-;XFS (dm-5): Shutting down filesystem\n",
            "3,903,4,-;Buffer I/O error on dev dm-6, logical block 0, async page read\n",
            "3,904,5,-;I/O error, dev nvme0n1, sector 2048 op 0x0:(READ) flags 0x0 phys_seg 1 prio class 0\n",
            "3,905,6,-;blk_update_request: I/O error, dev sda, sector 8 op 0x1:(WRITE)\n",
        ];
        for record in records {
            errors.record(record);
        }
        assert_eq!(
            errors.of("dm-3"),
            Some(DeviceErrors {
                count: 2,
                last: "EXT4-fs error (device dm-3): trigger_test_error:123: comm sh: boom".into(),
            })
        );
        assert_eq!(errors.of("dm-4").unwrap().count, 1);
        assert_eq!(
            errors.of("dm-5").unwrap().last,
            "XFS (dm-5): Shutting down filesystem"
        );
        assert_eq!(errors.of("dm-6").unwrap().count, 1);
        assert_eq!(errors.of("nvme0n1").unwrap().count, 1);
        assert_eq!(errors.of("sda").unwrap().count, 1);
        errors.forget("dm-3");
        assert_eq!(errors.of("dm-3"), None);
    }

    #[test]
    fn ordinary_records_are_not_errors() {
        let errors = KernelErrors::default();
        for record in [
            "6,100,1,-;EXT4-fs (dm-3): mounted filesystem with ordered data mode. Quota mode: none.\n",
            "5,101,2,-;XFS (dm-4): Mounting V5 Filesystem\n",
            "5,102,3,-;XFS (dm-4): Ending clean mount\n",
            "6,103,4,-;nvme nvme0: 2/0/0 default/read/poll queues\n",
            "no separator at all",
            "6,104,5,-;EXT4-fs error (device \n",
        ] {
            assert!(!errors.record(record), "{record}");
        }
        assert_eq!(errors.of("dm-3"), None);
        assert_eq!(errors.of("dm-4"), None);
    }
}
