//! Header rewriting between client and backend: hop-by-hop headers removed (RFC 9110 §7.6.1),
//! the X-Forwarded-* family and X-Real-IP added, cookies read.

use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};

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

/// Whether the request asks for a protocol upgrade (WebSocket): `Connection: upgrade` with an
/// `Upgrade` header.
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE) && connection_has(headers, "upgrade")
}

/// Whether the Connection header lists `token` (ignoring case).
pub fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Removes hop-by-hop headers, including those `Connection` names. With `upgrade`, the
/// `Upgrade` header and `Connection: upgrade` are kept (they must reach the other side).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // One pass over the names present (usually none or `connection`), rather than a hashed
    // removal per hop-by-hop name on every message.
    let mut remove: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_hop_by_hop(n) || (!upgrade && *n == header::UPGRADE))
        .cloned()
        .collect();
    remove.extend(
        headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            // `Connection: upgrade` names the Upgrade header, which an upgrade must keep.
            .filter(|n| !(upgrade && n == header::UPGRADE)),
    );
    for name in remove {
        headers.remove(name);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// X-Forwarded-For gets the client appended (so its first entry stays the original client);
/// X-Forwarded-Proto, X-Forwarded-Port and X-Real-IP describe this hop and are replaced.
pub fn add_forwarded(
    headers: &mut HeaderMap,
    client: HeaderValue,
    scheme: &'static str,
    port: u16,
) {
    let prior: Vec<&str> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let xff = if prior.is_empty() {
        Ok(client.clone())
    } else {
        let client = client.to_str().unwrap_or_default();
        HeaderValue::from_str(&format!("{}, {client}", prior.join(", ")))
    };
    if let Ok(v) = xff {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(scheme));
    headers.insert(X_FORWARDED_PORT.clone(), HeaderValue::from(port));
    headers.insert(X_REAL_IP.clone(), client);
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

/// A Host value without its port: `example.com:8080` → `example.com`, `[2001:db8::1]:443` →
/// `[2001:db8::1]` (an IPv6 literal keeps its brackets and colons).
pub fn without_port(host: &str) -> &str {
    let end = match host.strip_prefix('[') {
        Some(rest) => rest.find(']').map_or(host.len(), |i| i + 2),
        None => host.find(':').unwrap_or(host.len()),
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
    }

    #[test]
    fn forwarded_for_appends_and_the_rest_is_replaced() {
        let mut h = map(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "2.2.2.2"),
            ("x-real-ip", "9.9.9.9"),
            ("x-forwarded-proto", "gopher"),
        ]);
        add_forwarded(&mut h, HeaderValue::from_static("10.0.0.7"), "https", 443);
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 10.0.0.7");
        assert_eq!(h["x-real-ip"], "10.0.0.7");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-port"], "443");
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
