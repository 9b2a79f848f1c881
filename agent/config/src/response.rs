//! What an HTTP route sends back by itself: `directResponse` (status and body, the body decoded once
//! here so the proxy only clones a `Bytes`) and `headers.response` (set/add/remove). Checked as
//! Istio's webhook checks them (`validateHTTPDirectResponse`, `ValidateHTTPHeaderOperationName`).

use crate::istio::{HeaderOperations as HeaderOperationsSpec, HttpDirectResponse};
use crate::problem::Sink;
use bytes::Bytes;
use sluice_policy::{DirectResponse, HeaderOperations};

/// Istio rejects bodies over 1 MiB (and sets Envoy's `max_direct_response_body_size_bytes` to the
/// same) and warns above 100 KiB.
const MAX_BODY: usize = 1024 * 1024;
const LARGE_BODY: usize = 100 * 1024;

/// `directResponse` at `field`; `None` (with errors in `sink`) when it is not valid.
pub(crate) fn direct_response(
    sink: &mut Sink,
    field: &str,
    spec: &HttpDirectResponse,
) -> Option<DirectResponse> {
    let status = match spec.status {
        None => {
            sink.error(
                format!("{field}.status"),
                "required: the HTTP status to answer with (200-599)",
            );
            None
        }
        // Istio's check lets 600 through, which Envoy then refuses (`lt: 600`).
        Some(s) if !(200..=599).contains(&s) => {
            sink.error(
                format!("{field}.status"),
                format!("HTTP status {s} is not in range 200-599"),
            );
            None
        }
        Some(s) => Some(s as u16),
    };
    let body = match &spec.body {
        None => Some(Bytes::new()),
        Some(b) => match (&b.string, &b.bytes) {
            (Some(text), None) => Some(Bytes::from(text.clone())),
            (None, Some(encoded)) => match decode_base64(encoded) {
                Ok(raw) => Some(Bytes::from(raw)),
                Err(why) => {
                    sink.error(
                        format!("{field}.body.bytes"),
                        format!("not valid base64: {why}"),
                    );
                    None
                }
            },
            (Some(_), Some(_)) => {
                sink.error(
                    format!("{field}.body"),
                    "only one of string or bytes may be set",
                );
                None
            }
            (None, None) => {
                sink.error(
                    format!("{field}.body"),
                    "one of string or bytes is required (leave body out for an empty body)",
                );
                None
            }
        },
    };
    if let Some(body) = &body {
        if body.len() > MAX_BODY {
            sink.error(
                format!("{field}.body"),
                format!(
                    "large direct_responses may impact control plane performance, must be less than 1MB (got {} bytes)",
                    body.len()
                ),
            );
            return None;
        }
        if body.len() > LARGE_BODY {
            sink.warn(
                format!("{field}.body"),
                format!(
                    "large direct_responses may impact control plane performance ({} bytes)",
                    body.len()
                ),
            );
        }
    }
    Some(DirectResponse {
        status: status?,
        body: body?,
    })
}

/// `headers.response` at `field`; invalid names or values are errors, as in Istio.
pub(crate) fn header_operations(
    sink: &mut Sink,
    field: &str,
    spec: &HeaderOperationsSpec,
) -> HeaderOperations {
    let mut ops = HeaderOperations::default();
    for (kind, map, out) in [
        ("set", &spec.set, &mut ops.set),
        ("add", &spec.add, &mut ops.add),
    ] {
        for (name, value) in map {
            let f = format!("{field}.{kind}.{name}");
            let name = header_name(sink, &f, name);
            if let (Some(name), true) = (name, header_value(sink, &f, value)) {
                out.push((name, value.clone()));
            }
        }
    }
    for (i, name) in spec.remove.iter().enumerate() {
        if let Some(name) = header_name(sink, &format!("{field}.remove[{i}]"), name) {
            ops.remove.push(name);
        }
    }
    ops
}

/// Istio's `ValidateHTTPHeaderOperationName`; the name lower-cased as Envoy keeps it.
fn header_name(sink: &mut Sink, field: &str, name: &str) -> Option<String> {
    if name.is_empty() {
        sink.error(field, "header name cannot be empty");
        return None;
    }
    let lower = name.to_ascii_lowercase();
    if lower.starts_with(':') || lower == "host" {
        sink.error(
            field,
            format!("invalid header {name:?}: header cannot have \":\" prefix or be \"host\""),
        );
        return None;
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        sink.error(
            field,
            format!("header name {name} is not a valid header name"),
        );
        return None;
    }
    Some(lower)
}

/// A value an HTTP header can carry: no control characters but tab.
fn header_value(sink: &mut Sink, field: &str, value: &str) -> bool {
    if value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        sink.error(
            field,
            format!("header value {value:?} has control characters"),
        );
        return false;
    }
    if value.contains('%') {
        sink.warn(
            field,
            "Envoy expands %COMMAND% operators in header values; Sluice sends the value as written",
        );
    }
    true
}

/// Base64 as protobuf's JSON mapping reads `bytes`: the standard or the URL-safe alphabet, padding
/// optional, no whitespace.
pub(crate) fn decode_base64(text: &str) -> Result<Vec<u8>, String> {
    fn value(c: u8) -> Option<u32> {
        Some(u32::from(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        }))
    }
    let data = text.trim_end_matches('=');
    let padding = text.len() - data.len();
    if padding > 2 || (padding > 0 && !text.len().is_multiple_of(4)) {
        return Err("wrong padding".to_string());
    }
    if data.len() % 4 == 1 {
        return Err(format!("{} characters cannot be base64", data.len()));
    }
    let mut out = Vec::with_capacity(data.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for (i, c) in data.bytes().enumerate() {
        let Some(v) = value(c) else {
            return Err(format!(
                "{:?} at offset {i} is not a base64 character",
                c as char
            ));
        };
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_both_alphabets_with_and_without_padding() {
        assert_eq!(decode_base64("b2s=").unwrap(), b"ok");
        assert_eq!(decode_base64("b2s").unwrap(), b"ok");
        assert_eq!(decode_base64("").unwrap(), b"");
        assert_eq!(decode_base64("aGVsbG8gd29ybGQ=").unwrap(), b"hello world");
        assert_eq!(decode_base64("+/8=").unwrap(), [0xfb, 0xff]);
        assert_eq!(decode_base64("-_8").unwrap(), [0xfb, 0xff]);
        assert_eq!(decode_base64("AAECAw==").unwrap(), [0, 1, 2, 3]);
        assert!(decode_base64("b2s*")
            .unwrap_err()
            .contains("'*' at offset 3"));
        assert!(decode_base64("b").is_err());
        assert!(decode_base64("b2s==").is_err());
        assert!(decode_base64("b2 s").is_err());
    }
}
