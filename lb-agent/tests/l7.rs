//! End to end through the L7 proxy on loopback: real hyper backends (and misbehaving raw TCP
//! ones), real clients (hyper, rustls, raw sockets), certificates made here with rcgen.
//! Everything binds ephemeral 127.0.0.1 ports; every wait is bounded.

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use lb_agent::{admin, config, health::Health, proxy};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

/// Upper bound for anything a test waits on.
const LIMIT: Duration = Duration::from_secs(20);

// === backends ===

/// A hyper backend answering with its name, the path and the request headers it saw; `/ws`
/// upgrades and echoes, `/app-cookie` sets `sid`, `/slow` sleeps 3 s.
async fn backend(name: &'static str) -> SocketAddr {
    serve_backend(name, None).await
}

/// `backend`, over TLS when `tls` is given.
async fn serve_backend(name: &'static str, tls: Option<tokio_rustls::TlsAcceptor>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let tls = tls.clone();
            tokio::spawn(async move {
                match tls {
                    Some(tls) => {
                        if let Ok(s) = tls.accept(s).await {
                            serve_answers(name, s).await;
                        }
                    }
                    None => serve_answers(name, s).await,
                }
            });
        }
    });
    addr
}

async fn serve_answers<I>(name: &'static str, io: I)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let svc = service_fn(move |req: Request<Incoming>| answer(name, req));
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades()
        .await;
}

async fn answer(
    name: &'static str,
    mut req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().to_string();
    if path == "/ws" {
        let up = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = up.await {
                let mut io = TokioIo::new(up);
                let mut buf = [0u8; 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        return Ok(Response::builder()
            .status(101)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(Full::default())
            .unwrap());
    }
    if path == "/slow" {
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let mut text = format!("{name}\npath: {path}\n");
    for (k, v) in req.headers() {
        text.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().len())
        .unwrap_or(0);
    text.push_str(&format!("body-bytes: {body}\n"));
    let mut res = Response::builder()
        .header("x-backend", name)
        .header("keep-alive", "timeout=99");
    if path == "/app-cookie" {
        res = res.header("set-cookie", format!("sid={name}-session; Path=/"));
    }
    Ok(res.body(Full::new(Bytes::from(text))).unwrap())
}

/// A backend that accepts, reads the request and resets the connection.
async fn resetting_backend() -> SocketAddr {
    raw_backend(|mut s| async move {
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf).await;
        // SO_LINGER 0: closing sends a reset instead of a FIN.
        #[allow(
            deprecated,
            reason = "the point is the reset; the close does not block with a zero linger"
        )]
        let _ = s.set_linger(Some(Duration::ZERO));
    })
    .await
}

/// A backend that answers with something that is not HTTP.
async fn garbage_backend() -> SocketAddr {
    raw_backend(|mut s| async move {
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf).await;
        let _ = s
            .write_all(b"SSH-2.0-OpenSSH_9.6 definitely not http\r\n\r\n")
            .await;
    })
    .await
}

async fn raw_backend<F, Fut>(f: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(f(s));
        }
    });
    addr
}

/// Reads from a raw backend's connection until a request head is complete: what was read
/// (the head and any body bytes after it) and where the head ends. `None`: the connection
/// ended first.
async fn read_request_head(s: &mut TcpStream) -> Option<(Vec<u8>, usize)> {
    let mut got = Vec::new();
    let mut b = vec![0u8; 64 << 10];
    loop {
        let Ok(n @ 1..) = s.read(&mut b).await else {
            return None;
        };
        got.extend_from_slice(&b[..n]);
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some((got, i + 4));
        }
    }
}

/// An address nothing listens on (connects are refused).
fn dead_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

// === the proxy ===

struct Lb {
    addrs: Vec<(String, SocketAddr)>,
    stop: watch::Sender<()>,
    done: tokio::task::JoinSet<()>,
    /// The health probes; dropping them stops them.
    _checks: tokio::task::JoinSet<()>,
    _dir: TempDir,
    log: PathBuf,
    /// Each listener's request counters, as the admin API's /metrics reads them.
    requests: Vec<Arc<proxy::metrics::RequestStats>>,
}

impl Lb {
    fn addr(&self, listener: &str) -> SocketAddr {
        self.addrs.iter().find(|(n, _)| n == listener).unwrap().1
    }

    /// Access log lines, waiting until at least `n` are written.
    async fn log_lines(&self, n: usize) -> Vec<serde_json::Value> {
        let deadline = tokio::time::Instant::now() + LIMIT;
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<serde_json::Value> = text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            if lines.len() >= n || tokio::time::Instant::now() > deadline {
                return lines;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn shutdown(mut self, grace: Duration) {
        let _ = self.stop.send(());
        tokio::time::timeout(grace + LIMIT, async {
            while self.done.join_next().await.is_some() {}
        })
        .await
        .expect("the proxy drains within its grace period");
    }
}

/// Starts the proxy for `listeners` (YAML list items, indented 2) and `pools`; every listener
/// logs to the same file. `{log}` and `{dir}` in the text are replaced.
/// The common case: one plain http listener `site` in front of pool `web`.
async fn site(pools: &str) -> Lb {
    lb(
        "  - { name: site, protocol: http, vip: 127.0.0.1, port: 8080, pool: web, access_log: {log} }\n",
        pools,
    )
    .await
}

/// One https listener `site` with `certificates` (YAML flow-list items) in front of `web`.
async fn https_site(dir: TempDir, certificates: &str, web: SocketAddr) -> Lb {
    lb_in(
        dir,
        &format!(
            "  - {{ name: site, protocol: https, vip: 127.0.0.1, port: 8443, pool: web, access_log: '{{log}}', tls: {{ certificates: [{certificates}] }} }}\n"
        ),
        &pool("web", &[web]),
    )
    .await
}

/// An HTTP/2 client connection (prior knowledge) to a plain listener, and its task.
async fn h2_prior_knowledge(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    tokio::task::JoinHandle<hyper::Result<()>>,
) {
    let s = TcpStream::connect(addr).await.unwrap();
    let (tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
        .await
        .unwrap();
    (tx, tokio::spawn(conn))
}

async fn lb(listeners: &str, pools: &str) -> Lb {
    lb_in(TempDir::new(), listeners, pools).await
}

async fn lb_in(dir: TempDir, listeners: &str, pools: &str) -> Lb {
    let log = dir.path().join("access.log");
    let text = format!("agent:\n  interfaces: [lo]\nlisteners:\n{listeners}pools:\n{pools}")
        .replace("{log}", &log.display().to_string())
        .replace("{dir}", &dir.path().display().to_string());
    let cfg = config::parse("test.yaml", &text, &config::Host::default())
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
    let health = Arc::new(Health::new(&cfg));
    let l7 = cfg.listeners.iter().filter(|l| l.protocol.is_l7());
    let servers = proxy::servers(&cfg, l7, &health, &[], |_| {
        std::net::TcpListener::bind("127.0.0.1:0")
    })
    .await
    .unwrap();
    let (stop, stopped) = watch::channel(());
    let mut done = tokio::task::JoinSet::new();
    let mut addrs = Vec::new();
    let requests = servers.iter().map(proxy::Server::requests).collect();
    for (s, l) in servers
        .into_iter()
        .zip(cfg.listeners.iter().filter(|l| l.protocol.is_l7()))
    {
        addrs.push((l.name.clone(), s.local_addr().unwrap()));
        done.spawn(s.run(stopped.clone(), Duration::from_secs(5)));
    }
    Lb {
        addrs,
        stop,
        done,
        _checks: health.start(&cfg),
        _dir: dir,
        log,
        requests,
    }
}

fn pool(name: &str, backends: &[SocketAddr]) -> String {
    let mut s = format!("  - name: {name}\n    backends:\n");
    for b in backends {
        s.push_str(&format!(
            "      - {{ address: {}, port: {} }}\n",
            b.ip(),
            b.port()
        ));
    }
    s
}

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "lb-l7-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// === clients ===

struct Answer {
    status: StatusCode,
    headers: hyper::HeaderMap,
    body: String,
}

impl Answer {
    fn backend(&self) -> &str {
        self.body.lines().next().unwrap_or_default()
    }
    /// A header line the backend reported seeing.
    fn seen(&self, name: &str) -> Option<&str> {
        self.body
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
    }
}

/// One HTTP/1.1 request on a fresh connection.
async fn send(addr: SocketAddr, req: Request<Full<Bytes>>) -> Answer {
    tokio::time::timeout(LIMIT, async {
        let s = TcpStream::connect(addr).await.unwrap();
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
            .await
            .unwrap();
        tokio::spawn(conn);
        read_answer(tx.send_request(req).await.unwrap()).await
    })
    .await
    .expect("answer in time")
}

async fn read_answer(res: Response<Incoming>) -> Answer {
    let (parts, body) = res.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into(),
    }
}

fn get(host: &str, path: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", host)
        .body(Full::default())
        .unwrap()
}

/// Sends raw bytes and returns everything the proxy answers until it closes.
async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    tokio::time::timeout(LIMIT, async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(bytes).await.unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    })
    .await
    .expect("answer in time")
}

fn status_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default()
}

// === routing and headers ===

#[tokio::test]
async fn routes_by_host_and_path_first_match_wins_else_the_default_pool() {
    let (web, api, v1, wild) = (
        backend("web").await,
        backend("api").await,
        backend("v1").await,
        backend("wild").await,
    );
    let lb = lb(
        "  - name: site
    protocol: http
    vip: 127.0.0.1
    port: 8080
    pool: web
    access_log: {log}
    routes:
      - { host: api.example.com, path_prefix: /v1, pool: v1 }
      - { host: api.example.com, pool: api }
      - { host: '*.wild.example.com', pool: wild }
      - { path_prefix: /a%2Fb, pool: v1 }
",
        &[
            pool("web", &[web]),
            pool("api", &[api]),
            pool("v1", &[v1]),
            pool("wild", &[wild]),
        ]
        .concat(),
    )
    .await;
    let a = lb.addr("site");
    for (host, path, want) in [
        ("api.example.com", "/v1/users", "v1"),
        ("API.example.com:8080", "/v1", "v1"),
        ("api.example.com", "/v2", "api"),
        ("a.b.wild.example.com", "/", "wild"),
        ("wild.example.com", "/", "web"),
        ("www.example.com", "/v1", "web"),
        // A fully qualified name, and paths as nginx normalizes them before matching.
        ("api.example.com.", "/v1/users", "v1"),
        ("api.example.com", "/./v1/users", "v1"),
        ("api.example.com", "/x/../v1/users", "v1"),
        ("api.example.com", "//v1//users", "v1"),
        ("api.example.com", "/%76%31/users", "v1"),
        ("api.example.com", "/%2Fv1/users", "api"),
        // Escapes match whatever the case of their hex digits (RFC 3986 §6.2.2.1).
        ("www.example.com", "/a%2fb/c", "v1"),
        ("www.example.com", "/a%2Fb/c", "v1"),
    ] {
        let r = send(a, get(host, path)).await;
        assert_eq!(r.status, 200, "{host}{path}");
        assert_eq!(r.backend(), want, "{host}{path}");
    }
    // The backend gets the path as the client sent it.
    let r = send(a, get("api.example.com", "/%76%31/users")).await;
    assert_eq!(r.seen("path"), Some("/%76%31/users"));
    // A `%` that starts no escape: 400, as nginx answers.
    assert_eq!(send(a, get("api.example.com", "/v1/%zz")).await.status, 400);
    // An absolute-form target names the host, whatever the Host header says (RFC 9112
    // §3.2.2); the backend is told that host.
    let r = send(a, get("www.example.com", "http://api.example.com/v1/abs")).await;
    assert_eq!(r.backend(), "v1");
    assert_eq!(r.seen("host"), Some("api.example.com"));
    lb.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn without_a_default_pool_what_no_route_matches_gets_404() {
    let web = backend("web").await;
    let lb = lb(
        "  - { name: site, protocol: http, vip: 127.0.0.1, port: 8080, access_log: {log},
      routes: [ { path_prefix: /v1, pool: web } ] }
",
        &pool("web", &[web]),
    )
    .await;
    assert_eq!(send(lb.addr("site"), get("x", "/v1/a")).await.status, 200);
    let r = send(lb.addr("site"), get("x", "/v2")).await;
    assert_eq!(r.status, 404);
    assert!(r.body.contains("404 Not Found"), "{}", r.body);
    lb.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn requests_without_a_valid_host_get_400_but_http_1_0_needs_none() {
    let web = backend("web").await;
    let lb = site(&pool("web", &[web])).await;
    let a = lb.addr("site");
    for head in [
        "GET / HTTP/1.1\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a b/c@d\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: evil\"><x\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a..example\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: \r\n\r\n",
        // The authority form is CONNECT's alone: not a host to route by (nginx: 400).
        "GET foo HTTP/1.1\r\nHost: a\r\n\r\n",
        "GET evil.example.com HTTP/1.1\r\nHost: a\r\n\r\n",
    ] {
        let answer = raw(a, head.as_bytes()).await;
        assert!(status_line(&answer).contains(" 400 "), "{head:?}: {answer}");
        assert!(
            answer.contains("400 Bad Request"),
            "the page says so: {answer}"
        );
    }
    let answer = raw(a, b"GET /old HTTP/1.0\r\n\r\n").await;
    assert!(status_line(&answer).contains(" 200 "), "{answer}");
    assert!(answer.contains("path: /old"), "{answer}");
    // The backend gets HTTP/1.1, which needs a Host: the listener's address and port.
    assert!(answer.contains("\nhost: 127.0.0.1:8080\n"), "{answer}");
    // A head the parser refuses after a request served on the same connection: its page too.
    let answer = raw(
        a,
        b"GET /first HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost x\r\n\r\n",
    )
    .await;
    assert!(answer.contains("path: /first"), "{answer}");
    assert!(answer.contains("<h1>400 Bad Request</h1>"), "{answer}");
    let lines = lb.log_lines(11).await;
    assert_eq!(
        lines.iter().filter(|l| l["status"] == 400).count(),
        9,
        "{lines:?}"
    );
    // Not sent: `-`, as every field without a value.
    assert_eq!(lines[0]["host"], "-", "{:?}", lines[0]);
    let old = lines.iter().find(|l| l["path"] == "/old").unwrap();
    assert_eq!(old["host"], "-", "{old:?}");
    // The page for the head the parser refused went out, and is counted.
    let unparsed = lines.iter().find(|l| l["method"] == "-").unwrap();
    let page = proxy::errors::body(StatusCode::BAD_REQUEST).len();
    assert_eq!(unparsed["bytes_out"], page, "{unparsed:?}");
    lb.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn an_upload_over_the_limit_gets_its_413_while_the_client_still_sends() {
    let web = backend("web").await;
    let lb = lb(
        "  - { name: site, protocol: http, vip: 127.0.0.1, port: 8080, pool: web, access_log: {log}, max_body_bytes: 1000 }\n",
        &pool("web", &[web]),
    )
    .await;
    // Declared too large (answered before the body is read), and found too large on the way
    // (chunked): either way the client goes on sending, as curl does. Closed with its bytes
    // unread, the connection would be reset under it.
    for (framing, chunked) in [
        ("content-length: 4000000", false),
        ("transfer-encoding: chunked", true),
    ] {
        let s = TcpStream::connect(lb.addr("site")).await.unwrap();
        let (mut rx, mut tx) = s.into_split();
        let head = format!("PUT /up HTTP/1.1\r\nhost: site\r\n{framing}\r\n\r\n");
        let sender = tokio::spawn(async move {
            tx.write_all(head.as_bytes()).await?;
            let piece = vec![b'x'; 64 << 10];
            for _ in 0..60 {
                if chunked {
                    tx.write_all(format!("{:x}\r\n", piece.len()).as_bytes())
                        .await?;
                }
                tx.write_all(&piece).await?;
                if chunked {
                    tx.write_all(b"\r\n").await?;
                }
            }
            std::io::Result::Ok(tx)
        });
        // All of it is sent: the proxy, which answered and closed its side right away, reads
        // it (a client whose sends fail gives up without reading the answer, as curl does).
        let tx = tokio::time::timeout(LIMIT, sender)
            .await
            .expect("the proxy takes the whole upload")
            .unwrap()
            .unwrap_or_else(|e| panic!("{framing}: sending failed: {e}"));
        let mut answer = Vec::new();
        tokio::time::timeout(LIMIT, rx.read_to_end(&mut answer))
            .await
            .expect("the proxy closes")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            status_line(&answer).contains(" 413 "),
            "{framing}: {answer:?}"
        );
        drop(tx);
    }
    lb.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_client_that_half_closes_after_its_request_still_gets_the_answer() {
    let web = backend("web").await;
    let lb = site(&pool("web", &[web])).await;
    // As `printf … | socat - TCP:…` does: the request, then the sending side shut.
    for (head, want) in [
        ("GET /p HTTP/1.1\r\nHost: x\r\n\r\n", " 200 "),
        ("GET /q HTTP/1.0\r\n\r\n", " 200 "),
        ("CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n", " 405 "),
    ] {
        for _ in 0..10 {
            let answer = half_closed(lb.addr("site"), head).await;
            assert!(status_line(&answer).contains(want), "{head:?}: {answer:?}");
        }
    }
    lb.shutdown(Duration::from_secs(1)).await;
    // An answer whose body takes longer than the wait for its head comes whole.
    let drip = raw_backend(|mut s| async move {
        if read_request_head(&mut s).await.is_some() {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n")
                .await;
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_millis(60)).await;
                let _ = s.write_all(b"x").await;
            }
        }
    })
    .await;
    let lb = site(&pool("web", &[drip])).await;
    let answer = half_closed(lb.addr("site"), "GET /drip HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(answer.ends_with("\r\n\r\nxxxxxxxxxx"), "{answer:?}");
    lb.shutdown(Duration::from_secs(1)).await;
}

/// Sends `head`, shuts the sending side (as `printf … | socat - TCP:…` does) and returns
/// everything the proxy answers until it closes.
async fn half_closed(addr: SocketAddr, head: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(LIMIT, s.read_to_end(&mut out))
        .await
        .expect("the proxy closes after the answer")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn connect_is_refused_with_405_and_never_reaches_a_backend() {
    let web = backend("web").await;
    let lb = site(&pool("web", &[web])).await;
    let answer = raw(
        lb.addr("site"),
        b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n",
    )
    .await;
    assert!(status_line(&answer).contains(" 405 "), "{answer}");
    assert!(
        answer.contains("<h1>405 Method Not Allowed</h1>"),
        "{answer}"
    );
    let lines = lb.log_lines(1).await;
    assert_eq!(lines[0]["status"], 405);
    assert_eq!(lines[0]["upstream_addr"], "-");
    lb.shutdown(Duration::from_secs(1)).await;
}

/// A backend's 204 that says a length (RFC 9110 §8.6 forbids it) reaches an HTTP/2 client
/// without it: the client would refuse the stream (and HTTP/1's encoder drops it anyway).
#[tokio::test]
async fn a_204_with_a_content_length_reaches_http2_clients_without_it() {
    let nc = raw_backend(|mut s| async move {
        while read_request_head(&mut s).await.is_some() {
            let _ = s
                .write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n")
                .await;
        }
    })
    .await;
    let lb = site(&pool("web", &[nc])).await;
    let (mut tx, _conn) = h2_prior_knowledge(lb.addr("site")).await;
    for _ in 0..2 {
        let res = tx
            .send_request(get("h2.example", "http://h2.example/nc"))
            .await
            .expect("the stream is not refused");
        let answer = read_answer(res).await;
        assert_eq!(answer.status, 204);
        assert_eq!(
            answer.headers.get("content-length"),
            None,
            "{:?}",
            answer.headers
        );
        assert_eq!(answer.body, "");
    }
    lb.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn http2_refusals_arrive_whole_413_for_a_body_and_431_for_headers() {
    let web = backend("web").await;
    let lb = lb(
        "  - { name: site, protocol: http, vip: 127.0.0.1, port: 8080, pool: web, access_log: {log}, max_body_bytes: 1000 }\n",
        &pool("web", &[web]),
    )
    .await;
    let (mut tx, _conn) = h2_prior_knowledge(lb.addr("site")).await;
    // A declared body over the limit: answered before it is read; the answer's page must
    // come whole (then the stream is reset with NO_ERROR), not a head cut off by a reset.
    let big = Request::post("http://site.example/up")
        .header("content-length", "200000")
        .body(Full::new(Bytes::from(vec![b'x'; 200_000])))
        .unwrap();
    let answer = tokio::time::timeout(LIMIT, async {
        read_answer(tx.send_request(big).await.unwrap()).await
    })
    .await
    .expect("answer in time");
    assert_eq!(answer.status, 413);
    assert!(answer.body.contains("<h1>413 "), "{}", answer.body);
    // Headers over max_header_bytes (64 KiB): 431 as over HTTP/1, not a refused stream that
    // clients retry.
    tx.ready().await.unwrap();
    let huge = Request::get("http://site.example/")
        .header("x-big", "a".repeat(70_000))
        .body(Full::default())
        .unwrap();
    let answer = read_answer(tx.send_request(huge).await.unwrap()).await;
    assert_eq!(answer.status, 431);
    assert!(answer.body.contains("<h1>431 "), "{}", answer.body);
    // The connection goes on.
    tx.ready().await.unwrap();
    let ok = read_answer(
        tx.send_request(get("site.example", "http://site.example/ok"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    let lines = lb.log_lines(3).await;
    let statuses: Vec<_> = lines.iter().map(|l| l["status"].clone()).collect();
    assert_eq!(statuses, [413, 431, 200], "{lines:?}");
    lb.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn an_http_1_0_backend_is_answered_as_http_1_1_and_the_client_stays_connected() {
    let old = raw_backend(|mut s| async move {
        while read_request_head(&mut s).await.is_some() {
            if s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nold")
                .await
                .is_err()
            {
                return;
            }
        }
    })
    .await;
    let lb = site(&pool("web", &[old])).await;
    let s = TcpStream::connect(lb.addr("site")).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    for _ in 0..3 {
        let res = tx.send_request(get("x", "/")).await.unwrap();
        assert_eq!(res.version(), hyper::Version::HTTP_11);
        assert_eq!(read_answer(res).await.body, "old");
    }
    assert!(!conn.is_finished(), "one client connection for all three");
    lb.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn http2_cookies_reach_an_http_1_1_backend_as_one_header() {
    let web = backend("web").await;
    let lb = site(&pool("web", &[web])).await;
    let (mut tx, _conn) = h2_prior_knowledge(lb.addr("site")).await;
    let req = Request::get("http://h2.example/c")
        .header("cookie", "a=1")
        .header("cookie", "SERVERID=b2")
        .body(Full::<Bytes>::default())
        .unwrap();
    let r = read_answer(tx.send_request(req).await.unwrap()).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.seen("cookie"), Some("a=1; SERVERID=b2"));
    assert_eq!(r.body.matches("cookie: ").count(), 1, "{}", r.body);
    assert_eq!(r.seen("host"), Some("h2.example"));
    lb.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_backend_that_stops_mid_body_is_cut_off_after_the_response_timeout() {
    let stalls = raw_backend(|mut s| async move {
        if read_request_head(&mut s).await.is_some() {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab")
                .await;
            tokio::time::sleep(LIMIT).await;
        }
    })
    .await;
    let lb = lb(
        "  - { name: site, protocol: http, vip: 127.0.0.1, port: 8080, pool: web, access_log: {log},
      timeouts: { response: 1s } }
",
        &pool("web", &[stalls]),
    )
    .await;
    let started = std::time::Instant::now();
    let answer = raw(lb.addr("site"), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let took = started.elapsed();
    assert!(status_line(&answer).contains(" 200 "), "{answer}");
    assert!(answer.ends_with("\r\n\r\nab"), "{answer:?}");
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(5),
        "closed after {took:?}"
    );
    lb.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn forwarded_headers_are_added_host_kept_and_hop_by_hop_removed() {
    let web = backend("web").await;
    let lb = site(&pool("web", &[web])).await;
    let req = Request::get("/x?q=1")
        .header("host", "shop.example.com")
        .header("x-forwarded-for", "203.0.113.7, 198.51.100.1")
        .header("x-real-ip", "6.6.6.6")
        .header("x-forwarded-proto", "gopher")
        .header("connection", "x-drop-me")
        .header("x-drop-me", "1")
        .header("proxy-authorization", "secret")
        .header("te", "trailers")
        .body(Full::default())
        .unwrap();
    let r = send(lb.addr("site"), req).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.seen("path"), Some("/x?q=1"));
    assert_eq!(r.seen("host"), Some("shop.example.com"));
    assert_eq!(
        r.seen("x-forwarded-for"),
        Some("203.0.113.7, 198.51.100.1, 127.0.0.1")
    );
    assert_eq!(r.seen("x-real-ip"), Some("127.0.0.1"));
    assert_eq!(r.seen("x-forwarded-proto"), Some("http"));
    assert_eq!(r.seen("x-forwarded-port"), Some("8080"));
    for gone in ["x-drop-me", "proxy-authorization", "te"] {
        assert_eq!(r.seen(gone), None, "{gone} reached the backend");
    }
    // The backend's own hop-by-hop header does not reach the client.
    assert!(r.headers.get("keep-alive").is_none());
    assert_eq!(r.headers["x-backend"], "web");
    // An absolute-form request target goes on in origin form, query included.
    let r = send(
        lb.addr("site"),
        get("shop.example.com", "http://shop.example.com/abs?y=2"),
    )
    .await;
    assert_eq!(r.seen("path"), Some("/abs?y=2"));
    lb.shutdown(Duration::from_secs(1)).await;
}

/// Undoes HTTP/1.1 chunked framing (sizes in hex, each chunk CRLF-terminated).
fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16).unwrap();
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

#[tokio::test]
async fn chunked_bodies_stream_both_ways_over_one_kept_alive_backend_connection() {
    use std::sync::Mutex;
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (s2, c2) = (seen.clone(), connections.clone());
    // Reads chunked requests and answers each in two chunks, 50 ms apart, on one connection.
    let web = raw_backend(move |mut s| {
        let (seen, connections) = (s2.clone(), c2.clone());
        async move {
            connections.fetch_add(1, Ordering::Relaxed);
            let mut buf = Vec::new();
            let mut b = [0u8; 4096];
            loop {
                while !String::from_utf8_lossy(&buf).contains("\r\n0\r\n\r\n") {
                    match s.read(&mut b).await {
                        Ok(n) if n > 0 => buf.extend_from_slice(&b[..n]),
                        _ => return,
                    }
                }
                seen.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf).into_owned());
                buf.clear();
                let head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n";
                s.write_all(head.as_bytes()).await.unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
                s.write_all(b"6\r\n world\r\n0\r\n\r\n").await.unwrap();
            }
        }
    })
    .await;
    let lb = site(&pool("web", &[web])).await;
    for _ in 0..2 {
        let out = raw(
            lb.addr("site"),
            b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
              3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n",
        )
        .await;
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{out}");
        assert!(
            head.to_ascii_lowercase()
                .contains("transfer-encoding: chunked"),
            "{out}"
        );
        assert_eq!(dechunk(body), "hello world", "{out}");
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    for req in &seen {
        let (head, body) = req.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("POST /up HTTP/1.1\r\n"), "{req}");
        assert!(head.contains("transfer-encoding: chunked"), "{req}");
        assert_eq!(dechunk(body), "abcdefg", "{req}");
    }
    assert_eq!(
        connections.load(Ordering::Relaxed),
        1,
        "the second request reused the backend connection"
    );
    let line = &lb.log_lines(2).await[1];
    assert_eq!(line["bytes_in"], 7);
    assert_eq!(line["status"], 200);
    lb.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_large_response_streams_through_whole_with_and_without_a_length() {
    const SIZE: usize = 8 << 20;
    // Printable, as the test client reads the body as text.
    let body: Arc<Vec<u8>> = Arc::new((0..SIZE).map(|i| b'a' + (i % 26) as u8).collect());
    let b2 = body.clone();
    // `/length` answers with Content-Length, anything else until the close.
    let web = raw_backend(move |mut s| {
        let body = b2.clone();
        async move {
            let Some((head, _)) = read_request_head(&mut s).await else {
                return;
            };
            let with_length = head.starts_with(b"GET /length ");
            let answer = if with_length {
                format!("HTTP/1.1 200 OK\r\nContent-Length: {SIZE}\r\n\r\n")
            } else {
                "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".to_string()
            };
            s.write_all(answer.as_bytes()).await.unwrap();
            s.write_all(&body).await.unwrap();
        }
    })
    .await;
    let lb = site(&pool("web", &[web])).await;
    for path in ["/length", "/until-close"] {
        let r = send(lb.addr("site"), get("x", path)).await;
        assert_eq!(r.status, 200);
        let got = r.body.as_bytes();
        assert_eq!(got.len(), SIZE, "{path}");
        assert!(got == &body[..], "{path}: the bytes differ");
    }
    lb.shutdown(Duration::from_secs(1)).await;
}

// === errors ===

#[tokio::test]
async fn every_error_code_is_provoked_and_logged() {
    let (web, slow, reset, garbage) = (
        backend("web").await,
        backend("slow").await,
        resetting_backend().await,
        garbage_backend().await,
    );
    let dead = [dead_port(), dead_port()];
    let lb = lb(
        "  - name: site
    protocol: http
    vip: 127.0.0.1
    port: 8080
    pool: web
    access_log: {log}
    max_body_bytes: 1000
    timeouts: { connect: 1s, request: 1s, response: 1s }
    routes:
      - { path_prefix: /slow, pool: slow }
      - { path_prefix: /reset, pool: reset }
      - { path_prefix: /garbage, pool: garbage }
      - { path_prefix: /dead, pool: dead }
",
        &[
            pool("web", &[web]),
            pool("slow", &[slow]),
            pool("reset", &[reset]),
            pool("garbage", &[garbage]),
            pool("dead", &dead),
        ]
        .concat(),
    )
    .await;
    let a = lb.addr("site");
    let status = |r: Answer| {
        assert!(
            r.body.contains(&r.status.as_u16().to_string()),
            "page says the code: {}",
            r.body
        );
        r.status.as_u16()
    };
    assert_eq!(status(send(a, get("x", "/slow")).await), 504);
    assert_eq!(status(send(a, get("x", "/reset")).await), 502);
    assert_eq!(status(send(a, get("x", "/garbage")).await), 502);
    assert_eq!(status(send(a, get("x", "/dead")).await), 503);
    // Both dead backends are now marked down: 503 without trying.
    assert_eq!(status(send(a, get("x", "/dead")).await), 503);

    let big = Request::post("/")
        .header("host", "x")
        .body(Full::new(Bytes::from(vec![b'a'; 1001])))
        .unwrap();
    assert_eq!(status(send(a, big).await), 413);
    // The same without a declared length: chunked, stopped at the limit.
    let chunked = raw(
        a,
        format!(
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n7d0\r\n{}\r\n0\r\n\r\n",
            "b".repeat(2000)
        )
        .as_bytes(),
    )
    .await;
    assert!(status_line(&chunked).contains(" 413 "), "{chunked}");

    let malformed = raw(a, b"GET / HTTP/1.1\r\nHost x\r\n\r\n").await;
    assert!(status_line(&malformed).contains(" 400 "), "{malformed}");
    // The parser's own answers are pages that say the code too.
    assert!(
        malformed.contains("<h1>400 Bad Request</h1>"),
        "{malformed}"
    );
    let huge_header = raw(
        a,
        format!(
            "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "h".repeat(70 << 10)
        )
        .as_bytes(),
    )
    .await;
    assert!(status_line(&huge_header).contains(" 431 "), "{huge_header}");
    assert!(huge_header.contains("<h1>431 "), "{huge_header}");
    let long_uri = raw(
        a,
        format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "u".repeat(9000)).as_bytes(),
    )
    .await;
    assert!(status_line(&long_uri).contains(" 414 "), "{long_uri}");
    let te = raw(
        a,
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    )
    .await;
    assert!(status_line(&te).contains(" 501 "), "{te}");
    // A lone coding the parser refuses (RFC 9112 §6.3) is a 501 as well.
    let lone = raw(
        a,
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabc",
    )
    .await;
    assert!(status_line(&lone).contains(" 501 "), "{lone}");
    assert!(lone.contains("<h1>501 Not Implemented</h1>"), "{lone}");
    // A body that stops halfway: 408 after the request timeout.
    let stalled = raw(
        a,
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly part of it",
    )
    .await;
    assert!(status_line(&stalled).contains(" 408 "), "{stalled}");

    // A client that leaves before the (slow) answer: logged as 499.
    {
        let mut s = TcpStream::connect(a).await.unwrap();
        s.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let lines = lb.log_lines(16).await;
    let statuses: Vec<u64> = lines
        .iter()
        .map(|l| l["status"].as_u64().unwrap())
        .collect();
    for code in [504, 502, 503, 413, 414, 501, 408, 499, 400, 431] {
        assert!(statuses.contains(&code), "{code} not logged: {statuses:?}");
    }
    // What reached a backend names it, however it ended; a timeout took its time.
    let slow = slow.to_string();
    for code in [504, 499] {
        let line = lines.iter().find(|l| l["status"] == code).unwrap();
        assert_eq!(line["upstream_addr"], slow.as_str(), "{line}");
        assert_ne!(line["upstream_connect_time"], "-", "{line}");
    }
    let timed_out = lines.iter().find(|l| l["status"] == 504).unwrap();
    assert_eq!(timed_out["upstream_status"], "504", "{timed_out}");
    assert_ne!(timed_out["upstream_response_time"], "-", "{timed_out}");
    assert_eq!(
        timed_out["upstream_header_time"], "-",
        "no head came: {timed_out}"
    );
    let dead_line = lines.iter().find(|l| l["status"] == 503).unwrap();
    assert_eq!(
        dead_line["upstream_addr"],
        format!("{}, {}", dead[0], dead[1]).as_str(),
        "both dead backends were tried: {dead_line}"
    );

    // Every logged request is in the admin API's /metrics under its code and in the latency
    // histogram, which a Prometheus parser reads.
    let view = admin::View {
        requests: lb.requests.clone(),
        ..Default::default()
    };
    let text = admin::metrics::render(&view);
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    let value = |metric: &str, code: Option<String>| {
        let s = scrape
            .samples
            .iter()
            .find(|s| {
                s.metric == metric
                    && s.labels.get("listener") == Some("site")
                    && s.labels.get("code") == code.as_deref()
            })
            .unwrap_or_else(|| panic!("{metric} {code:?} in\n{text}"));
        s.value.clone()
    };
    use prometheus_parse::Value;
    for code in [504, 502, 503, 413, 414, 501, 408, 499, 400, 431] {
        let logged = statuses.iter().filter(|&&s| s == code).count() as f64;
        let counted = value("lb_http_requests_total", Some(code.to_string()));
        assert_eq!(counted, Value::Counter(logged), "{code}");
    }
    let Value::Histogram(buckets) = value("lb_http_request_duration_seconds", None) else {
        panic!("a histogram:\n{text}")
    };
    let at = |le: f64| buckets.iter().find(|b| b.less_than == le).unwrap().count;
    assert_eq!(at(f64::INFINITY), lines.len() as f64);
    assert!(
        at(0.5) < at(f64::INFINITY),
        "the 504 waited the 1 s response timeout: {buckets:?}"
    );
    let Value::Untyped(sum) = value("lb_http_request_duration_seconds_sum", None) else {
        panic!("{text}")
    };
    assert!(sum >= 1.0, "{sum}");
    lb.shutdown(Duration::from_secs(1)).await;
}

/// Sends a request head declaring a `len`-byte body and then the body, from a task of its own
/// (it stalls when nobody reads); returns the answer's head as soon as it arrives.
async fn upload(addr: SocketAddr, path: &str, len: usize) -> String {
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let head = format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n\r\n");
    let body = tokio::spawn(async move {
        wr.write_all(head.as_bytes()).await?;
        let chunk = vec![b'u'; 64 << 10];
        let mut sent = 0;
        while sent < len {
            let n = chunk.len().min(len - sent);
            wr.write_all(&chunk[..n]).await?;
            sent += n;
        }
        Ok::<_, std::io::Error>(wr)
    });
    let answer = tokio::time::timeout(LIMIT, async {
        let mut out = Vec::new();
        let mut b = [0u8; 4096];
        while !out.windows(4).any(|w| w == b"\r\n\r\n") {
            match rd.read(&mut b).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&b[..n]),
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    })
    .await
    .expect("answer in time");
    body.abort();
    answer
}

/// A backend that takes a request's head (and what of the body fits in the buffers), writes
/// `answer` (may be empty), and then reads nothing more: with the connection open for
/// `LIMIT` if it `stalls`, else closing it.
async fn head_taker(answer: &'static [u8], stalls: bool) -> SocketAddr {
    raw_backend(move |mut s| async move {
        let mut b = [0u8; 4096];
        let _ = s.read(&mut b).await;
        let _ = s.write_all(answer).await;
        if stalls {
            tokio::time::sleep(LIMIT).await;
        }
    })
    .await
}

/// A 256 MiB upload through a site whose one backend is `backend`, with `timeouts.response`
/// `response`: the site, the answer's head and how long it took.
async fn upload_through(backend: SocketAddr, response: &str) -> (Lb, String, Duration) {
    let lb = lb(
        &format!(
            "  - {{ name: site, protocol: http, vip: 127.0.0.1, port: 8080, pool: web, access_log: {{log}},
      max_body_bytes: 1000000000, timeouts: {{ response: {response} }} }}\n"
        ),
        &pool("web", &[backend]),
    )
    .await;
    let started = std::time::Instant::now();
    let answer = upload(lb.addr("site"), "/up", 256 << 20).await;
    (lb, answer, started.elapsed())
}

#[tokio::test]
async fn a_backend_that_stops_taking_an_upload_gets_504_after_the_response_timeout() {
    let (lb, answer, took) = upload_through(head_taker(b"", true).await, "1s").await;
    assert_eq!(
        status_line(&answer),
        "HTTP/1.1 504 Gateway Timeout",
        "{answer}"
    );
    assert!(took >= Duration::from_secs(1));
    let line = &lb.log_lines(1).await[0];
    assert_eq!(line["status"], 504);
    assert_eq!(line["upstream_status"], "504");
}

#[tokio::test]
async fn a_backend_that_answers_an_upload_early_is_relayed_whether_it_stops_reading_or_closes() {
    // Each answers 413 at once, then either reads nothing more with the connection open, or
    // closes it (a reset: the body is unread).
    for closes in [false, true] {
        let early = head_taker(
            b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\n\r\nbig!",
            !closes,
        )
        .await;
        let (lb, answer, took) = upload_through(early, "5s").await;
        assert_eq!(
            status_line(&answer),
            "HTTP/1.1 413 Payload Too Large",
            "closes: {closes}: {answer}"
        );
        assert!(
            took < Duration::from_secs(5),
            "closes: {closes}: answered after {took:?}"
        );
        let line = &lb.log_lines(1).await[0];
        assert_eq!(line["status"], 413, "closes: {closes}");
        assert_eq!(line["upstream_status"], "413", "closes: {closes}");
        // The connection whose upload was cut short is not reused: the backend still sleeps
        // on it, and a request sent there would get no answer (504).
        let started = std::time::Instant::now();
        assert_eq!(send(lb.addr("site"), get("x", "/")).await.status, 413);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "closes: {closes}"
        );
    }
}

#[tokio::test]
async fn a_backend_that_answers_200_before_the_body_still_gets_all_of_it() {
    // A streaming backend: answers at once, then reads the whole body and reports its length
    // as the answer's body (10 digits).
    let streaming = raw_backend(|mut s| async move {
        let Some((got, head_end)) = read_request_head(&mut s).await else {
            return;
        };
        let head = String::from_utf8_lossy(&got[..head_end]).to_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
            .await;
        let mut body = got.len() - head_end;
        let mut b = vec![0u8; 64 << 10];
        while body < len {
            let Ok(n @ 1..) = s.read(&mut b).await else {
                break;
            };
            body += n;
        }
        let _ = s.write_all(format!("{body:010}").as_bytes()).await;
    })
    .await;
    let lb = site(&pool("web", &[streaming])).await;
    let size = 8 << 20;
    let req = Request::post("/stream")
        .header("host", "x")
        .body(Full::new(Bytes::from(vec![b'u'; size])))
        .unwrap();
    let answer = send(lb.addr("site"), req).await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.body,
        format!("{size:010}"),
        "the backend got the whole body"
    );
}

#[tokio::test]
async fn an_idle_backend_connection_the_backend_closes_is_closed_too() {
    // Answers one request on a kept-alive connection, closes its side a moment later, and
    // reports how long the proxy then took to close its own.
    let (tx, mut closed_after) = tokio::sync::mpsc::unbounded_channel();
    let backend = raw_backend(move |mut s| {
        let tx = tx.clone();
        async move {
            let mut b = [0u8; 4096];
            let _ = s.read(&mut b).await;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            let _ = s.shutdown().await;
            let closed = std::time::Instant::now();
            let _ = tokio::time::timeout(LIMIT, s.read(&mut b)).await;
            let _ = tx.send(closed.elapsed());
        }
    })
    .await;
    let lb = site(&pool("web", &[backend])).await;
    assert_eq!(send(lb.addr("site"), get("x", "/")).await.status, 200);
    let waited = tokio::time::timeout(LIMIT, closed_after.recv())
        .await
        .unwrap()
        .unwrap();
    // Idle connections are swept every second.
    assert!(waited < Duration::from_secs(3), "closed after {waited:?}");
}

#[tokio::test]
async fn a_refused_connect_moves_on_to_the_next_backend_and_is_logged() {
    let web = backend("web").await;
    let dead = dead_port();
    let lb = site(&pool("web", &[dead, web])).await;
    let post = Request::post("/form")
        .header("host", "x")
        .body(Full::new(Bytes::from_static(b"hello")))
        .unwrap();
    let r = send(lb.addr("site"), post).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.seen("body-bytes"),
        Some("5"),
        "the body went to the second backend"
    );
    let line = &lb.log_lines(1).await[0];
    assert_eq!(line["upstream_addr"], format!("{dead}, {web}").as_str());
    assert_eq!(line["upstream_status"], "-, 200");
    assert_eq!(line["bytes_in"], 5);
    for field in lb_agent::proxy::log::FIELDS {
        assert!(!line[field].is_null(), "{field} missing: {line}");
    }
    assert_eq!(line["method"], "POST");
    assert_eq!(line["listener"], "site");
    lb.shutdown(Duration::from_secs(1)).await;
}

// === balancing and persistence ===

#[tokio::test]
async fn insert_cookie_keeps_a_client_on_one_backend_over_30_requests() {
    let bs = [
        backend("b1").await,
        backend("b2").await,
        backend("b3").await,
    ];
    let lb = lb(
        "  - name: site
    protocol: http
    vip: 127.0.0.1
    port: 8080
    pool: web
    access_log: {log}
    session_persistence: { type: insert_cookie, cookie: SERVERID, timeout: 20m }
",
        &pool("web", &bs),
    )
    .await;
    let a = lb.addr("site");
    // Without the cookie, wrr spreads requests.
    let mut seen = std::collections::HashSet::new();
    for _ in 0..6 {
        seen.insert(send(a, get("x", "/")).await.backend().to_string());
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    let first = send(a, get("x", "/")).await;
    let set = first.headers["set-cookie"].to_str().unwrap().to_string();
    assert!(
        set.starts_with("SERVERID=") && set.contains("Max-Age=1200"),
        "{set}"
    );
    let cookie = set.split(';').next().unwrap().to_string();
    for _ in 0..30 {
        let req = Request::get("/")
            .header("host", "x")
            .header("cookie", format!("other=1; {cookie}"))
            .body(Full::default())
            .unwrap();
        assert_eq!(send(a, req).await.backend(), first.backend());
    }
    lb.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn app_cookie_follows_the_backends_own_session_cookie() {
    let bs = [backend("b1").await, backend("b2").await];
    let lb = lb(
        "  - name: site
    protocol: http
    vip: 127.0.0.1
    port: 8080
    pool: web
    access_log: {log}
    session_persistence: { type: app_cookie, cookie: sid }
",
        &pool("web", &bs),
    )
    .await;
    let a = lb.addr("site");
    let first = send(a, get("x", "/app-cookie")).await;
    let who = first.backend().to_string();
    for _ in 0..10 {
        let req = Request::get("/")
            .header("host", "x")
            .header("cookie", format!("sid={who}-session"))
            .body(Full::default())
            .unwrap();
        assert_eq!(send(a, req).await.backend(), who);
    }
    lb.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_keep_alive_connection_serves_100_requests_then_closes_http2_too() {
    let web = backend("web").await;
    let lb = site(&pool("web", &[web])).await;
    tokio::time::timeout(LIMIT, async {
        let s = TcpStream::connect(lb.addr("site")).await.unwrap();
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
            .await
            .unwrap();
        let conn = tokio::spawn(conn);
        for i in 1..=100 {
            let r = read_answer(tx.send_request(get("x", "/")).await.unwrap()).await;
            assert_eq!(r.status, 200);
            let close = r.headers.get("connection").is_some_and(|v| v == "close");
            assert_eq!(close, i == 100, "request {i}");
        }
        conn.await.unwrap().unwrap();
        assert!(tx.send_request(get("x", "/")).await.is_err());

        // HTTP/2 the same: after its 100th stream the connection sends GOAWAY and ends.
        let (mut tx, conn) = h2_prior_knowledge(lb.addr("site")).await;
        for i in 1..=100 {
            let req = Request::get("http://h2.example/")
                .body(Full::<Bytes>::default())
                .unwrap();
            let r = read_answer(tx.send_request(req).await.unwrap()).await;
            assert_eq!(r.status, 200, "stream {i}");
        }
        conn.await.unwrap().unwrap();
        let req = Request::get("http://h2.example/")
            .body(Full::<Bytes>::default())
            .unwrap();
        assert!(tx.send_request(req).await.is_err());
    })
    .await
    .unwrap();
    lb.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn http2_streams_past_the_request_cap_are_refused_even_when_opened_together() {
    let web = backend("web").await;
    let lb = lb(
        "  - { name: site, protocol: http, vip: 127.0.0.1, port: 8080, pool: web, access_log: {log}, max_requests_per_connection: 3 }\n",
        &pool("web", &[web]),
    )
    .await;
    tokio::time::timeout(LIMIT, async {
        let (tx, _conn) = h2_prior_knowledge(lb.addr("site")).await;
        let mut sent = tokio::task::JoinSet::new();
        for _ in 0..10 {
            let mut tx = tx.clone();
            sent.spawn(async move {
                let req = Request::get("http://h2.example/")
                    .body(Full::<Bytes>::default())
                    .unwrap();
                match tx.send_request(req).await {
                    Ok(r) => Ok(read_answer(r).await.status),
                    Err(e) => Err(e),
                }
            });
        }
        let answers = sent.join_all().await;
        let served = answers
            .iter()
            .filter(|a| a.as_ref().is_ok_and(|s| *s == 200))
            .count();
        assert_eq!(served, 3, "{answers:?}");
        assert_eq!(
            answers.iter().filter(|a| a.is_err()).count(),
            7,
            "{answers:?}"
        );
    })
    .await
    .unwrap();
    lb.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn idle_http2_and_silent_connections_close_after_the_idle_timeout_requests_keep_them() {
    let web = backend("web").await;
    let lb = lb(
        "  - { name: site, protocol: http, vip: 127.0.0.1, port: 8080, pool: web, access_log: {log}, timeouts: { idle: 1s } }\n",
        &pool("web", &[web]),
    )
    .await;
    let idle = Duration::from_secs(1);
    tokio::time::timeout(LIMIT, async {
        // HTTP/2 (prior knowledge): requests keep the connection; after the last one it closes
        // once the idle timeout passes.
        let s = TcpStream::connect(lb.addr("site")).await.unwrap();
        let (mut tx, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
                .await
                .unwrap();
        let started = std::time::Instant::now();
        let conn = tokio::spawn(conn);
        for i in 0..3 {
            if i > 0 {
                tokio::time::sleep(idle * 3 / 4).await;
            }
            let r = read_answer(tx.send_request(get("x", "/")).await.unwrap()).await;
            assert_eq!(r.status, 200);
        }
        let last = started.elapsed();
        conn.await.unwrap().unwrap();
        let closed = started.elapsed();
        assert!(last >= idle, "three requests over {last:?} kept it open");
        assert!(
            closed >= last + idle * 9 / 10 && closed < last + idle * 3,
            "closed {:?} after the last request",
            closed - last
        );

        // A connection that never sends anything closes too.
        let mut s = TcpStream::connect(lb.addr("site")).await.unwrap();
        let started = std::time::Instant::now();
        assert_eq!(s.read(&mut [0u8; 16]).await.unwrap(), 0);
        assert!(started.elapsed() >= idle * 9 / 10);
    })
    .await
    .unwrap();
    lb.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn http_redirects_to_the_https_listener() {
    let web = backend("web").await;
    let dir = TempDir::new();
    let certs = Certs::new(&dir, &[("site", &["www.example.com"])]);
    let lb = lb_in(
        dir,
        &format!(
            "  - name: plain
    protocol: http
    vip: 127.0.0.1
    port: 8080
    access_log: {{log}}
    redirect: {{ to: https, code: 301 }}
  - name: site
    protocol: https
    vip: 127.0.0.1
    port: 8443
    pool: web
    access_log: {{log}}
    tls: {{ certificates: [{}] }}
",
            certs.pair("site")
        ),
        &pool("web", &[web]),
    )
    .await;
    let r = send(lb.addr("plain"), get("www.example.com:8080", "/a/b?c=d")).await;
    assert_eq!(r.status, 301);
    assert_eq!(
        r.headers["location"],
        "https://www.example.com:8443/a/b?c=d"
    );
    // An IPv6 literal keeps its brackets; only the port is replaced.
    let r = send(lb.addr("plain"), get("[2001:db8::5]:8080", "/v6")).await;
    assert_eq!(r.headers["location"], "https://[2001:db8::5]:8443/v6");
    // HTTP/1.0 without a Host: the listener's address stands in.
    let answer = raw(lb.addr("plain"), b"GET /p HTTP/1.0\r\n\r\n").await;
    assert!(
        answer.contains("location: https://127.0.0.1:8443/p\r\n"),
        "{answer}"
    );
    // `OPTIONS *` names no resource to redirect to.
    let answer = raw(
        lb.addr("plain"),
        b"OPTIONS * HTTP/1.1\r\nHost: www.example.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(status_line(&answer).contains(" 400 "), "{answer}");
    assert!(!answer.contains("location"), "{answer}");
    lb.shutdown(Duration::from_secs(1)).await;
}

// === TLS ===

struct Certs {
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
    dir: PathBuf,
}

impl Certs {
    /// A CA and, for each `(name, dns names)`, `name.pem` (leaf + CA chain) and `name.key`.
    fn new(dir: &TempDir, leaves: &[(&str, &[&str])]) -> Self {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "test CA");
        let ca = params.self_signed(&ca_key).unwrap();
        let certs = Self {
            ca,
            ca_key,
            dir: dir.path().to_path_buf(),
        };
        for (name, dns) in leaves {
            certs.issue(name, dns);
        }
        certs
    }

    fn issue(&self, name: &str, dns: &[&str]) -> Vec<u8> {
        self.issue_with_key(name, dns, rcgen::KeyPair::generate().unwrap())
    }

    /// `issue` with the leaf's key given (`key` written as PKCS#8).
    fn issue_with_key(&self, name: &str, dns: &[&str], key: rcgen::KeyPair) -> Vec<u8> {
        let params =
            rcgen::CertificateParams::new(dns.iter().map(|d| d.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        // Written aside and renamed, as a deployment would: a reader never sees half a file.
        let tmp = self.dir.join(format!("{name}.tmp"));
        std::fs::write(&tmp, key.serialize_pem()).unwrap();
        std::fs::rename(&tmp, self.dir.join(format!("{name}.key"))).unwrap();
        std::fs::write(&tmp, format!("{}{}", cert.pem(), self.ca.pem())).unwrap();
        std::fs::rename(&tmp, self.dir.join(format!("{name}.pem"))).unwrap();
        cert.der().to_vec()
    }

    fn pair(&self, name: &str) -> String {
        format!(
            "{{ cert: {}/{name}.pem, key: {}/{name}.key }}",
            self.dir.display(),
            self.dir.display()
        )
    }

    fn connector(&self, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
        let mut cfg = self
            .client_config(rustls::DEFAULT_VERSIONS)
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
    }

    /// A client trusting the test CA and speaking `versions`, before its choice of client
    /// certificate.
    fn client_config(
        &self,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.der().clone()).unwrap();
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
    }
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// A TLS connection with SNI `name`, verified against the test CA (so it only succeeds with a
/// certificate valid for `name`); returns it and the leaf the server presented.
async fn tls(certs: &Certs, addr: SocketAddr, name: &str, alpn: &[&[u8]]) -> (Tls, Vec<u8>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let sni = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
    let s = tokio::time::timeout(LIMIT, certs.connector(alpn).connect(sni, tcp))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("TLS to {name}: {e}"));
    let leaf = s.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    (s, leaf)
}

#[tokio::test]
async fn heads_over_the_limit_get_431_over_tls_too_even_far_over_it() {
    let web = backend("web").await;
    let dir = TempDir::new();
    let certs = Certs::new(&dir, &[("site", &["site.example"])]);
    let lb = lb_in(
        dir,
        &format!(
            "  - {{ name: plain, protocol: http, vip: 127.0.0.1, port: 8080, pool: web, access_log: '{{log}}' }}
  - {{ name: site, protocol: https, vip: 127.0.0.1, port: 8443, pool: web, access_log: '{{log}}', tls: {{ certificates: [{}] }} }}
",
            certs.pair("site")
        ),
        &pool("web", &[web]),
    )
    .await;
    // Just over the limit (TLS records could take the buffer past it with the whole head in
    // it), and far over it (the client is still sending when the answer comes, more than the
    // sockets' buffers hold: closed at once, the connection would be reset under it).
    for size in [65_600, 70_000, 8_000_000] {
        let head = format!(
            "GET / HTTP/1.1\r\nHost: site.example\r\nX-Big: {}\r\n\r\n",
            "a".repeat(size)
        );
        for _ in 0..3 {
            let (mut s, _) = tls(&certs, lb.addr("site"), "site.example", &[b"http/1.1"]).await;
            let (mut rx, mut tx) = tokio::io::split(&mut s);
            let (sent, answer) = tokio::join!(tx.write_all(head.as_bytes()), async {
                let mut out = Vec::new();
                let _ = tokio::time::timeout(LIMIT, rx.read_to_end(&mut out)).await;
                String::from_utf8_lossy(&out).into_owned()
            });
            assert!(sent.is_ok(), "{size}: sending the head: {sent:?}");
            assert!(
                status_line(&answer).contains(" 431 "),
                "{size} over TLS: {answer:?}"
            );
            let answer = raw(lb.addr("plain"), head.as_bytes()).await;
            assert!(status_line(&answer).contains(" 431 "), "{size}: {answer:?}");
        }
    }
    lb.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_tls_client_that_closes_its_side_after_its_request_still_gets_the_answer() {
    let web = backend("web").await;
    let dir = TempDir::new();
    let certs = Certs::new(&dir, &[("site", &["site.example"])]);
    let lb = https_site(dir, &certs.pair("site"), web).await;
    // As `printf … | socat - OPENSSL:…` does; and with a bare FIN, no close_notify.
    for i in 0..10 {
        let (mut s, _) = tls(&certs, lb.addr("site"), "site.example", &[b"http/1.1"]).await;
        s.write_all(b"GET /p HTTP/1.1\r\nHost: site.example\r\n\r\n")
            .await
            .unwrap();
        if i % 2 == 0 {
            s.shutdown().await.unwrap();
        } else {
            s.flush().await.unwrap();
            socket2::SockRef::from(s.get_ref().0)
                .shutdown(std::net::Shutdown::Write)
                .unwrap();
        }
        let mut out = Vec::new();
        let _ = tokio::time::timeout(LIMIT, s.read_to_end(&mut out))
            .await
            .expect("the proxy closes after the answer");
        let answer = String::from_utf8_lossy(&out);
        assert!(status_line(&answer).contains(" 200 "), "{answer:?}");
    }
    lb.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn sni_picks_the_certificate_including_wildcards_and_h2_is_offered() {
    let web = backend("web").await;
    let dir = TempDir::new();
    let certs = Certs::new(&dir, &[]);
    let site = certs.issue("site", &["www.example.com"]);
    let wild = certs.issue("wild", &["*.api.example.com"]);
    let lb = lb_in(
        dir,
        &format!(
            "  - name: site
    protocol: https
    vip: 127.0.0.1
    port: 8443
    pool: web
    access_log: {{log}}
    tls: {{ certificates: [{}, {}] }}
",
            certs.pair("site"),
            certs.pair("wild")
        ),
        &pool("web", &[web]),
    )
    .await;
    let a = lb.addr("site");
    assert_eq!(tls(&certs, a, "www.example.com", &[]).await.1, site);
    assert_eq!(tls(&certs, a, "eu.api.example.com", &[]).await.1, wild);

    // HTTP/2 over ALPN; the backend gets HTTP/1.1 with the Host from :authority.
    let (s, _) = tls(&certs, a, "eu.api.example.com", &[b"h2", b"http/1.1"]).await;
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut tx, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::get("https://eu.api.example.com/h2")
        .body(Full::<Bytes>::default())
        .unwrap();
    let res = tx.send_request(req).await.unwrap();
    assert_eq!(res.version(), hyper::Version::HTTP_2);
    let r = read_answer(res).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.seen("host"), Some("eu.api.example.com"));
    assert_eq!(r.seen("x-forwarded-proto"), Some("https"));
    assert_eq!(r.seen("x-forwarded-port"), Some("8443"));
    let line = &lb.log_lines(1).await[0];
    assert_eq!(line["protocol"], "HTTP/2.0");
    // The client connection's RTT, read from the kernel (µs; loopback's is small, not 0).
    assert!(
        line["tcpinfo_rtt"].as_u64().is_some_and(|rtt| rtt > 0),
        "{line}"
    );
    lb.shutdown(Duration::from_secs(1)).await;
}

/// `openssl` with `args`, its standard output.
fn openssl(args: &[&str]) -> Vec<u8> {
    let out = std::process::Command::new("openssl")
        .args(args)
        .output()
        .expect("run openssl");
    assert!(out.status.success(), "openssl {args:?}: {out:?}");
    out.stdout
}

#[tokio::test]
async fn rsa_ec_and_pkcs8_keys_serve_tls_1_2_and_1_3_and_sessions_resume() {
    let web = backend("web").await;
    let dir = TempDir::new();
    let certs = Certs::new(&dir, &[]);
    // rcgen signs with an RSA key but does not make one.
    let rsa = openssl(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
    ]);
    let rsa = rcgen::KeyPair::from_pem(std::str::from_utf8(&rsa).unwrap()).unwrap();
    let leaves = [
        (
            "rsa",
            certs.issue_with_key("rsa", &["rsa.example.com"], rsa),
            "-----BEGIN RSA PRIVATE KEY-----",
        ),
        (
            "ec",
            certs.issue("ec", &["ec.example.com"]),
            "-----BEGIN EC PRIVATE KEY-----",
        ),
        (
            "p8",
            certs.issue("p8", &["p8.example.com"]),
            "-----BEGIN PRIVATE KEY-----",
        ),
    ];
    // The RSA and EC keys in their algorithms' own encodings (PKCS#1, SEC1).
    for name in ["rsa", "ec"] {
        let key = certs.dir.join(format!("{name}.key"));
        let pem = openssl(&["pkey", "-in", key.to_str().unwrap(), "-traditional"]);
        std::fs::write(&key, pem).unwrap();
    }
    for (name, _, header) in &leaves {
        let pem = std::fs::read_to_string(certs.dir.join(format!("{name}.key"))).unwrap();
        assert!(pem.starts_with(header), "{name}.key: {pem}");
    }
    let pairs: Vec<String> = leaves.iter().map(|(n, ..)| certs.pair(n)).collect();
    let lb = https_site(dir, &pairs.join(", "), web).await;
    let a = lb.addr("site");
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        for (name, leaf, _) in &leaves {
            let host = format!("{name}.example.com");
            // One client per key and version: its session store holds what the first
            // connection was given, which the second offers.
            let connector = tokio_rustls::TlsConnector::from(Arc::new(
                certs.client_config(&[version]).with_no_client_auth(),
            ));
            for kind in [rustls::HandshakeKind::Full, rustls::HandshakeKind::Resumed] {
                let tcp = TcpStream::connect(a).await.unwrap();
                let sni = rustls::pki_types::ServerName::try_from(host.clone()).unwrap();
                let s = tokio::time::timeout(LIMIT, connector.connect(sni, tcp))
                    .await
                    .unwrap()
                    .unwrap_or_else(|e| panic!("{name} over {:?}: {e}", version.version));
                let c = s.get_ref().1;
                assert_eq!(c.protocol_version(), Some(version.version));
                assert_eq!(
                    c.handshake_kind(),
                    Some(kind),
                    "{name} over {:?}",
                    version.version
                );
                assert_eq!(c.peer_certificates().unwrap()[0].as_ref(), &leaf[..]);
                // A request through it; reading the answer also takes in the tickets TLS 1.3
                // sends after the handshake.
                let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
                    .await
                    .unwrap();
                tokio::spawn(conn);
                let r = read_answer(tx.send_request(get(&host, "/")).await.unwrap()).await;
                assert_eq!(r.status, 200);
            }
        }
    }
    lb.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_replaced_certificate_serves_new_handshakes_and_live_connections_continue() {
    let web = backend("web").await;
    let dir = TempDir::new();
    let certs = Certs::new(&dir, &[]);
    let old = certs.issue("site", &["www.example.com"]);
    let lb = https_site(dir, &certs.pair("site"), web).await;
    let a = lb.addr("site");
    let (live, leaf) = tls(&certs, a, "www.example.com", &[b"http/1.1"]).await;
    assert_eq!(leaf, old);
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(live))
        .await
        .unwrap();
    tokio::spawn(conn);
    assert_eq!(
        read_answer(tx.send_request(get("www.example.com", "/")).await.unwrap())
            .await
            .status,
        200
    );

    // mtime granularity: make sure the replacement is visibly newer.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let new = certs.issue("site", &["www.example.com"]);
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        if tls(&certs, a, "www.example.com", &[]).await.1 == new {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "new certificate never served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The connection made before the reload still works.
    assert_eq!(
        read_answer(tx.send_request(get("www.example.com", "/")).await.unwrap())
            .await
            .status,
        200
    );
    lb.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn bad_pem_is_a_config_error_naming_the_file() {
    let dir = TempDir::new();
    std::fs::write(
        dir.path().join("bad.pem"),
        "-----BEGIN CERTIFICATE-----\nnot base64!\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("bad.key"), "nothing here").unwrap();
    let text = format!(
        "agent:\n  interfaces: [lo]\nlisteners:\n  - name: s\n    protocol: https\n    vip: 127.0.0.1\n    port: 443\n    pool: web\n    tls:\n      certificates:\n        - {{ cert: {d}/bad.pem, key: {d}/bad.key }}\npools:\n  - name: web\n    backends: [{{ address: 127.0.0.1, port: 1 }}]\n",
        d = dir.path().display()
    );
    let e = config::parse("lb.yaml", &text, &config::Host::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("lb.yaml:11:19: listeners[0].tls.certificates[0].cert: ")
            && e.contains("listeners[0].tls.certificates[0].cert")
            && e.contains("bad.pem"),
        "{e}"
    );
}

// === WebSocket and shutdown ===

#[tokio::test]
async fn websocket_upgrade_is_tunnelled_and_echoes() {
    let web = backend("web").await;
    let lb = site(&pool("web", &[web])).await;
    tokio::time::timeout(LIMIT, async {
        let mut s = TcpStream::connect(lb.addr("site")).await.unwrap();
        s.write_all(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await
        .unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            assert_eq!(s.read(&mut b).await.unwrap(), 1);
            head.push(b[0]);
        }
        let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 101"), "{head}");
        assert!(head.contains("upgrade: websocket"), "{head}");
        for msg in [&b"ping"[..], b"frame two"] {
            s.write_all(msg).await.unwrap();
            let mut back = vec![0u8; msg.len()];
            s.read_exact(&mut back).await.unwrap();
            assert_eq!(back, msg);
        }
    })
    .await
    .unwrap();
    lb.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn shutdown_stops_accepting_and_lets_in_flight_requests_finish() {
    let web = backend("web").await;
    let lb = site(&pool("web", &[web])).await;
    let a = lb.addr("site");
    let in_flight = tokio::spawn(send(a, get("x", "/slow")));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = lb.stop.send(());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(TcpStream::connect(a).await.is_err(), "still accepting");
    let r = in_flight.await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.backend(), "web");
    lb.shutdown(Duration::from_secs(5)).await;
}

// === active health checks ===

/// A backend answering every request with its name, or with 500 while `sick` is set.
async fn switchable_backend(name: &'static str, sick: Arc<AtomicBool>) -> SocketAddr {
    raw_backend(move |mut s| {
        let sick = sick.clone();
        async move {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let answer = if sick.load(Ordering::Relaxed) {
                "HTTP/1.1 500 Internal Server Error\r\ncontent-length: 4\r\nconnection: close\r\n\r\nsick".to_string()
            } else {
                format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{name}", name.len())
            };
            let _ = s.write_all(answer.as_bytes()).await;
        }
    })
    .await
}

/// Sends requests until `done` holds for ten in a row; the time that took.
async fn until(lb: SocketAddr, within: Duration, done: impl Fn(&Answer) -> bool) -> Duration {
    let started = std::time::Instant::now();
    let mut streak = 0;
    while streak < 10 {
        assert!(started.elapsed() < within, "not within {within:?}");
        let a = send(lb, get("site", "/")).await;
        streak = if done(&a) { streak + 1 } else { 0 };
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

#[tokio::test]
async fn http_probes_take_a_failing_backend_out_and_back_and_none_left_is_503() {
    let (sick_a, sick_b) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let a = switchable_backend("a", sick_a.clone()).await;
    let b = switchable_backend("b", sick_b.clone()).await;
    let check = "    health_check: { protocol: http, path: /healthz, interval: 1s, timeout: 1s, healthy_threshold: 2, unhealthy_threshold: 2 }\n";
    let pools =
        pool("web", &[a, b]).replacen("    backends:\n", &format!("{check}    backends:\n"), 1);
    let lb = site(&pools).await;
    let addr = lb.addr("site");
    // Both online after their first probe (within one interval): both answer.
    let (mut seen_a, mut seen_b) = (false, false);
    let started = std::time::Instant::now();
    while !(seen_a && seen_b) {
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "both backends online"
        );
        let ans = send(addr, get("site", "/")).await;
        seen_a |= ans.body == "a";
        seen_b |= ans.body == "b";
    }

    // interval × unhealthy_threshold + timeout = 3 s.
    sick_b.store(true, Ordering::Relaxed);
    let detection = until(addr, Duration::from_secs(4), |ans| ans.body == "a").await;
    println!("http: b out after {detection:?}");
    sick_a.store(true, Ordering::Relaxed);
    until(addr, Duration::from_secs(4), |ans| {
        ans.status == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    // interval × healthy_threshold = 2 s (plus the probe in flight).
    sick_b.store(false, Ordering::Relaxed);
    let recovery = until(addr, Duration::from_millis(3500), |ans| ans.body == "b").await;
    println!("http: b back after {recovery:?}");
    lb.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn the_listeners_acl_refuses_clients_at_accept() {
    let web = backend("web").await;
    let with_acl = |acl: &str| {
        format!("  - {{ name: site, protocol: http, vip: 127.0.0.1, port: 8080, pool: web, access_log: {{log}}, acl: {acl} }}\n")
    };
    let denied = lb(&with_acl("{ deny: [127.0.0.0/8] }"), &pool("web", &[web])).await;
    let mut s = TcpStream::connect(denied.addr("site")).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(LIMIT, s.read(&mut buf)).await.unwrap();
    assert!(
        matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset)
            || matches!(read, Ok(0)),
        "{read:?}"
    );
    let allowed = lb(
        &with_acl("{ allow: [127.0.0.1/32], deny: [10.0.0.0/8] }"),
        &pool("web", &[web]),
    )
    .await;
    let a = send(allowed.addr("site"), get("x", "/")).await;
    assert_eq!(a.status, StatusCode::OK);
}

/// A backend behind TLS (with `cert`/`key`, PEM files) answering like `backend`.
async fn tls_backend(name: &'static str, cert: &Path, key: &Path) -> SocketAddr {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_file_iter(cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key).unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    serve_backend(name, Some(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))).await
}

#[tokio::test]
async fn client_certificates_are_required_from_the_ca_and_backends_can_be_reached_over_tls() {
    use rustls::pki_types::pem::PemObject;
    let dir = TempDir::new();
    let certs = Certs::new(
        &dir,
        &[("site", &["www.example.com"]), ("back", &["backend"])],
    );
    let secure = tls_backend(
        "secure",
        &dir.path().join("back.pem"),
        &dir.path().join("back.key"),
    )
    .await;
    std::fs::write(dir.path().join("ca.pem"), certs.ca.pem()).unwrap();
    let lb = lb_in(
        dir,
        &format!(
            "  - name: site
    protocol: https
    vip: 127.0.0.1
    port: 8443
    pool: web
    backend_protocol: https
    access_log: {{log}}
    tls: {{ certificates: [{}], client_ca: {{dir}}/ca.pem }}
",
            certs.pair("site")
        ),
        &pool("web", &[secure]),
    )
    .await;
    let a = lb.addr("site");

    // No client certificate: the handshake (or the first read) fails.
    let tcp = TcpStream::connect(a).await.unwrap();
    let sni = rustls::pki_types::ServerName::try_from("www.example.com").unwrap();
    let refused = match certs.connector(&[]).connect(sni.clone(), tcp).await {
        Err(_) => true,
        Ok(mut s) => {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = s
                .write_all(b"GET / HTTP/1.1\r\nhost: www.example.com\r\n\r\n")
                .await;
            let mut buf = [0u8; 16];
            !matches!(s.read(&mut buf).await, Ok(n) if n > 0)
        }
    };
    assert!(refused, "a client without a certificate was served");

    // With one the CA issued: served, by the backend over TLS.
    let client_der = certs.issue("client", &["client"]);
    let client_key =
        rustls::pki_types::PrivateKeyDer::from_pem_file(certs.dir.join("client.key")).unwrap();
    let cfg = certs
        .client_config(rustls::DEFAULT_VERSIONS)
        .with_client_auth_cert(vec![client_der.into(), certs.ca.der().clone()], client_key)
        .unwrap();
    let tcp = TcpStream::connect(a).await.unwrap();
    let s = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(sni, tcp)
        .await
        .expect("mutual TLS handshake");
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    let res = tx
        .send_request(get("www.example.com", "/mtls"))
        .await
        .unwrap();
    let r = read_answer(res).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.backend(), "secure");
    lb.shutdown(Duration::from_secs(1)).await;
}
