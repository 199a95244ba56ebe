//! The proxy's own responses: short error pages that say the code, and redirects.

use bytes::Bytes;
use hyper::{header, Response, StatusCode};

/// `<code> <reason>` as a tiny HTML page, the way nginx/Tengine answer.
pub fn page(status: StatusCode) -> Response<Bytes> {
    let title = format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    let body = format!(
        "<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n<center><h1>{title}</h1></center>\r\n</body>\r\n</html>\r\n"
    );
    let mut res = Response::new(Bytes::from(body));
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
