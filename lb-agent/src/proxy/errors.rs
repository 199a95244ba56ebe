//! The proxy's own responses: short error pages that say the code, and redirects.

use bytes::Bytes;
use hyper::{header, Response, StatusCode};

/// `<code> <reason>`.
fn title(status: StatusCode) -> String {
    format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    )
}

/// `<code> <reason>` as a tiny HTML page, the way nginx/Tengine answer.
pub fn body(status: StatusCode) -> String {
    let title = title(status);
    format!(
        "<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n<center><h1>{title}</h1></center>\r\n</body>\r\n</html>\r\n"
    )
}

/// The page as a whole HTTP/1.1 answer that closes the connection (written in place of
/// hyper's own, `own_answers`).
pub fn page_bytes(status: StatusCode) -> Vec<u8> {
    let body = body(status);
    format!(
        "HTTP/1.1 {}\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        title(status),
        body.len()
    )
    .into_bytes()
}

/// The page as a response.
pub fn page(status: StatusCode) -> Response<Bytes> {
    let mut res = Response::new(Bytes::from(body(status)));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/html"),
    );
    // After a broken request the connection's state is unknown (an unread body, a stalled
    // client): close it, as nginx does.
    if matches!(
        status,
        StatusCode::BAD_REQUEST
            | StatusCode::REQUEST_TIMEOUT
            | StatusCode::PAYLOAD_TOO_LARGE
            | StatusCode::URI_TOO_LONG
            | StatusCode::NOT_IMPLEMENTED
    ) {
        res.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
    }
    res
}

/// A redirect to `location` with a short page.
pub fn redirect(status: StatusCode, location: &str) -> Response<Bytes> {
    let mut res = page(status);
    if let Ok(v) = header::HeaderValue::from_str(location) {
        res.headers_mut().insert(header::LOCATION, v);
    }
    res
}
