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

/// A ratio estimated from paired runs: the geometric mean of the per-pair ratios and its 95%
/// confidence interval.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Paired {
    pub pairs: usize,
    pub ratio: f64,
    pub low: f64,
    pub high: f64,
}

/// The ratio of two programs from runs paired in time (each pair ran back to back, so what the
/// shared host was doing then divides out): Student's t on the logarithms of the per-pair
/// ratios, read back as a geometric mean and an interval. `None` below two usable pairs.
pub fn paired(ratios: &[f64]) -> Option<Paired> {
    let logs = logs(ratios);
    let n = logs.len();
    if n < 2 {
        return None;
    }
    let mean = logs.iter().sum::<f64>() / n as f64;
    let var = logs.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let half = t975(n - 1) * (var / n as f64).sqrt();
    Some(Paired {
        pairs: n,
        ratio: mean.exp(),
        low: (mean - half).exp(),
        high: (mean + half).exp(),
    })
}

/// The same ratio from paired figures that come in groups sharing a cause of their spread: the
/// seconds of one round, whose programs kept one state (after a saturated run a program's p99
/// holds one of two levels for the whole run). The group is the unit: each gives the
/// geometric mean of its ratios, and Student's t runs over the groups, so `pairs` counts
/// groups. `None` below two groups with a usable ratio.
pub fn clustered(groups: &[Vec<f64>]) -> Option<Paired> {
    let means: Vec<f64> = groups.iter().filter_map(|g| paired_mean(g)).collect();
    paired(&means)
}

/// Geometric mean of the usable ratios of one group.
fn paired_mean(ratios: &[f64]) -> Option<f64> {
    let logs = logs(ratios);
    (!logs.is_empty()).then(|| (logs.iter().sum::<f64>() / logs.len() as f64).exp())
}

/// The logarithms of the usable ratios (finite, above zero).
fn logs(ratios: &[f64]) -> Vec<f64> {
    ratios
        .iter()
        .filter(|r| r.is_finite() && **r > 0.0)
        .map(|r| r.ln())
        .collect()
}

/// An interval widened by a control: `control` is the same ratio between two processes of one
/// build, where any distance from 1 is the host's or the process's (its memory layout, its
/// state after a saturated run), not the program's. Within one run of the bench each target is
/// one process, so nothing else averages that out: the interval stretches by the control's
/// distance from 1 on both sides (on the log scale).
pub fn widened(p: Paired, control: f64) -> Paired {
    let by = control.ln().abs().exp();
    Paired {
        low: p.low / by,
        high: p.high * by,
        ..p
    }
}

/// Student's t at 97.5% for `df` degrees of freedom (`df` >= 1): the table to 30, then the
/// Cornish-Fisher expansion around the normal quantile (within 0.0005 of the table at 30).
fn t975(df: usize) -> f64 {
    const TABLE: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    if let Some(t) = TABLE.get(df.max(1) - 1) {
        return *t;
    }
    let (z, v) = (1.959_964_f64, df as f64);
    z + (z.powi(3) + z) / (4.0 * v)
        + (5.0 * z.powi(5) + 16.0 * z.powi(3) + 3.0 * z) / (96.0 * v * v)
        + (3.0 * z.powi(7) + 19.0 * z.powi(5) + 17.0 * z.powi(3) - 15.0 * z) / (384.0 * v.powi(3))
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

    #[test]
    fn paired_ratios_give_a_geometric_mean_and_a_t_interval() {
        // Every pair the same: no spread, the interval is the point.
        let p = paired(&[1.1, 1.1, 1.1]).unwrap();
        assert_eq!(p.pairs, 3);
        assert!((p.ratio - 1.1).abs() < 1e-12 && (p.low - 1.1).abs() < 1e-12);
        // ln ratios +-0.1: mean 0, sd 0.1155 (n - 1), t(3) = 3.182, half width 0.1837.
        let p = paired(&[0.1f64.exp(), (-0.1f64).exp(), 0.1f64.exp(), (-0.1f64).exp()]).unwrap();
        assert!((p.ratio - 1.0).abs() < 1e-12);
        assert!((p.high.ln() - 0.1837).abs() < 1e-3, "{p:?}");
        assert!((p.low.ln() + 0.1837).abs() < 1e-3, "{p:?}");
        // Symmetric on the log scale: a ratio and its inverse swap the bounds.
        let q = paired(&[1.0 / 1.2, 1.0 / 0.9, 1.0 / 1.05]).unwrap();
        let r = paired(&[1.2, 0.9, 1.05]).unwrap();
        assert!((q.low * r.high - 1.0).abs() < 1e-12);
        // Unusable values are left out; fewer than two pairs give no interval.
        assert_eq!(paired(&[1.0, f64::NAN, 0.0]), None);
        assert_eq!(paired(&[]), None);
    }

    #[test]
    fn grouped_ratios_count_groups_not_members() {
        // Ten seconds alike in each of two rounds that disagree: per second the interval would
        // be narrow; per round it holds both rounds.
        let groups = vec![vec![1.2; 10], vec![1.0; 10], vec![]];
        let c = clustered(&groups).unwrap();
        assert_eq!(c.pairs, 2);
        assert!((c.ratio - 1.2f64.sqrt()).abs() < 1e-12, "{c:?}");
        assert!(c.low < 1.0 && c.high > 1.2, "{c:?}");
        let flat: Vec<f64> = groups.concat();
        let p = paired(&flat).unwrap();
        assert!(p.high - p.low < (c.high - c.low) / 10.0, "{p:?} {c:?}");
        // One usable group gives no interval.
        assert_eq!(clustered(&[vec![1.0, 1.1], vec![f64::NAN]]), None);
    }

    #[test]
    fn a_control_away_from_one_widens_the_interval_both_ways() {
        let p = Paired {
            pairs: 5,
            ratio: 1.05,
            low: 1.02,
            high: 1.08,
        };
        for control in [1.04, 1.0 / 1.04] {
            let w = widened(p, control);
            assert_eq!((w.pairs, w.ratio), (5, 1.05));
            assert!((w.low - 1.02 / 1.04).abs() < 1e-12, "{w:?}");
            assert!((w.high - 1.08 * 1.04).abs() < 1e-12, "{w:?}");
        }
        assert_eq!(widened(p, 1.0), p);
    }

    #[test]
    fn t_quantiles_join_the_expansion_at_thirty() {
        assert_eq!(t975(1), 12.706);
        assert_eq!(t975(30), 2.042);
        assert!((t975(31) - 2.0395).abs() < 5e-4, "{}", t975(31));
        assert!((t975(60) - 2.0003).abs() < 5e-4, "{}", t975(60));
        assert!((t975(100_000) - 1.96).abs() < 1e-3);
    }
}
