//! Erasing what an earlier tenant left in an LV's extents: every signature
//! and both ends of a new LV, and the whole of an LV about to be removed.
//! Only ever run on an LV whose recorded state says it holds nobody's data
//! yet (`creating`) or that its removal was asked (`deleting`).
//!
//! Zeroing goes through `blkdiscard --zeroout` (the BLKZEROOUT ioctl): the
//! kernel offloads it to WRITE ZEROES where the device has it, and writes
//! zeroes itself where not. blkdiscard opens the device exclusively, so a
//! mounted LV is refused rather than zeroed under its filesystem.

use std::time::Duration;

use crate::command::{Cmd, CommandError, Runner};

/// How much of each end of a new LV is zeroed: partition tables (and the
/// backup GPT), RAID, LVM, ZFS and filesystem labels all live there.
pub const EDGE_BYTES: u64 = 1 << 20;

/// The slowest zeroing the timeout of a whole-LV zeroing allows: a busy
/// disk without WRITE ZEROES, written by the kernel.
const SLOWEST_ZEROING_BYTES_PER_SEC: u64 = 32 << 20;

#[derive(Debug, Clone)]
pub struct Eraser {
    runner: Runner,
}

impl Eraser {
    pub fn new(runner: Runner) -> Self {
        Self { runner }
    }

    /// Readies a new LV: every signature libblkid knows of erased, then
    /// its first and last [`EDGE_BYTES`] zeroed.
    pub async fn wipe_new(&self, device: &str, size_bytes: u64) -> Result<(), CommandError> {
        for cmd in wipe_commands(device, size_bytes) {
            self.runner.run(&cmd).await?;
        }
        Ok(())
    }

    /// Zeroes the whole LV, with a timeout that grows with its size.
    pub async fn zero_whole(&self, device: &str, size_bytes: u64) -> Result<(), CommandError> {
        let runner = self
            .runner
            .clone()
            .with_timeout(zeroing_timeout(self.runner.timeout(), size_bytes));
        runner.run(&zero_cmd(device, 0, size_bytes)).await?;
        Ok(())
    }
}

fn zero_cmd(device: &str, offset: u64, length: u64) -> Cmd {
    Cmd::new(
        "blkdiscard",
        [
            "--zeroout".to_owned(),
            "--offset".to_owned(),
            offset.to_string(),
            "--length".to_owned(),
            length.to_string(),
            device.to_owned(),
        ],
    )
}

fn wipe_commands(device: &str, size_bytes: u64) -> Vec<Cmd> {
    let mut cmds = vec![Cmd::new("wipefs", ["--all", device])];
    if size_bytes <= 2 * EDGE_BYTES {
        cmds.push(zero_cmd(device, 0, size_bytes));
    } else {
        cmds.push(zero_cmd(device, 0, EDGE_BYTES));
        cmds.push(zero_cmd(device, size_bytes - EDGE_BYTES, EDGE_BYTES));
    }
    cmds
}

fn zeroing_timeout(floor: Duration, size_bytes: u64) -> Duration {
    floor + Duration::from_secs(size_bytes.div_ceil(SLOWEST_ZEROING_BYTES_PER_SEC))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_lv_loses_its_signatures_and_both_ends() {
        let lines: Vec<String> = wipe_commands("/dev/vg/v", 8 << 20)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            lines,
            [
                "wipefs --all /dev/vg/v",
                "blkdiscard --zeroout --offset 0 --length 1048576 /dev/vg/v",
                "blkdiscard --zeroout --offset 7340032 --length 1048576 /dev/vg/v",
            ]
        );
        // Ends that would overlap are one zeroing of the whole.
        let small = wipe_commands("/dev/vg/v", 2 << 20);
        assert_eq!(small.len(), 2);
        assert_eq!(
            small[1].to_string(),
            "blkdiscard --zeroout --offset 0 --length 2097152 /dev/vg/v"
        );
    }

    #[test]
    fn zeroing_a_large_lv_may_take_longer() {
        let floor = Duration::from_secs(120);
        assert_eq!(zeroing_timeout(floor, 0), floor);
        assert_eq!(
            zeroing_timeout(floor, 1 << 40),
            floor + Duration::from_secs(32768)
        );
    }
}
