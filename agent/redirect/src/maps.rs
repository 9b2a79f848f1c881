//! [`Maps`]: the agent's handle on the pinned maps (enrollment, proxy address, exclusions,
//! counters, original destinations). Opened from the pins, so it works the same after a restart.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    time::Duration,
};

use aya::maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData, PerCpuArray, SockMap};
use parking_lot::Mutex;
use sluice_ebpf_common::{
    ip4_to_be, ip6_to_be, maps as names, Counter, EnrolledCgroup, OriginalDst, ProxyConfig,
    TupleKey, AF_INET, AF_INET6,
};

use crate::{cgroup_id, map_err, open_pinned, sys::monotonic_ns, Error, Result};

/// Where the redirect's lease stands (see [`ProxyConfig::lease_until_ns`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lease {
    /// Never renewed since the proxy address was set: connections fail open.
    None,
    /// Redirecting for this much longer unless renewed.
    Valid(Duration),
    /// Ran out this long ago: connections fail open.
    Expired(Duration),
}

/// Typed handles on the pinned maps. Writers take `&self`: each map sits behind its own lock.
pub struct Maps {
    config: Mutex<Array<MapData, ProxyConfig>>,
    enrolled: Mutex<HashMap<MapData, u64, EnrolledCgroup>>,
    excluded_ports: Mutex<HashMap<MapData, u16, u8>>,
    excluded_v4: Mutex<LpmTrie<MapData, u32, u8>>,
    excluded_v6: Mutex<LpmTrie<MapData, [u32; 4], u8>>,
    orig_by_tuple: HashMap<MapData, TupleKey, OriginalDst>,
    counters: PerCpuArray<MapData, u64>,
    /// Absent in pins of builds before it (until this build installs).
    listener: Option<Mutex<SockMap<MapData>>>,
}

macro_rules! typed {
    ($dir:expr, $name:expr) => {
        open_pinned($dir, $name)?
            .try_into()
            .map_err(map_err($name))?
    };
}

impl Maps {
    /// Opens the maps pinned under `pin_dir/maps` (by [`crate::install`]).
    pub fn open(pin_dir: &Path) -> Result<Self> {
        Ok(Maps {
            config: Mutex::new(typed!(pin_dir, names::CONFIG)),
            enrolled: Mutex::new(typed!(pin_dir, names::ENROLLED)),
            excluded_ports: Mutex::new(typed!(pin_dir, names::EXCLUDED_PORTS)),
            excluded_v4: Mutex::new(typed!(pin_dir, names::EXCLUDED_V4)),
            excluded_v6: Mutex::new(typed!(pin_dir, names::EXCLUDED_V6)),
            orig_by_tuple: typed!(pin_dir, names::ORIG_BY_TUPLE),
            counters: typed!(pin_dir, names::COUNTERS),
            listener: open_pinned(pin_dir, names::LISTENER)
                .ok()
                .and_then(|m| m.try_into().ok())
                .map(Mutex::new),
        })
    }

    /// Redirects the outbound TCP connections of every process in `cgroup` (a cgroup v2
    /// directory) and its descendants.
    pub fn enroll_cgroup(&self, cgroup: &Path) -> Result<u64> {
        let id = cgroup_id(cgroup)?;
        self.enroll_cgroup_id(id)?;
        Ok(id)
    }

    /// Stops redirecting `cgroup`'s new connections (established ones are not touched).
    pub fn release_cgroup(&self, cgroup: &Path) -> Result<u64> {
        let id = cgroup_id(cgroup)?;
        self.release_cgroup_id(id)?;
        Ok(id)
    }

    /// [`Maps::enroll_cgroup`] by id (the caller has stat'ed the directory).
    pub fn enroll_cgroup_id(&self, id: u64) -> Result<()> {
        let value = EnrolledCgroup {
            flags: EnrolledCgroup::REDIRECT,
            tag: 0,
        };
        self.enrolled
            .lock()
            .insert(id, value, 0)
            .map_err(map_err(names::ENROLLED))
    }

    pub fn release_cgroup_id(&self, id: u64) -> Result<()> {
        match self.enrolled.lock().remove(&id) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(names::ENROLLED)(e)),
        }
    }

    pub fn enrolled_cgroups(&self) -> Vec<u64> {
        self.enrolled.lock().keys().filter_map(|k| k.ok()).collect()
    }

    /// Where redirected connections go: the proxy's outbound listener for IPv4 and/or IPv6
    /// clients (one port: the programs know one; both given must share it); `enabled` false lets
    /// every connection through untouched (fail open). Clears the lease: nothing is redirected
    /// until [`Maps::renew_lease`] says the proxy serves.
    pub fn set_proxy(
        &self,
        v4: Option<SocketAddr>,
        v6: Option<SocketAddr>,
        enabled: bool,
    ) -> Result<()> {
        if let (Some(a), Some(b)) = (v4, v6) {
            if a.port() != b.port() {
                return Err(Error::ProxyPorts(a, b));
            }
        }
        self.update_config(|cfg| {
            cfg.flags &= ProxyConfig::SETTINGS;
            if let Some(addr) = v4 {
                let IpAddr::V4(ip) = addr.ip() else {
                    return Err(Error::Family(addr.ip(), 4));
                };
                cfg.ip4 = ip4_to_be(ip);
                cfg.port = addr.port();
                cfg.flags |= ProxyConfig::HAS_V4;
            }
            if let Some(addr) = v6 {
                let IpAddr::V6(ip) = addr.ip() else {
                    return Err(Error::Family(addr.ip(), 6));
                };
                cfg.ip6 = ip6_to_be(ip);
                cfg.port = addr.port();
                cfg.flags |= ProxyConfig::HAS_V6;
            }
            if enabled {
                cfg.flags |= ProxyConfig::ENABLED;
            }
            cfg.lease_until_ns = 0;
            Ok(())
        })
    }

    /// The proxy addresses the programs rewrite to (IPv4, IPv6), as the map holds them.
    pub fn proxy_addrs(&self) -> Result<(Option<SocketAddr>, Option<SocketAddr>)> {
        let cfg = self.config()?;
        let v4 = (cfg.flags & ProxyConfig::HAS_V4 != 0)
            .then(|| SocketAddr::from((sluice_ebpf_common::be_to_ip4(cfg.ip4), cfg.port)));
        let v6 = (cfg.flags & ProxyConfig::HAS_V6 != 0)
            .then(|| SocketAddr::from((sluice_ebpf_common::be_to_ip6(cfg.ip6), cfg.port)));
        Ok((v4, v6))
    }

    /// Redirect for `lease` from now. The agent calls this periodically while its listener
    /// serves; when it stops (crash, SIGKILL, hang), connections fail open once the lease runs
    /// out. Renewing also sets [`ProxyConfig::ENABLED`]: the agent that renews is the one
    /// serving, and a predecessor that cleared the flag on its way out (a restart whose new
    /// agent started early) must not leave its successor's redirection off.
    pub fn renew_lease(&self, lease: Duration) -> Result<()> {
        self.update_config(|cfg| {
            cfg.lease_until_ns = monotonic_ns().saturating_add(lease.as_nanos() as u64);
            cfg.flags |= ProxyConfig::ENABLED;
            Ok(())
        })
    }

    /// Ends the lease now: new connections fail open at once.
    pub fn end_lease(&self) -> Result<()> {
        self.update_config(|cfg| {
            cfg.lease_until_ns = 0;
            Ok(())
        })
    }

    pub fn lease(&self) -> Result<Lease> {
        Ok(lease_at(&self.config()?, monotonic_ns()))
    }

    /// Puts the proxy's listening socket into `SLUICE_LISTENER` and has the programs redirect
    /// only while it is there ([`ProxyConfig::LISTENER`]): the kernel takes it out when the socket
    /// closes, so a killed agent's pods fail open at once. Call it once listening (the programs
    /// redirect nothing while the flag is set and the map is empty).
    pub fn set_listener(&self, listener: &impl std::os::fd::AsRawFd) -> Result<()> {
        let Some(map) = &self.listener else {
            return Err(Error::MissingPin(names::LISTENER));
        };
        map.lock()
            .set(0, listener, 0)
            .map_err(map_err(names::LISTENER))?;
        self.set_flag(ProxyConfig::LISTENER, true)
    }

    /// Turns redirection on or off without forgetting the proxy's address.
    pub fn set_enabled(&self, enabled: bool) -> Result<()> {
        self.set_flag(ProxyConfig::ENABLED, enabled)
    }

    /// The programs' aya-log debug lines (one per redirected connect).
    pub fn set_debug_log(&self, on: bool) -> Result<()> {
        self.set_flag(ProxyConfig::DEBUG_LOG, on)
    }

    /// The sk_msg fast path: redirected connections' sockets go into the SOCKHASH so data
    /// between a pod and the proxy skips the TCP stack. Off saves the two SOCKHASH inserts each
    /// redirected `connect()` makes, for connections too short to gain from it.
    pub fn set_sockmap(&self, on: bool) -> Result<()> {
        self.set_flag(ProxyConfig::NO_SOCKMAP, !on)
    }

    /// Whether new redirected connections get the sk_msg fast path.
    pub fn sockmap(&self) -> Result<bool> {
        Ok(self.config()?.flags & ProxyConfig::NO_SOCKMAP == 0)
    }

    fn set_flag(&self, flag: u16, on: bool) -> Result<()> {
        self.update_config(|cfg| {
            cfg.flags = if on {
                cfg.flags | flag
            } else {
                cfg.flags & !flag
            };
            Ok(())
        })
    }

    pub fn config(&self) -> Result<ProxyConfig> {
        self.config
            .lock()
            .get(&0, 0)
            .map_err(map_err(names::CONFIG))
    }

    /// Read, change, write back, all under the map's lock: the lease task renews while a reload
    /// changes settings, and neither may undo the other.
    fn update_config(&self, change: impl FnOnce(&mut ProxyConfig) -> Result<()>) -> Result<()> {
        let mut map = self.config.lock();
        let mut cfg = map.get(&0, 0).map_err(map_err(names::CONFIG))?;
        change(&mut cfg)?;
        map.set(0, cfg, 0).map_err(map_err(names::CONFIG))
    }

    /// Replaces the excluded destination ports.
    ///
    /// The programs look the map up only while [`ProxyConfig::EXCL_PORTS`] says it holds
    /// entries: the flag goes on after the entries are in, and off before the last goes.
    pub fn set_excluded_ports(&self, ports: &[u16]) -> Result<()> {
        let mut map = self.excluded_ports.lock();
        if ports.is_empty() {
            self.set_flag(ProxyConfig::EXCL_PORTS, false)?;
        }
        let old: Vec<u16> = map.keys().filter_map(|k| k.ok()).collect();
        for p in old.iter().filter(|p| !ports.contains(p)) {
            let _ = map.remove(p);
        }
        for p in ports {
            map.insert(p, 1, 0)
                .map_err(map_err(names::EXCLUDED_PORTS))?;
        }
        if !ports.is_empty() {
            self.set_flag(ProxyConfig::EXCL_PORTS, true)?;
        }
        Ok(())
    }

    /// The excluded destination ports, sorted.
    pub fn excluded_ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self
            .excluded_ports
            .lock()
            .keys()
            .filter_map(|k| k.ok())
            .collect();
        ports.sort_unstable();
        ports
    }

    /// The excluded destination CIDRs (address, prefix length), IPv4 first.
    pub fn excluded_cidrs(&self) -> Vec<(IpAddr, u8)> {
        let mut out: Vec<(IpAddr, u8)> = self
            .excluded_v4
            .lock()
            .keys()
            .filter_map(|k| k.ok())
            .map(|k| {
                (
                    IpAddr::V4(sluice_ebpf_common::be_to_ip4(k.data())),
                    k.prefix_len() as u8,
                )
            })
            .collect();
        out.extend(
            self.excluded_v6
                .lock()
                .keys()
                .filter_map(|k| k.ok())
                .map(|k| {
                    (
                        IpAddr::V6(sluice_ebpf_common::be_to_ip6(k.data())),
                        k.prefix_len() as u8,
                    )
                }),
        );
        out.sort();
        out
    }

    /// Replaces the excluded destination CIDRs (address, prefix length).
    ///
    /// The programs look a map up only while its flag ([`ProxyConfig::EXCL_V4`],
    /// [`ProxyConfig::EXCL_V6`]) says it holds entries. As before, the old and the new entries
    /// are not swapped atomically: for an instant neither set is in force.
    pub fn set_excluded_cidrs(&self, cidrs: &[(IpAddr, u8)]) -> Result<()> {
        let has_v4 = cidrs.iter().any(|(ip, _)| ip.is_ipv4());
        let has_v6 = cidrs.iter().any(|(ip, _)| ip.is_ipv6());
        let mut v4 = self.excluded_v4.lock();
        let mut v6 = self.excluded_v6.lock();
        if !has_v4 {
            self.set_flag(ProxyConfig::EXCL_V4, false)?;
        }
        if !has_v6 {
            self.set_flag(ProxyConfig::EXCL_V6, false)?;
        }
        let old: Vec<Key<u32>> = v4.keys().filter_map(|k| k.ok()).collect();
        for k in &old {
            let _ = v4.remove(k);
        }
        let old: Vec<Key<[u32; 4]>> = v6.keys().filter_map(|k| k.ok()).collect();
        for k in &old {
            let _ = v6.remove(k);
        }
        for (ip, len) in cidrs {
            match ip {
                IpAddr::V4(ip) => v4
                    .insert(&Key::new(u32::from(*len).min(32), ip4_to_be(*ip)), 1, 0)
                    .map_err(map_err(names::EXCLUDED_V4))?,
                IpAddr::V6(ip) => v6
                    .insert(&Key::new(u32::from(*len).min(128), ip6_to_be(*ip)), 1, 0)
                    .map_err(map_err(names::EXCLUDED_V6))?,
            }
        }
        if has_v4 {
            self.set_flag(ProxyConfig::EXCL_V4, true)?;
        }
        if has_v6 {
            self.set_flag(ProxyConfig::EXCL_V6, true)?;
        }
        Ok(())
    }

    /// Every counter summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>> {
        Counter::ALL
            .iter()
            .map(|c| {
                let per_cpu = self
                    .counters
                    .get(&(*c as u32), 0)
                    .map_err(map_err(names::COUNTERS))?;
                Ok((*c, per_cpu.iter().sum()))
            })
            .collect()
    }

    pub fn counter(&self, c: Counter) -> Result<u64> {
        let per_cpu = self
            .counters
            .get(&(c as u32), 0)
            .map_err(map_err(names::COUNTERS))?;
        Ok(per_cpu.iter().sum())
    }

    /// The original destination of a connection the proxy accepted (`peer` is the client,
    /// `local` the proxy's end): the userspace equivalent of `getsockopt(SO_ORIGINAL_DST)`.
    pub fn original_dst(&self, peer: SocketAddr, local: SocketAddr) -> Option<SocketAddr> {
        let (family, src, dst) = match (peer.ip(), local.ip()) {
            (IpAddr::V4(p), IpAddr::V4(l)) => (AF_INET, v4_words(p), v4_words(l)),
            (IpAddr::V6(p), IpAddr::V6(l)) => (AF_INET6, ip6_to_be(p), ip6_to_be(l)),
            _ => return None,
        };
        let key = TupleKey::new(family, src, peer.port(), dst, local.port());
        self.orig_by_tuple.get(&key, 0).ok()?.to_socket_addr()
    }
}

fn lease_at(cfg: &ProxyConfig, now_ns: u64) -> Lease {
    match cfg.lease_until_ns {
        0 => Lease::None,
        until if now_ns < until => Lease::Valid(Duration::from_nanos(until - now_ns)),
        until => Lease::Expired(Duration::from_nanos(now_ns - until)),
    }
}

fn v4_words(ip: Ipv4Addr) -> [u32; 4] {
    [ip4_to_be(ip), 0, 0, 0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_states() {
        let cfg = |until| ProxyConfig {
            flags: ProxyConfig::ENABLED,
            lease_until_ns: until,
            ..Default::default()
        };
        assert_eq!(lease_at(&cfg(0), 5), Lease::None);
        assert_eq!(
            lease_at(&cfg(2_000_000_000), 1_000_000_000),
            Lease::Valid(Duration::from_secs(1))
        );
        assert_eq!(
            lease_at(&cfg(1_000), 3_000),
            Lease::Expired(Duration::from_nanos(2_000))
        );
    }
}
