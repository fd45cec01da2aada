//! Kubernetes resource quantities (`10Gi`, `1.5T`, `500M`, `1e9`) as bytes,
//! and bytes back as the short binary form operators read in messages.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    #[error("{0:?} is not a Kubernetes quantity")]
    Malformed(String),
    #[error("{0:?} is negative")]
    Negative(String),
    #[error("{0:?} does not fit in 64 bits of bytes")]
    TooLarge(String),
}

/// Bytes in `quantity`, rounded up to a whole byte as the API server does for
/// storage requests.
pub fn parse_bytes(quantity: &str) -> Result<u64, QuantityError> {
    let malformed = || QuantityError::Malformed(quantity.to_owned());
    let too_large = || QuantityError::TooLarge(quantity.to_owned());
    let unsigned = match quantity.as_bytes().first() {
        Some(b'-') => return Err(QuantityError::Negative(quantity.to_owned())),
        Some(b'+') => &quantity[1..],
        _ => quantity,
    };
    let number_len = unsigned
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(unsigned.len());
    let (number, suffix) = unsigned.split_at(number_len);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() || fraction.contains('.') {
        return Err(malformed());
    }

    // value = digits / 10^fraction_len * scale, kept as an exact fraction
    // numerator / denominator so that `1.5Gi` or `100m` round correctly.
    let mut numerator: u128 = 0;
    for digit in whole.bytes().chain(fraction.bytes()) {
        numerator = numerator
            .checked_mul(10)
            .and_then(|n| n.checked_add(u128::from(digit - b'0')))
            .ok_or_else(too_large)?;
    }
    let mut denominator = pow10(fraction.len()).ok_or_else(too_large)?;

    match Scale::parse(suffix).ok_or_else(malformed)? {
        Scale::Binary(shift) => {
            numerator = numerator.checked_mul(1 << shift).ok_or_else(too_large)?;
        }
        Scale::Decimal(exponent) if exponent >= 0 => {
            let factor = pow10(exponent.unsigned_abs() as usize).ok_or_else(too_large)?;
            numerator = numerator.checked_mul(factor).ok_or_else(too_large)?;
        }
        Scale::Decimal(exponent) => {
            let factor = pow10(exponent.unsigned_abs() as usize).ok_or_else(too_large)?;
            denominator = denominator.checked_mul(factor).ok_or_else(too_large)?;
        }
    }
    u64::try_from(numerator.div_ceil(denominator)).map_err(|_| too_large())
}

enum Scale {
    /// Multiply by 2^n.
    Binary(u32),
    /// Multiply by 10^n.
    Decimal(i32),
}

impl Scale {
    fn parse(suffix: &str) -> Option<Scale> {
        Some(match suffix {
            "Ki" => Scale::Binary(10),
            "Mi" => Scale::Binary(20),
            "Gi" => Scale::Binary(30),
            "Ti" => Scale::Binary(40),
            "Pi" => Scale::Binary(50),
            "Ei" => Scale::Binary(60),
            "n" => Scale::Decimal(-9),
            "u" => Scale::Decimal(-6),
            "m" => Scale::Decimal(-3),
            "" => Scale::Decimal(0),
            "k" => Scale::Decimal(3),
            "M" => Scale::Decimal(6),
            "G" => Scale::Decimal(9),
            "T" => Scale::Decimal(12),
            "P" => Scale::Decimal(15),
            "E" => Scale::Decimal(18),
            _ => {
                let exponent = suffix.strip_prefix(['e', 'E'])?;
                let digits = exponent.strip_prefix(['+', '-']).unwrap_or(exponent);
                if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                Scale::Decimal(exponent.parse().ok()?)
            }
        })
    }
}

fn pow10(exponent: usize) -> Option<u128> {
    10u128.checked_pow(u32::try_from(exponent).ok()?)
}

/// Bytes in binary units with at most one decimal, e.g. `200Gi`, `119.5Gi`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
        let bytes = u128::from(self.0);
        let mut unit = 0;
        while unit + 1 < UNITS.len() && bytes >= 1u128 << (10 * (unit + 1)) {
            unit += 1;
        }
        let size = 1u128 << (10 * unit);
        let tenths = (bytes * 10 + size / 2) / size;
        if tenths.is_multiple_of(10) {
            write!(f, "{}{}", tenths / 10, UNITS[unit])
        } else {
            write!(f, "{}.{}{}", tenths / 10, tenths % 10, UNITS[unit])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GI: u64 = 1 << 30;

    #[test]
    fn parses_the_forms_found_in_storage_requests() {
        let cases: &[(&str, u64)] = &[
            ("0", 0),
            ("1", 1),
            ("+1", 1),
            ("10Gi", 10 * GI),
            ("1.5Gi", 3 * GI / 2),
            (".5Ki", 512),
            ("1Ti", 1 << 40),
            ("2Ei", 2 << 60),
            ("500M", 500_000_000),
            ("1G", 1_000_000_000),
            ("1.5k", 1500),
            ("1e3", 1000),
            ("1E9", 1_000_000_000),
            ("12e-1", 2),
            ("100m", 1),
            ("1500m", 2),
            ("1n", 1),
            ("0.000001u", 1),
        ];
        for (text, bytes) in cases {
            assert_eq!(parse_bytes(text), Ok(*bytes), "{text}");
        }
    }

    #[test]
    fn rejects_what_is_not_a_byte_count() {
        assert_eq!(
            parse_bytes("-1Gi"),
            Err(QuantityError::Negative("-1Gi".into()))
        );
        for bad in [
            "", "Gi", ".", "1.2.3", "1GB", "1 Gi", "1e", "1e+", "ten", "1gi",
        ] {
            assert_eq!(
                parse_bytes(bad),
                Err(QuantityError::Malformed(bad.into())),
                "{bad}"
            );
        }
        for big in ["16Ei", "1e20", "99999999999999999999999999999999999999999"] {
            assert_eq!(
                parse_bytes(big),
                Err(QuantityError::TooLarge(big.into())),
                "{big}"
            );
        }
    }

    #[test]
    fn displays_in_binary_units() {
        let cases: &[(u64, &str)] = &[
            (0, "0"),
            (1000, "1000"),
            (1024, "1Ki"),
            (200 * GI, "200Gi"),
            (120 * GI, "120Gi"),
            (GI * 239 / 2, "119.5Gi"),
            (1536 * GI, "1.5Ti"),
            (u64::MAX, "16Ei"),
        ];
        for (bytes, text) in cases {
            assert_eq!(Bytes(*bytes).to_string(), *text, "{bytes}");
        }
    }
}
