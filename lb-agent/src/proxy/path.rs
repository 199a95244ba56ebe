//! The request path routes match against, normalized as nginx does before it matches
//! locations: unreserved characters percent-decoded (RFC 3986 §6.2.2.2), `.` and `..`
//! segments resolved (§5.2.4) and repeated slashes merged. Without it `/./v1`, `/a/../v1` or
//! `/%76%31` would miss a `/v1` route. The backend still gets the path the client sent.

use std::borrow::Cow;

/// `path` normalized; borrowed when it already is (almost every request).
pub fn normalized(path: &str) -> Cow<'_, str> {
    // One pass (this runs for every request): an escape, or a slash before a dot or a slash.
    let b = path.as_bytes();
    let plain = (0..b.len())
        .all(|i| b[i] != b'%' && !(b[i] == b'/' && matches!(b.get(i + 1), Some(b'.' | b'/'))));
    if plain {
        return Cow::Borrowed(path);
    }
    let decoded = decode_unreserved(path);
    let mut segments: Vec<&str> = Vec::new();
    // Whether the path ends in a directory (a slash, `.` or `..`).
    let mut dir = false;
    for seg in decoded.split('/') {
        dir = matches!(seg, "" | "." | "..");
        match seg {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if dir || out.is_empty() {
        out.push('/');
    }
    Cow::Owned(out)
}

/// `%XX` escapes of unreserved characters (letters, digits, `-._~`) decoded; every other
/// escape (`%2F` among them) left as it is, since decoding it would change what the path
/// means.
fn decode_unreserved(path: &str) -> String {
    let b = path.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let escaped = (b[i] == b'%')
            .then(|| b.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok())
            .filter(|c| c.is_ascii_alphanumeric() || b"-._~".contains(c));
        match escaped {
            Some(c) => {
                out.push(c);
                i += 3;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    // Only ASCII replaced ASCII escapes: still UTF-8.
    String::from_utf8(out).unwrap_or_else(|_| path.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalized_as_nginx_matches_them() {
        for (path, want) in [
            ("/v1/users", "/v1/users"),
            ("/", "/"),
            ("/./v1/x", "/v1/x"),
            ("/a/../v1/x", "/v1/x"),
            ("/%76%31/x", "/v1/x"),
            ("/%7e%2Fx", "/~%2Fx"),
            ("//v1///x", "/v1/x"),
            ("/v1/x/..", "/v1/"),
            ("/v1/.", "/v1/"),
            ("/../../v1", "/v1"),
            ("/..", "/"),
            ("/v1/", "/v1/"),
            ("/%zz/%4", "/%zz/%4"),
        ] {
            assert_eq!(normalized(path), want, "{path}");
        }
        assert!(matches!(normalized("/v1/users"), Cow::Borrowed(_)));
    }
}
