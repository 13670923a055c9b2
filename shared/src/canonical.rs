//! The one canonical byte encoding that signatures cover.
//!
//! A signed document is serialised to a `serde_json::Value` and then written
//! as *canonical JSON*: UTF-8, no insignificant whitespace, object keys in
//! ascending byte order at every level, strings escaped the way `serde_json`
//! escapes them, integers in plain decimal and floats in their shortest
//! round-tripping form. Key order is enforced here, by sorting, rather than
//! by relying on `serde_json`'s map type, so a crate elsewhere in the build
//! turning on `serde_json/preserve_order` cannot silently change what gets
//! signed.
//!
//! Every signature also binds a domain tag (`edgefleet/v1/<doc type>`), so a
//! signature made over one kind of document can never be replayed as a
//! signature over another kind with the same bytes.

use serde_json::Value;

/// Writes `value` as canonical JSON.
pub fn to_canonical_bytes(value: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    write_value(value, &mut out);
    out
}

/// The exact bytes an ed25519 signature covers for a document of
/// `doc_type`: the domain tag, a NUL, then the canonical JSON.
pub fn signing_input(doc_type: &str, value: &Value) -> Vec<u8> {
    let mut out = format!("edgefleet/v1/{doc_type}\0").into_bytes();
    write_value(value, &mut out);
    out
}

fn write_value(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_string(key, out);
                out.push(b':');
                write_value(item, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(item, out);
            }
            out.push(b']');
        }
        Value::String(s) => write_string(s, out),
        // Null, booleans and numbers have exactly one compact form in
        // serde_json's writer.
        scalar => out.extend_from_slice(scalar.to_string().as_bytes()),
    }
}

fn write_string(s: &str, out: &mut Vec<u8>) {
    // serde_json's string escaping is deterministic (it escapes only what
    // JSON requires, with fixed short forms), so reuse it.
    out.extend_from_slice(Value::String(s.to_string()).to_string().as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_are_sorted_at_every_level_and_whitespace_dropped() {
        let v = json!({"b": 1, "a": {"z": [3, {"y": true, "x": null}], "c": "s"}});
        assert_eq!(
            String::from_utf8(to_canonical_bytes(&v)).unwrap(),
            r#"{"a":{"c":"s","z":[3,{"x":null,"y":true}]},"b":1}"#
        );
    }

    #[test]
    fn encoding_is_independent_of_input_key_order() {
        let a: Value = serde_json::from_str(r#"{"x":1,"y":[1.5,-2],"z":"q"}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{ "z":"q", "y":[1.5, -2], "x":1 }"#).unwrap();
        assert_eq!(to_canonical_bytes(&a), to_canonical_bytes(&b));
    }

    #[test]
    fn strings_are_escaped_deterministically() {
        let v = json!({"k\"ey": "line\nbreak\u{1}é"});
        assert_eq!(
            String::from_utf8(to_canonical_bytes(&v)).unwrap(),
            "{\"k\\\"ey\":\"line\\nbreak\\u0001é\"}"
        );
    }

    #[test]
    fn numbers_keep_a_single_form() {
        let v = json!([0, -1, 18446744073709551615u64, 0.1, 1e-7, 2.5e20]);
        assert_eq!(
            String::from_utf8(to_canonical_bytes(&v)).unwrap(),
            "[0,-1,18446744073709551615,0.1,1e-7,2.5e+20]"
        );
    }

    #[test]
    fn signing_input_is_domain_separated() {
        let v = json!({"a": 1});
        assert_ne!(signing_input("root", &v), signing_input("desired", &v));
        assert!(signing_input("root", &v).starts_with(b"edgefleet/v1/root\0"));
    }
}
