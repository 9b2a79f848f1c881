//! Envoy response flags (`%RESPONSE_FLAGS%`): a compact record of why a request ended as it did.

use std::fmt;

/// A set of Envoy response flags. Printed in Envoy's order, comma-separated, `-` when empty.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ResponseFlags(u32);

macro_rules! flags {
    ($($(#[$doc:meta])* $name:ident = $bit:expr, $short:literal;)*) => {
        impl ResponseFlags {
            $($(#[$doc])* pub const $name: Self = Self(1 << $bit);)*
            const ALL: &'static [(Self, &'static str)] = &[$((Self::$name, $short)),*];
        }
    };
}

// Order follows Envoy's `ResponseFlagUtils` so logs read the same as Envoy's.
flags! {
    /// No healthy upstream host.
    NO_HEALTHY_UPSTREAM = 0, "UH";
    /// Upstream connection failure.
    UPSTREAM_CONNECTION_FAILURE = 1, "UF";
    /// Upstream overflow (circuit breaking).
    UPSTREAM_OVERFLOW = 2, "UO";
    /// No route configured for the request.
    NO_ROUTE_FOUND = 3, "NR";
    /// Upstream request timeout.
    UPSTREAM_REQUEST_TIMEOUT = 4, "UT";
    /// Upstream remote reset.
    UPSTREAM_REMOTE_RESET = 5, "UR";
    /// Upstream connection termination.
    UPSTREAM_CONNECTION_TERMINATION = 6, "UC";
    /// Delay injected by a fault.
    DELAY_INJECTED = 7, "DI";
    /// Request aborted by a fault.
    FAULT_INJECTED = 8, "FI";
    /// Upstream retry limit exceeded.
    UPSTREAM_RETRY_LIMIT_EXCEEDED = 9, "URX";
    /// No cluster found for the request's destination.
    NO_CLUSTER_FOUND = 10, "NC";
    /// Downstream connection termination.
    DOWNSTREAM_CONNECTION_TERMINATION = 11, "DC";
    /// The connection's maximum duration was reached (TCP proxy `max_downstream_connection_duration`).
    DURATION_TIMEOUT = 12, "DT";
    /// The client's request broke the protocol or the proxy's limits on it (header size or count).
    DOWNSTREAM_PROTOCOL_ERROR = 13, "DPE";
    /// The upstream's response was not valid HTTP (status line, headers, framing).
    UPSTREAM_PROTOCOL_ERROR = 14, "UPE";
    /// The stream was reset on the client's side of the proxy (HTTP/2: Envoy logs its codec's own
    /// resets of a stream over the header limits so).
    DOWNSTREAM_REMOTE_RESET = 15, "DR";
    /// The proxy shed the request or connection to protect itself or the other clients (Envoy's
    /// overload manager flag): a pod at its own limit, or the whole proxy short of file
    /// descriptors or memory. The details say which.
    OVERLOAD_MANAGER = 16, "OM";
}

impl ResponseFlags {
    pub const fn empty() -> Self {
        Self(0)
    }

    pub const fn bits(self) -> u32 {
        self.0
    }

    pub const fn from_bits(bits: u32) -> Self {
        Self(bits)
    }

    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn insert(&mut self, other: Self) {
        self.0 |= other.0;
    }

    /// Parses Envoy's short form (`UT,URX`); `-` or empty is no flag.
    pub fn parse(s: &str) -> Option<Self> {
        let mut out = Self::empty();
        for part in s
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty() && *p != "-")
        {
            let (flag, _) = Self::ALL.iter().find(|(_, short)| *short == part)?;
            out.insert(*flag);
        }
        Some(out)
    }
}

impl std::ops::BitOr for ResponseFlags {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

impl fmt::Display for ResponseFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("-");
        }
        let mut first = true;
        for (flag, short) in Self::ALL {
            if self.contains(*flag) {
                if !first {
                    f.write_str(",")?;
                }
                f.write_str(short)?;
                first = false;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for ResponseFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ResponseFlags({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_in_envoy_order() {
        let f = ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED
            | ResponseFlags::UPSTREAM_CONNECTION_FAILURE;
        assert_eq!(f.to_string(), "UF,URX");
        assert_eq!(ResponseFlags::empty().to_string(), "-");
        assert_eq!(ResponseFlags::parse("UF,URX"), Some(f));
        assert_eq!(ResponseFlags::parse("-"), Some(ResponseFlags::empty()));
        assert_eq!(ResponseFlags::parse("XX"), None);
    }
}
