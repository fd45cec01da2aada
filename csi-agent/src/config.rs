//! The agent's configuration: a TOML file, with command-line flags on top.

use std::path::Path;
use std::time::Duration;

use lvmlocal_proto::MediaClass;
use serde::Deserialize;

use crate::slot::Slot;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("parsing {path}: {source}")]
    Parse {
        path: String,
        source: Box<toml::de::Error>,
    },
    #[error("slot pattern {pattern:?}: {source}")]
    Pattern {
        pattern: String,
        source: glob::PatternError,
    },
    #[error("{0}")]
    Invalid(String),
}

/// The file as an operator writes it; every field may be left out.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub vg_prefix: Option<String>,
    pub classes: Option<Vec<MediaClass>>,
    pub min_disk_bytes: Option<u64>,
    pub allow: Option<Vec<String>>,
    pub deny: Option<Vec<String>>,
    pub rescan_interval_secs: Option<u64>,
    pub claim_disks: Option<bool>,
    pub claim_control_plane: Option<bool>,
    #[serde(default)]
    pub media_override: Vec<MediaOverrideEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MediaOverrideEntry {
    pub slot: String,
    pub media: MediaClass,
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.display().to_string(),
            source: Box::new(source),
        })
    }
}

/// What discovery and the volume group plan need to know.
#[derive(Debug, Clone)]
pub struct DiscoveryConfig {
    /// Volume groups are named `<prefix>-<class>`.
    pub vg_prefix: String,
    pub classes: Vec<MediaClass>,
    pub min_disk_bytes: u64,
    /// A disk joins only if its slot matches one of these (empty: all).
    pub allow: Vec<glob::Pattern>,
    /// ... and none of these.
    pub deny: Vec<glob::Pattern>,
    /// First match wins; e.g. SAS SSDs behind a RAID card that claim to rotate.
    pub media_overrides: Vec<(glob::Pattern, MediaClass)>,
    pub rescan_interval: Duration,
    /// Claim blank disks on nodes without the claim label (see `claim`).
    pub claim_disks: bool,
    /// Claim them on control-plane nodes too, where opted in.
    pub claim_control_plane: bool,
}

pub const DEFAULT_VG_PREFIX: &str = "lvmlocal";
pub const DEFAULT_MIN_DISK_BYTES: u64 = 1 << 30;
pub const DEFAULT_RESCAN_SECS: u64 = 60;

impl Default for DiscoveryConfig {
    fn default() -> Self {
        Self {
            vg_prefix: DEFAULT_VG_PREFIX.into(),
            classes: MediaClass::ALL.to_vec(),
            min_disk_bytes: DEFAULT_MIN_DISK_BYTES,
            allow: Vec::new(),
            deny: Vec::new(),
            media_overrides: Vec::new(),
            rescan_interval: Duration::from_secs(DEFAULT_RESCAN_SECS),
            claim_disks: false,
            claim_control_plane: false,
        }
    }
}

fn patterns(globs: &[String]) -> Result<Vec<glob::Pattern>, ConfigError> {
    globs
        .iter()
        .map(|pattern| {
            glob::Pattern::new(pattern).map_err(|source| ConfigError::Pattern {
                pattern: pattern.clone(),
                source,
            })
        })
        .collect()
}

impl DiscoveryConfig {
    pub fn from_file(file: ConfigFile) -> Result<Self, ConfigError> {
        let defaults = Self::default();
        let vg_prefix = file.vg_prefix.unwrap_or(defaults.vg_prefix);
        // LVM allows [A-Za-z0-9+_.-] in names; keep to a DNS-friendly subset.
        if vg_prefix.is_empty()
            || !vg_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(ConfigError::Invalid(format!(
                "vg_prefix {vg_prefix:?} must be letters, digits, '-' or '_'"
            )));
        }
        let classes = file.classes.unwrap_or(defaults.classes);
        let rescan = file.rescan_interval_secs.unwrap_or(DEFAULT_RESCAN_SECS);
        if rescan == 0 {
            return Err(ConfigError::Invalid(
                "rescan_interval_secs must be at least 1".into(),
            ));
        }
        let media_overrides = file
            .media_override
            .iter()
            .map(|entry| {
                Ok((
                    patterns(std::slice::from_ref(&entry.slot))?.remove(0),
                    entry.media,
                ))
            })
            .collect::<Result<_, ConfigError>>()?;
        Ok(Self {
            vg_prefix,
            classes,
            min_disk_bytes: file.min_disk_bytes.unwrap_or(defaults.min_disk_bytes),
            allow: patterns(&file.allow.unwrap_or_default())?,
            deny: patterns(&file.deny.unwrap_or_default())?,
            media_overrides,
            rescan_interval: Duration::from_secs(rescan),
            claim_disks: file.claim_disks.unwrap_or(defaults.claim_disks),
            claim_control_plane: file
                .claim_control_plane
                .unwrap_or(defaults.claim_control_plane),
        })
    }

    pub fn vg_name(&self, media: MediaClass) -> String {
        format!("{}-{media}", self.vg_prefix)
    }

    pub fn manages(&self, media: MediaClass) -> bool {
        self.classes.contains(&media)
    }

    pub fn slot_allowed(&self, slot: &Slot) -> bool {
        let slot = slot.as_str();
        (self.allow.is_empty() || self.allow.iter().any(|p| p.matches(slot)))
            && !self.deny.iter().any(|p| p.matches(slot))
    }

    pub fn media_override(&self, slot: &Slot) -> Option<MediaClass> {
        self.media_overrides
            .iter()
            .find(|(pattern, _)| pattern.matches(slot.as_str()))
            .map(|(_, media)| *media)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<DiscoveryConfig, ConfigError> {
        DiscoveryConfig::from_file(toml::from_str(text).expect("valid TOML"))
    }

    #[test]
    fn empty_file_gives_defaults() {
        let config = parse("").unwrap();
        assert_eq!(config.vg_prefix, "lvmlocal");
        assert_eq!(config.classes, MediaClass::ALL.to_vec());
        assert_eq!(config.vg_name(MediaClass::Nvme), "lvmlocal-nvme");
        assert!(config.slot_allowed(&Slot::from("pci-0000:00:05.0-nvme-1")));
        assert!(!config.claim_disks && !config.claim_control_plane);
    }

    #[test]
    fn claiming_switches() {
        let config = parse("claim_disks = true\nclaim_control_plane = true").unwrap();
        assert!(config.claim_disks && config.claim_control_plane);
        assert!(toml::from_str::<ConfigFile>(r#"claim_disks = "yes""#).is_err());
    }

    #[test]
    fn allow_and_deny_by_slot_glob() {
        let config = parse(
            r#"
            allow = ["pci-0000:00:0[56].0-*", "pci-0000:00:10.0-ata-*"]
            deny = ["pci-0000:00:06.0-*", "*-ata-1"]
            "#,
        )
        .unwrap();
        assert!(config.slot_allowed(&Slot::from("pci-0000:00:05.0-nvme-1")));
        assert!(!config.slot_allowed(&Slot::from("pci-0000:00:06.0-nvme-1")));
        assert!(!config.slot_allowed(&Slot::from("pci-0000:00:07.0-nvme-1")));
        assert!(config.slot_allowed(&Slot::from("pci-0000:00:10.0-ata-2")));
        assert!(!config.slot_allowed(&Slot::from("pci-0000:00:10.0-ata-1")));
    }

    #[test]
    fn media_override_first_match_wins() {
        let config = parse(
            r#"
            [[media_override]]
            slot = "pci-0000:03:00.0-sas-*"
            media = "ssd"
            [[media_override]]
            slot = "pci-0000:03:*"
            media = "hdd"
            "#,
        )
        .unwrap();
        let sas = Slot::from("pci-0000:03:00.0-sas-0x5000c500a1b2c3d4-lun-0");
        assert_eq!(config.media_override(&sas), Some(MediaClass::Ssd));
        assert_eq!(
            config.media_override(&Slot::from("pci-0000:03:00.1-ata-1")),
            Some(MediaClass::Hdd)
        );
        assert_eq!(
            config.media_override(&Slot::from("pci-0000:00:05.0-nvme-1")),
            None
        );
    }

    #[test]
    fn bad_files_are_refused() {
        assert!(parse(r#"vg_prefix = "my vg""#).is_err());
        assert!(parse("rescan_interval_secs = 0").is_err());
        assert!(parse(r#"deny = ["[unclosed"]"#).is_err());
        assert!(toml::from_str::<ConfigFile>("classes = [\"floppy\"]").is_err());
        assert!(toml::from_str::<ConfigFile>("unknown_key = 1").is_err());
    }
}
