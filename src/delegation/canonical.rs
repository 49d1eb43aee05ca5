//! RFC 8785 (JSON Canonicalization Scheme) for the events this module writes, and their content
//! ids (`chronicle_cid` = `sha256:` + the hex SHA-256 of the canonical JSON).
//!
//! The audit chain hashes its own fixed array of fields and does not canonicalise arbitrary JSON,
//! so this is done here. Our event data holds only strings, integers, booleans, nulls, arrays and
//! objects; for those, RFC 8785 comes down to: object members sorted by their names' UTF-16 code
//! units, no whitespace, strings escaped as ECMAScript's JSON.stringify does (which is what
//! serde_json writes: `\"` `\\` `\b` `\f` `\n` `\r` `\t`, other controls as lowercase `\u00xx`,
//! everything else, `/` and non-ASCII included, as is), and integers in plain decimal. Floats
//! would need ECMAScript's number formatting, which serde_json does not promise; [`canonical`]
//! refuses them rather than hash something another implementation would write differently.

use serde_json::Value;
use sha2::{Digest, Sha256};

/// The canonical JSON text of `v`, or `None` if it holds a non-integer number.
pub fn canonical(v: &Value) -> Option<String> {
    let mut out = String::new();
    write(v, &mut out)?;
    Some(out)
}

fn write(v: &Value, out: &mut String) -> Option<()> {
    match v {
        Value::Null | Value::Bool(_) | Value::String(_) => out.push_str(&v.to_string()),
        Value::Number(n) => {
            if n.is_f64() {
                return None;
            }
            out.push_str(&n.to_string());
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write(item, out)?;
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_by(|a, b| a.encode_utf16().cmp(b.encode_utf16()));
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write(&map[k], out)?;
            }
            out.push('}');
        }
    }
    Some(())
}

/// `sha256:<hex>` of the canonical JSON of `v` (an event's data without its own `chronicle_cid`).
pub fn cid(v: &Value) -> String {
    let text = canonical(v).unwrap_or_else(|| v.to_string());
    format!("sha256:{}", hex::encode(Sha256::digest(text.as_bytes())))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn sorted_compact_and_escaped_as_rfc_8785() {
        let v = json!({ "b": [1, true, null], "a": { "z": "é/\u{1}\n", "y": -3 }, "\u{20ac}": 0, "\u{1f600}": 1 });
        // By UTF-16 code units: U+20AC (0x20AC) before U+1F600 (the surrogate pair 0xD83D 0xDE00).
        assert_eq!(
            canonical(&v).unwrap(),
            "{\"a\":{\"y\":-3,\"z\":\"é/\\u0001\\n\"},\"b\":[1,true,null],\"\u{20ac}\":0,\"\u{1f600}\":1}"
        );
        assert_eq!(canonical(&json!({ "x": 1.5 })), None);
        assert!(cid(&json!({})).starts_with("sha256:"));
        assert_eq!(cid(&json!({ "a": 1, "b": 2 })), cid(&json!({ "b": 2, "a": 1 })));
    }
}
