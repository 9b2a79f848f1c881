//! Istio's standard metric labels, with the values Istio gives them. One label set names both ends
//! of a request: the client pod (`source_*`), the endpoint that served it (`destination_*`) and the
//! Service it was addressed to (`destination_service*`). Identities are interned once per
//! configuration generation; a sample only copies pointers.

use parking_lot::Mutex;
use prometheus_client::encoding::{EncodeLabel, EncodeLabelSet, LabelSetEncoder};
use sluice_core::ResponseFlags;
use sluice_policy::{Identity, UNKNOWN};
use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::sync::OnceLock;

/// A label value set made unique: equal contents share one allocation for the life of the
/// process, so a sample finds its series by pointer (hashing a pointer, not some twenty strings:
/// the metric families are looked up several times per request). Only [`Interned::new`] makes
/// one, so two equal values are always the same pointer.
///
/// The table keeps every value for the life of the process, so a value is a `&'static` borrow of
/// it rather than a reference count: a request copies its labels into several samples and
/// records, and an `Arc` would make each copy and each drop an atomic read-modify-write (on x86 a
/// `lock`-prefixed instruction, some twenty cycles that also hold back the core's memory ops).
#[derive(Debug)]
pub struct Interned<T: 'static>(&'static T);

impl<T> Clone for Interned<T> {
    fn clone(&self) -> Self {
        Self(self.0)
    }
}

impl<T> std::ops::Deref for Interned<T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.0
    }
}

impl<T> PartialEq for Interned<T> {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self.0, other.0)
    }
}

impl<T> Eq for Interned<T> {}

impl<T> Hash for Interned<T> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        std::ptr::hash(self.0, state);
    }
}

impl<T> Interned<T> {
    /// The value's one address, which stands for it (equal values share it).
    pub(crate) fn addr(&self) -> u64 {
        std::ptr::from_ref(self.0) as *const () as usize as u64
    }
}

/// One step of FxHash's mix (rotate, xor, multiply): enough to spread a few addresses and small
/// numbers over a word.
fn mix(h: u64, v: u64) -> u64 {
    (h.rotate_left(5) ^ v).wrapping_mul(0x517c_c1b7_2722_0a95)
}

impl Peers {
    fn word(&self) -> u64 {
        let h = mix(0, self.source.addr());
        let h = mix(h, self.destination.addr());
        let h = mix(h, self.service.addr());
        mix(h, self.cluster.addr())
    }
}

/// The values interned so far, per type. They are per workload and per Service, not per pod or
/// request, so the tables stay as small as the mesh; a value is never freed (see [`Interned`]).
trait Table: Eq + Hash + Sized + Send + Sync + 'static {
    fn table() -> &'static Mutex<HashSet<&'static Self>>;
}

impl Table for Identity {
    fn table() -> &'static Mutex<HashSet<&'static Self>> {
        static T: OnceLock<Mutex<HashSet<&'static Identity>>> = OnceLock::new();
        T.get_or_init(Default::default)
    }
}

impl Table for ServiceName {
    fn table() -> &'static Mutex<HashSet<&'static Self>> {
        static T: OnceLock<Mutex<HashSet<&'static ServiceName>>> = OnceLock::new();
        T.get_or_init(Default::default)
    }
}

impl Table for String {
    fn table() -> &'static Mutex<HashSet<&'static Self>> {
        static T: OnceLock<Mutex<HashSet<&'static String>>> = OnceLock::new();
        T.get_or_init(Default::default)
    }
}

#[allow(private_bounds)]
impl<T: Table> Interned<T> {
    /// The one shared copy of `value`.
    pub fn new(value: T) -> Self {
        let mut table = T::table().lock();
        if let Some(found) = table.get(&value) {
            return Self(found);
        }
        let value: &'static T = Box::leak(Box::new(value));
        table.insert(value);
        Self(value)
    }
}

/// A peer's telemetry identity, interned.
pub type Peer = Interned<Identity>;

/// The Service a request or connection was addressed to, as Istio's `destination_service*` labels.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceName {
    /// `pricing.default.svc.cluster.local`.
    pub hostname: String,
    pub name: String,
    pub namespace: String,
}

impl ServiceName {
    pub fn new(hostname: &str, name: &str, namespace: &str) -> Interned<Self> {
        Interned::new(Self {
            hostname: hostname.into(),
            name: name.into(),
            namespace: namespace.into(),
        })
    }

    /// No Service (the proxy answered before one was chosen): every label `unknown`.
    pub fn unknown() -> Interned<Self> {
        static UNKNOWN_SERVICE: OnceLock<Interned<ServiceName>> = OnceLock::new();
        UNKNOWN_SERVICE
            .get_or_init(|| ServiceName::new(UNKNOWN, UNKNOWN, UNKNOWN))
            .clone()
    }
}

/// The shared identity of a peer nobody knows.
pub fn unknown_identity() -> Peer {
    static UNKNOWN_PEER: OnceLock<Peer> = OnceLock::new();
    UNKNOWN_PEER
        .get_or_init(|| Interned::new(Identity::unknown()))
        .clone()
}

/// Which side of the exchange reports a sample, as in a sidecar mesh: the client's proxy (once
/// per request, its final outcome) or the endpoint's (once per attempt that reached it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reporter {
    Source,
    Destination,
}

impl Reporter {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Source => "source",
            Self::Destination => "destination",
        }
    }
}

/// Istio's `request_protocol`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http,
    Grpc,
    Tcp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Grpc => "grpc",
            Self::Tcp => "tcp",
        }
    }
}

/// Both ends of an exchange and the Service between them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peers {
    pub source: Peer,
    pub destination: Peer,
    pub service: Interned<ServiceName>,
    /// `source_cluster` / `destination_cluster`: the cluster Sluice runs in (`--cluster-id`);
    /// both ends of a request through a node proxy are in it.
    pub cluster: Interned<String>,
}

impl Peers {
    fn encode(&self, reporter: Reporter, e: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        let (s, d) = (&*self.source, &*self.destination);
        let cluster = |id: &Identity| {
            if id.workload == UNKNOWN {
                UNKNOWN
            } else {
                &self.cluster
            }
        };
        for (k, v) in [
            ("reporter", reporter.as_str()),
            ("source_workload", &s.workload),
            ("source_workload_namespace", &s.namespace),
            ("source_canonical_service", &s.canonical_service),
            ("source_canonical_revision", &s.canonical_revision),
            ("source_app", &s.app),
            ("source_version", &s.version),
            ("source_principal", &s.principal),
            ("source_cluster", cluster(s)),
            ("destination_workload", &d.workload),
            ("destination_workload_namespace", &d.namespace),
            ("destination_canonical_service", &d.canonical_service),
            ("destination_canonical_revision", &d.canonical_revision),
            ("destination_app", &d.app),
            ("destination_version", &d.version),
            ("destination_principal", &d.principal),
            ("destination_cluster", cluster(d)),
            ("destination_service", &self.service.hostname),
            ("destination_service_name", &self.service.name),
            ("destination_service_namespace", &self.service.namespace),
        ] {
            (k, v).encode(e.encode_label())?;
        }
        Ok(())
    }
}

/// Istio's `connection_security_policy`: the source reporter does not know it (`unknown`); the
/// destination reports `none`, as Sluice carries plain text (no mutual TLS).
fn security_policy(reporter: Reporter) -> &'static str {
    match reporter {
        Reporter::Source => UNKNOWN,
        Reporter::Destination => "none",
    }
}

/// The labels of `istio_requests_total`, `istio_request_duration_milliseconds`,
/// `istio_request_bytes` and `istio_response_bytes`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestLabels {
    pub reporter: Reporter,
    pub peers: Peers,
    pub protocol: Protocol,
    /// 0 when no response was sent (the client went away first).
    pub response_code: u16,
    /// The gRPC status of a gRPC response, if it had one.
    pub grpc_status: Option<u32>,
    pub flags: ResponseFlags,
}

// Every request looks its series up in four families under each reporter, whose maps hash with
// SipHash: the label set is folded into one word first, so SipHash runs over 8 bytes rather than
// over each of a dozen fields (its parts are interned addresses and small numbers; equal sets
// fold equal, as `Eq` requires).
impl Hash for Peers {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.word());
    }
}

impl Hash for RequestLabels {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let h = mix(self.peers.word(), self.reporter as u64);
        let h = mix(h, self.protocol as u64);
        let h = mix(h, u64::from(self.response_code));
        let h = mix(h, self.grpc_status.map_or(u64::MAX, u64::from));
        state.write_u64(mix(h, u64::from(self.flags.bits())));
    }
}

impl Hash for TcpLabels {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let h = mix(self.peers.word(), self.reporter as u64);
        state.write_u64(mix(h, u64::from(self.flags.bits())));
    }
}

impl EncodeLabelSet for RequestLabels {
    fn encode(&self, mut e: LabelSetEncoder) -> Result<(), std::fmt::Error> {
        self.peers.encode(self.reporter, &mut e)?;
        ("request_protocol", self.protocol.as_str()).encode(e.encode_label())?;
        ("response_code", self.response_code).encode(e.encode_label())?;
        match self.grpc_status {
            Some(code) => ("grpc_response_status", code).encode(e.encode_label())?,
            None => ("grpc_response_status", "").encode(e.encode_label())?,
        }
        ("response_flags", Flags(self.flags)).encode(e.encode_label())?;
        let policy = security_policy(self.reporter);
        ("connection_security_policy", policy).encode(e.encode_label())
    }
}

/// The labels of the `istio_tcp_*` families.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpLabels {
    pub reporter: Reporter,
    pub peers: Peers,
    pub flags: ResponseFlags,
}

impl EncodeLabelSet for TcpLabels {
    fn encode(&self, mut e: LabelSetEncoder) -> Result<(), std::fmt::Error> {
        self.peers.encode(self.reporter, &mut e)?;
        ("request_protocol", "tcp").encode(e.encode_label())?;
        ("response_flags", Flags(self.flags)).encode(e.encode_label())?;
        let policy = security_policy(self.reporter);
        ("connection_security_policy", policy).encode(e.encode_label())
    }
}

/// Response flags written straight into the exposition (no per-sample string).
struct Flags(ResponseFlags);

impl prometheus_client::encoding::EncodeLabelValue for Flags {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder,
    ) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        write!(encoder, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn equal_values_are_one_pointer() {
        let labels = BTreeMap::from([("app".to_string(), "web".to_string())]);
        let a = Interned::new(Identity::of_pod("web-1", "shop", &labels, None));
        let b = Interned::new(Identity::of_pod("web-1", "shop", &labels, None));
        let c = Interned::new(Identity::of_pod("web-2", "shop", &labels, None));
        assert!(std::ptr::eq(a.0, b.0));
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(
            ServiceName::new("a", "a", "ns"),
            ServiceName::new("a", "a", "ns")
        );
        assert_eq!(unknown_identity(), Interned::new(Identity::unknown()));
    }
}
