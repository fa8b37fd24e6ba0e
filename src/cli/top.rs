//! `handoff top`: a live view of a running master, like `top` for its workers. Every
//! interval it asks the control socket for `status` and draws the cluster's totals and one
//! line per worker: pid, phase, CPU %, RSS, active connections, requests per second, age and
//! restarts. Rates are the change between two answers, so `--once` takes two, one interval
//! apart, and prints one frame.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde_json::Value;

use super::ctl;
use super::parse::parse_duration;

#[derive(Debug, Args)]
pub struct TopArgs {
    /// The master's control socket (its --control).
    #[arg(long, value_name = "PATH")]
    control: PathBuf,
    /// Print one frame and exit (for scripts).
    #[arg(long)]
    once: bool,
    /// Time between two frames.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    interval: Duration,
}

/// One answer of the master, and when it came.
#[derive(Debug, Clone)]
struct Sample {
    at: Instant,
    status: Value,
}

pub fn run(args: TopArgs) -> anyhow::Result<()> {
    let interval = args.interval.max(Duration::from_millis(100));
    let mut previous = sample(&args)?;
    let mut out = std::io::stdout();
    let clear = !args.once && std::io::IsTerminal::is_terminal(&out);
    loop {
        std::thread::sleep(interval);
        let now = sample(&args)?;
        let frame = render(&previous, &now);
        if clear {
            // Home and clear: the next frame replaces this one.
            write!(out, "\x1b[H\x1b[2J")?;
        }
        out.write_all(frame.as_bytes())
            .context("writing the frame")?;
        out.flush()?;
        if args.once {
            return Ok(());
        }
        previous = now;
    }
}

fn sample(args: &TopArgs) -> anyhow::Result<Sample> {
    let reply = ctl::ask(&args.control, "status")?;
    let status = serde_json::from_str(&reply)
        .with_context(|| format!("the master's status is not JSON: {reply:?}"))?;
    Ok(Sample {
        at: Instant::now(),
        status,
    })
}

fn number(value: &Value) -> u64 {
    value.as_u64().unwrap_or(0)
}

/// Per second, between two samples.
fn rate(before: u64, after: u64, seconds: f64) -> f64 {
    after.saturating_sub(before) as f64 / seconds.max(1e-3)
}

/// One frame: the cluster's totals, then a line per worker slot.
fn render(previous: &Sample, now: &Sample) -> String {
    let seconds = now.at.saturating_duration_since(previous.at).as_secs_f64();
    let (before, status) = (&previous.status, &now.status);
    let counters = &status["counters"];
    let workers = status["workers"].as_array().cloned().unwrap_or_default();
    let ready = workers.iter().filter(|w| w["phase"] == "ready").count();
    let active: u64 = workers.iter().map(|w| number(&w["active"])).sum();
    let accepted = number(&counters["accepted"]);
    let mut out = format!(
        "handoff master {}  {}  listening {}\n\
         workers {ready}/{} ready   connections {:.0}/s   active {active}   accepted {accepted}\n\
         re-dispatched {}   lost with a worker {}   replaced {}   messages {} (dropped {})\n\n",
        status["pid"],
        status["strategy"].as_str().unwrap_or("?"),
        status["listening"]
            .as_array()
            .map(|l| l
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(", "))
            .unwrap_or_default(),
        workers.len(),
        rate(number(&before["counters"]["accepted"]), accepted, seconds),
        number(&counters["redispatched"]),
        number(&counters["lost_with_worker"]),
        number(&counters["recycled"]) + number(&counters["unresponsive"]),
        number(&status["messages"]["received"]),
        number(&status["messages"]["dropped"]),
    );
    out.push_str(&format!(
        "{:>4} {:>8} {:<9} {:>6} {:>9} {:>7} {:>8} {:>8} {:>8}\n",
        "SLOT", "PID", "PHASE", "CPU%", "RSS", "ACTIVE", "REQ/S", "AGE", "RESTARTS"
    ));
    let earlier: HashMap<u64, &Value> = before["workers"]
        .as_array()
        .map(|ws| ws.iter().map(|w| (number(&w["pid"]), w)).collect())
        .unwrap_or_default();
    for worker in &workers {
        out.push_str(&worker_line(
            worker,
            earlier.get(&number(&worker["pid"])),
            seconds,
        ));
    }
    out
}

/// A worker's line; its rates need its previous sample (the same pid).
fn worker_line(worker: &Value, before: Option<&&Value>, seconds: f64) -> String {
    let pid = worker["pid"].as_u64();
    let (cpu, requests) = match before {
        Some(before) if pid.is_some() => (
            format!(
                "{:.1}",
                rate(
                    number(&before["cpu_ms"]),
                    number(&worker["cpu_ms"]),
                    seconds
                ) / 10.0
            ),
            format!(
                "{:.0}",
                rate(
                    number(&before["finished"]),
                    number(&worker["finished"]),
                    seconds
                )
            ),
        ),
        _ => ("-".into(), "-".into()),
    };
    format!(
        "{:>4} {:>8} {:<9} {:>6} {:>9} {:>7} {:>8} {:>8} {:>8}\n",
        number(&worker["worker"]),
        pid.map_or("-".into(), |p| p.to_string()),
        worker["phase"].as_str().unwrap_or("-"),
        cpu,
        worker["rss_kib"]
            .as_u64()
            .map_or("-".into(), |kib| format!("{:.1}M", kib as f64 / 1024.0)),
        number(&worker["active"]),
        requests,
        age(Duration::from_millis(number(&worker["uptime_ms"]))),
        number(&worker["spawns"]).saturating_sub(1),
    )
}

/// `45s`, `12m05s`, `3h20m`.
fn age(uptime: Duration) -> String {
    let s = uptime.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(accepted: u64, finished: u64, cpu_ms: u64) -> Value {
        serde_json::json!({
            "pid": 100,
            "strategy": "least-loaded",
            "listening": ["127.0.0.1:8000"],
            "counters": {"accepted": accepted, "redispatched": 1, "lost_with_worker": 0,
                         "recycled": 2, "unresponsive": 0},
            "messages": {"received": 7, "dropped": 1},
            "workers": [
                {"worker": 0, "pid": 101, "phase": "ready", "active": 3, "finished": finished,
                 "cpu_ms": cpu_ms, "rss_kib": 20480, "uptime_ms": 754_000, "spawns": 3},
                {"worker": 1, "pid": null, "phase": null, "active": 0, "finished": 0,
                 "cpu_ms": null, "rss_kib": null, "uptime_ms": 0, "spawns": 1},
            ]
        })
    }

    #[test]
    fn a_frame_shows_totals_and_each_worker_with_rates_between_two_answers() {
        let start = Instant::now();
        let previous = Sample {
            at: start,
            status: status(1000, 400, 1000),
        };
        let now = Sample {
            at: start + Duration::from_secs(2),
            status: status(3000, 1400, 1500),
        };
        let frame = render(&previous, &now);
        assert!(frame.contains("workers 1/2 ready"), "{frame}");
        assert!(frame.contains("connections 1000/s"), "{frame}");
        assert!(frame.contains("active 3"), "{frame}");
        assert!(frame.contains("messages 7 (dropped 1)"), "{frame}");
        let line = frame.lines().find(|l| l.contains(" 101 ")).unwrap();
        let fields: Vec<&str> = line.split_whitespace().collect();
        // slot pid phase cpu% rss active req/s age restarts
        assert_eq!(
            fields,
            ["0", "101", "ready", "25.0", "20.0M", "3", "500", "12m34s", "2"]
        );
        let empty = frame.lines().last().unwrap();
        assert_eq!(
            empty.split_whitespace().collect::<Vec<_>>(),
            ["1", "-", "-", "-", "-", "0", "-", "0s", "0"]
        );
    }

    #[test]
    fn ages_read_like_top() {
        assert_eq!(age(Duration::from_secs(45)), "45s");
        assert_eq!(age(Duration::from_secs(725)), "12m05s");
        assert_eq!(age(Duration::from_secs(12_000)), "3h20m");
    }
}
