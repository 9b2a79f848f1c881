//! Durations in config dumps as Istio writes them (`10s`, `500ms`, `1.5s`), not as `{secs, nanos}`.

use serde::Serializer;
use std::time::Duration;

pub(crate) fn format(d: Duration) -> String {
    let ms = d.as_millis();
    if !d.subsec_nanos().is_multiple_of(1_000_000) {
        format!("{}us", d.as_micros())
    } else if ms < 1000 && !ms.is_multiple_of(1000) {
        format!("{ms}ms")
    } else if !ms.is_multiple_of(1000) {
        format!("{}s", d.as_secs_f64())
    } else {
        format!("{}s", d.as_secs())
    }
}

pub(crate) fn one<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format(*d))
}

pub(crate) fn opt<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_str(&format(*d)),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::format;
    use std::time::Duration;

    #[test]
    fn istio_style() {
        assert_eq!(format(Duration::from_secs(10)), "10s");
        assert_eq!(format(Duration::from_millis(500)), "500ms");
        assert_eq!(format(Duration::from_millis(2500)), "2.5s");
        assert_eq!(format(Duration::from_micros(1500)), "1500us");
        assert_eq!(format(Duration::ZERO), "0s");
    }
}
