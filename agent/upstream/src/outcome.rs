//! What one attempt tells the outlier detector, decided here and nowhere else. Every way an attempt
//! (HTTP or TCP) can end is an [`Event`]; [`decide`] turns it into the [`Outcome`] the detector
//! hears, with Envoy's rules:
//!
//! - Upstream outcomes count: the response status, a connect failure, a reset or close by the
//!   upstream before headers or in the middle of the response body (Envoy's router reports every
//!   upstream reset but overflow as `LOCAL_ORIGIN_CONNECT_FAILED`, response started or not), and
//!   the proxy's own per-try or route timer ending an attempt that waits for headers
//!   (`LOCAL_ORIGIN_TIMEOUT`).
//! - A client that goes away is never the upstream's failure: its attempts are dropped with no timer
//!   raised (see [`sluice_core::Expiry`]), or fail because its request body did
//!   ([`sluice_core::Origin::Downstream`]). Envoy reports nothing then: the router resets the
//!   upstream request with its callbacks removed.
//! - Nothing is reported for an attempt that never had a connection (the host was not yet in play,
//!   as in Envoy, whose upstream request has no host before the pool is ready), nor for the
//!   proxy's own refusals (overflow: Envoy ignores overflow resets so as not to eject hosts of an
//!   overloaded cluster), nor for a response body the client stops reading.

use sluice_core::{Deadline, Origin, ProxyError};

/// Where an attempt is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Admitted, waiting for or opening a connection.
    Connecting,
    /// The request is being sent; no response headers yet.
    AwaitingHeaders,
    /// Headers arrived (the status was reported); the body is being read.
    Streaming,
    /// Its outcome is known.
    Done,
}

/// Something that happened to an attempt.
#[derive(Debug)]
pub(crate) enum Event<'a> {
    /// A connection (h1), a stream slot (h2) or a TCP connection is ready.
    Connected,
    /// Response headers arrived with this status.
    Headers(u16),
    /// No connection could be had from the pool: `err` says why.
    NoConnection(&'a ProxyError),
    /// The attempt failed with `err` once it had a connection (or gave up on stale ones), before
    /// or after response headers.
    Failed(&'a ProxyError),
    /// The attempt's future was dropped in `phase`; `expired` is the proxy timer that dropped it.
    Dropped {
        phase: Phase,
        expired: Option<Deadline>,
    },
}

/// What the detector hears of one attempt (Envoy's `Outlier::Result` plus the status), or why it
/// hears nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Response headers arrived with this status.
    Status(u16),
    /// The connection could not be made, or the host reset or closed it before headers
    /// (Envoy reports every upstream reset except overflow as `LOCAL_ORIGIN_CONNECT_FAILED`).
    ConnectFailed,
    /// A proxy timer ended the attempt while it waited for headers (`LOCAL_ORIGIN_TIMEOUT`).
    Timeout(Deadline),
    /// A connection is ready for the attempt (`LOCAL_ORIGIN_CONNECT_SUCCESS`).
    ConnectSuccess,
    /// The client went away: not reported.
    Cancelled,
    /// Not the host's doing (the proxy refused it, or it never reached a host): not reported.
    NotTheHost,
}

/// The one decision of what an attempt's event means for its host.
pub(crate) fn decide(event: Event<'_>) -> Outcome {
    match event {
        Event::Connected => Outcome::ConnectSuccess,
        Event::Headers(code) => Outcome::Status(code),
        // Only a failed connect is the host's; an overflow, or a pool that went away while the
        // request waited, is not.
        Event::NoConnection(err) => match err {
            ProxyError::ConnectFailure(_) => Outcome::ConnectFailed,
            _ => Outcome::NotTheHost,
        },
        Event::Failed(err) => match err.origin() {
            Origin::Upstream => match err {
                ProxyError::PerTryTimeout(_) => Outcome::Timeout(Deadline::PerTry),
                ProxyError::RequestTimeout(_) => Outcome::Timeout(Deadline::Route),
                _ => Outcome::ConnectFailed,
            },
            Origin::Downstream => Outcome::Cancelled,
            Origin::Local => Outcome::NotTheHost,
        },
        Event::Dropped {
            phase: Phase::AwaitingHeaders,
            expired: Some(deadline),
        } => Outcome::Timeout(deadline),
        Event::Dropped {
            phase: Phase::AwaitingHeaders | Phase::Connecting,
            expired: None,
        } => Outcome::Cancelled,
        Event::Dropped {
            phase: Phase::Connecting,
            expired: Some(_),
        } => Outcome::NotTheHost,
        // After headers the status was reported; a body cut short by either side adds nothing.
        Event::Dropped {
            phase: Phase::Streaming | Phase::Done,
            ..
        } => Outcome::NotTheHost,
    }
}

impl Outcome {
    /// Whether the detector hears of it at all.
    pub(crate) fn reported(self) -> bool {
        !matches!(self, Self::Cancelled | Self::NotTheHost)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::{Cause, ConnectError, OverflowKind};
    use std::time::Duration;

    #[test]
    fn a_client_going_away_is_never_an_upstream_outcome() {
        for phase in [Phase::Connecting, Phase::AwaitingHeaders, Phase::Streaming] {
            let outcome = decide(Event::Dropped {
                phase,
                expired: None,
            });
            assert!(!outcome.reported(), "{phase:?}: {outcome:?}");
        }
        let gone = ProxyError::DownstreamTermination(Cause::new("client reset"));
        assert_eq!(decide(Event::Failed(&gone)), Outcome::Cancelled);
    }

    #[test]
    fn upstream_outcomes_and_proxy_timers_count() {
        assert_eq!(decide(Event::Headers(503)), Outcome::Status(503));
        assert_eq!(decide(Event::Connected), Outcome::ConnectSuccess);
        let refused = ProxyError::ConnectFailure(ConnectError::TimedOut {
            host: "127.0.0.1:9".parse().unwrap(),
            after: Duration::from_secs(1),
        });
        assert_eq!(decide(Event::Failed(&refused)), Outcome::ConnectFailed);
        let closed = ProxyError::ConnectionTermination(Cause::new("eof"));
        assert_eq!(decide(Event::Failed(&closed)), Outcome::ConnectFailed);
        for deadline in [Deadline::PerTry, Deadline::Route] {
            let dropped = Event::Dropped {
                phase: Phase::AwaitingHeaders,
                expired: Some(deadline),
            };
            assert_eq!(decide(dropped), Outcome::Timeout(deadline));
        }
        // Before a connection the host is not in play yet; after headers the status was reported.
        for phase in [Phase::Connecting, Phase::Streaming] {
            let dropped = Event::Dropped {
                phase,
                expired: Some(Deadline::PerTry),
            };
            assert!(!decide(dropped).reported());
        }
        let overflow = ProxyError::Overflow(OverflowKind::Pending);
        assert_eq!(decide(Event::Failed(&overflow)), Outcome::NotTheHost);
        assert_eq!(decide(Event::NoConnection(&overflow)), Outcome::NotTheHost);
        assert_eq!(
            decide(Event::NoConnection(&refused)),
            Outcome::ConnectFailed
        );
        let pool_gone = ProxyError::ConnectionTermination(Cause::new("pool closed"));
        assert_eq!(decide(Event::NoConnection(&pool_gone)), Outcome::NotTheHost);
    }
}
