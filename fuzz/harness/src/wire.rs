//! What a client may receive from the proxy: a sequence of HTTP/1.x responses, or HTTP/2 frames
//! beginning with the server's SETTINGS, or nothing. The stream may end anywhere (a connection
//! closed or reset mid-response is how HTTP/1 reports a failure, and a reset can discard what the
//! client had not read yet), so what is checked is that every byte received belongs to a valid
//! stream: [`check`] accepts any prefix of one.

use std::collections::HashMap;

/// Checks the bytes a client received on one connection.
pub fn check(out: &[u8]) -> Result<(), String> {
    if out.is_empty() {
        return Ok(());
    }
    if is_prefix_of(out, b"HTTP/1.") || out.starts_with(b"HTTP/1.") {
        return Http1::default().from(out, 0);
    }
    http2(out)
}

fn is_prefix_of(short: &[u8], long: &[u8]) -> bool {
    short.len() < long.len() && long.starts_with(short)
}

/// A sequence of HTTP/1.x responses. A response to `HEAD` carries a `Content-Length` but no body,
/// and the client's requests are not known here, so both readings are tried (memoised by offset:
/// linear in the length).
#[derive(Default)]
struct Http1 {
    memo: HashMap<usize, Result<(), String>>,
}

impl Http1 {
    fn from(&mut self, out: &[u8], at: usize) -> Result<(), String> {
        if at == out.len() {
            return Ok(());
        }
        if let Some(r) = self.memo.get(&at) {
            return r.clone();
        }
        let r = self.response(out, at);
        self.memo.insert(at, r.clone());
        r
    }

    fn response(&mut self, out: &[u8], at: usize) -> Result<(), String> {
        let rest = &out[at..];
        if is_prefix_of(rest, b"HTTP/1.") {
            return Ok(());
        }
        let mut headers = [httparse::EMPTY_HEADER; 128];
        let mut rsp = httparse::Response::new(&mut headers);
        let head = match rsp.parse(rest) {
            Ok(httparse::Status::Complete(n)) => n,
            // A head cut short: what there is parsed so far.
            Ok(httparse::Status::Partial) => return Ok(()),
            Err(e) => {
                return Err(format!(
                    "byte {at}: not an HTTP/1 response head ({e}): {:?}",
                    String::from_utf8_lossy(&rest[..rest.len().min(120)])
                ))
            }
        };
        let code = rsp.code.unwrap_or(0);
        if !(100..=599).contains(&code) {
            return Err(format!("byte {at}: status {code}"));
        }
        let body_at = at + head;
        if code == 101 {
            // Switched protocols: the rest is the new protocol's.
            return Ok(());
        }
        if (100..200).contains(&code) || code == 204 || code == 304 {
            return self.from(out, body_at);
        }
        let mut lengths = Vec::new();
        let mut chunked = false;
        for h in rsp.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                let v = std::str::from_utf8(h.value).unwrap_or("");
                match v.trim().parse::<u64>() {
                    Ok(n) => lengths.push(n),
                    Err(_) => return Err(format!("byte {at}: content-length {v:?}")),
                }
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                let v = String::from_utf8_lossy(h.value).to_ascii_lowercase();
                chunked = v
                    .rsplit(',')
                    .next()
                    .is_some_and(|last| last.trim() == "chunked");
                if !chunked {
                    return Err(format!("byte {at}: transfer-encoding {v:?} is not chunked"));
                }
            }
        }
        if chunked && !lengths.is_empty() {
            return Err(format!(
                "byte {at}: both transfer-encoding and content-length"
            ));
        }
        if lengths.windows(2).any(|w| w[0] != w[1]) {
            return Err(format!("byte {at}: content-lengths differ: {lengths:?}"));
        }
        if chunked {
            return match chunks(out, body_at)? {
                Some(next) => self.from(out, next),
                None => Ok(()),
            };
        }
        match lengths.first() {
            // Delimited by the close: everything after the head is the body.
            None => Ok(()),
            Some(&0) => self.from(out, body_at),
            Some(&n) => {
                let end = usize::try_from(n)
                    .ok()
                    .and_then(|n| body_at.checked_add(n))
                    .unwrap_or(usize::MAX);
                if end >= out.len() {
                    // The body ran to the end of what arrived (or was cut short), or this is a
                    // HEAD response followed by more responses.
                    return if end == out.len() {
                        Ok(())
                    } else {
                        self.from(out, body_at).or(Ok(()))
                    };
                }
                self.from(out, end)
                    .or_else(|with_body| self.from(out, body_at).map_err(|_| with_body))
            }
        }
    }
}

/// A chunked body from `at`: the offset after its trailer, or `None` when it is cut short.
fn chunks(out: &[u8], mut at: usize) -> Result<Option<usize>, String> {
    loop {
        let Some(eol) = find_crlf(out, at) else {
            return Ok(None);
        };
        let line = &out[at..eol];
        let size = line.split(|&b| b == b';').next().unwrap_or(&[]);
        let size = std::str::from_utf8(size)
            .ok()
            .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
            .ok_or_else(|| format!("byte {at}: chunk size {:?}", String::from_utf8_lossy(line)))?;
        at = eol + 2;
        if size == 0 {
            // Trailer fields, then an empty line.
            loop {
                let Some(eol) = find_crlf(out, at) else {
                    return Ok(None);
                };
                let empty = eol == at;
                at = eol + 2;
                if empty {
                    return Ok(Some(at));
                }
            }
        }
        let Some(end) = at.checked_add(size) else {
            return Err(format!("byte {at}: chunk size overflows"));
        };
        if end + 2 > out.len() {
            return Ok(None);
        }
        if &out[end..end + 2] != b"\r\n" {
            return Err(format!("byte {end}: chunk not followed by CRLF"));
        }
        at = end + 2;
    }
}

fn find_crlf(out: &[u8], from: usize) -> Option<usize> {
    out.get(from..)?
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|i| from + i)
}

/// Frames of an HTTP/2 server: SETTINGS first, each frame's size and stream as its type requires
/// (RFC 9113 section 6). The header block's HPACK is not decoded.
fn http2(out: &[u8]) -> Result<(), String> {
    let mut at = 0;
    let mut first = true;
    while at + 9 <= out.len() {
        let h = &out[at..at + 9];
        let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
        let (kind, flags) = (h[3], h[4]);
        let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
        let bad = |why: &str| {
            Err(format!(
                "byte {at}: HTTP/2 frame type {kind} flags {flags:#x} stream {stream} length {len}: {why}"
            ))
        };
        if first && (kind != 4 || flags & 1 != 0) {
            return bad("the server's first frame is not its SETTINGS");
        }
        first = false;
        match kind {
            // DATA, HEADERS: a response stream, one the client opened (odd: push is off).
            0 | 1 if stream == 0 || stream.is_multiple_of(2) => return bad("not a client stream"),
            2 if len != 5 => return bad("PRIORITY is 5 bytes"),
            3 if len != 4 || stream == 0 => return bad("RST_STREAM is 4 bytes on a stream"),
            4 if stream != 0 || !len.is_multiple_of(6) => {
                return bad("SETTINGS on stream 0, 6 bytes each")
            }
            4 if flags & 1 != 0 && len != 0 => return bad("a SETTINGS ACK is empty"),
            5 => return bad("PUSH_PROMISE while push is disabled"),
            6 if stream != 0 || len != 8 => return bad("PING is 8 bytes on stream 0"),
            7 if stream != 0 || len < 8 => return bad("GOAWAY is at least 8 bytes on stream 0"),
            8 if len != 4 => return bad("WINDOW_UPDATE is 4 bytes"),
            9 if stream == 0 => return bad("CONTINUATION on stream 0"),
            _ => {}
        }
        at += 9 + len;
    }
    // Less than one frame: it must be able to become the server's SETTINGS.
    let settings_so_far =
        out.get(3).is_none_or(|&t| t == 4) && out.get(4).is_none_or(|&f| f & 1 == 0);
    if first && !settings_so_far {
        return Err(format!(
            "neither HTTP/1 nor HTTP/2: {:?}",
            String::from_utf8_lossy(&out[..out.len().min(120)])
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check;

    #[test]
    fn valid_streams_and_their_prefixes_pass() {
        let streams: &[&[u8]] = &[
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nx-t: 1\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
            // A HEAD response (length, no body) then another response.
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nHTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.0 200 OK\r\n\r\nbody until the close",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            // SETTINGS (one setting), SETTINGS ACK, GOAWAY.
            &[
                0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100, 0, 0, 0, 4, 1, 0, 0, 0, 0, 0, 0, 8,
                7, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1,
            ],
        ];
        for s in streams {
            for end in 0..=s.len() {
                assert_eq!(
                    check(&s[..end]),
                    Ok(()),
                    "{:?}",
                    String::from_utf8_lossy(&s[..end])
                );
            }
        }
    }

    #[test]
    fn what_no_server_may_send_fails() {
        let bad: &[&[u8]] = &[
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokgarbage after the response\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
            b"HTTP/1.1 999 Nine\r\n\r\n",
            b"hello",
            // SETTINGS then HEADERS on stream 0; DATA first; SETTINGS then DATA on stream 2.
            &[0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 1, 4, 0, 0, 0, 0],
            &[0, 0, 0, 0, 0, 0, 0, 0, 1],
            &[0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
        ];
        for s in bad {
            assert!(check(s).is_err(), "{:?}", String::from_utf8_lossy(s));
        }
    }
}
