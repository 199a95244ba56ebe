//! The admin API (hyper, HTTP/1.1 on `agent.admin`):
//!
//! - `GET /status`: the [`status::Status`] tree as JSON;
//! - `GET /metrics`: Prometheus text format ([`metrics`]);
//! - `POST /backends/{pool}/{address}/weight` (body `{"weight": N}` or `N`) and
//!   `POST /backends/{pool}/{address}/drain` (no body or `true` drains, `false` undoes it),
//!   `{address}` being `IP:PORT` or `[IPv6]:PORT`.
//!
//! The server never touches the maps or the overrides: the main loop publishes a fresh [`View`]
//! every conntrack sweep (and after every change) through a watch channel, and applies the
//! changes it receives as [`Command`]s, answering each once its tables are updated.

pub mod client;
pub mod metrics;
pub mod status;
#[cfg(test)]
pub(crate) mod tests;

use std::{
    convert::Infallible,
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{
    body::Incoming, header, server::conn::http1, service::service_fn, Method, Request, Response,
    StatusCode,
};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
};
use tracing::{debug, info, warn};

use self::status::{Inputs, Status};
use crate::{
    config::Config,
    dataplane::Dataplane,
    gc,
    health::Health,
    overrides::{Change, OverrideError, Overrides},
    plan::Plan,
    proxy::metrics::RequestStats,
};

/// Largest request body accepted (a weight is a few bytes).
const MAX_BODY: usize = 1024;
/// How long a change may wait for the main loop (which is busy only for a table update).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin API: listening on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// What the endpoints show: the status as of the last sweep, and the L7 request counters
/// (read live).
#[derive(Debug, Default)]
pub struct View {
    pub status: Status,
    pub requests: Vec<Arc<RequestStats>>,
}

/// A weight or drain change for the main loop to apply.
#[derive(Debug)]
pub struct Command {
    pub pool: String,
    pub backend: SocketAddr,
    pub change: Change,
    reply: oneshot::Sender<Result<(), OverrideError>>,
}

impl Command {
    /// Answers the request, once the change is in the tables (or refused).
    pub fn reply(self, result: Result<(), OverrideError>) {
        let _ = self.reply.send(result);
    }
}

// === impl Publisher ===

/// Builds views from the main loop's state and hands them to the server.
pub struct Publisher {
    config_path: PathBuf,
    health: Arc<Health>,
    requests: Vec<Arc<RequestStats>>,
    views: watch::Sender<Arc<View>>,
}

impl Publisher {
    /// `requests`: the L7 listeners' counters, in config order.
    pub fn new(
        config_path: &Path,
        health: Arc<Health>,
        requests: Vec<Arc<RequestStats>>,
    ) -> (Self, watch::Receiver<Arc<View>>) {
        let (views, rx) = watch::channel(Arc::new(View::default()));
        let publisher = Self {
            // Absolute, so `diagnose` finds it from any directory.
            config_path: std::fs::canonicalize(config_path).unwrap_or_else(|_| config_path.into()),
            health,
            requests,
            views,
        };
        (publisher, rx)
    }

    /// After a reload: the health and L7 counters views are built from.
    pub fn follow(&mut self, health: Arc<Health>, requests: Vec<Arc<RequestStats>>) {
        self.health = health;
        self.requests = requests;
    }

    /// Reads the datapath's counters and publishes a view of everything. Blocking (map
    /// syscalls).
    pub fn publish(
        &self,
        dp: &Dataplane,
        config: &Config,
        plan: &Plan,
        overrides: &Overrides,
        sweep: &gc::Report,
    ) {
        let counters = match dp.snapshot(plan.listener_slots()) {
            Ok(c) => c,
            Err(e) => return warn!(error = %e, "reading counters for the admin API"),
        };
        let backends = match dp.backend_stats(plan.backend_slots()) {
            Ok(b) => b,
            Err(e) => return warn!(error = %e, "reading backend counters for the admin API"),
        };
        let status = Status::build(&Inputs {
            config_path: &self.config_path,
            config,
            plan,
            overrides,
            health: &self.health,
            sweep,
            counters: &counters,
            backends: &backends,
            requests: &self.requests,
        });
        self.views.send_replace(Arc::new(View {
            status,
            requests: self.requests.clone(),
        }));
    }
}

// === server ===

/// Listens on `addr` and serves the API on a task of its own, which ends with the runtime.
/// The admin API's listener; a reload may move it to another address.
pub struct Api {
    views: watch::Receiver<Arc<View>>,
    commands: mpsc::Sender<Command>,
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Api {
    pub async fn serve(
        addr: SocketAddr,
        views: watch::Receiver<Arc<View>>,
        commands: mpsc::Sender<Command>,
    ) -> Result<Self, AdminError> {
        let task = listen(addr, &views, &commands).await?;
        Ok(Self {
            views,
            commands,
            addr,
            task,
        })
    }

    /// Listens on `addr` instead: bound first, so on an error the API stays where it was.
    /// Requests on connections already open finish.
    pub async fn move_to(&mut self, addr: SocketAddr) -> Result<(), AdminError> {
        if addr == self.addr {
            return Ok(());
        }
        let task = match listen(addr, &self.views, &self.commands).await {
            Ok(task) => task,
            // The API's own socket holds the port (127.0.0.1 to 0.0.0.0 on one port): it is
            // closed first, and listens again if the new address cannot be bound either.
            Err(AdminError::Bind { source, .. })
                if source.kind() == io::ErrorKind::AddrInUse && addr.port() == self.addr.port() =>
            {
                self.task.abort();
                let _ = (&mut self.task).await;
                match listen(addr, &self.views, &self.commands).await {
                    Ok(task) => task,
                    Err(e) => {
                        self.task = listen(self.addr, &self.views, &self.commands).await?;
                        return Err(e);
                    }
                }
            }
            Err(e) => return Err(e),
        };
        std::mem::replace(&mut self.task, task).abort();
        self.addr = addr;
        Ok(())
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn listen(
    addr: SocketAddr,
    views: &watch::Receiver<Arc<View>>,
    commands: &mpsc::Sender<Command>,
) -> Result<JoinHandle<()>, AdminError> {
    let tcp = TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError::Bind { addr, source })?;
    info!(addr = %tcp.local_addr().unwrap_or(addr), "admin API listening");
    Ok(tokio::spawn(accept(tcp, views.clone(), commands.clone())))
}

/// The accept loop, for tests that bind their own port.
pub async fn accept(
    tcp: TcpListener,
    views: watch::Receiver<Arc<View>>,
    commands: mpsc::Sender<Command>,
) {
    loop {
        let (stream, peer) = match tcp.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                warn!(error = %e, "admin API: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (views, commands) = (views.clone(), commands.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let (views, commands) = (views.clone(), commands.clone());
                async move { Ok::<_, Infallible>(handle(req, &views, &commands).await) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                debug!(client = %peer, error = %e, "admin API connection ended with an error");
            }
        });
    }
}

type Answer = Response<Full<Bytes>>;

async fn handle(
    req: Request<Incoming>,
    views: &watch::Receiver<Arc<View>>,
    commands: &mpsc::Sender<Command>,
) -> Answer {
    let Some(segments) = req
        .uri()
        .path()
        .trim_start_matches('/')
        .split('/')
        .map(percent_decode)
        .collect::<Option<Vec<String>>>()
    else {
        return error(
            StatusCode::BAD_REQUEST,
            "malformed percent-encoding in the path",
        );
    };
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let method = req.method().clone();
    match (&method, segments.as_slice()) {
        (&Method::GET, ["status"]) => json(StatusCode::OK, &views.borrow().status),
        (&Method::GET, ["metrics"]) => {
            let body = metrics::render(&views.borrow());
            answer(StatusCode::OK, metrics::CONTENT_TYPE, body)
        }
        (&Method::POST, ["backends", pool, address, action @ ("weight" | "drain")]) => {
            let Ok(backend) = address.parse::<SocketAddr>() else {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!("`{address}` is not IP:PORT or [IPv6]:PORT"),
                );
            };
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return error(StatusCode::BAD_REQUEST, &format!("reading the body: {e}")),
            };
            let change = match *action {
                "weight" => parse_weight(&body).map(Change::Weight),
                _ => parse_drain(&body).map(Change::Drain),
            };
            match change {
                Ok(change) => apply(views, commands, pool, backend, change).await,
                Err(message) => error(StatusCode::BAD_REQUEST, &message),
            }
        }
        (_, ["status" | "metrics"]) => allow(&method, "GET"),
        (_, ["backends", _, _, "weight" | "drain"]) => allow(&method, "POST"),
        _ => error(
            StatusCode::NOT_FOUND,
            &format!("no endpoint {} (try /status or /metrics)", req.uri().path()),
        ),
    }
}

/// Sends a change to the main loop and answers with the backend as the next view shows it.
async fn apply(
    views: &watch::Receiver<Arc<View>>,
    commands: &mpsc::Sender<Command>,
    pool: &str,
    backend: SocketAddr,
    change: Change,
) -> Answer {
    let (tx, rx) = oneshot::channel();
    let command = Command {
        pool: pool.into(),
        backend,
        change,
        reply: tx,
    };
    let unavailable = || {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent is shutting down",
        )
    };
    if commands.send(command).await.is_err() {
        return unavailable();
    }
    match tokio::time::timeout(COMMAND_TIMEOUT, rx).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => {
            let code = match e {
                OverrideError::Weight(_) => StatusCode::BAD_REQUEST,
                OverrideError::NoPool(_) | OverrideError::NoBackend { .. } => StatusCode::NOT_FOUND,
            };
            return error(code, &e.to_string());
        }
        Ok(Err(_)) | Err(_) => return unavailable(),
    }
    #[derive(Serialize)]
    struct Changed<'a> {
        pool: &'a str,
        #[serde(flatten)]
        backend: Option<&'a status::Backend>,
    }
    let view = views.borrow();
    // A pool no listener uses is not in the status tree.
    let backend = view.status.backend(pool, backend);
    json(StatusCode::OK, &Changed { pool, backend })
}

/// `{"weight": N}` or a bare `N`.
fn parse_weight(body: &[u8]) -> Result<u32, String> {
    parse_body(body, "weight", "a weight, {\"weight\": N} or N", |v| {
        v.as_u64().and_then(|n| u32::try_from(n).ok())
    })
}

/// Nothing (drain), `true`/`false`, or `{"drain": true|false}`.
fn parse_drain(body: &[u8]) -> Result<bool, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(true);
    }
    parse_body(
        body,
        "drain",
        "no body, true, false or {\"drain\": BOOL}",
        serde_json::Value::as_bool,
    )
}

/// A JSON body holding a bare value or `{"<key>": value}`, converted by `convert`; the error
/// says what was `expected` and what came.
fn parse_body<T>(
    body: &[u8],
    key: &str,
    expected: &str,
    convert: impl Fn(&serde_json::Value) -> Option<T>,
) -> Result<T, String> {
    let bad = || {
        format!(
            "expected {expected}, got `{}`",
            String::from_utf8_lossy(body).trim()
        )
    };
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|_| bad())?;
    let inner = match &v {
        serde_json::Value::Object(o) if o.len() == 1 => o.get(key),
        v => Some(v),
    };
    inner.and_then(convert).ok_or_else(bad)
}

/// `%XX` escapes decoded; `None` when one is malformed or the result is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex = [bytes.next()?, bytes.next()?];
            out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok()
}

fn answer(code: StatusCode, content_type: &'static str, body: String) -> Answer {
    let mut res = Response::new(Full::new(Bytes::from(body)));
    *res.status_mut() = code;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    res
}

fn json(code: StatusCode, value: &impl Serialize) -> Answer {
    match serde_json::to_string_pretty(value) {
        Ok(mut body) => {
            body.push('\n');
            answer(code, "application/json", body)
        }
        Err(e) => answer(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain; charset=utf-8",
            e.to_string(),
        ),
    }
}

fn error(code: StatusCode, message: &str) -> Answer {
    json(code, &serde_json::json!({ "error": message }))
}

fn allow(method: &Method, allowed: &'static str) -> Answer {
    let mut res = error(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!("{method} not allowed here; use {allowed}"),
    );
    res.headers_mut()
        .insert(header::ALLOW, header::HeaderValue::from_static(allowed));
    res
}
