//! Host selection: which endpoint one attempt goes to. Ejected hosts are skipped unless the cluster
//! is in panic (`minHealthPercent`, Envoy's `healthy_panic_threshold`); hosts an earlier attempt of
//! the same request tried are avoided when another eligible host exists (Istio's `previous_hosts`
//! retry predicate; Envoy re-draws up to 5 times, we filter, which never lands on a tried host
//! when an untried one is eligible). Policies, with equal weights, as Envoy implements them:
//! ROUND_ROBIN cycles from a random start, LEAST_REQUEST takes the less loaded of two random picks
//! (power of two choices), RANDOM picks uniformly. Selection allocates nothing.
//!
//! `warmup` (Envoy's slow start, ROUND_ROBIN and LEAST_REQUEST only): while eligible hosts of
//! different ages are inside the window, hosts are weighted by [`Warmup::factor`] of their age (LEAST_REQUEST
//! also divides by active requests + 1, as Envoy's weighted least request does) and one is drawn in
//! proportion to its weight. Envoy's EDF scheduler gives the same shares in a deterministic order.

use sluice_policy::{LoadBalancer, Warmup};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// What the balancer needs to know about a host.
pub(crate) trait Candidate {
    fn addr(&self) -> SocketAddr;
    fn ejected(&self) -> bool;
    fn active_requests(&self) -> u32;
    /// Time since the host joined the cluster.
    fn age(&self) -> Duration {
        Duration::MAX
    }
}

/// The balancer's own state (the round-robin cursor).
#[derive(Debug)]
pub(crate) struct Balancer {
    rr: AtomicUsize,
}

impl Default for Balancer {
    fn default() -> Self {
        // Random start, as Envoy seeds each worker, so proxies do not hit hosts in lockstep.
        Self {
            rr: AtomicUsize::new(fastrand::usize(..1 << 16)),
        }
    }
}

impl Balancer {
    /// Picks a host, or `None` when no host may take the request (no endpoints, or all ejected and
    /// no panic).
    #[cfg(test)]
    pub(crate) fn pick<'h, H: Candidate>(
        &self,
        hosts: &'h [H],
        policy: LoadBalancer,
        panic_threshold: u32,
        tried: &[SocketAddr],
    ) -> Option<&'h H> {
        self.pick_warming(hosts, policy, panic_threshold, tried, None)
    }

    /// [`Self::pick`] under the cluster's `warmup`.
    pub(crate) fn pick_warming<'h, H: Candidate>(
        &self,
        hosts: &'h [H],
        policy: LoadBalancer,
        panic_threshold: u32,
        tried: &[SocketAddr],
        warmup: Option<&Warmup>,
    ) -> Option<&'h H> {
        if hosts.is_empty() {
            return None;
        }
        let healthy = hosts.iter().filter(|h| !h.ejected()).count();
        // Envoy: panic when the healthy percentage is below the threshold; then ejection is ignored.
        let panic = panic_threshold > 0 && healthy * 100 < panic_threshold as usize * hosts.len();
        let eligible = |h: &H| panic || !h.ejected();
        let avoid = !tried.is_empty()
            && hosts
                .iter()
                .any(|h| eligible(h) && !tried.contains(&h.addr()));
        let ok = |h: &&H| eligible(h) && !(avoid && tried.contains(&h.addr()));
        let count = if avoid {
            hosts.iter().filter(ok).count()
        } else if panic {
            hosts.len()
        } else {
            healthy
        };
        if count == 0 {
            return None;
        }
        let nth = |i: usize| hosts.iter().filter(ok).nth(i);
        if let Some(w) = warmup.filter(|_| {
            matches!(
                policy,
                LoadBalancer::RoundRobin | LoadBalancer::LeastRequest
            )
        }) {
            // Equal factors (every host as young, or none young) weigh nothing: Envoy's
            // scheduler then keeps the unweighted order, and so does this.
            let mut factors = hosts.iter().filter(ok).map(|h| w.factor(h.age()));
            let first = factors.next().unwrap_or(1.0);
            if factors.any(|f| (f - first).abs() > 1e-9) {
                let weight = |h: &H| {
                    let f = w.factor(h.age());
                    match policy {
                        LoadBalancer::LeastRequest => f / (f64::from(h.active_requests()) + 1.0),
                        _ => f,
                    }
                };
                let total: f64 = hosts.iter().filter(ok).map(weight).sum();
                let mut x = fastrand::f64() * total;
                let mut last = None;
                for h in hosts.iter().filter(ok) {
                    let wt = weight(h);
                    if x < wt {
                        return Some(h);
                    }
                    x -= wt;
                    last = Some(h);
                }
                return last;
            }
        }
        match policy {
            LoadBalancer::RoundRobin => nth(self.rr.fetch_add(1, Ordering::Relaxed) % count),
            LoadBalancer::Random | LoadBalancer::Passthrough => nth(fastrand::usize(..count)),
            LoadBalancer::LeastRequest => {
                let first = nth(fastrand::usize(..count))?;
                let second = nth(fastrand::usize(..count))?;
                // Envoy keeps the first draw unless the second has strictly fewer active requests.
                Some(if second.active_requests() < first.active_requests() {
                    second
                } else {
                    first
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct H(SocketAddr, bool, u32);

    impl Candidate for H {
        fn addr(&self) -> SocketAddr {
            self.0
        }
        fn ejected(&self) -> bool {
            self.1
        }
        fn active_requests(&self) -> u32 {
            self.2
        }
    }

    fn hosts(n: u16) -> Vec<H> {
        (0..n)
            .map(|i| H(SocketAddr::from(([10, 0, 0, 1], 8000 + i)), false, 0))
            .collect()
    }

    #[test]
    fn round_robin_cycles_in_order() {
        let hs = hosts(3);
        let lb = Balancer::default();
        let picks: Vec<u16> = (0..9)
            .map(|_| {
                lb.pick(&hs, LoadBalancer::RoundRobin, 0, &[])
                    .unwrap()
                    .0
                    .port()
            })
            .collect();
        for w in picks.windows(2) {
            assert_eq!(w[1], 8000 + (w[0] - 8000 + 1) % 3, "{picks:?}");
        }
    }

    #[test]
    fn round_robin_skips_ejected() {
        let mut hs = hosts(3);
        hs[1].1 = true;
        let lb = Balancer::default();
        for _ in 0..10 {
            let p = lb.pick(&hs, LoadBalancer::RoundRobin, 0, &[]).unwrap();
            assert_ne!(p.0.port(), 8001);
        }
    }

    #[test]
    fn least_request_prefers_idle_hosts() {
        let mut hs = hosts(2);
        hs[0].2 = 10;
        let lb = Balancer::default();
        let idle = (0..1000)
            .filter(|_| {
                lb.pick(&hs, LoadBalancer::LeastRequest, 0, &[])
                    .unwrap()
                    .0
                    .port()
                    == 8001
            })
            .count();
        // Two random draws miss the idle host only when both land on the busy one (1 in 4).
        assert!(idle > 650, "idle host picked {idle}/1000");
    }

    #[test]
    fn random_covers_all_hosts() {
        let hs = hosts(5);
        let lb = Balancer::default();
        let mut seen = [0u32; 5];
        for _ in 0..500 {
            let p = lb.pick(&hs, LoadBalancer::Random, 0, &[]).unwrap();
            seen[usize::from(p.0.port() - 8000)] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
    }

    #[test]
    fn avoids_previously_tried_host_when_another_exists() {
        let hs = hosts(2);
        let lb = Balancer::default();
        for policy in [
            LoadBalancer::RoundRobin,
            LoadBalancer::Random,
            LoadBalancer::LeastRequest,
        ] {
            for _ in 0..50 {
                let p = lb.pick(&hs, policy, 0, &[hs[0].0]).unwrap();
                assert_eq!(p.0, hs[1].0);
            }
        }
        // Both tried: any host will do rather than none.
        assert!(lb
            .pick(&hs, LoadBalancer::Random, 0, &[hs[0].0, hs[1].0])
            .is_some());
        // The only other host is ejected: retry the tried one.
        let mut hs = hs;
        hs[1].1 = true;
        assert_eq!(
            lb.pick(&hs, LoadBalancer::Random, 0, &[hs[0].0]).unwrap().0,
            hs[0].0
        );
    }

    #[test]
    fn all_ejected_without_panic_is_no_host() {
        let mut hs = hosts(2);
        hs.iter_mut().for_each(|h| h.1 = true);
        let lb = Balancer::default();
        assert!(lb.pick(&hs, LoadBalancer::RoundRobin, 0, &[]).is_none());
        assert!(lb
            .pick::<H>(&[], LoadBalancer::RoundRobin, 0, &[])
            .is_none());
    }

    #[test]
    fn panic_mode_balances_across_all_hosts() {
        let mut hs = hosts(4);
        for h in &mut hs[..3] {
            h.1 = true;
        }
        let lb = Balancer::default();
        // 25% healthy < 50% threshold: panic, every host gets traffic.
        let mut seen = [0u32; 4];
        for _ in 0..400 {
            seen[usize::from(
                lb.pick(&hs, LoadBalancer::RoundRobin, 50, &[])
                    .unwrap()
                    .0
                    .port()
                    - 8000,
            )] += 1;
        }
        assert!(seen.iter().all(|&n| n == 100), "{seen:?}");
        // 25% healthy >= 20% threshold: no panic, only the healthy host.
        for _ in 0..10 {
            assert_eq!(
                lb.pick(&hs, LoadBalancer::RoundRobin, 20, &[])
                    .unwrap()
                    .0
                    .port(),
                8003
            );
        }
        // All ejected but panic on: still served.
        hs[3].1 = true;
        assert!(lb.pick(&hs, LoadBalancer::RoundRobin, 1, &[]).is_some());
    }
}

#[cfg(test)]
mod warmup_tests {
    use super::*;

    struct Aged(SocketAddr, Duration);

    impl Candidate for Aged {
        fn addr(&self) -> SocketAddr {
            self.0
        }
        fn ejected(&self) -> bool {
            false
        }
        fn active_requests(&self) -> u32 {
            0
        }
        fn age(&self) -> Duration {
            self.1
        }
    }

    fn share_of_new_host(policy: LoadBalancer, warmup: Option<&Warmup>) -> usize {
        let hs = [
            Aged(
                SocketAddr::from(([10, 0, 0, 1], 80)),
                Duration::from_secs(3600),
            ),
            Aged(
                SocketAddr::from(([10, 0, 0, 2], 80)),
                Duration::from_secs(1),
            ),
        ];
        let lb = Balancer::default();
        (0..4000)
            .filter(|_| lb.pick_warming(&hs, policy, 0, &[], warmup).unwrap().0 == hs[1].0)
            .count()
    }

    #[test]
    fn a_warming_host_gets_its_factor_of_the_traffic() {
        let w = Warmup {
            window: Duration::from_secs(10),
            minimum_percent: 10.0,
            aggression: 1.0,
        };
        // 1 s into a 10 s window: factor 0.1 against 1, so about 1/11 of the picks (364/4000).
        for policy in [LoadBalancer::RoundRobin, LoadBalancer::LeastRequest] {
            let n = share_of_new_host(policy, Some(&w));
            assert!((200..550).contains(&n), "{policy:?}: {n}/4000");
        }
        // RANDOM has no slow start; nor does a cluster without warmup.
        let n = share_of_new_host(LoadBalancer::Random, Some(&w));
        assert!((1700..2300).contains(&n), "random: {n}/4000");
        let n = share_of_new_host(LoadBalancer::RoundRobin, None);
        assert_eq!(n, 2000, "round robin alternates");
    }
}

#[cfg(test)]
mod warmup_equal_tests {
    use super::*;

    struct Young(SocketAddr);

    impl Candidate for Young {
        fn addr(&self) -> SocketAddr {
            self.0
        }
        fn ejected(&self) -> bool {
            false
        }
        fn active_requests(&self) -> u32 {
            0
        }
        fn age(&self) -> Duration {
            Duration::from_secs(1)
        }
    }

    #[test]
    fn hosts_warming_together_keep_round_robin_order() {
        let hs = [
            Young(SocketAddr::from(([10, 0, 0, 1], 80))),
            Young(SocketAddr::from(([10, 0, 0, 2], 80))),
        ];
        let w = Warmup {
            window: Duration::from_secs(10),
            minimum_percent: 10.0,
            aggression: 1.0,
        };
        let lb = Balancer::default();
        let picks: Vec<SocketAddr> = (0..6)
            .map(|_| {
                lb.pick_warming(&hs, LoadBalancer::RoundRobin, 0, &[], Some(&w))
                    .unwrap()
                    .0
            })
            .collect();
        for pair in picks.windows(2) {
            assert_ne!(pair[0], pair[1], "{picks:?}");
        }
    }
}
