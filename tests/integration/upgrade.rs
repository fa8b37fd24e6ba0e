//! Live upgrade: `handoff upgrade` starts the binary again and hands it the listening,
//! control and metrics sockets; the old master stops only once the new one is ready, so no
//! client is refused. A new binary that fails leaves the old master serving.

use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::util::{send_signal, status_at, wait_until, Load, Master, BIN, PATIENCE};

fn upgrade(master: &Master, binary: Option<&str>) -> std::process::Output {
    let mut cmd = Command::new(BIN);
    cmd.args(["upgrade", "--control"]).arg(&master.control);
    if let Some(binary) = binary {
        cmd.args(["--binary", binary]);
    }
    cmd.output().unwrap()
}

/// Stops whatever master answers at the control socket now (the one an upgrade started is
/// no child of the test's).
struct StopAtEnd(std::path::PathBuf);

impl Drop for StopAtEnd {
    fn drop(&mut self) {
        if let Some(pid) = status_at(&self.0).and_then(|s| s["pid"].as_u64()) {
            send_signal(pid as u32, "TERM");
        }
    }
}

#[test]
fn three_upgrades_under_load_refuse_no_connection_and_fail_no_request() {
    let master = Master::start(&["--workers", "2", "--metrics", "127.0.0.1:0"]);
    let _stop = StopAtEnd(master.control.clone());
    let first = master.pid();
    let load = Load::start(master.addr, 300, 1_500);
    assert!(load.wait_sent(200), "load started");
    let mut pids = vec![first];
    for _ in 0..3 {
        let before = load.sent();
        let output = upgrade(&master, None);
        assert!(output.status.success(), "{output:?}\n{}", master.log());
        let answer: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        let pid = answer["pid"].as_u64().unwrap() as u32;
        assert!(!pids.contains(&pid));
        pids.push(pid);
        // The new master answers the same control socket, ready.
        let status = master.status();
        assert_eq!(status["pid"].as_u64(), Some(u64::from(pid)), "{status}");
        assert_eq!(crate::util::ready_workers(&status), 2, "{status}");
        assert!(load.wait_sent(before + 200), "load goes on");
    }
    let report = load.finish();
    assert!(
        report.failures.is_empty(),
        "{} of {} failed: {:?}\n{}",
        report.failures.len(),
        report.sent,
        report.failure_kinds(),
        master.log()
    );
    assert_eq!(report.ok, 1_500);
    // The first master has gone, having drained its workers. (Its log pipe stays open:
    // the new masters write to it too.)
    let gone = wait_until(PATIENCE, || !crate::util::process_exists(first));
    assert!(gone, "{}", master.log());
    assert!(wait_until(PATIENCE, || master
        .log()
        .contains("upgraded: stopping")));
}

/// The acceptance: 50 upgrades in a row under about 2,000 requests per second mixing
/// new connections (open loop), keep-alive connections (paced) and long-lived ones (a
/// request every 200 ms for the whole run): no failed request, no reset. Keep-alive
/// connections go on through every upgrade: a draining old worker hands each idle one back
/// and the old master passes it to the new one.
#[test]
fn fifty_upgrades_under_mixed_load_fail_no_request() {
    use crate::keepalive::KeepAliveLoad;
    let master = Master::start(&["--workers", "2"]);
    let _stop = StopAtEnd(master.control.clone());
    let fresh = Load::start(master.addr, 1_200, 60_000);
    let keep_alive = KeepAliveLoad::paced(master.addr, 15, Some(Duration::from_millis(20)));
    let long_lived = KeepAliveLoad::paced(master.addr, 10, Some(Duration::from_millis(200)));
    assert!(fresh.wait_sent(500));
    assert!(keep_alive.wait_requests(0, 300));
    let mut pids = vec![master.pid()];
    for round in 0..50 {
        let before = (keep_alive.requests(), long_lived.requests());
        let output = upgrade(&master, None);
        assert!(
            output.status.success(),
            "upgrade {round}: {output:?}\n{}",
            master.log()
        );
        let answer: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        pids.push(answer["pid"].as_u64().unwrap() as u32);
        // Every kind of client is served through each upgrade.
        assert!(keep_alive.wait_requests(before.0, 30), "{}", master.log());
        assert!(long_lived.wait_requests(before.1, 10), "{}", master.log());
    }
    let sent = fresh.sent();
    let report = fresh.finish_early();
    let (keep_alive, long_lived) = (keep_alive.finish(), long_lived.finish());
    let errors: Vec<String> = [&keep_alive, &long_lived]
        .iter()
        .flat_map(|t| t.errors.lock().unwrap().clone())
        .collect();
    let kept = |t: &crate::keepalive::Tally| t.requests.load(Ordering::Relaxed);
    eprintln!(
        "50 upgrades: {} new-connection requests, {} keep-alive, {} long-lived; {} errors",
        report.ok,
        kept(&keep_alive),
        kept(&long_lived),
        report.failures.len() + errors.len()
    );
    assert!(
        report.failures.is_empty() && errors.is_empty(),
        "new connections: {} of {sent} failed {:?}; {} keep-alive errors, first {:?}\n{}",
        report.failures.len(),
        report.failure_kinds(),
        errors.len(),
        &errors[..errors.len().min(5)],
        master.log()
    );
    assert_eq!(report.ok, report.sent);
    let counters = master.status()["counters"].clone();
    assert!(
        counters["handed_back"].as_u64().unwrap() > 0,
        "keep-alive connections went on to the new masters: {counters}"
    );
    assert_eq!(counters["handbacks_refused"], 0, "{counters}");
    // Each old master went, having drained its workers and passed their connections on.
    let gone = wait_until(PATIENCE, || {
        pids[..50]
            .iter()
            .all(|&pid| !crate::util::process_exists(pid))
    });
    assert!(gone, "{}", master.log());
}

#[test]
fn totals_count_on_across_upgrades_and_end_exact() {
    use crate::metrics::{metrics_addr, scrape, series};
    let master = Master::start(&["--workers", "2", "--metrics", "127.0.0.1:0"]);
    let _stop = StopAtEnd(master.control.clone());
    let metrics = metrics_addr(&master);
    let (mut answered, mut last) = (0u64, 0.0);
    let mut check = |answered: u64| {
        let text = scrape(metrics);
        let accepted = series(&text, "handoff_connections_accepted_total").unwrap_or(0.0);
        assert!(accepted >= last, "went down: {last} then {accepted}");
        last = accepted;
        accepted == answered as f64 && series(&text, "demo_requests_total") == Some(answered as f64)
    };
    for round in 0..3 {
        for _ in 0..100 {
            if master.get().status == 200 {
                answered += 1;
            }
        }
        check(answered);
        if round == 2 {
            break;
        }
        let old = master.status()["pid"].as_u64().unwrap() as u32;
        let output = upgrade(&master, None);
        assert!(output.status.success(), "{output:?}\n{}", master.log());
        assert!(wait_until(PATIENCE, || !crate::util::process_exists(old)));
    }
    // The last replaced master's FINAL totals arrive as it exits.
    let exact = wait_until(PATIENCE, || check(answered));
    let text = scrape(metrics);
    assert!(exact, "{answered} answered\n{text}\n{}", master.log());
    assert_eq!(answered, 300);
    assert_eq!(
        series(&text, "handoff_workers_spawned_total"),
        Some(6.0),
        "{text}"
    );
}

#[test]
fn five_upgrades_to_binaries_that_fail_leave_the_old_master_serving() {
    let master = Master::start(&["--workers", "2"]);
    let _stop = StopAtEnd(master.control.clone());
    let load = Load::start(master.addr, 200, 1_000);
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("handoff");
    std::fs::write(&script, "#!/bin/sh\nexit 3\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    // Each exits at once (with a failure, with success), or is not there.
    let broken = [
        ("/bin/false", "exited (exit status: 1) before it was ready"),
        ("/bin/true", "exited (exit status: 0) before it was ready"),
        ("/nonexistent/handoff", "starting /nonexistent/handoff"),
        (
            script.to_str().unwrap(),
            "exited (exit status: 3) before it was ready",
        ),
        ("/bin/false", "exited (exit status: 1) before it was ready"),
    ];
    for (binary, reason) in broken {
        let output = upgrade(&master, Some(binary));
        assert!(!output.status.success(), "{binary}: {output:?}");
        let error = String::from_utf8_lossy(&output.stderr);
        assert!(error.contains(reason), "{binary}: {error}");
        assert_eq!(
            master.status()["pid"].as_u64(),
            Some(u64::from(master.pid()))
        );
    }
    assert!(load.wait_sent(100));
    let report = load.finish();
    assert!(report.failures.is_empty(), "{:?}", report.failure_kinds());
    assert_eq!(master.get().status, 200);
    assert!(wait_until(PATIENCE, || master.status()["workers"][0]
        ["phase"]
        == "ready"));
}
