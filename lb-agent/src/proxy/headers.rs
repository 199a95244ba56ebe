//! Header rewriting between client and backend: hop-by-hop headers removed (RFC 9110 §7.6.1),
//! the X-Forwarded-* family and X-Real-IP added, cookies read.

use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use smallvec::SmallVec;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Headers that concern one connection only (RFC 9110 §7.6.1, and the legacy keep-alive ones).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TE
        || name == header::TRAILER
        || name == header::TRANSFER_ENCODING
        || name == header::PROXY_AUTHENTICATE
        || name == header::PROXY_AUTHORIZATION
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
}

/// Whether the request asks for a protocol upgrade to tunnel (WebSocket): `Connection:
/// upgrade` with an `Upgrade` header. Not `h2c`: an upgrade of this hop's connection to
/// HTTP/2 means nothing to the next one, and a backend accepting it would take the client's
/// later requests past the proxy's routing (h2c smuggling); the request goes on without it.
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    let mut upgrades = headers.get_all(header::UPGRADE).iter().peekable();
    // Almost every request: one lookup, and done.
    if upgrades.peek().is_none() {
        return false;
    }
    let h2c = upgrades.any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|p| p.trim_ascii().eq_ignore_ascii_case(b"h2c"))
    });
    !h2c && connection_has(headers, "upgrade")
}

/// Whether the Connection header lists `token` (ignoring case).
pub fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    connection_tokens(headers)
        .iter()
        .any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
}

/// What `Connection` lists: options (`close`, `keep-alive`, `upgrade`) and the names of
/// headers that concern this connection only. Split as bytes: this runs for every request
/// and response, and `to_str` and `str::split`'s searcher cost more than finding the one
/// short token there usually is (a token that is not ASCII matches no header name anyway).
fn connection_tokens(headers: &HeaderMap) -> SmallVec<[&[u8]; 4]> {
    let mut tokens = SmallVec::new();
    for v in headers.get_all(header::CONNECTION) {
        tokens.extend(
            v.as_bytes()
                .split(|&b| b == b',')
                .map(<[u8]>::trim_ascii)
                .filter(|t| !t.is_empty()),
        );
    }
    tokens
}

/// Whether header `name` stays on this hop: hop-by-hop by definition or `listed` by
/// `Connection`; `Upgrade` goes along only with an upgrade.
fn hop_only(name: &HeaderName, listed: &[&[u8]], upgrade: bool) -> bool {
    if *name == header::UPGRADE {
        return !upgrade;
    }
    is_hop_by_hop(name)
        || listed
            .iter()
            .any(|t| t.eq_ignore_ascii_case(name.as_str().as_bytes()))
}

/// Removes hop-by-hop headers, including those `Connection` names. With `upgrade`, the
/// `Upgrade` header and `Connection: upgrade` are kept (they must reach the other side).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // One pass over the names present (usually none or `connection`), rather than a hashed
    // removal per hop-by-hop name on every message.
    let remove: SmallVec<[HeaderName; 4]> = {
        let listed = connection_tokens(headers);
        headers
            .keys()
            .filter(|n| hop_only(n, &listed, upgrade))
            .cloned()
            .collect()
    };
    for name in remove {
        headers.remove(name);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// What this hop tells a backend about the request it passes on.
#[derive(Debug)]
pub struct Forwarded<'a> {
    /// The client's IP address: X-Real-IP, and the last X-Forwarded-For entry.
    pub client: &'a HeaderValue,
    /// X-Forwarded-Proto: the scheme the client used.
    pub scheme: &'static str,
    /// X-Forwarded-Port: the listener's port.
    pub port: u16,
    /// The request upgrades (WebSocket): `Upgrade` and `Connection: upgrade` go along.
    pub upgrade: bool,
    /// The Host to send instead of the request's (the target's authority).
    pub host: Option<HeaderValue>,
    /// Send the Cookie headers as one, `; `-separated (HTTP/2 splits them; RFC 9113 §8.2.3).
    pub join_cookies: bool,
}

impl Forwarded<'_> {
    /// Appends the request's header lines as the backend gets them: hop-by-hop headers
    /// dropped (see [`strip_hop_by_hop`]); X-Forwarded-For with the client appended (so its
    /// first entry stays the original client); X-Forwarded-Proto, X-Forwarded-Port and
    /// X-Real-IP describing this hop, replacing the client's. Written as the head is
    /// serialized rather than by editing the map: inserting into it (and growing it past
    /// the client's few headers) cost more than writing the whole head.
    pub fn write_lines(&self, headers: &HeaderMap, out: &mut Vec<u8>) {
        let line = |out: &mut Vec<u8>, name: &[u8], value: &[u8]| {
            out.extend_from_slice(name);
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        };
        let listed = connection_tokens(headers);
        for (name, value) in headers {
            let replaced = *name == X_FORWARDED_FOR
                || *name == X_FORWARDED_PROTO
                || *name == X_FORWARDED_PORT
                || *name == X_REAL_IP
                || (self.host.is_some() && name == header::HOST)
                || (self.join_cookies && name == header::COOKIE);
            if !replaced && !hop_only(name, &listed, self.upgrade) {
                line(out, name.as_str().as_bytes(), value.as_bytes());
            }
        }
        if self.upgrade {
            line(out, b"connection", b"upgrade");
        }
        if let Some(host) = &self.host {
            line(out, b"host", host.as_bytes());
        }
        if self.join_cookies && headers.contains_key(header::COOKIE) {
            out.extend_from_slice(b"cookie: ");
            for (i, v) in headers.get_all(header::COOKIE).iter().enumerate() {
                if i > 0 {
                    out.extend_from_slice(b"; ");
                }
                out.extend_from_slice(v.as_bytes());
            }
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"x-forwarded-for: ");
        for prior in headers.get_all(&X_FORWARDED_FOR) {
            out.extend_from_slice(prior.as_bytes());
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(self.client.as_bytes());
        out.extend_from_slice(b"\r\n");
        line(out, b"x-forwarded-proto", self.scheme.as_bytes());
        line(
            out,
            b"x-forwarded-port",
            itoa::Buffer::new().format(self.port).as_bytes(),
        );
        line(out, b"x-real-ip", self.client.as_bytes());
    }
}

/// The value of cookie `name` in the request's Cookie headers.
pub fn request_cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"'))
}

/// The value the response sets for cookie `name`, if it does.
pub fn response_cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.split(';').next()?.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"'))
}

/// A Transfer-Encoding the proxy cannot pass on: anything but chunked and identity (→ 501).
pub fn unsupported_transfer_encoding(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|c| c.trim().to_ascii_lowercase())
        .find(|c| c != "chunked" && c != "identity")
}

/// An HTTP/2 request's header list size as SETTINGS_MAX_HEADER_LIST_SIZE counts it: each
/// field's name and value plus 32, pseudo-headers included (RFC 9113 §6.5.2).
pub fn list_size<B>(req: &hyper::Request<B>) -> usize {
    let field = |name: usize, value: usize| name + value + 32;
    let uri = req.uri();
    let pseudo = field(":method".len(), req.method().as_str().len())
        + field(":scheme".len(), uri.scheme_str().map_or(0, str::len))
        + field(
            ":authority".len(),
            uri.authority().map_or(0, |a| a.as_str().len()),
        )
        + field(
            ":path".len(),
            uri.path_and_query().map_or(1, |p| p.as_str().len()),
        );
    req.headers()
        .iter()
        .map(|(n, v)| field(n.as_str().len(), v.len()))
        .sum::<usize>()
        + pseudo
}

/// Whether `host` is a valid Host value (RFC 9110 §7.2): a registered name (no empty label)
/// or an IP literal, with an optional numeric port; no user info, path or spaces.
pub fn valid_host(host: &str) -> bool {
    let name = without_port(host);
    let port_ok = host[name.len()..]
        .strip_prefix(':')
        .map_or(name.len() == host.len(), |p| {
            p.bytes().all(|b| b.is_ascii_digit())
        });
    let name_ok = match name.strip_prefix('[') {
        Some(literal) => literal
            .strip_suffix(']')
            .is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok()),
        // One pass (this runs for every request): allowed characters, no empty label.
        None => {
            let mut prev = b'.';
            name.bytes().all(|b| {
                let ok = REG_NAME[b as usize] && !(b == b'.' && prev == b'.');
                prev = b;
                ok
            }) && !name.is_empty()
        }
    };
    port_ok && name_ok
}

/// The characters of a registered name (RFC 3986 §3.2.2: unreserved, percent-encoded,
/// sub-delims), as a table.
static REG_NAME: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        t[i] = b.is_ascii_alphanumeric();
        i += 1;
    }
    let extra = b"-._~%!$&'()*+,;=";
    let mut j = 0;
    while j < extra.len() {
        t[extra[j] as usize] = true;
        j += 1;
    }
    t
};

/// A Host value without its port: `example.com:8080` → `example.com`, `[2001:db8::1]:443` →
/// `[2001:db8::1]` (an IPv6 literal keeps its brackets and colons).
pub fn without_port(host: &str) -> &str {
    // Byte searches: `str::find`'s searcher costs more than these short values (every
    // request asks).
    let b = host.as_bytes();
    let end = match b.first() {
        Some(b'[') => b.iter().position(|&c| c == b']').map_or(b.len(), |i| i + 1),
        _ => b.iter().position(|&c| c == b':').unwrap_or(b.len()),
    };
    &host[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_removed() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("x-kept", "1"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
    }

    #[test]
    fn an_upgrade_keeps_upgrade_and_connection_upgrade() {
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(wants_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        // h2c is this hop's business: the request goes on without Upgrade and its settings.
        let h = map(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAAQCAAAAAAIAAAAA"),
        ]);
        assert!(!wants_upgrade(&h));
        let sent = lines(&h, &forwarded(false, None));
        assert!(sent[0].starts_with("x-forwarded-for: "), "{sent:?}");
    }

    /// The header lines `fwd` writes for `h`.
    fn lines(h: &HeaderMap, fwd: &Forwarded) -> Vec<String> {
        let mut out = Vec::new();
        fwd.write_lines(h, &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.ends_with("\r\n"));
        text.split_terminator("\r\n").map(str::to_string).collect()
    }

    static CLIENT: HeaderValue = HeaderValue::from_static("10.0.0.7");

    fn forwarded(upgrade: bool, host: Option<&'static str>) -> Forwarded<'static> {
        Forwarded {
            client: &CLIENT,
            scheme: "https",
            port: 443,
            upgrade,
            host: host.map(HeaderValue::from_static),
            join_cookies: false,
        }
    }

    #[test]
    fn the_targets_authority_replaces_the_host_header_and_http2_cookies_go_as_one() {
        let h = map(&[
            ("host", "other.example"),
            ("cookie", "a=1"),
            ("accept", "*/*"),
            ("cookie", "SERVERID=b2"),
        ]);
        let fwd = Forwarded {
            join_cookies: true,
            ..forwarded(false, Some("api.example.com"))
        };
        assert_eq!(
            &lines(&h, &fwd)[..3],
            [
                "accept: */*",
                "host: api.example.com",
                "cookie: a=1; SERVERID=b2"
            ]
        );
        // HTTP/1 cookies pass as they came.
        let sent = lines(&h, &forwarded(false, None));
        assert_eq!(
            &sent[..4],
            [
                "host: other.example",
                "cookie: a=1",
                "cookie: SERVERID=b2",
                "accept: */*"
            ]
        );
    }

    #[test]
    fn hosts_are_names_or_ip_literals_with_an_optional_port() {
        for ok in [
            "example.com",
            "Example.COM:8080",
            "a-b.example.com.",
            "10.0.0.1:80",
            "[2001:db8::1]",
            "[2001:db8::1]:443",
            "localhost:",
        ] {
            assert!(valid_host(ok), "{ok}");
        }
        for bad in [
            "",
            ":80",
            "a b",
            "a/b",
            "user@example.com",
            "evil\"><x",
            "a..b",
            ".example.com",
            "example.com:8o",
            "example.com:80:80",
            "[2001:db8::1",
            "[zz::1]",
            "[2001:db8::1]x",
        ] {
            assert!(!valid_host(bad), "{bad}");
        }
    }

    #[test]
    fn forwarded_for_appends_and_the_rest_is_replaced() {
        let h = map(&[
            ("host", "example.com"),
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "2.2.2.2"),
            ("x-real-ip", "9.9.9.9"),
            ("x-forwarded-proto", "gopher"),
            ("x-forwarded-port", "1"),
            ("accept", "*/*"),
        ]);
        assert_eq!(
            lines(&h, &forwarded(false, None)),
            [
                "host: example.com",
                "accept: */*",
                "x-forwarded-for: 1.1.1.1, 2.2.2.2, 10.0.0.7",
                "x-forwarded-proto: https",
                "x-forwarded-port: 443",
                "x-real-ip: 10.0.0.7",
            ]
        );
    }

    #[test]
    fn requests_pass_on_without_hop_by_hop_headers() {
        let h = map(&[
            ("connection", "keep-alive, X-Secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-kept", "1"),
        ]);
        let sent = lines(&h, &forwarded(false, Some("h2.example")));
        assert_eq!(&sent[..2], ["x-kept: 1", "host: h2.example"]);
        // An upgrade keeps Upgrade and says so in Connection, and nothing else it lists.
        let h = map(&[
            ("connection", "Upgrade, x-secret"),
            ("upgrade", "websocket"),
            ("x-secret", "1"),
        ]);
        let sent = lines(&h, &forwarded(true, None));
        assert_eq!(&sent[..2], ["upgrade: websocket", "connection: upgrade"]);
        assert!(sent[2].starts_with("x-forwarded-for: "));
    }

    #[test]
    fn cookies_are_found_by_name() {
        let h = map(&[("cookie", "a=1; SERVERID=abc; b=2")]);
        assert_eq!(request_cookie(&h, "SERVERID"), Some("abc"));
        assert_eq!(request_cookie(&h, "SERVER"), None);
        let h = map(&[("set-cookie", "sid=xyz; Path=/; HttpOnly")]);
        assert_eq!(response_cookie(&h, "sid"), Some("xyz"));
    }

    #[test]
    fn only_chunked_and_identity_transfer_codings_pass() {
        assert_eq!(
            unsupported_transfer_encoding(&map(&[("transfer-encoding", "chunked")])),
            None
        );
        assert_eq!(
            unsupported_transfer_encoding(&map(&[("transfer-encoding", "gzip, chunked")])),
            Some("gzip".into())
        );
    }

    #[test]
    fn host_without_port() {
        for (host, name) in [
            ("example.com", "example.com"),
            ("example.com:8080", "example.com"),
            ("10.0.0.1:80", "10.0.0.1"),
            ("[2001:db8::1]:443", "[2001:db8::1]"),
            ("[2001:db8::1]", "[2001:db8::1]"),
            ("[broken", "[broken"),
            ("", ""),
        ] {
            assert_eq!(without_port(host), name, "{host}");
        }
    }
}
