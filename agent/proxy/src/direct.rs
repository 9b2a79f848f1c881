//! Answers the proxy gives by itself on a route: `directResponse` (the status, headers and body are
//! built once per configuration generation, so a request only clones them) and the route's
//! `headers.response` operations, which also apply to upstream responses.
//!
//! As in Envoy, a direct response is a local reply of the router: nothing is retried or timed out,
//! no upstream is involved; the response code details are `direct_response`. (Istio refuses a
//! `fault` on such a route, so none runs before it.) A 201 or 3xx direct response carries
//! `Location` with the request's URL, as Envoy's router adds it.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use sluice_core::Body;
use sluice_policy::{DirectResponse, HeaderOperations};

/// Response details Envoy logs for a direct response.
pub(crate) const DIRECT_RESPONSE_DETAILS: &str = "direct_response";

/// `headers.response`, as header names and values ready to apply.
#[derive(Debug)]
pub(crate) struct ResponseHeaders {
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

impl ResponseHeaders {
    pub(crate) fn compile(ops: &HeaderOperations) -> Self {
        fn pair((name, value): &(String, String)) -> Option<(HeaderName, HeaderValue)> {
            let parsed = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_bytes(value.as_bytes()),
            );
            match parsed {
                (Ok(name), Ok(value)) => Some((name, value)),
                _ => {
                    // The configuration layer has checked both; this is a guard, not a path.
                    tracing::warn!(%name, %value, "header operation skipped: not a valid header");
                    None
                }
            }
        }
        Self {
            set: ops.set.iter().filter_map(pair).collect(),
            add: ops.add.iter().filter_map(pair).collect(),
            remove: ops
                .remove
                .iter()
                .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
                .collect(),
        }
    }

    /// Envoy's order: removals, then `set` (replacing), then `add` (appending).
    pub(crate) fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }
}

/// A route's `directResponse`, ready to send.
#[derive(Debug)]
pub(crate) struct DirectReply {
    status: StatusCode,
    /// `content-type: text/plain` (with a body) and `content-length`, then `headers.response`.
    headers: HeaderMap,
    body: Bytes,
    /// 201 or 3xx: Envoy adds `Location`.
    pub(crate) wants_location: bool,
}

impl DirectReply {
    pub(crate) fn new(spec: &DirectResponse, ops: Option<&ResponseHeaders>) -> Self {
        let status = StatusCode::from_u16(spec.status).unwrap_or(StatusCode::OK);
        let mut headers = HeaderMap::new();
        if !spec.body.is_empty() {
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        }
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(spec.body.len()));
        if let Some(ops) = ops {
            ops.apply(&mut headers);
        }
        Self {
            wants_location: status == StatusCode::CREATED || status.is_redirection(),
            status,
            headers,
            body: spec.body.clone(),
        }
    }

    /// The response; `location` only when [`Self::wants_location`].
    pub(crate) fn respond(&self, location: Option<&HeaderValue>) -> Response<Body> {
        let mut rsp = Response::new(sluice_core::full(self.body.clone()));
        *rsp.status_mut() = self.status;
        *rsp.headers_mut() = self.headers.clone();
        if let Some(location) = location {
            rsp.headers_mut().insert(header::LOCATION, location.clone());
        }
        rsp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops() -> HeaderOperations {
        HeaderOperations {
            set: vec![("content-type".into(), "application/json".into())],
            add: vec![("x-served-by".into(), "sluice".into())],
            remove: vec!["content-length".into()],
        }
    }

    #[test]
    fn headers_are_built_once_then_cloned() {
        let spec = DirectResponse {
            status: 200,
            body: Bytes::from_static(b"ok"),
        };
        let reply = DirectReply::new(&spec, None);
        let rsp = reply.respond(None);
        assert_eq!(rsp.status(), StatusCode::OK);
        assert_eq!(rsp.headers()[header::CONTENT_TYPE], "text/plain");
        assert_eq!(rsp.headers()[header::CONTENT_LENGTH], "2");
        assert!(!reply.wants_location);

        // Removals first, then set, then add.
        let reply = DirectReply::new(&spec, Some(&ResponseHeaders::compile(&ops())));
        let h = reply.respond(None).headers().clone();
        assert_eq!(h[header::CONTENT_TYPE], "application/json");
        assert_eq!(h["x-served-by"], "sluice");
        assert!(!h.contains_key(header::CONTENT_LENGTH));
    }

    #[test]
    fn empty_body_has_no_content_type_and_redirects_want_a_location() {
        let spec = DirectResponse {
            status: 301,
            body: Bytes::new(),
        };
        let reply = DirectReply::new(&spec, None);
        assert!(reply.wants_location);
        let loc = HeaderValue::from_static("http://web/old");
        let rsp = reply.respond(Some(&loc));
        assert_eq!(rsp.status(), StatusCode::MOVED_PERMANENTLY);
        assert!(!rsp.headers().contains_key(header::CONTENT_TYPE));
        assert_eq!(rsp.headers()[header::CONTENT_LENGTH], "0");
        assert_eq!(rsp.headers()[header::LOCATION], "http://web/old");
    }
}
