//! Thin provisioning: the StorageClass parameters that ask for it, the
//! overprovisioning ratio, and what a thin volume is charged against its
//! volume group. One rule for the controller, the extender and the agent.

use std::fmt;
use std::str::FromStr;

/// StorageClass parameter: `thick` (the default) or `thin`.
pub const PROVISIONING_PARAM: &str = "lvmlocal.io/provisioning";
/// StorageClass parameter: how many bytes of thin volumes one byte of the
/// thin pool backs, e.g. `2` or `1.5`.
pub const OVERPROVISION_PARAM: &str = "lvmlocal.io/overprovision-ratio";

/// The largest ratio accepted: beyond it a pool is all promise.
pub const MAX_RATIO_PERCENT: u32 = 10_000;

/// How a volume takes its space.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Provisioning {
    /// A linear LV that owns all of its extents.
    #[default]
    Thick,
    /// A thin LV in its media class's thin pool; blocks are taken on write.
    Thin,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{PROVISIONING_PARAM} must be thick or thin, not {0:?}")]
pub struct ParseProvisioningError(String);

impl FromStr for Provisioning {
    type Err = ParseProvisioningError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "thick" => Ok(Provisioning::Thick),
            "thin" => Ok(Provisioning::Thin),
            _ => Err(ParseProvisioningError(s.to_owned())),
        }
    }
}

/// An overprovisioning ratio in hundredths: 100 is none, 250 is 2.5.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ratio(u32);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{OVERPROVISION_PARAM} must be a number from 1 to 100 with at most two decimals (e.g. 2 or 1.5), not {0:?}"
)]
pub struct ParseRatioError(String);

impl Ratio {
    /// No overprovisioning: a thin volume is charged its whole size.
    pub const ONE: Ratio = Ratio(100);

    /// From hundredths, as kept in a `LogicalVolume` and an LV tag.
    pub fn from_percent(percent: u32) -> Option<Self> {
        (Self::ONE.0..=MAX_RATIO_PERCENT)
            .contains(&percent)
            .then_some(Ratio(percent))
    }

    pub fn percent(self) -> u32 {
        self.0
    }

    /// What a thin volume of `bytes` takes from its volume group: its size
    /// divided by the ratio, rounded up.
    pub fn charge(self, bytes: u64) -> u64 {
        let charged = (u128::from(bytes) * 100).div_ceil(u128::from(self.0));
        u64::try_from(charged).unwrap_or(u64::MAX)
    }

    /// How many bytes of thin volumes `bytes` of pool back.
    pub fn capacity(self, bytes: u64) -> u64 {
        let promised = u128::from(bytes) * u128::from(self.0) / 100;
        u64::try_from(promised).unwrap_or(u64::MAX)
    }
}

impl FromStr for Ratio {
    type Err = ParseRatioError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || ParseRatioError(s.to_owned());
        let (whole, fraction) = s.split_once('.').unwrap_or((s, ""));
        let digits = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
        if whole.is_empty()
            || whole.len() > 3
            || !digits(whole)
            || fraction.len() > 2
            || !digits(fraction)
            || (s.contains('.') && fraction.is_empty())
            || (whole.len() > 1 && whole.starts_with('0'))
        {
            return Err(invalid());
        }
        let whole: u32 = whole.parse().map_err(|_| invalid())?;
        let hundredths: u32 = format!("{fraction:0<2}").parse().map_err(|_| invalid())?;
        Ratio::from_percent(whole * 100 + hundredths).ok_or_else(invalid)
    }
}

impl fmt::Display for Ratio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 % 100 {
            0 => write!(f, "{}", self.0 / 100),
            rest if rest % 10 == 0 => write!(f, "{}.{}", self.0 / 100, rest / 10),
            rest => write!(f, "{}.{rest:02}", self.0 / 100),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_parse_as_written_and_nothing_else() {
        for (text, percent) in [
            ("1", 100),
            ("1.5", 150),
            ("2", 200),
            ("2.25", 225),
            ("100", 10_000),
            ("1.05", 105),
        ] {
            let ratio: Ratio = text.parse().unwrap();
            assert_eq!(ratio.percent(), percent, "{text}");
            assert_eq!(ratio.to_string(), text);
        }
        for bad in [
            "", "0", "0.5", "0.99", "100.01", "1000", "1.", ".5", "1.123", "-1", "+2", " 2", "2 ",
            "1,5", "01", "1e2", "two",
        ] {
            assert!(bad.parse::<Ratio>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_thin_volume_is_charged_its_size_over_the_ratio_rounded_up() {
        assert_eq!(Ratio::ONE.charge(1 << 30), 1 << 30);
        let two: Ratio = "2".parse().unwrap();
        assert_eq!(two.charge(1 << 30), 1 << 29);
        assert_eq!(two.charge(3), 2);
        let one_and_half: Ratio = "1.5".parse().unwrap();
        assert_eq!(one_and_half.charge(300), 200);
        assert_eq!(one_and_half.capacity(200), 300);
        assert_eq!(
            Ratio::from_percent(MAX_RATIO_PERCENT)
                .unwrap()
                .charge(u64::MAX),
            u64::MAX.div_ceil(100)
        );
        assert_eq!(Ratio::from_percent(99), None);
    }

    #[test]
    fn provisioning_is_thick_or_thin() {
        assert_eq!("thin".parse(), Ok(Provisioning::Thin));
        assert_eq!("thick".parse(), Ok(Provisioning::Thick));
        assert!("Thin".parse::<Provisioning>().is_err());
        assert_eq!(Provisioning::default(), Provisioning::Thick);
    }
}
