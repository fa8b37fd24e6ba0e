//! The embedded demo worker: the seed's HTTP/1.1 server answering `hola, mundo\n` with an
//! `x-worker-pid` header, keep-alive aware, written against the public API with hyper 1.x as
//! a user would. Draining, it hands each keep-alive connection back to the master at its next
//! request boundary ([`crate::http1::serve`]), so no client finds its connection closed
//! under its next request. Its per-request CPU cost (and, for the proxy benchmark's backends, a
//! blocking wait) makes it a benchmark workload; its memory leak
//! knob (tests only) exercises `--max-rss`.

use std::convert::Infallible;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};

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
    /// Every request also blocks its thread this long without using CPU: a synchronous call
    /// (a database, another service) in a worker that serves nothing else meanwhile, so
    /// requests queue behind it. A benchmark knob for backends slower than the CPU they
    /// get on a small shared machine; 0 in any real use.
    pub wait: Duration,
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

async fn connection(conn: Connection, cost: Cost, pid: Bytes, figures: Figures, drain: Drain) {
    let service = service_fn(move |_request: Request<hyper::body::Incoming>| {
        let start = std::time::Instant::now();
        burn(cost.pick(&mut fastrand::Rng::new()));
        if !cost.wait.is_zero() {
            // Blocking on purpose: the stand-in for a synchronous call (see `Cost::wait`).
            std::thread::sleep(cost.wait);
        }
        leak(cost.leak_per_request);
        figures.requests.increment(1);
        figures.duration.record(start.elapsed().as_secs_f64());
        let response = Response::builder()
            .header("content-type", "text/plain")
            .header("x-worker-pid", pid.as_ref())
            .body(Full::new(Bytes::from_static(BODY)))
            .expect("static response parts are valid");
        std::future::ready(Ok::<_, Infallible>(response))
    });
    let mut builder = http1::Builder::new();
    builder.keep_alive(true);
    // Draining, the connection goes back to the master at its next request boundary.
    let _ = crate::http1::serve(conn, &builder, service, drain).await;
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
            wait: Duration::ZERO,
            leak_per_request: 0,
        };
        let mut rng = fastrand::Rng::with_seed(3);
        let heavy = (0..10_000)
            .filter(|_| cost.pick(&mut rng) > Duration::ZERO)
            .count();
        assert!((800..1200).contains(&heavy), "{heavy}");
    }
}
