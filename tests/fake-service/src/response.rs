//! The JSON document the service answers with, field for field as the image's
//! `response.Response` (same names, same omissions, two-space indent).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// One service's answer; upstream answers nest under `upstream_calls`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Response {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub uri: String,
    #[serde(rename = "type", skip_serializing_if = "String::is_empty")]
    pub kind: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ip_addresses: Vec<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub start_time: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub end_time: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub duration: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub cookies: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<serde_json::Value>,
    /// Keyed by the upstream URI as configured; sorted, as Go sorts map keys.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub upstream_calls: BTreeMap<String, Response>,
    /// `-1` when the upstream could not be reached, as in the image.
    pub code: i32,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
}

impl Response {
    /// Pretty JSON with a trailing newline, like Go's indented `json.Encoder`.
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("a Response always serializes");
        s.push('\n');
        s
    }
}

/// `MESSAGE` as the `body` field: raw JSON when it starts with `{`, else a string.
pub fn body_from_message(message: &str) -> serde_json::Value {
    if message.starts_with('{') {
        if let Ok(v) = serde_json::from_str(message) {
            return v;
        }
    }
    serde_json::Value::String(message.to_owned())
}

/// The wall clock in the image's format, `2006-01-02T15:04:05.000000` (UTC here; the
/// image prints its local time, which is UTC in its container).
pub fn timestamp(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:06}",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60,
        since.subsec_micros()
    )
}

/// Howard Hinnant's days-to-civil conversion (proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// This host's non-loopback IPv4 addresses, read once from `/proc/net/fib_trie`
/// (the image lists its interfaces' addresses; this needs no unsafe `getifaddrs`).
pub fn ip_addresses() -> &'static [String] {
    static CACHE: OnceLock<Vec<String>> = OnceLock::new();
    CACHE.get_or_init(|| {
        std::fs::read_to_string("/proc/net/fib_trie")
            .map(|t| local_addresses_from_fib_trie(&t))
            .unwrap_or_default()
    })
}

/// The `/32 host LOCAL` leaves of a fib_trie dump, loopback excluded, deduplicated.
fn local_addresses_from_fib_trie(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut last_leaf: Option<Ipv4Addr> = None;
    for line in text.lines() {
        let line = line.trim_start_matches([' ', '|', '+', '-']).trim();
        if let Ok(ip) = line.parse::<Ipv4Addr>() {
            last_leaf = Some(ip);
        } else if line.starts_with("/32 host LOCAL") {
            if let Some(ip) = last_leaf {
                let s = ip.to_string();
                if !ip.is_loopback() && !ip.is_multicast() && !out.contains(&s) {
                    out.push(s);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_look_like_go() {
        let t = UNIX_EPOCH + Duration::from_micros(1_763_904_123_456_789);
        assert_eq!(timestamp(t), "2025-11-23T13:22:03.456789");
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000000");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(timestamp(leap), "2000-02-29T00:00:00.000000");
    }

    #[test]
    fn reads_local_addresses_from_fib_trie() {
        let dump = "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 10.0.0.5\n        /32 host LOCAL\n     |-- 10.0.0.255\n        /32 link BROADCAST\n  +-- 127.0.0.0/8 2 0 2\n     |-- 127.0.0.1\n        /32 host LOCAL\nLocal:\n     |-- 10.0.0.5\n        /32 host LOCAL\n";
        assert_eq!(local_addresses_from_fib_trie(dump), ["10.0.0.5"]);
    }

    #[test]
    fn omits_empty_fields_and_keeps_code() {
        let r = Response {
            name: "inventory".into(),
            code: 500,
            error: "Service error automatically injected".into(),
            ..Default::default()
        };
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        let keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys.len(), 3, "{keys:?}");
        assert_eq!(body_from_message("{\"a\":1}")["a"], 1);
        assert_eq!(body_from_message("Hello World"), "Hello World");
    }
}
