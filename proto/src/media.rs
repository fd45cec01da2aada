use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Kind of disk a volume group is built from. Classes are never mixed in one
/// volume group, so this is also the unit of capacity accounting.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum MediaClass {
    Nvme,
    Ssd,
    Hdd,
}

impl MediaClass {
    pub const ALL: [MediaClass; 3] = [MediaClass::Nvme, MediaClass::Ssd, MediaClass::Hdd];

    /// The spelling used in StorageClass parameters, CRDs and VG names.
    pub const fn as_str(self) -> &'static str {
        match self {
            MediaClass::Nvme => "nvme",
            MediaClass::Ssd => "ssd",
            MediaClass::Hdd => "hdd",
        }
    }
}

impl fmt::Display for MediaClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown media class {0:?}; expected one of nvme, ssd, hdd")]
pub struct ParseMediaClassError(String);

impl FromStr for MediaClass {
    type Err = ParseMediaClassError;

    // Exact, lowercase match only: these strings come from StorageClass
    // parameters and CRD fields, where a near miss should be rejected loudly.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        MediaClass::ALL
            .into_iter()
            .find(|class| class.as_str() == s)
            .ok_or_else(|| ParseMediaClassError(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_from_str_round_trip() {
        for class in MediaClass::ALL {
            assert_eq!(class.to_string().parse::<MediaClass>(), Ok(class));
        }
        assert_eq!(MediaClass::Nvme.to_string(), "nvme");
        assert_eq!(MediaClass::Ssd.to_string(), "ssd");
        assert_eq!(MediaClass::Hdd.to_string(), "hdd");
    }

    #[test]
    fn from_str_rejects_unknown_and_miscased() {
        for bad in ["", "NVMe", "SSD", " hdd", "tape"] {
            let err = bad.parse::<MediaClass>().unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn serde_uses_the_same_spelling_as_display() {
        for class in MediaClass::ALL {
            let json = serde_json::to_string(&class).unwrap();
            assert_eq!(json, format!("\"{class}\""));
            assert_eq!(serde_json::from_str::<MediaClass>(&json).unwrap(), class);
        }
        assert!(serde_json::from_str::<MediaClass>("\"Ssd\"").is_err());
    }

    #[test]
    fn all_lists_each_class_once() {
        let mut all = MediaClass::ALL.to_vec();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 3);
    }
}
