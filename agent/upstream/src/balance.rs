//! Host selection: which endpoint one attempt goes to. Ejected hosts are skipped unless the cluster
//! is in panic (`minHealthPercent`, Envoy's `healthy_panic_threshold`); hosts an earlier attempt of
//! the same request tried are avoided when another eligible host exists (Istio's `previous_hosts`
//! retry predicate; Envoy re-draws up to 5 times, we filter, which never lands on a tried host
//! when an untried one is eligible). Policies, with equal weights, as Envoy implements them:
//! ROUND_ROBIN cycles from a random start, LEAST_REQUEST takes the less loaded of two random picks
//! (power of two choices), RANDOM picks uniformly. Selection allocates nothing.

use sluice_policy::LoadBalancer;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

/// What the balancer needs to know about a host.
pub(crate) trait Candidate {
    fn addr(&self) -> SocketAddr;
    fn ejected(&self) -> bool;
    fn active_requests(&self) -> u32;
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
    pub(crate) fn pick<'h, H: Candidate>(
        &self,
        hosts: &'h [H],
        policy: LoadBalancer,
        panic_threshold: u32,
        tried: &[SocketAddr],
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
