//! Money: US dollars as exact decimals, never floats (API.md "Money": decimal strings such
//! as `"0.004210"`).

use std::fmt;

use rust_decimal::Decimal;
use serde_json::Value;

/// An amount in US dollars, at most 6 decimal places (the precision prices and costs are
/// stored with).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Usd(Decimal);

/// The decimal places every amount is kept to.
pub const SCALE: u32 = 6;

impl Usd {
    pub const ZERO: Usd = Usd(Decimal::ZERO);

    /// Reads a JSON amount: a decimal string (`"12.50"`) or an integer. Floats are refused,
    /// because `0.1` as a float is not one tenth.
    pub fn from_json(v: &Value) -> Result<Self, String> {
        let text = match v {
            Value::String(s) => s.trim().to_string(),
            Value::Number(n) if n.is_i64() || n.is_u64() => n.to_string(),
            Value::Number(_) => {
                return Err(
                    "must be a decimal string, e.g. \"12.50\" (floats are not exact)".into(),
                );
            }
            _ => return Err("must be a decimal string, e.g. \"12.50\"".into()),
        };
        Self::parse(&text)
    }

    /// Parses a decimal string with at most [`SCALE`] decimal places.
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("'{s}' is not a decimal amount, e.g. \"12.50\"");
        let ok_chars = !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_digit() || b == b'.' || b == b'-')
            && s.bytes().filter(|b| *b == b'.').count() <= 1;
        if !ok_chars {
            return Err(bad());
        }
        let d: Decimal = s.parse().map_err(|_| bad())?;
        if d.scale() > SCALE {
            return Err(format!("'{s}' has more than {SCALE} decimal places"));
        }
        if d > Decimal::from(1_000_000_000_000i64) || d < Decimal::from(-1_000_000_000_000i64) {
            return Err(format!("'{s}' is out of range"));
        }
        Ok(Self(d))
    }

    /// The exact decimal.
    pub fn decimal(self) -> Decimal {
        self.0
    }

    pub fn is_positive(self) -> bool {
        self.0 > Decimal::ZERO
    }

    pub fn is_negative(self) -> bool {
        self.0 < Decimal::ZERO
    }

    /// The amount with exactly [`SCALE`] decimal places, as stored and answered.
    pub fn to_fixed(self) -> String {
        let mut d = self.0;
        d.rescale(SCALE);
        d.to_string()
    }
}

impl From<Decimal> for Usd {
    fn from(d: Decimal) -> Self {
        Usd(d)
    }
}

impl std::ops::Add for Usd {
    type Output = Usd;
    fn add(self, other: Usd) -> Usd {
        Usd(self.0 + other.0)
    }
}

impl std::ops::Sub for Usd {
    type Output = Usd;
    fn sub(self, other: Usd) -> Usd {
        Usd(self.0 - other.0)
    }
}

impl fmt::Display for Usd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_fixed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn amounts_are_exact_and_answered_with_six_places() {
        assert_eq!(Usd::parse("12.5").unwrap().to_fixed(), "12.500000");
        assert_eq!(
            Usd::from_json(&json!("0.004210")).unwrap().to_fixed(),
            "0.004210"
        );
        assert_eq!(
            Usd::from_json(&json!(100)).unwrap().to_fixed(),
            "100.000000"
        );
    }

    #[test]
    fn floats_and_garbage_are_refused() {
        for bad in [
            json!(0.1),
            json!("1e3"),
            json!("1.2.3"),
            json!(""),
            json!("0.0000001"),
            json!(null),
            json!("NaN"),
        ] {
            assert!(Usd::from_json(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn signs_are_reported() {
        assert!(Usd::parse("0.01").unwrap().is_positive());
        assert!(!Usd::parse("0").unwrap().is_positive());
        assert!(Usd::parse("-1").unwrap().is_negative());
    }
}
