//! Worker lifecycle on the real binary, under bounded open-loop load on 127.0.0.1: workers
//! are recycled (connection count, memory), restarted (SIGHUP), replaced when hung, killed
//! at random, crash-looping, and scaled (SIGTTIN/SIGTTOU), without losing a connection the
//! master still held. One master at a time: the figures are timing-sensitive on 2 cores.
//!
//! The chaos figures in docs/reliability.md come from
//! `cargo test --test integration lifecycle::chaos -- --nocapture`.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::util::{
    cpu_ticks, log_field, log_lines, process_exists, read_response, ready_workers, send_request,
    send_signal, wait_until, worker_pids, Load, Master, PATIENCE,
};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn pids(master: &Master) -> Vec<u32> {
    master.worker_pids().into_iter().flatten().collect()
}

fn counter(status: &serde_json::Value, name: &str) -> u64 {
    status["counters"][name].as_u64().unwrap()
}

/// Resident set in KiB, or `None` once the process is gone.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Polls the status while `load` runs; returns the fewest ready workers seen.
fn fewest_ready_while(master: &Master, load: &Load, until_sent: usize) -> usize {
    let mut fewest = usize::MAX;
    let done = wait_until(Duration::from_secs(60), || {
        if let Some(status) = master.try_status() {
            fewest = fewest.min(ready_workers(&status));
        }
        load.sent() >= until_sent
    });
    assert!(done, "the load stalled at {} sent", load.sent());
    fewest
}

#[test]
fn max_connections_recycles_workers_under_steady_load_without_a_failed_request() {
    let _one = serial();
    let master = Master::start(&["--workers", "2", "--max-connections", "50"]);
    let first = pids(&master);
    let load = Load::start(master.addr, 200, 600);
    let fewest_ready = fewest_ready_while(&master, &load, 600);
    let report = load.finish();
    let log = master.log();
    assert!(
        report.failures.is_empty(),
        "{:?}\nlog:\n{log}",
        report.failure_kinds()
    );
    assert_eq!(report.ok, 600);
    assert_eq!(fewest_ready, 2, "a recycle never lowers capacity");
    let recycled = log_lines(&log, &["recycling worker", "reason=max-connections"]);
    assert!(recycled >= 6, "{recycled} recycles\n{log}");
    assert!(
        report.by_pid.len() >= 6,
        "answers came from {} pids: {:?}",
        report.by_pid.len(),
        report.by_pid
    );
    assert!(
        report.by_pid.values().all(|&n| n <= 50 + 25),
        "a worker keeps serving only until its successor is ready: {:?}",
        report.by_pid
    );
    assert!(wait_until(PATIENCE, || log_lines(
        &master.log(),
        &["worker drained"]
    ) >= 4));
    for pid in first {
        assert!(
            wait_until(PATIENCE, || !process_exists(pid)),
            "the first worker {pid} drained and exited"
        );
    }
    let status = master.status();
    assert_eq!(counter(&status, "redispatched"), 0, "{status}");
    assert_eq!(counter(&status, "lost_with_worker"), 0, "{status}");
    assert!(
        !master.log().contains("killed by signal"),
        "no drain needed a kill"
    );
}

#[test]
fn sighup_replaces_every_worker_under_load_without_a_failed_request() {
    let _one = serial();
    let master = Master::start(&["--workers", "4"]);
    let before: HashSet<u32> = pids(&master).into_iter().collect();
    let load = Load::start(master.addr, 150, 900);
    assert!(load.wait_sent(100));
    master.signal("HUP");
    let mut after = HashSet::new();
    let replaced = wait_until(PATIENCE, || {
        let status = master.status();
        after = worker_pids(&status).into_iter().flatten().collect();
        ready_workers(&status) == 4 && after.is_disjoint(&before)
    });
    assert!(
        replaced,
        "before {before:?}, after {after:?}\nlog:\n{}",
        master.log()
    );
    assert!(wait_until(PATIENCE, || master
        .log()
        .contains("rolling restart done")));
    let sent_at_restart_end = load.sent();
    let report = load.finish();
    let log = master.log();
    assert!(
        report.failures.is_empty(),
        "{:?}\nlog:\n{log}",
        report.failure_kinds()
    );
    assert!(
        sent_at_restart_end < 900,
        "the restart finished while the load still ran"
    );
    assert_eq!(log_lines(&log, &["recycling worker", "reason=restart"]), 4);
    for pid in &before {
        assert!(
            wait_until(PATIENCE, || !process_exists(*pid)),
            "old worker {pid} still runs"
        );
    }
    assert!(
        report.by_pid.keys().any(|pid| after.contains(pid)),
        "the new workers served"
    );
    assert!(wait_until(PATIENCE, || log_lines(
        &master.log(),
        &["worker drained"]
    ) == 4));
}

#[test]
fn max_rss_recycles_a_leaking_worker_within_one_interval_of_the_limit() {
    let _one = serial();
    const INTERVAL: Duration = Duration::from_millis(100);
    let master = Master::start(&[
        "--workers",
        "1",
        "--max-rss",
        "48M",
        "--rss-interval",
        "100ms",
        "--jitter",
        "0",
        "--leak-kb-per-request",
        "512",
    ]);
    let victim = pids(&master)[0];
    // Sample the leaking worker's memory from outside, every few milliseconds.
    let sampler = std::thread::spawn(move || {
        let mut samples = Vec::new();
        let start = Instant::now();
        while let Some(kib) = rss_kib(victim) {
            samples.push((Instant::now(), kib));
            if start.elapsed() > PATIENCE {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        samples
    });
    let load = Load::start(master.addr, 60, 300);
    assert!(
        wait_until(PATIENCE, || master.log().contains("reason=max-rss")),
        "never recycled; log:\n{}",
        master.log()
    );
    let report = load.finish();
    assert!(
        report.failures.is_empty(),
        "{:?}\nlog:\n{}",
        report.failure_kinds(),
        master.log()
    );
    assert!(
        wait_until(PATIENCE, || !process_exists(victim)),
        "the leaking worker drained and exited"
    );
    let samples = sampler.join().unwrap();
    let log = master.log();
    let line = log
        .lines()
        .find(|l| l.contains("reason=max-rss") && l.contains(&format!("pid={victim}")))
        .expect("the first worker was recycled for memory");
    let seen: u64 = log_field(line, "rss_kib").unwrap().parse().unwrap();
    let limit: u64 = log_field(line, "limit_kib").unwrap().parse().unwrap();
    assert_eq!(limit, 48 * 1024);
    // The most the worker grew in any window of one interval (plus one sample), as seen
    // from outside.
    let window = INTERVAL + Duration::from_millis(10);
    let growth = samples
        .iter()
        .enumerate()
        .map(|(i, &(at, kib))| {
            let later = samples[i..]
                .iter()
                .take_while(|(t, _)| t.duration_since(at) <= window)
                .last()
                .map_or(kib, |&(_, k)| k);
            later.saturating_sub(kib)
        })
        .max()
        .unwrap_or(0);
    let peak = samples.iter().map(|&(_, k)| k).max().unwrap_or(0);
    eprintln!(
        "max-rss: limit {limit} KiB, seen at the decision {seen} KiB (+{} KiB), largest growth \
         in one interval {growth} KiB, peak before exit {peak} KiB",
        seen - limit
    );
    assert!(seen >= limit);
    assert!(growth > 0, "the knob leaks: {samples:?}");
    assert!(
        seen - limit <= growth,
        "recycled {} KiB past the limit, more than one interval's growth ({growth} KiB)",
        seen - limit
    );
    assert_ne!(pids(&master)[0], victim, "replaced");
}

#[test]
fn a_stopped_worker_is_aborted_replaced_and_its_pending_connections_served_elsewhere() {
    let _one = serial();
    const TIMEOUT: Duration = Duration::from_secs(2);
    let master = Master::start(&[
        "--workers",
        "2",
        "--strategy",
        "round-robin",
        "--worker-timeout",
        "2s",
    ]);
    let victim = master.worker_pids()[0].unwrap();
    let stopped = Instant::now();
    send_signal(victim, "STOP");
    let pending: Vec<_> = (0..6).map(|_| send_request(master.addr)).collect();
    let replaced = wait_until(TIMEOUT + Duration::from_secs(5), || {
        let status = master.status();
        let slot = &status["workers"][0];
        slot["phase"] == "ready" && slot["pid"] != victim
    });
    let replaced_after = stopped.elapsed();
    assert!(replaced, "not replaced; log:\n{}", master.log());
    let gone = wait_until(TIMEOUT + Duration::from_secs(5), || !process_exists(victim));
    let gone_after = stopped.elapsed();
    assert!(
        gone,
        "the stopped worker was not killed; log:\n{}",
        master.log()
    );
    for mut stream in pending {
        let response = read_response(&mut stream).expect("every pending connection is answered");
        assert_eq!(response.status, 200);
        assert_ne!(response.pid, victim);
    }
    eprintln!("hung worker: replaced after {replaced_after:?}, gone after {gone_after:?}");
    // Detected at the timeout (checks run every quarter of it: +0.5 s), replaced at once
    // (plus the first backoff step, 100 ms); SIGKILL half a second after SIGABRT. The
    // bounds leave a second and a half for a loaded machine on top of that design.
    assert!(
        replaced_after < TIMEOUT + Duration::from_millis(2500),
        "{replaced_after:?}"
    );
    assert!(
        gone_after < TIMEOUT + Duration::from_millis(3000),
        "{gone_after:?}"
    );
    let log = master.log();
    assert_eq!(
        log_lines(&log, &["worker not responding", &format!("pid={victim}")]),
        1
    );
    assert_eq!(
        log_lines(
            &log,
            &["still there after SIGABRT", &format!("pid={victim}")]
        ),
        1,
        "a stopped process ignores SIGABRT until SIGKILL: {log}"
    );
    let status = master.status();
    assert_eq!(counter(&status, "unresponsive"), 1);
    assert!(counter(&status, "redispatched") >= 3, "{status}");
    assert_eq!(status["workers"].as_array().unwrap().len(), 2);
    assert!(
        wait_until(PATIENCE, || ready_workers(&master.status()) == 2),
        "one replacement only"
    );
}

#[test]
fn chaos_sigkill_random_workers_under_load_fails_only_connections_they_owned() {
    let _one = serial();
    // 5 ms of CPU per request, so a killed worker is often in the middle of one.
    let master = Master::start(&["--workers", "4", "--work-us", "5000"]);
    let (rate, total) = (200, 1600);
    let load = Load::start(master.addr, rate, total);
    let mut kills = Vec::new();
    let mut rng = fastrand::Rng::with_seed(4);
    while load.sent() < total - rate as usize {
        let status = master.status();
        let ready: Vec<u32> = status["workers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["phase"] == "ready")
            .filter_map(|w| w["pid"].as_u64().map(|p| p as u32))
            .collect();
        if ready.len() >= 2 {
            let victim = ready[rng.usize(..ready.len())];
            send_signal(victim, "KILL");
            kills.push(victim);
        }
        // Pacing the chaos, not waiting for an outcome.
        std::thread::sleep(Duration::from_millis(300));
    }
    let report = load.finish();
    let status = master.status();
    let lost = counter(&status, "lost_with_worker");
    let redispatched = counter(&status, "redispatched");
    eprintln!(
        "chaos: {} requests at {rate}/s, {} workers SIGKILLed, {} answered, {} failed {:?}; \
         master: {lost} connections acknowledged by killed workers and unfinished, \
         {redispatched} re-dispatched",
        report.sent,
        kills.len(),
        report.ok,
        report.failures.len(),
        report.failure_kinds(),
    );
    assert_eq!(report.sent, total);
    assert!(kills.len() >= 15, "{} kills", kills.len());
    assert!(
        report.failures.len() as u64 <= lost,
        "{} failures but killed workers owned only {lost}: {:?}",
        report.failures.len(),
        report.failure_kinds()
    );
    for (kind, _) in report.failure_kinds() {
        assert!(
            kind == "UnexpectedEof" || kind == "ConnectionReset",
            "a failure other than a cut connection: {kind}"
        );
    }
    assert!(
        wait_until(PATIENCE, || ready_workers(&master.status()) == 4),
        "every slot refilled: {}",
        master.status()
    );
    assert!(wait_until(PATIENCE, || master
        .log()
        .contains("worker killed by signal")));
}

#[test]
fn a_crash_looping_worker_is_reported_loudly_while_the_master_serves_with_the_others() {
    let _one = serial();
    // Slot 0 runs the demo worker; slot 1 exits at once, every time.
    let script = r#"test "$HANDOFF_WORKER" = 0 || exit 3; exec "$0" run"#;
    let master = Master::launch(
        &["--workers", "2", "--", "sh", "-c", script, crate::util::BIN],
        |_| {},
    );
    let crash_looping = wait_until(PATIENCE, || {
        master.status()["workers"][1]["crash_loop"] == true
    });
    assert!(crash_looping, "{}\n{}", master.status(), master.log());
    let status = master.status();
    assert_eq!(status["crash_looping"], 1, "{status}");
    assert_eq!(counter(&status, "crash_loops"), 1);
    assert_eq!(status["workers"][0]["phase"], "ready");
    let serving = status["workers"][0]["pid"].as_u64().unwrap() as u32;
    let log = master.log();
    assert_eq!(
        log_lines(&log, &["ERROR", "crash loop", "worker=1", "failures=5"]),
        1,
        "the loud report:\n{log}"
    );
    for delay in [100, 200, 400, 800, 1600] {
        assert!(
            log.contains(&format!("next_start_ms={delay}")),
            "backoff {delay} missing:\n{log}"
        );
    }
    for _ in 0..20 {
        assert_eq!(master.get().pid, serving, "served by the healthy worker");
    }
    // The next start is 1.6 s away: the master should sleep through it. Watch the log, not
    // the control socket, so the test's own polling costs the master nothing.
    let ticks = cpu_ticks(master.pid());
    assert!(wait_until(PATIENCE, || master
        .log()
        .contains("next_start_ms=3200")));
    let burnt = cpu_ticks(master.pid()) - ticks;
    eprintln!("crash loop: the master used {burnt} clock ticks over the 1.6 s backoff");
    assert!(burnt <= 20, "master burnt {burnt} ticks while backing off");
    assert_eq!(master.status()["workers"][1]["failures"], 6);
    assert_eq!(master.get().status, 200, "still up and serving");
}

#[test]
fn sigttin_and_sigttou_change_the_worker_count_never_below_one() {
    let _one = serial();
    let master = Master::start(&["--workers", "2"]);
    let count = |m: &Master| m.status()["workers"].as_array().unwrap().len();
    master.signal("TTIN");
    assert!(wait_until(PATIENCE, || count(&master) == 3
        && ready_workers(&master.status()) == 3));
    let three = pids(&master);
    master.signal("TTOU");
    assert!(wait_until(PATIENCE, || count(&master) == 2));
    assert!(
        wait_until(PATIENCE, || !process_exists(three[2])),
        "the removed worker drained and exited"
    );
    master.signal("TTOU");
    assert!(wait_until(PATIENCE, || count(&master) == 1));
    master.signal("TTOU");
    assert!(
        wait_until(PATIENCE, || master.log().contains("only one worker left")),
        "{}",
        master.log()
    );
    assert_eq!(count(&master), 1);
    assert_eq!(ready_workers(&master.status()), 1);
    assert_eq!(master.get().pid, three[0], "the first worker stays");
    master.signal("TTIN");
    assert!(wait_until(PATIENCE, || count(&master) == 2
        && ready_workers(&master.status()) == 2));
    let log = master.log();
    assert_eq!(log_lines(&log, &["reason=scale-down"]), 2, "{log}");
    assert_eq!(log_lines(&log, &["worker drained"]), 2, "{log}");
    assert_eq!(
        log_lines(&log, &["worker killed by signal"]) + log_lines(&log, &["expected=false"]),
        0
    );
}

#[test]
fn max_age_recycles_and_the_request_in_flight_finishes_within_the_drain_timeout() {
    let _one = serial();
    // Every request burns 1.5 s; the worker is recycled after about a second and may take
    // 3 s to drain, so the request in flight finishes.
    let master = Master::start(&[
        "--workers",
        "1",
        "--max-age",
        "1s",
        "--drain-timeout",
        "3s",
        "--work-us",
        "1500000",
    ]);
    let first = pids(&master)[0];
    let mut in_flight = send_request(master.addr);
    assert!(
        wait_until(PATIENCE, || master.log().contains("reason=max-age")),
        "{}",
        master.log()
    );
    let response = read_response(&mut in_flight).expect("the in-flight request finishes");
    assert_eq!((response.status, response.pid), (200, first));
    assert!(wait_until(PATIENCE, || master
        .log()
        .contains(&format!("worker drained worker=0 pid={first}"))));
    let log = master.log();
    let line = log.lines().find(|l| l.contains("reason=max-age")).unwrap();
    let age: u64 = log_field(line, "age_ms").unwrap().parse().unwrap();
    assert!((900..2500).contains(&age), "recycled at {age} ms:\n{log}");
    assert!(!log.contains("drain timeout"), "{log}");
}

#[test]
fn a_draining_worker_past_the_drain_timeout_is_killed_without_a_respawn() {
    let _one = serial();
    // A 4 s request cannot finish within a 500 ms drain: that connection is cut, nothing else.
    let master = Master::start(&[
        "--workers",
        "1",
        "--max-age",
        "1s",
        "--jitter",
        "0",
        "--drain-timeout",
        "500ms",
        "--work-us",
        "4000000",
    ]);
    let first = pids(&master)[0];
    let started = Instant::now();
    let mut in_flight = send_request(master.addr);
    assert!(
        wait_until(PATIENCE, || !process_exists(first)),
        "{}",
        master.log()
    );
    let killed_after = started.elapsed();
    assert!(
        read_response(&mut in_flight).is_err(),
        "the request was cut, not answered"
    );
    assert!(
        killed_after < Duration::from_millis(3900),
        "{killed_after:?}"
    );
    assert!(wait_until(PATIENCE, || master.log().contains(&format!(
        "worker killed by signal worker=0 pid={first}"
    ))));
    let log = master.log();
    assert_eq!(
        log_lines(&log, &["drain timeout", &format!("pid={first}")]),
        1,
        "{log}"
    );
    let status = master.status();
    assert_eq!(counter(&status, "drain_kills"), 1, "{status}");
    assert_eq!(counter(&status, "lost_with_worker"), 1, "{status}");
    assert_eq!(
        status["workers"][0]["failures"], 0,
        "an expected exit: {status}"
    );
    assert_eq!(
        log_lines(&log, &["worker spawned"]),
        counter(&status, "spawned") as usize
    );
    assert!(!log.contains("restarting worker after backoff"), "{log}");
    assert!(wait_until(PATIENCE, || ready_workers(&master.status()) == 1));
}

#[test]
fn a_worker_sent_sigterm_from_outside_hands_its_slot_over_under_load_without_a_failed_request() {
    let _one = serial();
    let master = Master::start(&["--workers", "2", "--strategy", "round-robin"]);
    let victim = master.worker_pids()[0].unwrap();
    let load = Load::start(master.addr, 150, 450);
    assert!(load.wait_sent(100));
    // Not the master's doing: the worker announces DRAINING, leaves its slot at once and a
    // replacement starts.
    send_signal(victim, "TERM");
    assert!(
        wait_until(PATIENCE, || {
            let status = master.status();
            ready_workers(&status) == 2 && status["workers"][0]["pid"] != victim
        }),
        "slot 0 not refilled; log:\n{}",
        master.log()
    );
    assert!(wait_until(PATIENCE, || !process_exists(victim)));
    let report = load.finish();
    let log = master.log();
    assert!(
        report.failures.is_empty(),
        "{:?}\nlog:\n{log}",
        report.failure_kinds()
    );
    assert_eq!(
        log_lines(
            &log,
            &[
                "worker draining",
                "reason=worker-draining",
                &format!("pid={victim}")
            ]
        ),
        1,
        "{log}"
    );
    assert!(
        log.contains(&format!("worker exited worker=0 pid={victim} code=0")),
        "{log}"
    );
    // A worker that lived less than the stable period goes through the backoff (a service
    // ending on its own again and again must not respawn in a loop): one step, 100 ms.
    let status = master.status();
    assert!(
        status["workers"][0]["failures"].as_u64().unwrap() <= 1,
        "{status}"
    );
}
