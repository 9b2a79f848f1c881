//! Retries with Envoy's semantics (`RetryStateImpl` and the router's retry handling):
//!
//! - The route's `retryOn` and `attempts`; with `attempts: 0` Istio configures no retry policy, so
//!   `num_retries == 0` means none, and only the request headers below can enable retries (then with
//!   Envoy's default of 1 retry).
//! - `x-envoy-retry-on` / `x-envoy-retry-grpc-on` add conditions, `x-envoy-retriable-status-codes` adds
//!   codes, and `x-envoy-max-retries` replaces the retry count when any condition is set. These and the
//!   other retry headers are consumed here; `x-envoy-upstream-rq-per-try-timeout-ms` is left for the
//!   per-try [`TimeoutLayer`](crate::TimeoutLayer) below.
//! - Every attempt carries `x-envoy-attempt-count` (Istio sets `include_request_attempt_count`) and
//!   counts in [`RequestInfo::add_attempt`]; each attempt gets a copy of the request's extensions, so
//!   the balancer sees the same `Arc<RequestInfo>` and can avoid hosts already tried, unless the
//!   route has `retryIgnorePreviousHosts: false` (`any_host` in the request's [`RequestCtx`]).
//! - A retriable outcome is retried after the jittered [`Backoff`] if retries remain (else flag `URX`)
//!   and the cluster's [`RetryBudget`] has room (else flag `UO` and an overflow count); the retriable
//!   response is dropped, which resets its stream. A request whose body outgrew the replay buffer is
//!   not retried at all (no flag), as Envoy abandons its retry state then.

mod budget;
mod classify;
mod future;

pub use self::budget::{RetryBudget, RetryPermit};
pub use self::classify::classify;
pub use self::future::ResponseFuture;

use self::classify::On;
use self::future::{Attempts, Replay};
use crate::backoff::Backoff;
use crate::replay::{ReplayBody, DEFAULT_MAX_BYTES};
use http::{header::HeaderName, HeaderMap, HeaderValue, Request, Response};
use http_body::Body as _;
use sluice_core::{Body, BoxError, RequestCtx};
use sluice_policy::RetryPolicy;
use std::sync::Arc;
use std::task::{Context, Poll};
use tower_layer::Layer;
use tower_service::Service;

/// Set on every upstream attempt: 1 for the first, 2 for the first retry, ...
pub const ATTEMPT_COUNT: HeaderName = HeaderName::from_static("x-envoy-attempt-count");
pub const RETRY_ON: HeaderName = HeaderName::from_static("x-envoy-retry-on");
pub const RETRY_GRPC_ON: HeaderName = HeaderName::from_static("x-envoy-retry-grpc-on");
pub const MAX_RETRIES: HeaderName = HeaderName::from_static("x-envoy-max-retries");
pub const RETRIABLE_STATUS_CODES: HeaderName =
    HeaderName::from_static("x-envoy-retriable-status-codes");
const RETRIABLE_HEADER_NAMES: HeaderName =
    HeaderName::from_static("x-envoy-retriable-header-names");
const HEDGE_ON_PER_TRY_TIMEOUT: HeaderName =
    HeaderName::from_static("x-envoy-hedge-on-per-try-timeout");

/// Builds [`Retry`] services for one route and cluster.
#[derive(Clone, Debug)]
pub struct RetryLayer {
    policy: Arc<RetryPolicy>,
    budget: Arc<RetryBudget>,
    max_replay_bytes: usize,
    seed: Option<u64>,
}

impl RetryLayer {
    /// Retries under the route's `policy`, within the cluster's `budget`.
    pub fn new(policy: Arc<RetryPolicy>, budget: Arc<RetryBudget>) -> Self {
        Self {
            policy,
            budget,
            max_replay_bytes: DEFAULT_MAX_BYTES,
            seed: None,
        }
    }

    /// How much of a request body is kept for replay (default 1 MiB, as Envoy); larger requests are sent once.
    pub fn max_replay_bytes(mut self, max: usize) -> Self {
        self.max_replay_bytes = max;
        self
    }

    /// Draws every request's back-off from an Rng seeded with `seed` (for deterministic tests).
    pub fn rng_seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }
}

impl RetryLayer {
    /// The service for `inner`, built from this layer alone: what [`Layer::layer`] makes, with
    /// the policy and budget moved in rather than their reference counts raised (and dropped
    /// with the layer) again. For a stack built per request.
    pub fn into_service<S>(self, inner: S) -> Retry<S> {
        let route_on = if self.policy.num_retries == 0 {
            On::NONE
        } else {
            On::from_policy(&self.policy.retry_on)
        };
        Retry {
            inner,
            policy: self.policy,
            budget: self.budget,
            route_on,
            max_replay_bytes: self.max_replay_bytes,
            seed: self.seed,
        }
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Retry<S> {
        self.clone().into_service(inner)
    }
}

/// Retries requests to `S`; see the module docs.
#[derive(Clone, Debug)]
pub struct Retry<S> {
    inner: S,
    policy: Arc<RetryPolicy>,
    budget: Arc<RetryBudget>,
    route_on: On,
    max_replay_bytes: usize,
    seed: Option<u64>,
}

/// The request's own additions to the route's retry policy.
#[derive(Default)]
struct Overrides {
    on: On,
    max_retries: Option<u32>,
    codes: Vec<u16>,
}

impl Overrides {
    /// Reads and removes every retry header, as Envoy's `RetryStateImpl::create` does.
    fn take(headers: &mut HeaderMap) -> Self {
        // Every retry header is an `x-envoy-` one.
        if !crate::has_envoy_headers(headers, None) {
            return Self::default();
        }
        // Values are read in place; nothing is allocated unless status codes are given.
        let mut on = On::NONE;
        if let Some(v) = text(&headers.remove(RETRY_ON)) {
            on = on | On::parse_http(v);
        }
        if let Some(v) = text(&headers.remove(RETRY_GRPC_ON)) {
            on = on | On::parse_grpc(v);
        }
        let max_retries = text(&headers.remove(MAX_RETRIES)).and_then(|v| v.parse().ok());
        let codes = text(&headers.remove(RETRIABLE_STATUS_CODES))
            .map(|v| v.split(',').filter_map(|c| c.trim().parse().ok()).collect())
            .unwrap_or_default();
        headers.remove(RETRIABLE_HEADER_NAMES);
        headers.remove(HEDGE_ON_PER_TRY_TIMEOUT);
        Self {
            on,
            max_retries,
            codes,
        }
    }
}

impl<S> Service<Request<Body>> for Retry<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError> + Clone,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = ResponseFuture<S, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let (mut parts, body) = req.into_parts();
        let overrides = Overrides::take(&mut parts.headers);
        let on = self.route_on | overrides.on;
        let info = RequestCtx::info(&parts.extensions).cloned();

        if on.is_empty() {
            // No retry state at all, as in Envoy: one attempt, no flags. The request itself is
            // the attempt: room, once, for what the layers below add to it.
            parts.headers.reserve(future::PER_ATTEMPT_HEADERS);
            parts
                .headers
                .insert(ATTEMPT_COUNT, sluice_core::decimal_value(1));
            if let Some(info) = &info {
                info.add_attempt();
            }
            let fut = self.inner.call(Request::from_parts(parts, body));
            return ResponseFuture::once(fut);
        }

        let retries = overrides
            .max_retries
            .unwrap_or(if self.policy.num_retries == 0 {
                1 // Envoy's default for a retry policy that comes only from request headers
            } else {
                self.policy.num_retries
            });
        // Buffer only when a retry can happen and there is a body to replay.
        let (first_body, replay) = if body.is_end_stream() {
            (body, Replay::Empty)
        } else if retries == 0 {
            (body, Replay::Never)
        } else {
            let first = ReplayBody::new(body, self.max_replay_bytes);
            let handle = first.clone();
            (Body::new(first), Replay::Body(handle))
        };
        if !self.policy.avoid_previous_hosts {
            RequestCtx::of_mut(&mut parts.extensions).any_host = true;
        }
        let rng = match self.seed {
            Some(seed) => fastrand::Rng::with_seed(seed),
            None => fastrand::Rng::new(),
        };
        // The first attempt goes out on the request's own header map; the loop keeps a copy for
        // the retries. A clone copies the entries and their index without hashing a name, where
        // building the first attempt's map from the kept one hashed every header again.
        let first_headers = std::mem::take(&mut parts.headers);
        parts.headers = first_headers.clone();
        // The same for its extensions, which nearly always hold only the request's context: then
        // the loop keeps a copy of the context (reference counts), not of the map and its boxes.
        let first_extensions = std::mem::take(&mut parts.extensions);
        let ctx = RequestCtx::of(&first_extensions).cloned();
        if ctx.is_none() || first_extensions.len() > 1 {
            parts.extensions = first_extensions.clone();
        }
        let mut attempts = Attempts {
            parts,
            ctx,
            replay,
            on,
            policy: self.policy.clone(),
            extra_codes: overrides.codes,
            remaining: retries,
            attempt: 0,
            budget: self.budget.clone(),
            permit: None,
            backoff: Backoff::from_policy(&self.policy),
            rng,
            info,
        };
        let req = attempts.first(first_body, first_headers, first_extensions);
        let fut = self.inner.call(req);
        ResponseFuture::retrying(fut, self.inner.clone(), attempts)
    }
}

/// A header's trimmed text, read in place.
fn text(value: &Option<HeaderValue>) -> Option<&str> {
    value.as_ref()?.to_str().ok().map(str::trim)
}

#[cfg(test)]
mod tests;
