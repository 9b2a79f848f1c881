//! The proxy in-process, one behaviour at a time, against real loopback upstreams.
