//! The canonical encoding a receipt is hashed and signed in: the JSON Canonicalization Scheme,
//! RFC 8785 (JCS), so that anyone can recompute a hash with an off-the-shelf JCS library
//! (Python `jcs`, JavaScript `canonicalize`, Go `webpki.org/jsoncanonicalizer`):
//!
//! - no whitespace between tokens;
//! - object members sorted by their keys' UTF-16 code units;
//! - strings escaped as ECMAScript's `JSON.stringify` does: `\"`, `\\`, `\b \f \n \r \t`, other
//!   control characters as `\u00xx` (lower-case hex), everything else as UTF-8;
//! - numbers as ECMAScript's `Number.prototype.toString` writes an IEEE-754 double: the shortest
//!   digits that read back to the same double, `1` not `1.0`, `1e+21`, `1e-7`, `-0` as `0`.
//!
//! Integers beyond 2^53 cannot travel as JSON numbers without loss; they are refused, not rounded,
//! unless their digits are already how ECMAScript writes the double nearest them: that is how a
//! double of 2^53 or more (`1e19`) encodes, and it must read back to the same text.

use serde_json::{Number, Value};

/// The largest integer every JSON reader (a double) holds exactly.
const MAX_EXACT_INTEGER: u64 = 1 << 53;

#[derive(Debug, PartialEq, Eq)]
pub struct NotCanonicalizable(pub String);

impl std::fmt::Display for NotCanonicalizable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotCanonicalizable {}

/// `value` in RFC 8785 form.
pub fn encode(value: &Value) -> Result<String, NotCanonicalizable> {
    let mut out = String::new();
    write_value(&mut out, value, "")?;
    Ok(out)
}

fn write_value(out: &mut String, value: &Value, path: &str) -> Result<(), NotCanonicalizable> {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&number(n, path)?),
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(out, item, &format!("{path}/{i}"))?;
            }
            out.push(']');
        }
        Value::Object(members) => {
            let mut keys: Vec<&String> = members.keys().collect();
            keys.sort_by(|a, b| a.encode_utf16().cmp(b.encode_utf16()));
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(out, key);
                out.push(':');
                write_value(out, &members[key], &format!("{path}/{key}"))?;
            }
            out.push('}');
        }
    }
    Ok(())
}

fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn number(n: &Number, path: &str) -> Result<String, NotCanonicalizable> {
    let too_big = || {
        NotCanonicalizable(format!(
            "{path}: the integer {n} is beyond 2^53, which JSON numbers cannot hold exactly"
        ))
    };
    // Beyond 2^53, the integer's digits must be those of the double nearest it, as written.
    let double = |digits: String, nearest: f64| {
        if ecmascript_number(nearest) == digits {
            Ok(digits)
        } else {
            Err(too_big())
        }
    };
    if let Some(u) = n.as_u64() {
        return if u <= MAX_EXACT_INTEGER {
            Ok(u.to_string())
        } else {
            double(u.to_string(), u as f64)
        };
    }
    if let Some(i) = n.as_i64() {
        return if i.unsigned_abs() <= MAX_EXACT_INTEGER {
            Ok(i.to_string())
        } else {
            double(i.to_string(), i as f64)
        };
    }
    // serde_json holds no NaN or infinity: every other number is a finite double.
    Ok(ecmascript_number(n.as_f64().unwrap_or(0.0)))
}

/// ECMAScript's Number::toString(x) (ECMA-262, 7.1.12.1) for a finite double.
pub fn ecmascript_number(x: f64) -> String {
    if x == 0.0 {
        return "0".into();
    }
    if x < 0.0 {
        return format!("-{}", ecmascript_number(-x));
    }
    // Rust writes the shortest round-trip digits too; only the layout differs.
    let scientific = format!("{x:e}");
    let (mantissa, exponent) = scientific
        .split_once('e')
        .expect("{:e} always writes an exponent");
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let k = digits.len() as i32;
    // x = 0.digits × 10^n
    let n = exponent
        .parse::<i32>()
        .expect("{:e} writes a decimal exponent")
        + 1;
    if k <= n && n <= 21 {
        format!("{digits}{}", "0".repeat((n - k) as usize))
    } else if 0 < n && n <= 21 {
        format!("{}.{}", &digits[..n as usize], &digits[n as usize..])
    } else if -6 < n && n <= 0 {
        format!("0.{}{digits}", "0".repeat((-n) as usize))
    } else {
        let e = n - 1;
        let sign = if e < 0 { '-' } else { '+' };
        let (first, rest) = digits.split_at(1);
        if rest.is_empty() {
            format!("{first}e{sign}{}", e.abs())
        } else {
            format!("{first}.{rest}e{sign}{}", e.abs())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn numbers_as_rfc_8785_appendix_b() {
        // The test vectors of RFC 8785, Appendix B (as doubles).
        let cases: [(f64, &str); 14] = [
            (0.0, "0"),
            (-0.0, "0"),
            (5e-324, "5e-324"),
            (-5e-324, "-5e-324"),
            (1.7976931348623157e308, "1.7976931348623157e+308"),
            (9007199254740992.0, "9007199254740992"),
            (-9007199254740992.0, "-9007199254740992"),
            (295147905179352830000.0, "295147905179352830000"),
            (1e21, "1e+21"),
            (0.000001, "0.000001"),
            (1e-7, "1e-7"),
            (333333333.3333333, "333333333.3333333"),
            (4.5, "4.5"),
            (0.1 + 0.2, "0.30000000000000004"),
        ];
        for (x, want) in cases {
            assert_eq!(ecmascript_number(x), want, "{x:e}");
        }
        assert_eq!(encode(&json!(1.0)).unwrap(), "1");
        assert_eq!(encode(&json!(123456.5e10)).unwrap(), "1234565000000000");
    }

    #[test]
    fn keys_sorted_by_utf16_and_strings_escaped() {
        // RFC 8785 3.2.3's sorting example: by UTF-16 code units, so U+1F600 (a surrogate pair,
        // 0xD83D...) sorts before U+FB33 although its code point is larger.
        let value = json!({
            "\u{20ac}": "Euro Sign",
            "\r": "Carriage Return",
            "\u{fb33}": "Hebrew Letter Dalet With Dagesh",
            "1": "One",
            "\u{1f600}": "Emoji: Grinning Face",
            "\u{80}": "Control",
            "\u{f6}": "Latin Small Letter O With Diaeresis"
        });
        let text = encode(&value).unwrap();
        let order: Vec<usize> = [
            "\"\\r\"",
            "\"1\"",
            "\"\u{80}\"",
            "\"\u{f6}\"",
            "\"\u{20ac}\"",
            "\"\u{1f600}\"",
            "\"\u{fb33}\"",
        ]
        .iter()
        .map(|k| {
            text.find(k)
                .unwrap_or_else(|| panic!("{k} missing in {text}"))
        })
        .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{text}");
        assert_eq!(
            encode(&json!({"b": [1, "x\u{1}\"\\\n"], "a": null, "c": true})).unwrap(),
            r#"{"a":null,"b":[1,"x\u0001\"\\\n"],"c":true}"#
        );
    }

    #[test]
    fn integers_beyond_2_53_refused_with_their_path() {
        let err = encode(&json!({"a": {"b": u64::MAX}})).unwrap_err();
        assert!(
            err.0.starts_with("/a/b: the integer 18446744073709551615"),
            "{err}"
        );
        assert_eq!(encode(&json!(-(1i64 << 53))).unwrap(), "-9007199254740992");
        // 2^53 + 1 and 2^60 are no double's digits: a JCS reader would round them.
        assert!(encode(&json!((1u64 << 53) + 1)).is_err());
        assert!(encode(&json!(1u64 << 60)).is_err());
    }

    #[test]
    fn a_double_beyond_2_53_reads_back_to_its_encoding() {
        // Found by fuzzing (fuzz/ `canonical`): this double encodes as 8999999999100000000,
        // which reads back as an integer beyond 2^53. `nbt receipts verify` re-encodes what it
        // reads: the encoding must be the same, or a receipt holding such a number (a workload's
        // reported loss) would be called altered.
        for input in [
            "8999999999099999999.99",
            "1e19",
            "-1e19",
            "1152921504606847000",
            "-9007199254740994",
        ] {
            let value: Value = serde_json::from_str(input).unwrap();
            let text = encode(&value).unwrap_or_else(|e| panic!("{input}: {e}"));
            let again: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(encode(&again).as_ref(), Ok(&text), "{input}");
        }
        assert_eq!(encode(&json!(1e19)).unwrap(), "10000000000000000000");
    }
}
