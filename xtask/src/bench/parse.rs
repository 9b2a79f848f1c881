//! Parsers for what the benchmark reads: `wrk` reports and `/proc/PID/{stat,status}`.

/// The figures of one `wrk --latency` report.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct WrkReport {
    pub requests_per_sec: f64,
    pub requests: u64,
    /// Non-2xx/3xx answers plus socket errors.
    pub errors: u64,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
}

/// Reads `Requests/sec:`, the request count, the latency distribution and errors.
pub fn wrk(text: &str) -> Option<WrkReport> {
    let mut r = WrkReport::default();
    let mut seen_rps = false;
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", v] => {
                r.requests_per_sec = v.parse().ok()?;
                seen_rps = true;
            }
            [n, "requests", "in", ..] => r.requests = n.parse().ok()?,
            ["50%", v] => r.p50_us = duration_us(v),
            ["99%", v] => r.p99_us = duration_us(v),
            ["Non-2xx", "or", "3xx", "responses:", n] => r.errors += n.parse::<u64>().ok()?,
            ["Socket", "errors:", rest @ ..] => {
                // "Socket errors: connect 0, read 0, write 0, timeout 0"
                r.errors += rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>();
            }
            _ => {}
        }
    }
    seen_rps.then_some(r)
}

/// wrk's durations (`85.00us`, `1.23ms`, `2.00s`, `1.00m`) in microseconds.
pub fn duration_us(s: &str) -> Option<f64> {
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = s.split_at(split);
    let n: f64 = n.parse().ok()?;
    let scale = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        _ => return None,
    };
    Some(n * scale)
}

/// `utime + stime` in clock ticks from `/proc/PID/stat` (fields 14 and 15).
pub fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    stat_cpu_split(stat).map(|(user, system)| user + system)
}

/// `(utime, stime)` in clock ticks from `/proc/PID/stat` (fields 14 and 15): time in the
/// program's own code and in the kernel on its behalf. The command name may hold spaces and
/// parentheses, so fields are counted after the last `)`.
pub fn stat_cpu_split(stat: &str) -> Option<(u64, u64)> {
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3 (state), so field N is at index N - 3.
    let utime: u64 = fields.get(14 - 3)?.parse().ok()?;
    let stime: u64 = fields.get(15 - 3)?.parse().ok()?;
    Some((utime, stime))
}

/// `VmHWM` (peak resident set) in KiB from `/proc/PID/status`.
pub fn status_hwm_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = "Running 10s test @ http://127.0.0.1:8080/
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   310.52us  120.11us   8.02ms   91.23%
    Req/Sec    98.12k     3.01k  104.33k    72.00%
  Latency Distribution
     50%  289.00us
     75%  330.00us
     90%  401.00us
     99%    1.02ms
  976512 requests in 10.00s, 140.62MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 5
Requests/sec:  97651.20
Transfer/sec:     14.06MB
";

    #[test]
    fn parses_a_wrk_report() {
        let r = wrk(WRK).unwrap();
        assert_eq!(r.requests_per_sec, 97651.20);
        assert_eq!(r.requests, 976512);
        assert_eq!(r.errors, 8);
        assert_eq!(r.p50_us, Some(289.0));
        assert_eq!(r.p99_us, Some(1020.0));
        assert!(wrk("unable to connect to 127.0.0.1:1 Connection refused").is_none());
    }

    #[test]
    fn wrk_units() {
        assert_eq!(duration_us("85.00us"), Some(85.0));
        assert_eq!(duration_us("2.00s"), Some(2e6));
        assert_eq!(duration_us("1.00m"), Some(60e6));
        assert_eq!(duration_us("bogus"), None);
    }

    #[test]
    fn proc_stat_and_status() {
        let stat = "4242 (my (odd) proc) S 1 4242 4242 0 -1 4194560 1234 0 0 0 150 25 0 0 20 0 3 0 1000 123456 789 18446744073709551615";
        assert_eq!(stat_cpu_ticks(stat), Some(175));
        assert_eq!(stat_cpu_split(stat), Some((150, 25)));
        let status =
            "Name:\thaproxy\nVmPeak:\t  120000 kB\nVmHWM:\t   18432 kB\nVmRSS:\t   17000 kB\n";
        assert_eq!(status_hwm_kib(status), Some(18432));
        assert_eq!(stat_cpu_ticks("garbage"), None);
    }
}
