//! LVM allocates in whole extents: every component that sizes a volume or
//! charges one against a volume group rounds the same way.

/// LVM's default extent, used while a node has not reported its own.
pub const DEFAULT_EXTENT_BYTES: u64 = 4 << 20;

/// `bytes` rounded up to whole `extent`s, as LVM allocates them; `bytes`
/// itself for an unknown (zero) extent, `None` past `u64::MAX`.
pub fn checked_round_up(bytes: u64, extent: u64) -> Option<u64> {
    if extent == 0 {
        return Some(bytes);
    }
    bytes.div_ceil(extent).checked_mul(extent)
}

/// [`checked_round_up`], saturating: a size no volume group can hold.
pub fn round_up(bytes: u64, extent: u64) -> u64 {
    checked_round_up(bytes, extent).unwrap_or(u64::MAX)
}

/// `1.5Gi`, as Kubernetes writes quantities.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["Ki", "Mi", "Gi", "Ti", "Pi"];
    if bytes < 1024 {
        return bytes.to_string();
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1}{}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_up_to_whole_extents() {
        let extent = 4 << 20;
        assert_eq!(round_up(1, extent), extent);
        assert_eq!(round_up(extent, extent), extent);
        assert_eq!(round_up(extent + 1, extent), 2 * extent);
        assert_eq!(round_up(1 << 30, extent), 1 << 30);
    }
}
