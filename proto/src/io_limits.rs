//! A volume's IO limits: the StorageClass and VolumeAttributesClass
//! parameters that ask for them, and the cgroup v2 `io.max` entry that
//! enforces them. One spelling for the controller, which checks and records
//! them, and the agent, which writes them into the cgroups of the pods.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Read operations per second.
pub const READ_IOPS: &str = "lvmlocal.io/read-iops";
/// Write operations per second.
pub const WRITE_IOPS: &str = "lvmlocal.io/write-iops";
/// Bytes read per second; a suffix k, M, G (powers of 1000) or Ki, Mi, Gi
/// (powers of 1024) may follow the number.
pub const READ_BPS: &str = "lvmlocal.io/read-bps";
/// Bytes written per second, spelt as [`READ_BPS`].
pub const WRITE_BPS: &str = "lvmlocal.io/write-bps";

/// Every IO limit parameter.
pub const KEYS: [&str; 4] = [READ_IOPS, WRITE_IOPS, READ_BPS, WRITE_BPS];

/// The limits of one volume; an absent field is no limit.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IoLimits {
    /// Read operations per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub read_iops: Option<u64>,
    /// Write operations per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub write_iops: Option<u64>,
    /// Bytes read per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub read_bps: Option<u64>,
    /// Bytes written per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub write_bps: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidIoLimit {
    #[error(
        "parameter {key} must be a whole number of operations per second from 1 to {}, not {value:?}",
        u32::MAX
    )]
    Iops { key: &'static str, value: String },
    #[error(
        "parameter {key} must be a whole number of bytes per second above 0, optionally followed by k, M, G, Ki, Mi or Gi, not {value:?}"
    )]
    Bps { key: &'static str, value: String },
}

impl IoLimits {
    pub const NONE: IoLimits = IoLimits {
        read_iops: None,
        write_iops: None,
        read_bps: None,
        write_bps: None,
    };

    pub fn is_none(&self) -> bool {
        *self == Self::NONE
    }

    /// Sets the limit parameter `key` names from its `value`; false when
    /// `key` is not an IO limit parameter.
    pub fn set(&mut self, key: &str, value: &str) -> Result<bool, InvalidIoLimit> {
        match key {
            READ_IOPS => self.read_iops = Some(iops(READ_IOPS, value)?),
            WRITE_IOPS => self.write_iops = Some(iops(WRITE_IOPS, value)?),
            READ_BPS => self.read_bps = Some(bps(READ_BPS, value)?),
            WRITE_BPS => self.write_bps = Some(bps(WRITE_BPS, value)?),
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// `self` with every limit `other` sets taken from `other`.
    pub fn overlaid(self, other: IoLimits) -> IoLimits {
        IoLimits {
            read_iops: other.read_iops.or(self.read_iops),
            write_iops: other.write_iops.or(self.write_iops),
            read_bps: other.read_bps.or(self.read_bps),
            write_bps: other.write_bps.or(self.write_bps),
        }
    }

    /// The `io.max` line that sets exactly these limits on device
    /// `major:minor`; `max` lifts a limit, and a line of four `max` makes the
    /// kernel drop the device's entry.
    pub fn io_max_line(&self, major: u64, minor: u64) -> String {
        fn value(limit: Option<u64>) -> String {
            limit.map_or_else(|| "max".to_owned(), |n| n.to_string())
        }
        format!(
            "{major}:{minor} rbps={} wbps={} riops={} wiops={}",
            value(self.read_bps),
            value(self.write_bps),
            value(self.read_iops),
            value(self.write_iops)
        )
    }

    /// The limits an `io.max` file holds for device `major:minor`; none
    /// when it has no entry for the device.
    pub fn from_io_max(content: &str, major: u64, minor: u64) -> IoLimits {
        let device = format!("{major}:{minor}");
        let mut limits = IoLimits::NONE;
        let Some(line) = content
            .lines()
            .find(|line| line.split_whitespace().next() == Some(device.as_str()))
        else {
            return limits;
        };
        for field in line.split_whitespace().skip(1) {
            let Some((name, value)) = field.split_once('=') else {
                continue;
            };
            let value = value.parse().ok();
            match name {
                "rbps" => limits.read_bps = value,
                "wbps" => limits.write_bps = value,
                "riops" => limits.read_iops = value,
                "wiops" => limits.write_iops = value,
                _ => {}
            }
        }
        limits
    }
}

impl fmt::Display for IoLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_none() {
            return f.write_str("no IO limits");
        }
        let parts: Vec<String> = [
            self.read_iops.map(|n| format!("read {n} IOPS")),
            self.write_iops.map(|n| format!("write {n} IOPS")),
            self.read_bps.map(|n| format!("read {n} B/s")),
            self.write_bps.map(|n| format!("write {n} B/s")),
        ]
        .into_iter()
        .flatten()
        .collect();
        f.write_str(&parts.join(", "))
    }
}

fn iops(key: &'static str, value: &str) -> Result<u64, InvalidIoLimit> {
    // The kernel keeps IOPS limits in 32 bits.
    digits(value)
        .and_then(|s| s.parse::<u32>().ok())
        .filter(|n| *n > 0)
        .map(u64::from)
        .ok_or_else(|| InvalidIoLimit::Iops {
            key,
            value: value.to_owned(),
        })
}

fn bps(key: &'static str, value: &str) -> Result<u64, InvalidIoLimit> {
    let invalid = || InvalidIoLimit::Bps {
        key,
        value: value.to_owned(),
    };
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (number, suffix) = value.split_at(split);
    let unit: u64 = match suffix {
        "" => 1,
        "k" => 1000,
        "M" => 1000 * 1000,
        "G" => 1000 * 1000 * 1000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        _ => return Err(invalid()),
    };
    digits(number)
        .and_then(|s| s.parse::<u64>().ok())
        .and_then(|n| n.checked_mul(unit))
        .filter(|n| *n > 0)
        .ok_or_else(invalid)
}

/// `s` if it is a plain decimal number: no sign, no spaces, no leading zero.
fn digits(s: &str) -> Option<&str> {
    (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && !s.starts_with('0')).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse_with_their_units() {
        let mut limits = IoLimits::default();
        assert!(!limits.set("lvmlocal.io/iops", "1").unwrap());
        assert!(limits.set(READ_IOPS, "500").unwrap());
        limits.set(WRITE_IOPS, "4294967295").unwrap();
        limits.set(READ_BPS, "10Mi").unwrap();
        limits.set(WRITE_BPS, "2k").unwrap();
        assert_eq!(
            limits,
            IoLimits {
                read_iops: Some(500),
                write_iops: Some(u64::from(u32::MAX)),
                read_bps: Some(10 << 20),
                write_bps: Some(2000),
            }
        );
        for (suffix, unit) in [
            ("", 1),
            ("M", 1_000_000),
            ("G", 1_000_000_000),
            ("Gi", 1 << 30),
        ] {
            limits.set(WRITE_BPS, &format!("3{suffix}")).unwrap();
            assert_eq!(limits.write_bps, Some(3 * unit));
        }
    }

    #[test]
    fn bad_values_are_refused_naming_the_parameter() {
        for bad in [
            "",
            "0",
            "-1",
            "+5",
            " 5",
            "5 ",
            "05",
            "1.5",
            "4294967296",
            "1k",
            "ten",
        ] {
            let err = IoLimits::default().set(READ_IOPS, bad).unwrap_err();
            assert!(err.to_string().contains(READ_IOPS), "{bad:?}: {err}");
        }
        for bad in [
            "",
            "0",
            "0Mi",
            "-1Mi",
            "1m",
            "1mi",
            "1KiB",
            "1 Mi",
            "Mi",
            "1.5Mi",
            "99999999999Gi",
            "18446744073709551616",
        ] {
            let err = IoLimits::default().set(WRITE_BPS, bad).unwrap_err();
            assert!(err.to_string().contains(WRITE_BPS), "{bad:?}: {err}");
        }
    }

    #[test]
    fn an_overlay_replaces_only_what_it_sets() {
        let base = IoLimits {
            read_iops: Some(1),
            write_iops: Some(2),
            ..IoLimits::NONE
        };
        let over = IoLimits {
            write_iops: Some(20),
            write_bps: Some(30),
            ..IoLimits::NONE
        };
        assert_eq!(
            base.overlaid(over),
            IoLimits {
                read_iops: Some(1),
                write_iops: Some(20),
                read_bps: None,
                write_bps: Some(30),
            }
        );
    }

    #[test]
    fn io_max_lines_round_trip_and_other_devices_are_ignored() {
        let limits = IoLimits {
            read_iops: Some(100),
            write_bps: Some(1 << 20),
            ..IoLimits::NONE
        };
        let line = limits.io_max_line(253, 3);
        assert_eq!(line, "253:3 rbps=max wbps=1048576 riops=100 wiops=max");
        let file = format!("8:0 rbps=1 wbps=2 riops=3 wiops=4\n{line}\n");
        assert_eq!(IoLimits::from_io_max(&file, 253, 3), limits);
        assert_eq!(IoLimits::from_io_max(&file, 253, 4), IoLimits::NONE);
        assert_eq!(IoLimits::from_io_max("", 253, 3), IoLimits::NONE);
        assert_eq!(
            IoLimits::NONE.io_max_line(253, 3),
            "253:3 rbps=max wbps=max riops=max wiops=max"
        );
    }
}
