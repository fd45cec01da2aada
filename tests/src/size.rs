use anyhow::{Context, bail};

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

/// Parses `512M`, `4G`, `1T` or a plain byte count (binary units).
pub fn parse_size(text: &str) -> anyhow::Result<u64> {
    let text = text.trim();
    let (digits, shift) = match text.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => bail!("unknown size unit {c:?} in {text:?} (use K, M, G or T)"),
            };
            (&text[..i], shift)
        }
        _ => (text, 0),
    };
    let n: u64 = digits
        .parse()
        .with_context(|| format!("{text:?} is not a size"))?;
    if n == 0 {
        bail!("size {text:?} is zero");
    }
    n.checked_mul(1 << shift)
        .with_context(|| format!("size {text:?} overflows"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_are_binary() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("512M").unwrap(), 512 * MIB);
        assert_eq!(parse_size("4g").unwrap(), 4 * GIB);
        assert_eq!(parse_size("1T").unwrap(), 1024 * GIB);
    }

    #[test]
    fn rejects_nonsense() {
        for bad in ["", "G", "0", "0G", "4X", "-1G", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
