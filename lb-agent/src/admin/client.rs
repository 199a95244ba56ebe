//! A client of the admin API: what `lb-agent status | stats | diagnose` use (and the tests).

use std::{io, net::SocketAddr, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{header, Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::status::Status;

/// For the connection and the whole exchange: the API answers from memory.
const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the admin API at {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("admin API at {addr}: {source}")]
    Http {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("admin API at {addr}: no answer within {TIMEOUT:?}")]
    Timeout { addr: SocketAddr },
    #[error("admin API at {addr}: {path}: {code}: {message}")]
    Refused {
        addr: SocketAddr,
        path: String,
        code: StatusCode,
        message: String,
    },
    #[error("admin API at {addr}: {path}: unexpected answer: {source}")]
    Decode {
        addr: SocketAddr,
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

/// One request; the answer's status and body, whatever the status.
pub async fn request(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: &str,
) -> Result<(StatusCode, Bytes), ClientError> {
    let exchange = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| ClientError::Connect { addr, source })?;
        let http = |source| ClientError::Http { addr, source };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(http)?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, addr.to_string())
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("a valid request");
        let res = sender.send_request(req).await.map_err(http)?;
        let code = res.status();
        let body = res.into_body().collect().await.map_err(http)?.to_bytes();
        Ok((code, body))
    };
    tokio::time::timeout(TIMEOUT, exchange)
        .await
        .unwrap_or(Err(ClientError::Timeout { addr }))
}

/// `GET path`, an error unless it answers 200.
pub async fn get(addr: SocketAddr, path: &str) -> Result<Bytes, ClientError> {
    let (code, body) = request(addr, Method::GET, path, "").await?;
    if code != StatusCode::OK {
        return Err(refused(addr, path, code, &body));
    }
    Ok(body)
}

/// `POST path` with `body`; the JSON answer, an error unless it answers 200.
pub async fn post(
    addr: SocketAddr,
    path: &str,
    body: &str,
) -> Result<serde_json::Value, ClientError> {
    let (code, answer) = request(addr, Method::POST, path, body).await?;
    if code != StatusCode::OK {
        return Err(refused(addr, path, code, &answer));
    }
    decode(addr, path, &answer)
}

/// `GET /status`.
pub async fn status(addr: SocketAddr) -> Result<Status, ClientError> {
    decode(addr, "/status", &get(addr, "/status").await?)
}

fn decode<T: serde::de::DeserializeOwned>(
    addr: SocketAddr,
    path: &str,
    body: &[u8],
) -> Result<T, ClientError> {
    serde_json::from_slice(body).map_err(|source| ClientError::Decode {
        addr,
        path: path.into(),
        source,
    })
}

/// The API's `{"error": ...}` message, or the body as it is.
fn refused(addr: SocketAddr, path: &str, code: StatusCode, body: &[u8]) -> ClientError {
    let message = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| Some(v.get("error")?.as_str()?.to_string()))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string());
    ClientError::Refused {
        addr,
        path: path.into(),
        code,
        message,
    }
}
