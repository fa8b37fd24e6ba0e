//! `handoff bench` end to end: the real binary starts real contenders on 127.0.0.1 and
//! drives them briefly at a low rate. Checks the shape and sanity of each row and of what is
//! written (table, JSON, picture), never timings. Every run has its own current directory, so
//! the default `target/bench/` lands in a temporary folder.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::util::BIN;
/// The longest a whole bench run may take here.
const BENCH_PATIENCE: Duration = Duration::from_secs(180);

/// Runs `handoff bench ARGS`, killing it if it outlives [`BENCH_PATIENCE`].
fn bench(args: &[&str], adjust: impl FnOnce(&mut Command)) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.arg("bench")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    adjust(&mut cmd);
    let mut child = cmd.spawn().expect("spawn handoff bench");
    let deadline = Instant::now() + BENCH_PATIENCE;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().expect("wait");
            panic!(
                "handoff bench ran past {BENCH_PATIENCE:?}; stderr:\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("wait")
}

fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).expect("the --json file");
    serde_json::from_str(&text).expect("valid JSON")
}

fn node_on_path() -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("node").is_file()))
}

/// A row that ran: positive rate, no errors, shares adding up, Jain's index in (0, 1].
fn assert_sane(row: &serde_json::Value, context: &str) {
    let name = row["contender"].as_str().unwrap_or("?");
    assert!(
        row["unavailable"].is_null(),
        "{name} unavailable: {}\n{context}",
        row["unavailable"]
    );
    assert!(
        row["achieved_rps"].as_f64().unwrap() > 0.0,
        "{name}: no rate\n{context}"
    );
    assert_eq!(
        row["error_total"], 0,
        "{name}: errors {}\n{context}",
        row["errors"]
    );
    let requests = row["requests"].as_u64().unwrap();
    assert!(requests > 0, "{name}: no requests\n{context}");
    let workers = row["workers"].as_array().unwrap();
    assert!(workers.len() >= 2, "{name}: workers {workers:?}");
    let answered: u64 = workers
        .iter()
        .map(|w| w["requests"].as_u64().unwrap())
        .sum();
    assert_eq!(
        answered, requests,
        "{name}: per-worker requests add up to the total"
    );
    let shares: f64 = workers
        .iter()
        .map(|w| w["request_share"].as_f64().unwrap())
        .sum();
    assert!(
        (shares - 1.0).abs() < 1e-6,
        "{name}: shares add up to {shares}"
    );
    let jain = row["request_jain"].as_f64().unwrap();
    assert!(jain > 0.0 && jain <= 1.0 + 1e-9, "{name}: request J {jain}");
    if let Some(cpu_jain) = row["cpu_jain"].as_f64() {
        assert!(
            cpu_jain > 0.0 && cpu_jain <= 1.0 + 1e-9,
            "{name}: cpu J {cpu_jain}"
        );
    }
    let latency = &row["latency_us"];
    assert_eq!(latency["count"].as_u64().unwrap(), requests);
    let order = ["p50", "p90", "p99", "p999", "max"].map(|p| latency[p].as_u64().unwrap());
    assert!(
        order.windows(2).all(|w| w[0] <= w[1]),
        "{name}: percentiles in order {order:?}"
    );
    assert!(
        row["master"]["pid"].as_u64().is_some(),
        "{name}: master pid"
    );
}

#[test]
fn every_contender_produces_a_sane_error_free_row() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let mut contenders = vec![
        "kernel-shared",
        "kernel-reuseport",
        "handoff-rr",
        "handoff-least",
        "handoff-p2c",
    ];
    if crate::kernel_least::bpf_capable() {
        contenders.push("handoff-kernel-least");
    }
    if node_on_path() {
        contenders.push("node-rr");
    }
    let list = contenders.join(",");
    let output = bench(
        &[
            "--workers",
            "2",
            "--contenders",
            &list,
            "--workloads",
            "hello,keepalive,long-lived",
            "--rate",
            "150",
            "--duration",
            "500ms",
            "--warmup",
            "100ms",
            "--work-us",
            "10",
            "--json",
            json.to_str().unwrap(),
            "--out",
            dir.path().join("svg").to_str().unwrap(),
        ],
        |cmd| {
            cmd.current_dir(dir.path());
        },
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let context = format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(output.status.success(), "{context}");
    let report = read_json(&json);
    let workloads = report["workloads"].as_array().unwrap();
    assert_eq!(workloads.len(), 3);
    for workload in workloads {
        let rows = workload["rows"].as_array().unwrap();
        let names: Vec<&str> = rows
            .iter()
            .map(|r| r["contender"].as_str().unwrap())
            .collect();
        assert_eq!(names, contenders);
        for row in rows {
            assert_sane(row, &context);
            assert_eq!(row["offered_rps"].as_f64(), Some(150.0));
        }
    }
    // The table names every contender under a legend, fits 120 columns, gives a verdict;
    // the picture exists and is SVG, and the folder holds the same table.
    for name in &contenders {
        assert!(
            stdout.contains(name),
            "{name} missing from the table:\n{stdout}"
        );
    }
    assert!(
        stdout.find("evenness ").unwrap() < stdout.find("\nhello — ").unwrap(),
        "a legend above the tables:\n{stdout}"
    );
    for line in stdout.lines() {
        assert!(line.chars().count() <= 120, "wider than 120: {line:?}");
    }
    for workload in workloads {
        let verdict = workload["verdict"].as_str().expect("a verdict");
        assert!(verdict.starts_with("handoff-least: "), "{verdict}");
    }
    assert_eq!(
        stdout.matches("\nverdict: handoff-least: ").count(),
        workloads.len(),
        "{stdout}"
    );
    let svg = std::fs::read_to_string(dir.path().join("svg/report.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert!(
        svg.contains("verdict: handoff-least"),
        "the verdicts are drawn"
    );
    assert!(dir.path().join("svg/report.json").is_file());
    let table = std::fs::read_to_string(dir.path().join("svg/table.txt")).unwrap();
    assert_eq!(table, stdout, "table.txt is the printed table");
    assert!(
        !dir.path().join("target").exists(),
        "--out replaces the default folder"
    );
}

/// The one run folder `handoff bench` made under `cwd/target/bench/`.
fn default_folder(cwd: &Path) -> std::path::PathBuf {
    let base = cwd.join("target/bench");
    let entries: Vec<_> = std::fs::read_dir(&base)
        .unwrap_or_else(|e| panic!("{base:?}: {e}"))
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    entries.into_iter().next().unwrap()
}

#[test]
fn a_load_fraction_offers_that_part_of_the_measured_capacity() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let output = bench(
        &[
            "--workers",
            "2",
            "--contenders",
            "handoff-rr",
            "--workloads",
            "heavy-tail",
            "--load",
            "0.25",
            "--capacity-duration",
            "300ms",
            "--duration",
            "300ms",
            "--warmup",
            "100ms",
            "--capacity-runs",
            "2",
            "--clients",
            "4",
            "--json",
            json.to_str().unwrap(),
        ],
        |cmd| {
            cmd.current_dir(dir.path());
        },
    );
    let context = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{context}");
    let report = read_json(&json);
    let workload = &report["workloads"][0];
    let row = &workload["rows"][0];
    let capacity = &row["capacity"];
    let runs: Vec<f64> = capacity["runs_rps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_f64().unwrap())
        .collect();
    assert_eq!(runs.len(), 2, "{capacity}");
    let median = capacity["median_rps"].as_f64().unwrap();
    assert!(median > 0.0);
    // serde_json's default float parsing may be off by an ulp: compare loosely.
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs().max(1.0);
    assert!(close(median, (runs[0] + runs[1]) / 2.0), "{capacity}");
    let min = capacity["min_rps"].as_f64().unwrap();
    assert!(close(min, runs[0].min(runs[1])), "{capacity}");
    let offered = workload["offered_rps"].as_f64().unwrap();
    assert!(
        (offered - 0.25 * median).abs() < 1e-6 * median.max(1.0),
        "{offered} vs {median}"
    );
    assert_sane(row, &context);
    // Without --out, the picture, the JSON and the table land in target/bench/<UTC time>/,
    // and the last line says where.
    let folder = default_folder(dir.path());
    for file in ["report.svg", "report.json", "table.txt"] {
        assert!(folder.join(file).is_file(), "{file} in {folder:?}");
    }
    let name = folder.file_name().unwrap().to_str().unwrap();
    assert!(
        context.trim_end().lines().last().unwrap().contains(name),
        "{context}"
    );
}

#[test]
fn a_contender_that_cannot_start_is_reported_unavailable_not_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let output = bench(
        &[
            "--workers",
            "2",
            "--contenders",
            "handoff-rr,node-rr",
            "--workloads",
            "hello",
            "--rate",
            "100",
            "--duration",
            "200ms",
            "--warmup",
            "50ms",
            "--json",
            json.to_str().unwrap(),
        ],
        // No node here, whatever the machine has.
        |cmd| {
            cmd.env("PATH", dir.path()).current_dir(dir.path());
        },
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report = read_json(&json);
    let rows = report["workloads"][0]["rows"].as_array().unwrap();
    assert!(rows[0]["unavailable"].is_null());
    let reason = rows[1]["unavailable"]
        .as_str()
        .expect("node-rr unavailable");
    assert!(reason.contains("node"), "{reason}");
    assert!(
        stdout.contains("node-rr") && stdout.contains("unavailable: "),
        "{stdout}"
    );
}

#[test]
fn unknown_names_are_refused_before_anything_starts() {
    let output = bench(
        &[
            "--contenders",
            "nginx",
            "--rate",
            "10",
            "--duration",
            "100ms",
        ],
        |_| {},
    );
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown contender"));
    let output = bench(&["--workloads", "tsunami", "--rate", "10"], |_| {});
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown workload"));
}

/// `handoff bench --proxy` with every frontend: HAProxy and nginx must be installed (`.ci/run`
/// installs them); a missing one fails here as an unavailable row, it is not skipped.
#[test]
fn the_proxy_bench_runs_every_frontend_error_free_and_least_conn_spares_the_slow_backend() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("proxy.json");
    let output = bench(
        &[
            "--proxy",
            "--quick",
            "--backends",
            "4",
            // 20.5 ms per request on the first backend (500 µs CPU, the rest a wait),
            // 2.05 ms on the others: often still busy when its turn comes again (Poisson
            // arrivals, 100/s over 4 backends), yet not overloaded by round-robin (0.51 of
            // its time: room for a machine so busy that its CPU and wake-ups take twice as
            // long; at 150/s, 0.77, one run on a machine at load average 15 had errors).
            "--wait-us",
            "2000",
            "--slow",
            "10",
            "--contenders",
            "handoff-proxy,handoff-proxy-rr,haproxy-leastconn,nginx-least-conn",
            // A fixed rate: a fraction of a capacity measured on a busy machine may be so low
            // that no backend ever has a connection in flight to be told apart by.
            "--rate",
            "100",
            "--duration",
            "3s",
            "--json",
            json.to_str().unwrap(),
            "--out",
            dir.path().join("out").to_str().unwrap(),
        ],
        |_| {},
    );
    let context = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{context}");
    let report = read_json(&json);
    let backends = report["backends"].as_array().unwrap();
    assert_eq!(backends.len(), 4, "{context}");
    for cost in ["work_us", "wait_us"] {
        assert_eq!(
            backends[0][cost],
            10 * backends[1][cost].as_u64().unwrap(),
            "{cost}"
        );
    }
    assert_eq!(backends[1]["wait_us"], 2000);
    let rows = report["rows"].as_array().unwrap();
    let names: Vec<&str> = rows
        .iter()
        .map(|r| r["contender"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "handoff-proxy",
            "handoff-proxy-rr",
            "haproxy-leastconn",
            "nginx-least-conn"
        ]
    );
    for row in rows {
        let name = row["contender"].as_str().unwrap();
        assert!(
            row["unavailable"].is_null(),
            "{name} unavailable: {}\n{context}",
            row["unavailable"]
        );
        assert_eq!(
            row["error_total"], 0,
            "{name}: {}\n{context}",
            row["errors"]
        );
        assert!(
            row["capacity"].is_null(),
            "{name}: no capacity runs at a fixed rate"
        );
        let requests = row["requests"].as_u64().unwrap();
        assert!(requests > 0, "{name}: no requests\n{context}");
        let per_backend: Vec<u64> = row["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["requests"].as_u64().unwrap())
            .collect();
        assert_eq!(
            per_backend.iter().sum::<u64>(),
            requests,
            "{name}: every answer is a backend's"
        );
        let spread = &row["in_flight"];
        assert_eq!(spread["samples"], 3000, "{name}: {spread}");
        let within = spread["within_one"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&within), "{name}: {spread}");
    }
    // Least connections: the backend 10× slower holds its connections longer, so it is
    // picked less often than the others.
    let shares: Vec<f64> = rows[0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["share"].as_f64().unwrap())
        .collect();
    let others = shares[1..].iter().sum::<f64>() / 3.0;
    assert!(
        shares[0] < others,
        "handoff-proxy shares {shares:?}\n{context}"
    );
    assert!(report["arrivals"] == "poisson", "{context}");
    let table = std::fs::read_to_string(dir.path().join("out/table.txt")).unwrap();
    assert_eq!(
        table,
        String::from_utf8_lossy(&output.stdout),
        "table.txt is the printed table"
    );
    assert!(table.contains("without the zone"), "{table}");
    assert!(dir.path().join("out/report.json").is_file());
}
