//! HTTP/1.1 exchanges with backends, driven by the request's own task.
//!
//! hyper's client runs every backend connection as a task of its own and hands each request
//! and response across channels between that task and the request's. On `cargo xtask bench l7`
//! that cost about 3 µs of CPU per request, as much as nginx spends on a whole request. Here
//! the request's task writes the request itself and reads the response when the client's
//! connection asks for the body, as nginx does. Heads are parsed by httparse (hyper's parser);
//! message framing follows RFC 9112 §6.

use std::{
    fmt,
    future::Future,
    io::{self, Write as _},
    pin::Pin,
    task::{ready, Context, Poll, Waker},
    time::{Duration, Instant},
};

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::{
    body::{Body, Frame, SizeHint},
    header::{self, HeaderMap, HeaderName, HeaderValue},
    Method, Response, StatusCode, Version,
};
use tokio::{
    io::{AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};
use tokio_util::either::Either;

use super::{
    headers::{connection_has, Forwarded},
    BodyError, RequestBody,
};

/// A response head larger than this is refused (502): the limit of the client side's heads.
const MAX_HEAD_BYTES: usize = super::DEFAULT_MAX_HEADER_BYTES;
/// Headers in one response head.
const MAX_HEADERS: usize = 128;
/// How much room each read from a backend gets.
const READ_CHUNK: usize = 16 << 10;
/// A chunk-size line, with its extensions, longer than this is refused.
const MAX_CHUNK_LINE: usize = 4 << 10;

/// A backend connection's transport: TCP, or TLS over it (`backend_protocol: https`).
pub type Io = Either<TcpStream, Box<tokio_rustls::client::TlsStream<TcpStream>>>;

/// The TCP socket under a transport.
fn tcp(io: &Io) -> &TcpStream {
    match io {
        Either::Left(s) => s,
        Either::Right(s) => s.get_ref().0,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("the client's request body: {0}")]
    Body(#[source] BodyError),
    #[error("backend I/O: {0}")]
    Io(#[from] io::Error),
    #[error("backend closed the connection before a complete response head")]
    Closed,
    #[error("invalid response head: {0}")]
    Invalid(&'static str),
    /// The backend took none of the request body, or sent no response head, for this long.
    #[error("backend stalled for {0:?}")]
    Timeout(Duration),
}

/// A request's head as backends get it (forwarded headers added, hop-by-hop ones removed),
/// serialized once: a retry on another backend sends the same bytes, and the client's request,
/// whose header values share hyper's read buffer, can be dropped before any backend answers
/// (hyper then reads the client's next request into that buffer instead of a new one).
pub struct Head {
    bytes: Vec<u8>,
    /// The body goes chunked (it has one, of no declared length).
    chunked: bool,
}

impl Head {
    pub fn new(
        method: &Method,
        target: &str,
        headers: &HeaderMap,
        forwarded: &Forwarded<'_>,
        has_body: bool,
    ) -> Self {
        let has_length = headers.contains_key(header::CONTENT_LENGTH);
        let chunked = has_body && !has_length;
        let mut bytes = Vec::with_capacity(512);
        bytes.extend_from_slice(method.as_str().as_bytes());
        bytes.push(b' ');
        bytes.extend_from_slice(target.as_bytes());
        bytes.extend_from_slice(b" HTTP/1.1\r\n");
        forwarded.write_lines(headers, &mut bytes);
        if chunked {
            bytes.extend_from_slice(b"transfer-encoding: chunked\r\n");
        } else if !has_body
            && !has_length
            && matches!(*method, Method::POST | Method::PUT | Method::PATCH)
        {
            // A body-carrying method says it has none (RFC 9110 §8.6).
            bytes.extend_from_slice(b"content-length: 0\r\n");
        }
        bytes.extend_from_slice(b"\r\n");
        Self { bytes, chunked }
    }
}

/// One kept-alive HTTP/1.1 connection to a backend, with what was read past the last message.
pub struct Conn {
    io: Io,
    buf: BytesMut,
    /// Response bytes read during the current exchange (to tell a connection the backend had
    /// already closed from one that failed mid-answer).
    received: bool,
    /// The backend answered before the request body was sent whole, so the rest was not
    /// sent: the connection cannot take another request.
    body_cut: bool,
    /// A final answer that came while the request body was going out. Boxed: it is rare, and
    /// inline it would be a third of every response the proxy moves around.
    answer: Option<Box<Response<()>>>,
    /// The timer of every exchange's timed steps, kept: moving an armed timer's deadline later
    /// is a store, where a new one per step is a timer-wheel insert and removal (and a clock
    /// read) per request.
    timer: Timer,
}

type Timer = Option<Pin<Box<tokio::time::Sleep>>>;

/// How long a backend may take, counted from when: the response head is due `timeout` after
/// the request went out (`sent`, read by the caller, who times the exchange too); each body
/// write `timeout` after it began.
#[derive(Clone, Copy, Debug)]
pub struct Wait {
    pub sent: Instant,
    pub timeout: Duration,
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("h1::Conn")
            .field("peer", &tcp(&self.io).peer_addr().ok())
            .finish()
    }
}

impl Conn {
    pub fn new(io: Io) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
            received: false,
            body_cut: false,
            answer: None,
            timer: None,
        }
    }

    /// Whether an idle connection can take a request: nothing (data or the backend's close)
    /// has arrived since its last response. Asks the runtime's cached readiness, so a quiet
    /// connection costs no system call.
    pub fn is_reusable(&self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        match tcp(&self.io).poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            // The readiness may be left over from the last response's read; a read tells.
            // Under TLS that read would eat a record, so the connection is not reused.
            Poll::Ready(Ok(())) => match &self.io {
                Either::Left(s) => {
                    matches!(s.try_read(&mut [0u8; 1]), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
                }
                Either::Right(_) => false,
            },
        }
    }

    /// Whether the last exchange failed before any of the response arrived.
    pub fn nothing_received(&self) -> bool {
        !self.received
    }

    /// Sends the request (head, then body) and reads the response head, waiting at most
    /// `wait.timeout` for it once the request is sent. The response's body reads from this
    /// connection, and hands it back for reuse once complete
    /// ([`Incoming::take_reusable`]).
    pub async fn exchange(
        &mut self,
        head: &Head,
        body: RequestBody,
        wait: Wait,
    ) -> Result<Response<()>, ExchangeError> {
        self.received = false;
        self.answer = None;
        let has_body = !body.is_end_stream();
        let timeout = wait.timeout;
        match self.send(head, body, timeout).await {
            Ok(cut) => self.body_cut = cut,
            // A backend that refused the body and closed (a reset, as the body was left
            // unread) fails the write before the runtime reports its answer readable.
            // Bodiless requests are left alone: what a kept-alive connection holds then
            // is no answer to them, and they may go again on another connection.
            Err(ExchangeError::Io(e)) if has_body && self.answer.is_none() => {
                match self.head_within(Instant::now() + timeout, timeout).await {
                    Ok(res) if refuses_body(&res) => {
                        self.body_cut = true;
                        return Ok(res);
                    }
                    _ => return Err(ExchangeError::Io(e)),
                }
            }
            Err(e) => return Err(e),
        }
        // A bodiless request went out as `sent`; after a body, the wait starts now.
        let due = if has_body { Instant::now() } else { wait.sent } + timeout;
        match self.answer.take() {
            Some(res) => Ok(*res),
            None => self.head_within(due, timeout).await,
        }
    }

    /// The final response head (1xx interim answers other than 101 are skipped), by
    /// `deadline`.
    async fn head_within(
        &mut self,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Response<()>, ExchangeError> {
        self.timed(deadline, timeout, |c, cx| {
            c.poll_head(cx).map(|r| r?.ok_or(ExchangeError::Closed))
        })
        .await
    }

    /// Polls `step` until it is ready, failing with [`ExchangeError::Timeout`] (after
    /// `timeout`) at `deadline`.
    async fn timed<T>(
        &mut self,
        deadline: Instant,
        timeout: Duration,
        mut step: impl FnMut(&mut Self, &mut Context<'_>) -> Poll<Result<T, ExchangeError>>,
    ) -> Result<T, ExchangeError> {
        let deadline = tokio::time::Instant::from_std(deadline);
        let mut timer = self
            .timer
            .take()
            .unwrap_or_else(|| Box::pin(tokio::time::sleep_until(deadline)));
        timer.as_mut().reset(deadline);
        let done = std::future::poll_fn(|cx| match step(self, cx) {
            Poll::Ready(r) => Poll::Ready(r),
            Poll::Pending => timer
                .as_mut()
                .poll(cx)
                .map(|()| Err(ExchangeError::Timeout(timeout))),
        })
        .await;
        self.timer = Some(timer);
        done
    }

    async fn send(
        &mut self,
        head: &Head,
        mut body: RequestBody,
        timeout: Duration,
    ) -> Result<bool, ExchangeError> {
        // The head goes out without a timer: it is at most the header limit (64 KiB), which
        // the connection's buffers take whether or not the backend reads.
        self.io.write_all(&head.bytes).await?;
        if body.is_end_stream() {
            // TLS buffers what it encrypts until flushed.
            self.io.flush().await?;
            return Ok(false);
        }
        // A body can be more than the buffers take: a backend that stops reading it fails
        // the exchange after `timeout` without progress (nginx's proxy_send_timeout), unless
        // it answered meanwhile.
        let mut chunk = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(ExchangeError::Body)?;
            let Ok(data) = frame.into_data() else {
                // Trailers are not passed on.
                continue;
            };
            if data.is_empty() {
                continue;
            }
            let cut = if head.chunked {
                chunk.clear();
                let _ = write!(chunk, "{:x}\r\n", data.len());
                chunk.extend_from_slice(&data);
                chunk.extend_from_slice(b"\r\n");
                self.write_body(&chunk, timeout).await?
            } else {
                self.write_body(&data, timeout).await?
            };
            if cut {
                return Ok(true);
            }
        }
        if head.chunked && self.write_body(b"0\r\n\r\n", timeout).await? {
            return Ok(true);
        }
        self.timed(Instant::now() + timeout, timeout, |c, cx| {
            Pin::new(&mut c.io).poll_flush(cx).map_err(Into::into)
        })
        .await?;
        Ok(false)
    }

    /// Writes body bytes, watching the connection for the backend's final answer meanwhile,
    /// until it came (`self.answer`). An answer refusing the body (a 413 or 401 to an upload, say)
    /// ends the body: the rest is not written (true). Others (a streaming backend's 200)
    /// wait for the whole body. Fails after `timeout` without the bytes written.
    async fn write_body(
        &mut self,
        mut bytes: &[u8],
        timeout: Duration,
    ) -> Result<bool, ExchangeError> {
        // The backend's end of stream: nothing more to watch for (the writes will fail).
        let mut eof = false;
        self.timed(Instant::now() + timeout, timeout, |c, cx| loop {
            if c.answer.is_none() && !eof {
                match c.poll_head(cx) {
                    Poll::Ready(Ok(Some(res))) => {
                        let refused = refuses_body(&res);
                        c.answer = Some(Box::new(res));
                        if refused {
                            return Poll::Ready(Ok(true));
                        }
                    }
                    Poll::Ready(Ok(None)) => eof = true,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {}
                }
            }
            if bytes.is_empty() {
                return Poll::Ready(Ok(false));
            }
            match ready!(Pin::new(&mut c.io).poll_write(cx, bytes)) {
                Ok(0) => return Poll::Ready(Err(io::Error::from(io::ErrorKind::WriteZero).into())),
                Ok(n) => bytes = &bytes[n..],
                Err(e) => return Poll::Ready(Err(e.into())),
            }
        })
        .await
    }

    /// Reads until a final response head is complete; `None`: the backend's end of stream
    /// came first.
    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Response<()>>, ExchangeError>> {
        loop {
            if let Some(res) = self.parse_head()? {
                return Poll::Ready(Ok(Some(res)));
            }
            if self.buf.len() >= MAX_HEAD_BYTES {
                return Poll::Ready(Err(ExchangeError::Invalid("head too large")));
            }
            if ready!(self.poll_fill(cx))? == 0 {
                return Poll::Ready(Ok(None));
            }
        }
    }

    /// A complete final head from the buffer (taken out of it), or `None` for more bytes.
    fn parse_head(&mut self) -> Result<Option<Response<()>>, ExchangeError> {
        loop {
            if self.buf.is_empty() {
                return Ok(None);
            }
            let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut parsed = httparse::Response::new(&mut slots);
            let len = match parsed.parse(&self.buf) {
                Ok(httparse::Status::Complete(n)) => n,
                Ok(httparse::Status::Partial) => return Ok(None),
                Err(e) => return Err(ExchangeError::Invalid(parse_error(e))),
            };
            let code = parsed.code.unwrap_or_default();
            let status =
                StatusCode::from_u16(code).map_err(|_| ExchangeError::Invalid("status code"))?;
            if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
                self.buf.advance(len);
                continue;
            }
            let version = match parsed.version {
                Some(0) => Version::HTTP_10,
                _ => Version::HTTP_11,
            };
            // Values are taken as slices of the head's bytes, not copied: their offsets now,
            // the slices once the head is out of the buffer.
            let base = self.buf.as_ptr() as usize;
            let mut fields: smallvec::SmallVec<[(HeaderName, usize, usize); 24]> =
                smallvec::SmallVec::new();
            for h in parsed.headers.iter() {
                let name = HeaderName::from_bytes(h.name.as_bytes())
                    .map_err(|_| ExchangeError::Invalid("header name"))?;
                let start = h.value.as_ptr() as usize - base;
                fields.push((name, start, start + h.value.len()));
            }
            let head = self.buf.split_to(len).freeze();
            let mut map = HeaderMap::with_capacity(fields.len());
            for (name, start, end) in fields {
                let value = HeaderValue::from_maybe_shared(head.slice(start..end))
                    .map_err(|_| ExchangeError::Invalid("header value"))?;
                map.append(name, value);
            }
            let mut res = Response::new(());
            *res.status_mut() = status;
            *res.version_mut() = version;
            *res.headers_mut() = map;
            return Ok(Some(res));
        }
    }

    /// Reads what the backend sent into the buffer; 0 at its end of stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.buf.reserve(READ_CHUNK);
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.io),
            cx,
            &mut self.buf
        ))?;
        self.received |= n > 0;
        Poll::Ready(Ok(n))
    }

    /// The transport and what was read past the response head, for a tunnel (101).
    pub fn into_parts(self) -> (Io, Bytes) {
        (self.io, self.buf.freeze())
    }
}

/// Whether a final answer that came while the request body was going out tells the client to
/// stop sending it: an error (RFC 9112 §9.5).
fn refuses_body(res: &Response<()>) -> bool {
    res.status().is_client_error() || res.status().is_server_error()
}

fn parse_error(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::TooManyHeaders => "too many headers",
        httparse::Error::Status => "status line",
        httparse::Error::Version => "version",
        _ => "malformed head",
    }
}

/// How a response's body ends (RFC 9112 §6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Bytes left of a Content-Length body.
    Length(u64),
    ChunkSize,
    /// Bytes left of the current chunk.
    ChunkData(u64),
    ChunkEnd,
    Trailers,
    /// Until the backend closes.
    UntilClose,
    /// 101: the connection is now the tunnel's.
    Upgraded,
    Done,
}

/// A backend response's body, read from its connection as the client side asks for it.
pub struct Incoming {
    conn: Option<Conn>,
    state: State,
    /// The connection may take another request once the body is complete.
    keep_alive: bool,
    /// How long the backend may send nothing while the body is read (nginx's
    /// `proxy_read_timeout`, between two reads).
    timeout: Duration,
    /// A read is waiting on the backend, timed from when it began.
    waiting: bool,
}

impl Incoming {
    /// The body of `res` (a head `conn` just read, for a request with `method`), and the head
    /// with Content-Length dropped where Transfer-Encoding overrides it. A read that waits
    /// `timeout` for the backend fails the body.
    pub fn new(
        conn: Conn,
        method: &Method,
        res: &mut Response<()>,
        timeout: Duration,
    ) -> Result<Self, ExchangeError> {
        let status = res.status();
        // HTTP/1.0 keeps a connection only when it says so.
        let keep_alive = !conn.body_cut
            && !connection_has(res.headers(), "close")
            && (res.version() == Version::HTTP_11 || connection_has(res.headers(), "keep-alive"));
        let headers = res.headers_mut();
        let state = if status == StatusCode::SWITCHING_PROTOCOLS {
            State::Upgraded
        } else if *method == Method::HEAD
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            State::Done
        } else if headers.contains_key(header::TRANSFER_ENCODING) {
            // Chunked only when it is the last coding; then the length is unknown either way.
            let chunked = headers
                .get_all(header::TRANSFER_ENCODING)
                .iter()
                .next_back()
                .and_then(|v| v.to_str().ok()?.rsplit(',').next())
                .is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"));
            headers.remove(header::CONTENT_LENGTH);
            if chunked {
                State::ChunkSize
            } else {
                State::UntilClose
            }
        } else if let Some(n) = content_length(headers)? {
            State::Length(n)
        } else {
            State::UntilClose
        };
        let state = if state == State::Length(0) {
            State::Done
        } else {
            state
        };
        Ok(Self {
            conn: Some(conn),
            keep_alive: keep_alive && state != State::UntilClose,
            state,
            timeout,
            waiting: false,
        })
    }

    /// The connection, once the body is complete and it can take another request.
    pub fn take_reusable(&mut self) -> Option<Conn> {
        if self.state == State::Done && self.keep_alive {
            self.conn.take().filter(|c| c.buf.is_empty())
        } else {
            None
        }
    }

    /// The connection of a 101 answer, for the tunnel.
    pub fn take_upgraded(&mut self) -> Option<Conn> {
        if self.state == State::Upgraded {
            self.conn.take()
        } else {
            None
        }
    }

    fn fail(&mut self, e: io::Error) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.conn = None;
        self.state = State::Done;
        self.keep_alive = false;
        Poll::Ready(Some(Err(e)))
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

impl Body for Incoming {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            // Whether the buffer holds nothing useful yet: read, then look again.
            let need_more = match this.state {
                State::Done | State::Upgraded => return Poll::Ready(None),
                State::Length(rem) | State::ChunkData(rem) if !conn.buf.is_empty() => {
                    let n = rem.min(conn.buf.len() as u64);
                    let data = conn.buf.split_to(n as usize).freeze();
                    this.state = match this.state {
                        State::Length(_) if n == rem => State::Done,
                        State::Length(_) => State::Length(rem - n),
                        _ if n == rem => State::ChunkEnd,
                        _ => State::ChunkData(rem - n),
                    };
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::Length(_) | State::ChunkData(_) => true,
                State::ChunkSize => match httparse::parse_chunk_size(&conn.buf) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        conn.buf.advance(used);
                        this.state = if size == 0 {
                            State::Trailers
                        } else {
                            State::ChunkData(size)
                        };
                        false
                    }
                    Ok(httparse::Status::Partial) if conn.buf.len() < MAX_CHUNK_LINE => true,
                    _ => return this.fail(invalid("invalid chunk size")),
                },
                State::ChunkEnd if conn.buf.len() < 2 => true,
                State::ChunkEnd => {
                    if &conn.buf[..2] != b"\r\n" {
                        return this.fail(invalid("chunk without its CRLF"));
                    }
                    conn.buf.advance(2);
                    this.state = State::ChunkSize;
                    false
                }
                // Trailer fields are dropped; an empty line ends them.
                State::Trailers => match conn.buf.windows(2).position(|w| w == b"\r\n") {
                    Some(0) => {
                        conn.buf.advance(2);
                        this.state = State::Done;
                        return Poll::Ready(None);
                    }
                    Some(end) => {
                        conn.buf.advance(end + 2);
                        false
                    }
                    None if conn.buf.len() < MAX_HEAD_BYTES => true,
                    None => return this.fail(invalid("trailers too large")),
                },
                State::UntilClose if !conn.buf.is_empty() => {
                    let data = conn.buf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::UntilClose => true,
            };
            if need_more {
                let filled = conn.poll_fill(cx);
                if filled.is_pending() {
                    // The connection's timer, armed when the wait begins (a body that is
                    // already in, as most small ones are, never reads the clock).
                    if !this.waiting {
                        let deadline = tokio::time::Instant::now() + this.timeout;
                        conn.timer
                            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)))
                            .as_mut()
                            .reset(deadline);
                        this.waiting = true;
                    }
                    if let Some(timer) = conn.timer.as_mut() {
                        ready!(timer.as_mut().poll(cx));
                    }
                    return this.fail(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "backend sent nothing of the body within the response timeout",
                    ));
                }
                this.waiting = false;
                match ready!(filled) {
                    Ok(0) if this.state == State::UntilClose => {
                        this.state = State::Done;
                        return Poll::Ready(None);
                    }
                    Ok(0) => {
                        return this.fail(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "backend closed mid-body",
                        ))
                    }
                    Ok(_) => {}
                    Err(e) => return this.fail(e),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done | State::Upgraded)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Length(n) => SizeHint::with_exact(n),
            State::Done | State::Upgraded => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// The Content-Length of a head: several equal values count as one, differing ones or a
/// value that is not a number make the response invalid (RFC 9112 §6.3).
fn content_length(headers: &HeaderMap) -> Result<Option<u64>, ExchangeError> {
    let mut found = None;
    for v in headers.get_all(header::CONTENT_LENGTH) {
        for part in v.to_str().unwrap_or("x").split(',') {
            let n: u64 = part
                .trim()
                .parse()
                .map_err(|_| ExchangeError::Invalid("content-length"))?;
            if found.is_some_and(|f| f != n) {
                return Err(ExchangeError::Invalid("conflicting content-length"));
            }
            found = Some(n);
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::{io::AsyncReadExt, net::TcpListener};

    /// A connection to a backend that reads one request head and answers `answer` (then
    /// closes when `close`); returns the connection and the request the backend saw.
    async fn exchange_with(
        method: Method,
        headers: HeaderMap,
        answer: &'static [u8],
        close: bool,
    ) -> (Result<Response<Incoming>, ExchangeError>, String) {
        exchange_in_pieces(method, headers, answer, close, answer.len()).await
    }

    /// `exchange_with`, the backend writing its answer `piece` bytes at a time, 1 ms apart.
    async fn exchange_in_pieces(
        method: Method,
        headers: HeaderMap,
        answer: &'static [u8],
        close: bool,
        piece: usize,
    ) -> (Result<Response<Incoming>, ExchangeError>, String) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let backend = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut seen = Vec::new();
            let mut b = [0u8; 4096];
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut b).await.unwrap();
                assert!(n > 0, "request head incomplete");
                seen.extend_from_slice(&b[..n]);
            }
            s.set_nodelay(true).unwrap();
            for part in answer.chunks(piece.max(1)) {
                s.write_all(part).await.unwrap();
                if part.len() < answer.len() {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            if close {
                drop(s);
            } else {
                // Stays open until the test is done with it.
                let _ = s.read(&mut b).await;
            }
            String::from_utf8(seen).unwrap()
        });
        let mut conn = Conn::new(Either::Left(TcpStream::connect(addr).await.unwrap()));
        let client = HeaderValue::from_static("10.0.0.7");
        let forwarded = Forwarded {
            client: &client,
            scheme: "http",
            port: 80,
            upgrade: false,
            host: None,
            join_cookies: false,
        };
        let res = conn
            .exchange(
                &Head::new(&method, "/p?q=1", &headers, &forwarded, false),
                RequestBody(None),
                Wait {
                    sent: Instant::now(),
                    timeout: Duration::from_secs(5),
                },
            )
            .await
            .and_then(|mut res| {
                let body = Incoming::new(conn, &method, &mut res, BODY_TIMEOUT)?;
                Ok(res.map(|()| body))
            });
        let seen = if close || res.is_err() {
            backend.await.unwrap()
        } else {
            // Left running (not aborted): it may still be writing the body being read.
            drop(backend);
            String::new()
        };
        (res, seen)
    }

    /// `exchange_with` for a plain GET.
    async fn get_answer(
        answer: &'static [u8],
        close: bool,
    ) -> (Result<Response<Incoming>, ExchangeError>, String) {
        exchange_with(Method::GET, HeaderMap::new(), answer, close).await
    }

    /// The response timeout the test exchanges give their bodies.
    const BODY_TIMEOUT: Duration = Duration::from_millis(400);

    #[tokio::test]
    async fn a_body_the_backend_stops_sending_fails_after_the_response_timeout() {
        let (res, _) = get_answer(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nab", false).await;
        let mut res = res.unwrap();
        let first = res.body_mut().frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "ab");
        let waited = Instant::now();
        let e = res.body_mut().frame().await.unwrap().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(waited.elapsed() >= BODY_TIMEOUT, "{:?}", waited.elapsed());
        assert!(res.body_mut().take_reusable().is_none());
    }

    async fn body_of(res: &mut Response<Incoming>) -> Result<Vec<u8>, io::Error> {
        let mut out = Vec::new();
        while let Some(f) = res.body_mut().frame().await {
            if let Ok(d) = f?.into_data() {
                out.extend_from_slice(&d);
            }
        }
        Ok(out)
    }

    #[tokio::test]
    async fn a_request_head_goes_out_in_origin_form_with_its_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("example.com"));
        h.append("x-a", HeaderValue::from_static("1"));
        h.append("x-a", HeaderValue::from_static("2"));
        let (res, seen) =
            exchange_with(Method::POST, h, b"HTTP/1.1 204 No Content\r\n\r\n", true).await;
        assert_eq!(res.unwrap().status(), 204);
        assert_eq!(
            seen,
            "POST /p?q=1 HTTP/1.1\r\nhost: example.com\r\nx-a: 1\r\nx-a: 2\r\n\
             x-forwarded-for: 10.0.0.7\r\nx-forwarded-proto: http\r\nx-forwarded-port: 80\r\n\
             x-real-ip: 10.0.0.7\r\ncontent-length: 0\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn a_content_length_body_is_read_to_its_length_and_the_connection_kept() {
        let (res, _) = get_answer(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-B: v\r\n\r\nhello",
            false,
        )
        .await;
        let mut res = res.unwrap();
        assert_eq!(res.headers()["x-b"], "v");
        assert_eq!(res.body().size_hint().exact(), Some(5));
        assert_eq!(body_of(&mut res).await.unwrap(), b"hello");
        assert!(res.body().is_end_stream());
        let conn = res.body_mut().take_reusable().unwrap();
        assert!(conn.is_reusable(), "a quiet kept-alive connection");
    }

    #[tokio::test]
    async fn a_chunked_body_is_decoded_trailers_dropped_and_the_length_ignored() {
        let (res, _) = get_answer(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 99\r\n\r\n\
              5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-T: 1\r\n\r\n",
            false,
        )
        .await;
        let mut res = res.unwrap();
        assert!(res.headers().get(header::CONTENT_LENGTH).is_none());
        assert_eq!(body_of(&mut res).await.unwrap(), b"hello world");
        assert!(res.body_mut().take_reusable().is_some());
    }

    #[tokio::test]
    async fn answers_arriving_a_byte_at_a_time_are_framed_alike() {
        let (res, _) = exchange_in_pieces(
            Method::GET,
            HeaderMap::new(),
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
              5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\n",
            false,
            1,
        )
        .await;
        let mut res = res.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(body_of(&mut res).await.unwrap(), b"hello world");
        assert!(res.body_mut().take_reusable().is_some());
        let (res, _) = exchange_in_pieces(
            Method::GET,
            HeaderMap::new(),
            b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world",
            false,
            3,
        )
        .await;
        let mut res = res.unwrap();
        assert_eq!(body_of(&mut res).await.unwrap(), b"hello world");
        assert!(res.body_mut().take_reusable().is_some());
    }

    #[tokio::test]
    async fn interim_answers_are_skipped_and_a_body_without_length_runs_to_the_close() {
        let (res, _) = get_answer(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n\
              HTTP/1.0 200 OK\r\n\r\nuntil the end",
            true,
        )
        .await;
        let mut res = res.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.version(), Version::HTTP_10);
        assert_eq!(body_of(&mut res).await.unwrap(), b"until the end");
        assert!(res.body_mut().take_reusable().is_none());
    }

    #[tokio::test]
    async fn head_answers_have_no_body_whatever_their_length_says() {
        let (res, _) = exchange_with(
            Method::HEAD,
            HeaderMap::new(),
            b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n",
            false,
        )
        .await;
        let mut res = res.unwrap();
        assert!(res.body().is_end_stream());
        assert_eq!(res.headers()[header::CONTENT_LENGTH], "1000");
        assert!(res.body_mut().take_reusable().is_some());
    }

    #[tokio::test]
    async fn connection_close_and_http_1_0_answers_are_not_kept() {
        for answer in [
            &b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"[..],
            b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
        ] {
            let (res, _) = get_answer(answer, false).await;
            assert!(res.unwrap().body_mut().take_reusable().is_none());
        }
        let (res, _) = get_answer(
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
            false,
        )
        .await;
        assert!(res.unwrap().body_mut().take_reusable().is_some());
    }

    #[tokio::test]
    async fn invalid_heads_and_bodies_are_errors() {
        for answer in [
            &b"garbage\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        ] {
            let (res, _) = get_answer(answer, true).await;
            assert!(
                matches!(res, Err(ExchangeError::Invalid(_))),
                "{}",
                String::from_utf8_lossy(answer)
            );
        }
        let (res, _) = get_answer(b"HTTP/1.1 200", true).await;
        assert!(matches!(res, Err(ExchangeError::Closed)));
        for answer in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"[..],
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXY",
        ] {
            let (res, _) = get_answer(answer, true).await;
            let mut res = res.unwrap();
            assert!(body_of(&mut res).await.is_err());
            assert!(res.body_mut().take_reusable().is_none());
        }
    }

    #[tokio::test]
    async fn an_idle_connection_the_backend_closed_is_not_reused() {
        let (res, _) = get_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", true).await;
        let mut res = res.unwrap();
        body_of(&mut res).await.unwrap();
        let conn = res.body_mut().take_reusable().unwrap();
        // The backend's FIN reaches the runtime's readiness.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!conn.is_reusable());
    }
}
