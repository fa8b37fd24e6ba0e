//! Serving one [`Connection`] with hyper's HTTP/1.1 server so that keep-alive survives the
//! worker's drain (feature `hyper`): until the worker drains it is hyper's own connection;
//! draining, it stops at the next request boundary and hands the connection back to the
//! master ([`Connection::hand_back`], with what hyper had read of the next request), which
//! gives it to another worker. hyper's own graceful shutdown would close an idle keep-alive
//! connection instead, under the client's next request. Where the hand-back is impossible
//! (the master is gone, the kernel modes) a request in flight is answered with
//! `Connection: close`. Runs in workers.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::body::{Body, Incoming};
use hyper::server::conn::http1::Builder;
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{Connection, Drain};

/// How long a connection handed over just before the worker started draining may take to
/// send its first request: it is answered, not handed back unanswered.
const FIRST_REQUEST_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves `conn` with `builder`'s HTTP/1.1 settings and `service` until the client ends the
/// connection, or the worker drains and the connection reaches a request boundary: then it
/// is handed back to the master for another worker. The response body must be `Unpin`
/// (`Full`, axum's `Body`); the service's futures are boxed, one allocation per request.
///
/// ```no_run
/// # async fn serve(mut incoming: handoff::Incoming) {
/// use std::convert::Infallible;
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use hyper::{service::service_fn, Response};
///
/// let builder = hyper::server::conn::http1::Builder::new();
/// while let Some(conn) = incoming.accept().await {
///     let (drain, builder) = (incoming.drain_signal(), builder.clone());
///     tokio::spawn(async move {
///         let hello = service_fn(|_request| {
///             std::future::ready(Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("hi\n")))))
///         });
///         let _ = handoff::http1::serve(conn, &builder, hello, drain).await;
///     });
/// }
/// # }
/// ```
pub async fn serve<S, B>(
    conn: Connection,
    builder: &Builder,
    service: S,
    mut drain: Drain,
) -> Result<(), hyper::Error>
where
    S: Service<Request<Incoming>, Response = Response<B>> + Unpin,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let requests = Requests::default();
    let blocked = Arc::new(AtomicBool::new(false));
    let service = Counting {
        inner: service,
        requests: requests.clone(),
    };
    let io = Watched {
        conn,
        blocked: blocked.clone(),
    };
    let mut http = builder.serve_connection(TokioIo::new(io), service);
    tokio::select! {
        done = std::future::poll_fn(|cx| http.poll_without_shutdown(cx)) => return done,
        _ = drain.wait() => {}
    }
    if requests.now().0 == 0 {
        // Handed over just before the drain: its first request is answered first (handed
        // back unanswered, it would be lost if the master is stopping too).
        let first = std::future::poll_fn(|cx| match http.poll_without_shutdown(cx) {
            Poll::Ready(done) => Poll::Ready(Some(done)),
            Poll::Pending if requests.now().0 > 0 => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        });
        if let Ok(Some(done)) = tokio::time::timeout(FIRST_REQUEST_GRACE, first).await {
            return done;
        }
    }
    // The boundary: the requests begun before the drain answered, and what hyper holds of
    // their responses written out (bytes it still buffered would be lost with the
    // connection). A request begun since (a client sending back to back) does not delay it:
    // that one gets `Connection: close` below.
    let in_flight = requests.now().0;
    let boundary = std::future::poll_fn(|cx| match http.poll_without_shutdown(cx) {
        Poll::Ready(done) => Poll::Ready(Some(done)),
        Poll::Pending if blocked.load(Ordering::SeqCst) => Poll::Pending,
        Poll::Pending if requests.now().1 < in_flight => Poll::Pending,
        Poll::Pending => Poll::Ready(None),
    });
    if let Some(done) = boundary.await {
        return done;
    }
    // Idle (no request in flight), hyper's graceful shutdown stops at once and leaves the
    // connection open (`poll_without_shutdown`); busy, it answers the request in flight
    // with `Connection: close` and ends: the fallback.
    let (started, finished) = requests.now();
    Pin::new(&mut http).graceful_shutdown();
    std::future::poll_fn(|cx| http.poll_without_shutdown(cx)).await?;
    if started != finished || requests.now().0 != started {
        return Ok(());
    }
    let parts = http.into_parts();
    let conn = parts.io.into_inner().conn;
    match conn.hand_back(&parts.read_buf).await {
        Ok(()) => Ok(()),
        Err(failed) => {
            tracing::debug!(reason = %failed.reason, "serving a connection that could not be handed back");
            // Its bytes are restored: answer what comes, then close.
            let io = Watched {
                conn: failed.connection,
                blocked,
            };
            builder
                .clone()
                .keep_alive(false)
                .serve_connection(TokioIo::new(io), parts.service)
                .await
        }
    }
}

/// Requests a connection's service began, and responses hyper finished writing (it drops
/// the body then): equal, and the connection is between requests.
#[derive(Debug, Default, Clone)]
struct Requests {
    started: Arc<AtomicU64>,
    finished: Arc<AtomicU64>,
}

impl Requests {
    fn now(&self) -> (u64, u64) {
        (
            self.started.load(Ordering::SeqCst),
            self.finished.load(Ordering::SeqCst),
        )
    }
}

/// The user's service, counting the requests it begins and the responses it returns.
struct Counting<S> {
    inner: S,
    requests: Requests,
}

impl<S, B> Service<Request<Incoming>> for Counting<S>
where
    S: Service<Request<Incoming>, Response = Response<B>>,
{
    type Response = Response<Counted<B>>;
    type Error = S::Error;
    type Future = CountingFuture<S::Future>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        self.requests.started.fetch_add(1, Ordering::SeqCst);
        CountingFuture {
            inner: Box::pin(self.inner.call(request)),
            requests: Some(self.requests.clone()),
        }
    }
}

/// The service's future (boxed: hyper's `poll_without_shutdown` wants it `Unpin`); its
/// response's body counts itself finished when dropped.
struct CountingFuture<F> {
    inner: Pin<Box<F>>,
    requests: Option<Requests>,
}

impl<F, B, E> std::future::Future for CountingFuture<F>
where
    F: std::future::Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<Counted<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let response = std::task::ready!(this.inner.as_mut().poll(cx));
        let done = this.requests.take();
        if response.is_err() {
            // No body will be written: the request is over.
            if let Some(requests) = &done {
                requests.finished.fetch_add(1, Ordering::SeqCst);
            }
        }
        Poll::Ready(response.map(|r| r.map(|body| Counted { body, done })))
    }
}

/// A response body that counts its request finished when hyper drops it.
pub(crate) struct Counted<B> {
    body: B,
    done: Option<Requests>,
}

impl<B> Drop for Counted<B> {
    fn drop(&mut self) {
        if let Some(requests) = self.done.take() {
            requests.finished.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl<B: Body + Unpin> Body for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// The connection, noting whether its last write found the socket full: then hyper still
/// holds bytes of a response, and the connection is not at a boundary yet.
struct Watched {
    conn: Connection,
    blocked: Arc<AtomicBool>,
}

impl Watched {
    fn note<T>(&self, polled: Poll<T>) -> Poll<T> {
        self.blocked.store(polled.is_pending(), Ordering::SeqCst);
        polled
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().conn).poll_read(cx, buf)
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.conn).poll_write(cx, buf);
        this.note(polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.conn).poll_write_vectored(cx, bufs);
        this.note(polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.conn.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().conn).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().conn).poll_shutdown(cx)
    }
}
