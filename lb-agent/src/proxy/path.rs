//! The request path routes match against, normalized as nginx does before it matches
//! locations: unreserved characters percent-decoded (RFC 3986 §6.2.2.2), the other escapes'
//! hex digits in upper case (§6.2.2.1), `.` and `..` segments resolved (§5.2.4) and repeated
//! slashes merged. Without it `/./v1`, `/a/../v1`, `/%76%31` or `/a%2fb` would miss a route
//! written `/v1` or `/a%2Fb`. A `%` without two hex digits makes the path invalid (nginx
//! answers 400). The backend still gets the path the client sent.

use std::borrow::Cow;

/// `path` normalized; borrowed when it already is (almost every request). `None`: a `%` not
/// followed by two hex digits.
pub fn normalized(path: &str) -> Option<Cow<'_, str>> {
    // One pass (this runs for every request): an escape, or a slash before a dot or a slash.
    let b = path.as_bytes();
    let plain = (0..b.len())
        .all(|i| b[i] != b'%' && !(b[i] == b'/' && matches!(b.get(i + 1), Some(b'.' | b'/'))));
    if plain {
        return Some(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path)?;
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
    Some(Cow::Owned(out))
}

/// `%XX` escapes of unreserved characters (letters, digits, `-._~`) decoded; every other
/// escape (`%2F` among them) kept, since decoding it would change what the path means, with
/// its hex digits in upper case. `None` at a `%` without two hex digits.
fn decode_unreserved(path: &str) -> Option<String> {
    let b = path.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'%' {
            out.push(b[i]);
            i += 1;
            continue;
        }
        let hex = b
            .get(i + 1..i + 3)
            .filter(|h| h.iter().all(u8::is_ascii_hexdigit))?;
        let c = u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
        if c.is_ascii_alphanumeric() || b"-._~".contains(&c) {
            out.push(c);
        } else {
            out.push(b'%');
            out.extend(hex.iter().map(u8::to_ascii_uppercase));
        }
        i += 3;
    }
    // Only ASCII replaced ASCII escapes: still UTF-8.
    String::from_utf8(out).ok()
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
            ("/a%2fb", "/a%2Fb"),
            ("//v1///x", "/v1/x"),
            ("/v1/x/..", "/v1/"),
            ("/v1/.", "/v1/"),
            ("/../../v1", "/v1"),
            ("/..", "/"),
            ("/v1/", "/v1/"),
        ] {
            assert_eq!(normalized(path).as_deref(), Some(want), "{path}");
        }
        assert!(matches!(normalized("/v1/users"), Some(Cow::Borrowed(_))));
        for invalid in ["/%zz", "/a/%4", "/%", "/%4g"] {
            assert_eq!(normalized(invalid), None, "{invalid}");
        }
    }
}
