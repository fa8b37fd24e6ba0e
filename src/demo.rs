//! The embedded demo worker: the seed's HTTP/1.1 server answering `hola, mundo\n` with an
//! `x-worker-pid` header, keep-alive aware, written against the public API with hyper 1.x as
//! a user would. Draining, it hands each keep-alive connection back to the master at its next
//! request boundary ([`Connection::hand_back`]), so no client finds its connection closed
//! under its next request. Its per-request CPU cost makes it a benchmark workload; its memory leak
//! knob (tests only) exercises `--max-rss`.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::{BoxError, Connection, Drain, Incoming};

/// The response body.
pub const BODY: &[u8] = b"hola, mundo\n";

/// What a request costs.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Cost {
    /// Every request burns this much.
    pub work: Duration,
    /// `(percent, work)`: this percentage of requests burns `work` instead.
    pub heavy: Option<(f64, Duration)>,
    /// A test knob: bytes each request leaks on purpose (touched, so they count in the
    /// resident set), to exercise memory-based recycling. 0 in any real use.
    pub leak_per_request: usize,
}

impl Cost {
    fn pick(&self, rng: &mut fastrand::Rng) -> Duration {
        match self.heavy {
            Some((percent, heavy)) if rng.f64() * 100.0 < percent => heavy,
            _ => self.work,
        }
    }
}

/// Parses `PCT:US` (e.g. `2:2500`: 2% of requests burn 2.5 ms).
pub fn parse_heavy(text: &str) -> Result<(f64, Duration), String> {
    let (pct, us) = text
        .split_once(':')
        .ok_or_else(|| format!("expected PCT:US, got {text:?}"))?;
    let pct: f64 = pct
        .parse()
        .map_err(|_| format!("bad percentage {pct:?} in {text:?}"))?;
    if !(0.0..=100.0).contains(&pct) {
        return Err(format!("percentage {pct} is not within 0..=100"));
    }
    let us: u64 = us
        .parse()
        .map_err(|_| format!("bad microseconds {us:?} in {text:?}"))?;
    Ok((pct, Duration::from_micros(us)))
}

/// Leaks `bytes` of memory on purpose, written so they are resident (the `--max-rss` test
/// knob).
fn leak(bytes: usize) {
    if bytes > 0 {
        Box::leak(vec![0xA5u8; bytes].into_boxed_slice());
    }
}

/// Burns CPU on this thread for `duration` (a stand-in for real request work).
pub fn burn(duration: Duration) {
    let start = Instant::now();
    while start.elapsed() < duration {
        std::hint::spin_loop();
    }
}

/// Serves every connection the master hands over until the worker drains.
pub async fn serve(mut incoming: Incoming, cost: Cost) -> Result<(), BoxError> {
    let pid = Bytes::from(std::process::id().to_string());
    // Through the worker's recorder: added up across the cluster at `--metrics`.
    let figures = Figures {
        requests: metrics::counter!("demo_requests_total"),
        duration: metrics::histogram!("demo_request_duration_seconds"),
    };
    while let Some(conn) = incoming.accept().await {
        let drain = incoming.drain_signal();
        tokio::spawn(connection(conn, cost, pid.clone(), figures.clone(), drain));
    }
    Ok(())
}

/// What the demo counts per request.
#[derive(Clone)]
struct Figures {
    requests: metrics::Counter,
    duration: metrics::Histogram,
}

async fn connection(conn: Connection, cost: Cost, pid: Bytes, figures: Figures, mut drain: Drain) {
    let requests = Requests::default();
    let counted = requests.clone();
    let service = service_fn(move |_request: Request<hyper::body::Incoming>| {
        counted.started.fetch_add(1, Ordering::SeqCst);
        let start = std::time::Instant::now();
        burn(cost.pick(&mut fastrand::Rng::new()));
        leak(cost.leak_per_request);
        figures.requests.increment(1);
        figures.duration.record(start.elapsed().as_secs_f64());
        let response = Response::builder()
            .header("content-type", "text/plain")
            .header("x-worker-pid", pid.as_ref())
            .body(Counted {
                body: Full::new(Bytes::from_static(BODY)),
                done: Some(counted.clone()),
            })
            .expect("static response parts are valid");
        std::future::ready(Ok::<_, Infallible>(response))
    });
    let blocked = Arc::new(AtomicBool::new(false));
    let io = Watched {
        conn,
        blocked: blocked.clone(),
    };
    let mut http = http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), service);
    tokio::select! {
        _ = std::future::poll_fn(|cx| http.poll_without_shutdown(cx)) => return,
        _ = drain.wait() => {}
    }
    // Draining: at the next request boundary, hand the connection back to the master for
    // another worker. First let hyper write out what it holds (a response it still buffers
    // would be lost with it).
    let boundary = std::future::poll_fn(|cx| match http.poll_without_shutdown(cx) {
        Poll::Ready(_) => Poll::Ready(false),
        Poll::Pending if blocked.load(Ordering::SeqCst) => Poll::Pending,
        Poll::Pending => Poll::Ready(true),
    });
    if !boundary.await {
        return;
    }
    // Idle (no request in flight), hyper's graceful shutdown stops at once and leaves the
    // connection open (`without_shutdown`); busy, it answers the request in flight with
    // `Connection: close` and ends, which is the fallback.
    let (started, finished) = requests.now();
    Pin::new(&mut http).graceful_shutdown();
    if std::future::poll_fn(|cx| http.poll_without_shutdown(cx))
        .await
        .is_err()
    {
        return;
    }
    if started != finished || requests.now().0 != started {
        return;
    }
    let parts = http.into_parts();
    let conn = parts.io.into_inner().conn;
    if let Err(failed) = conn.hand_back(&parts.read_buf).await {
        tracing::debug!(reason = %failed.reason, "serving a connection that could not be handed back");
        // Its bytes are restored: answer what comes, then close.
        let io = Watched {
            conn: failed.connection,
            blocked,
        };
        let _ = http1::Builder::new()
            .keep_alive(false)
            .serve_connection(TokioIo::new(io), parts.service)
            .await;
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

/// A response body that counts itself finished when hyper drops it.
struct Counted {
    body: Full<Bytes>,
    done: Option<Requests>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        if let Some(requests) = self.done.take() {
            requests.finished.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl hyper::body::Body for Counted {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_heavy_specs_and_refuses_bad_ones() {
        assert_eq!(
            parse_heavy("2:2500"),
            Ok((2.0, Duration::from_micros(2500)))
        );
        assert_eq!(parse_heavy("0.5:10"), Ok((0.5, Duration::from_micros(10))));
        for bad in ["2", "x:1", "2:y", "101:5", "-1:5"] {
            assert!(parse_heavy(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn heavy_requests_come_at_the_requested_rate() {
        let cost = Cost {
            work: Duration::ZERO,
            heavy: Some((10.0, Duration::from_micros(7))),
            leak_per_request: 0,
        };
        let mut rng = fastrand::Rng::with_seed(3);
        let heavy = (0..10_000)
            .filter(|_| cost.pick(&mut rng) > Duration::ZERO)
            .count();
        assert!((800..1200).contains(&heavy), "{heavy}");
    }
}
