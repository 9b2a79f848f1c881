//! Order statistics and ratios for the benchmark summary.

/// Nearest-rank percentile (`p` in 0..=100) of an ascending slice.
pub fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Median of unordered values (mean of the middle two for an even count).
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    })
}

/// Smallest and largest finite value.
pub fn range(values: &[f64]) -> Option<(f64, f64)> {
    values
        .iter()
        .copied()
        .filter(|x| x.is_finite())
        .fold(None, |acc, x| match acc {
            None => Some((x, x)),
            Some((lo, hi)) => Some((lo.min(x), hi.max(x))),
        })
}

/// `a / b`, or `None` when `b` is not a usable denominator (zero, negative, missing).
pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 && a.is_finite() && b.is_finite() => Some(a / b),
        _ => None,
    }
}

/// Relative distance of `x` from `reference` (0.25 = 25%).
pub fn deviation(x: f64, reference: f64) -> f64 {
    if reference == 0.0 {
        return f64::INFINITY;
    }
    ((x - reference) / reference).abs()
}

/// Whether `v` meets a target `op bound` (`>=`, `<=`, `>`, else `<`).
pub fn meets(v: f64, op: &str, bound: f64) -> bool {
    match op {
        ">=" => v >= bound,
        "<=" => v <= bound,
        ">" => v > bound,
        _ => v < bound,
    }
}

/// A figure for a table: whole numbers from 100 up, two decimals below.
pub fn num(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// `median [min - max]`, or `-` without values.
pub fn median_range_text(median: Option<f64>, range: Option<(f64, f64)>) -> String {
    match (median, range) {
        (Some(m), Some((lo, hi))) => format!("{} [{} - {}]", num(m), num(lo), num(hi)),
        _ => "-".to_owned(),
    }
}

/// A round whose reference figure moved more than 20% from its median: the JSON record and the
/// line the summary prints; `None` for a steady round.
pub fn unstable(
    reference: &str,
    figure: &str,
    round: usize,
    value: f64,
    median: f64,
) -> Option<(serde_json::Value, String)> {
    (deviation(value, median) > 0.20).then(|| {
        (
            serde_json::json!({ "round": round, "figure": figure, "value": value, "median": median }),
            format!(
                "UNSTABLE round {round}: {reference} {figure} {} vs median {} (> 20%): distrust this round",
                num(value),
                num(median)
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&v, 100.0), Some(100));
        assert_eq!(percentile(&v, 0.0), Some(1));
        assert_eq!(percentile(&[7], 99.0), Some(7));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 99.0), Some(10));
    }

    #[test]
    fn medians_ranges_ratios() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[f64::NAN, 1.0]), Some(1.0));
        assert_eq!(median(&[]), None);
        assert_eq!(range(&[3.0, 1.0, 2.0]), Some((1.0, 3.0)));
        assert_eq!(ratio(Some(7.0), Some(10.0)), Some(0.7));
        assert_eq!(ratio(Some(7.0), Some(0.0)), None);
        assert_eq!(ratio(None, Some(1.0)), None);
        assert!((deviation(120.0, 100.0) - 0.2).abs() < 1e-12);
        assert!(deviation(79.0, 100.0) > 0.2);
    }
}
