//! The core promise, tested on the real binary: the master accepts, hands each connection to
//! a worker by the chosen strategy, loses none when a worker dies or stalls, and stops
//! cleanly.

use std::collections::HashMap;
use std::io::{BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use crate::util::{
    cpu_ticks, fd_count, http_get, process_exists, read_response, rss_kib, send_request,
    send_signal, wait_until, Held, Master, PATIENCE,
};

fn shares(pids: impl IntoIterator<Item = u32>) -> HashMap<u32, usize> {
    let mut counts = HashMap::new();
    for pid in pids {
        *counts.entry(pid).or_default() += 1;
    }
    counts
}

fn slot(status: &serde_json::Value, index: usize) -> &serde_json::Value {
    &status["workers"][index]
}

#[test]
fn round_robin_gives_each_of_4_workers_exactly_100_of_400_connections() {
    let master = Master::start(&["--workers", "4", "--strategy", "round-robin"]);
    let workers = master.wait_all_ready();
    let counts = shares((0..400).map(|_| master.get().pid));
    assert_eq!(counts.len(), 4, "{counts:?}");
    for pid in workers {
        assert_eq!(counts.get(&pid), Some(&100), "{counts:?}");
    }
}

#[test]
fn least_loaded_steers_new_connections_away_from_a_worker_holding_many() {
    let master = Master::start(&["--workers", "2", "--strategy", "least-loaded"]);
    let held: Vec<Held> = (0..10).map(|_| Held::open(master.addr).unwrap()).collect();
    let counts = shares(held.iter().map(|h| h.pid));
    assert_eq!(
        counts.values().copied().collect::<Vec<_>>(),
        [5, 5],
        "ties rotate: {counts:?}"
    );

    // Close everything on one worker: it is now idle while the other still holds 5.
    let idle = held[0].pid;
    let (closed, busy): (Vec<Held>, Vec<Held>) = held.into_iter().partition(|h| h.pid == idle);
    drop(closed);
    let idle_slot = master
        .worker_pids()
        .iter()
        .position(|p| *p == Some(idle))
        .unwrap();
    assert!(
        wait_until(PATIENCE, || slot(&master.status(), idle_slot)["active"]
            == 0),
        "the idle worker's closes never reached the master: {}",
        master.status()
    );
    let new: Vec<Held> = (0..5).map(|_| Held::open(master.addr).unwrap()).collect();
    assert!(
        new.iter().all(|h| h.pid == idle),
        "all 5 new connections go to the idle worker"
    );
    drop(busy);
}

#[test]
fn two_choices_spreads_1000_connections_within_max_over_min_1_5() {
    let master = Master::start(&["--workers", "4", "--strategy", "two-choices"]);
    let addr = master.addr;
    let clients: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                (0..250)
                    .map(|_| http_get(addr).unwrap().pid)
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let counts = shares(clients.into_iter().flat_map(|c| c.join().unwrap()));
    let (min, max) = (
        *counts.values().min().unwrap(),
        *counts.values().max().unwrap(),
    );
    assert_eq!(counts.len(), 4, "{counts:?}");
    assert!(max as f64 / min as f64 <= 1.5, "{counts:?}");
}

#[test]
fn a_killed_worker_s_pending_connections_are_served_by_others_and_it_is_respawned() {
    let master = Master::start(&["--workers", "2", "--strategy", "round-robin"]);
    let victim = master.worker_pids()[0].unwrap();
    send_signal(victim, "STOP");
    let pending: Vec<_> = (0..6).map(|_| send_request(master.addr)).collect();
    assert!(
        wait_until(PATIENCE, || slot(&master.status(), 0)["pending"] == 3),
        "3 connections should wait on the stopped worker: {}",
        master.status()
    );
    send_signal(victim, "KILL");
    for mut stream in pending {
        let response = read_response(&mut stream).expect("every pending connection is answered");
        assert_eq!(response.status, 200);
        assert_ne!(response.pid, victim);
    }
    assert!(
        wait_until(PATIENCE, || {
            let status = master.status();
            slot(&status, 0)["phase"] == "ready" && slot(&status, 0)["pid"] != victim
        }),
        "slot 0 was not respawned: {}",
        master.status()
    );
    let status = master.status();
    assert!(
        status["counters"]["redispatched"].as_u64().unwrap() >= 3,
        "{status}"
    );
    assert!(
        wait_until(PATIENCE, || master
            .log()
            .contains("worker killed by signal")),
        "the exit is logged"
    );
}

fn fd_flags(pid: u32, fd: &str) -> Option<u32> {
    let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
    let line = info.lines().find(|l| l.starts_with("flags:"))?;
    u32::from_str_radix(line.trim_start_matches("flags:").trim(), 8).ok()
}

#[test]
fn received_fds_are_close_on_exec_and_fd_counts_return_to_baseline() {
    let master = Master::start(&["--workers", "2", "--strategy", "round-robin"]);
    let workers = master.wait_all_ready();
    // Workers keep finished connections open a few ms (so the master's close is never the
    // last one); they too must come back to where they were.
    let worker_baseline: Vec<usize> = workers.iter().map(|&pid| fd_count(pid)).collect();
    let held = Held::open(master.addr).unwrap();
    let mut checked = 0;
    for entry in std::fs::read_dir(format!("/proc/{}/fd", held.pid)).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.parse::<u32>().unwrap() <= 2 {
            continue;
        }
        if let Some(flags) = fd_flags(held.pid, &name) {
            assert_ne!(
                flags & libc::O_CLOEXEC as u32,
                0,
                "worker fd {name} is not close-on-exec"
            );
            checked += 1;
        }
    }
    assert!(checked >= 2, "the channel and the held connection at least");
    drop(held);

    let baseline = fd_count(master.pid());
    let addr = master.addr;
    let clients: Vec<_> = (0..4)
        .map(|_| std::thread::spawn(move || (0..2500).filter(|_| http_get(addr).is_ok()).count()))
        .collect();
    let served: usize = clients.into_iter().map(|c| c.join().unwrap()).sum();
    assert_eq!(served, 10_000);
    // At most the baseline: a control connection of the last status may still have been
    // open when it was counted.
    assert!(
        wait_until(PATIENCE, || fd_count(master.pid()) <= baseline),
        "master fds {} after 10,000 connections, baseline {baseline}",
        fd_count(master.pid())
    );
    let worker_fds = || workers.iter().map(|&pid| fd_count(pid)).collect::<Vec<_>>();
    assert!(
        wait_until(PATIENCE, || worker_fds() == worker_baseline),
        "worker fds {:?} after 10,000 connections, baseline {worker_baseline:?}",
        worker_fds()
    );
}

#[test]
fn with_every_worker_stalled_the_master_stops_at_the_pending_cap_and_resumes() {
    let master = Master::start(&[
        "--workers",
        "2",
        "--strategy",
        "round-robin",
        "--max-pending",
        "8",
    ]);
    let pids: Vec<u32> = master.worker_pids().into_iter().flatten().collect();
    pids.iter().for_each(|&pid| send_signal(pid, "STOP"));
    let rss_before = rss_kib(master.pid());
    let waiting: Vec<_> = (0..200).map(|_| send_request(master.addr)).collect();
    assert!(
        wait_until(PATIENCE, || master.status()["accepting"] == false),
        "the master should stop accepting: {}",
        master.status()
    );
    let status = master.status();
    assert_eq!(
        status["counters"]["accepted"], 16,
        "2 workers x 8 pending, the rest stays in the backlog: {status}"
    );
    assert!(
        rss_kib(master.pid()) < rss_before + 16 * 1024,
        "master memory grew"
    );
    pids.iter().for_each(|&pid| send_signal(pid, "CONT"));
    for mut stream in waiting {
        assert_eq!(
            read_response(&mut stream)
                .expect("served after recovery")
                .status,
            200
        );
    }
    assert_eq!(master.status()["counters"]["accepted"], 200);
}

#[test]
fn fd_exhaustion_in_the_master_pauses_accepting_without_spinning_and_recovers() {
    let master = Master::start(&["--workers", "1", "--max-pending", "1000"]);
    let worker = master.worker_pids()[0].unwrap();
    send_signal(worker, "STOP");
    let limit = fd_count(master.pid()) + 10;
    let prlimit = Command::new("prlimit")
        .arg(format!("--pid={}", master.pid()))
        .arg(format!("--nofile={limit}:{limit}"))
        .status()
        .expect("prlimit (util-linux) is installed");
    assert!(prlimit.success());
    let waiting: Vec<_> = (0..40).map(|_| send_request(master.addr)).collect();
    assert!(
        wait_until(PATIENCE, || master
            .log()
            .matches("out of resources")
            .count()
            >= 5),
        "EMFILE should be hit and logged: {}",
        master.log()
    );
    // Five pauses (5+10+20+40+80 ms at least) later, a spinning loop would have burnt them all.
    let ticks = cpu_ticks(master.pid());
    let seen = master.log().matches("out of resources").count();
    assert!(wait_until(PATIENCE, || master
        .log()
        .matches("out of resources")
        .count()
        >= seen + 3));
    let burnt = cpu_ticks(master.pid()) - ticks;
    assert!(burnt <= 10, "master burnt {burnt} ticks while out of fds");
    send_signal(worker, "CONT");
    for mut stream in waiting {
        assert_eq!(
            read_response(&mut stream)
                .expect("served once fds free up")
                .status,
            200
        );
    }
    assert!(
        master.status()["counters"]["accept_errors"]
            .as_u64()
            .unwrap()
            >= 5
    );
}

#[test]
fn sigterm_under_load_finishes_in_flight_requests_and_exits_cleanly_with_no_orphan() {
    let mut master = Master::start(&["--workers", "2", "--work-us", "200000"]);
    let workers: Vec<u32> = master.worker_pids().into_iter().flatten().collect();
    let addr = master.addr;
    let load: Vec<_> = (0..3)
        .map(|_| {
            std::thread::spawn(move || {
                let mut answered = 0;
                for _ in 0..50 {
                    match http_get(addr) {
                        Ok(r) => {
                            assert_eq!((r.status, r.body.as_str()), (200, "hola, mundo\n"));
                            answered += 1;
                        }
                        Err(_) => break, // refused once the listener is closed
                    }
                }
                answered
            })
        })
        .collect();
    let mut in_flight = send_request(master.addr);
    assert!(wait_until(PATIENCE, || master.status()["counters"]
        ["accepted"]
        .as_u64()
        .unwrap()
        >= 4));
    master.signal("TERM");
    let response =
        read_response(&mut in_flight).expect("an in-flight request is finished, not cut");
    assert_eq!(response.status, 200);
    let status = master.wait_exit(PATIENCE).expect("master exits");
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        master.log()
    );
    let answered: usize = load.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(answered > 0);
    for pid in workers {
        assert!(!process_exists(pid), "worker {pid} outlived the master");
    }
    assert!(wait_until(PATIENCE, || master
        .log()
        .contains("master stopped")));
}

#[test]
fn a_unix_listener_and_an_ipv6_listener_serve_beside_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("h.sock");
    let unix = format!("unix:{}", path.display());
    let master = Master::start(&["--workers", "2", "--listen", &unix, "--listen", "[::1]:0"]);
    let mut stream = UnixStream::connect(&path).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")
        .unwrap();
    let response = read_response(&mut BufReader::new(stream)).unwrap();
    assert_eq!(
        (response.status, response.body.as_str()),
        (200, "hola, mundo\n")
    );
    let v6 = master.status()["listening"][2]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(http_get(v6).unwrap().status, 200);
}

#[test]
fn a_worker_command_that_exits_at_once_backs_off_and_the_master_stays_up() {
    let master = Master::launch(&["--workers", "1", "--", "sh", "-c", "exit 3"], |_| {});
    assert!(
        wait_until(PATIENCE, || master.status()["workers"][0]["failures"]
            .as_u64()
            .unwrap()
            >= 4),
        "{}",
        master.log()
    );
    // The status counts a failure before its log line is read back: wait for the lines.
    let delays = [
        "next_start_ms=100",
        "next_start_ms=200",
        "next_start_ms=400",
        "next_start_ms=800",
    ];
    wait_until(PATIENCE, || {
        let log = master.log();
        delays.iter().all(|delay| log.contains(delay))
    });
    let log = master.log();
    for delay in delays {
        assert!(log.contains(delay), "backoff {delay} missing:\n{log}");
    }
    assert!(log.contains("code=3"), "exit codes are logged");
    assert!(master.try_status().is_some(), "the master is still up");
}

#[test]
fn wrong_flags_and_unbindable_addresses_get_clear_errors() {
    let run = |args: &[&str]| {
        Command::new(crate::util::BIN)
            .arg("run")
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["--listen", "localhost"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid listen address \"localhost\""));

    let out = run(&["--workers", "0", "--listen", "127.0.0.1:0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--workers must be from 1 to 1024"));

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = run(&["--workers", "1", "--listen", &addr]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("binding {addr} failed")) && stderr.contains("in use"),
        "{stderr}"
    );

    let out = run(&["--heavy", "150:10"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not within 0..=100"));
}

#[test]
fn in_the_kernel_baselines_workers_accept_and_the_master_never_does() {
    for strategy in ["kernel-shared", "kernel-reuseport"] {
        let master = Master::start(&[
            "--workers",
            "2",
            "--strategy",
            strategy,
            "--worker-timeout",
            "2s",
        ]);
        let workers: Vec<u32> = master.worker_pids().into_iter().flatten().collect();
        for _ in 0..20 {
            let response = master.get();
            assert_eq!(response.status, 200);
            assert!(
                workers.contains(&response.pid),
                "{strategy}: answered by a worker"
            );
        }
        // Workers report what they accepted with their heartbeat.
        assert!(
            wait_until(PATIENCE, || {
                let status = master.status();
                let assigned: u64 = (0..2)
                    .map(|i| slot(&status, i)["assigned"].as_u64().unwrap())
                    .sum();
                assigned == 20
            }),
            "{strategy}: {}",
            master.status()
        );
        assert_eq!(
            master.status()["counters"]["accepted"],
            0,
            "{strategy}: the master accepted nothing"
        );
    }
}

#[test]
fn a_stalled_worker_s_full_channel_is_written_again_once_it_reads() {
    // 1 worker, a cap high enough that its channel (10 queued frames) fills first.
    let master = Master::start(&["--workers", "1", "--max-pending", "1000"]);
    let worker = master.worker_pids()[0].unwrap();
    send_signal(worker, "STOP");
    let mut waiting = Vec::new();
    for _ in 0..60 {
        waiting.push(send_request(master.addr));
        // One connection per accept batch: one frame each. Once the worker has left its
        // connections unacknowledged for the ack stall (100 ms; a loaded machine gets
        // there within the 60), it gets nothing new: the next connection waits in the
        // master for re-dispatch, the master stops accepting, and the rest wait in the
        // kernel's queue. Each is served all the same once the worker reads.
        let held = waiting.len();
        let mut stalled = false;
        assert!(wait_until(PATIENCE, || {
            let status = master.status();
            stalled = status["awaiting_redispatch"] != 0;
            stalled || slot(&status, 0)["pending"] == held
        }));
        if stalled {
            break;
        }
    }
    for _ in waiting.len()..60 {
        waiting.push(send_request(master.addr));
    }
    send_signal(worker, "CONT");
    for mut stream in waiting {
        assert_eq!(
            read_response(&mut stream)
                .expect("served once the worker reads")
                .status,
            200
        );
    }
    assert_eq!(master.status()["counters"]["redispatched"], 0);
}

#[test]
fn ctrl_c_to_the_master_s_process_group_drains_workers_instead_of_killing_them() {
    use std::os::unix::process::CommandExt;
    let mut master = Master::start_with(&["--workers", "2", "--work-us", "300000"], |cmd| {
        cmd.process_group(0);
    });
    let mut in_flight = send_request(master.addr);
    assert!(wait_until(PATIENCE, || master.status()["counters"]
        ["accepted"]
        == 1));
    // What a terminal does on Ctrl-C: SIGINT to the whole foreground process group.
    send_signal_to_group(master.pid(), "INT");
    let response = read_response(&mut in_flight).expect("the in-flight request is finished");
    assert_eq!(response.status, 200);
    let status = master.wait_exit(PATIENCE).expect("master exits");
    assert!(status.success(), "{status:?}\n{}", master.log());
    assert!(
        !master.log().contains("killed by signal"),
        "{}",
        master.log()
    );
}

fn send_signal_to_group(pgid: u32, signal: &str) {
    let ok = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg("--")
        .arg(format!("-{pgid}"))
        .status()
        .unwrap();
    assert!(ok.success());
}

/// Regression: a worker that drained on its own while the master was stopping got the
/// (short) --drain-timeout instead of the --shutdown-timeout, and was killed mid-request.
#[test]
fn a_worker_sigtermed_during_the_master_s_stop_keeps_the_shutdown_timeout() {
    let mut master = Master::start(&[
        "--workers",
        "1",
        "--work-us",
        "2500000",
        "--drain-timeout",
        "1s",
        "--shutdown-timeout",
        "20s",
    ]);
    let worker = master.worker_pids()[0].unwrap();
    let mut in_flight = send_request(master.addr);
    assert!(wait_until(PATIENCE, || master.status()["counters"]
        ["accepted"]
        == 1));
    // As systemd does to the whole cgroup: the master and the worker both get SIGTERM.
    master.signal("TERM");
    assert!(wait_until(PATIENCE, || master
        .log()
        .contains("SIGTERM: stopping")));
    send_signal(worker, "TERM");
    let response = read_response(&mut in_flight).expect("finished within the shutdown timeout");
    assert_eq!(response.status, 200);
    let status = master.wait_exit(PATIENCE).expect("master exits");
    assert!(status.success(), "{}", master.log());
    assert!(!master.log().contains("drain timeout"), "{}", master.log());
}

#[test]
fn json_logs_are_one_object_a_line_and_worker_lines_name_their_worker() {
    let master = Master::launch(&["--workers", "1"], |cmd| {
        cmd.arg("--log-format").arg("json");
    });
    let pid = master.wait_all_ready()[0];
    send_signal(pid, "USR1");
    let names_worker = |line: &serde_json::Value| {
        line["span"]["slot"] == "0" && line["span"]["pid"] == u64::from(pid)
    };
    assert!(
        wait_until(PATIENCE, || master
            .log()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|l| names_worker(&l))),
        "no worker line naming slot 0 and pid {pid}:\n{}",
        master.log()
    );
    for line in master.log().lines() {
        let parsed: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(parsed["level"].is_string() && parsed["fields"]["message"].is_string());
    }
}

#[test]
fn rust_workers_count_in_shared_memory_and_the_master_reads_exact_totals() {
    let master = Master::start(&["--workers", "2", "--strategy", "round-robin"]);
    master.wait_all_ready();
    for _ in 0..20 {
        assert_eq!(master.get().status, 200);
    }
    // Each worker counts in memory the master maps; `status` reads it at once.
    let settled = wait_until(PATIENCE, || {
        let status = master.status();
        let workers = status["workers"].as_array().unwrap().clone();
        workers.iter().all(|w| w["reports"] == "memory")
            && workers
                .iter()
                .map(|w| w["finished"].as_u64().unwrap())
                .sum::<u64>()
                == 20
            && workers
                .iter()
                .all(|w| w["active"] == 0 && w["pending"] == 0)
    });
    assert!(settled, "{}", master.status());
}

#[test]
fn a_sigkilled_master_leaves_no_worker_once_their_in_flight_work_is_done() {
    let master = Master::start(&["--workers", "2", "--work-us", "300000"]);
    let workers: Vec<u32> = master.worker_pids().into_iter().flatten().collect();
    // Requests in flight on both workers when the master dies.
    let mut in_flight: Vec<_> = (0..2).map(|_| send_request(master.addr)).collect();
    assert!(wait_until(PATIENCE, || master.status()["counters"]
        ["accepted"]
        .as_u64()
        .unwrap()
        >= 2));
    master.signal("KILL");
    for reader in &mut in_flight {
        let response = read_response(reader).expect("what a worker holds is finished");
        assert_eq!(response.status, 200);
    }
    let gone = wait_until(Duration::from_secs(5), || {
        workers.iter().all(|pid| !process_exists(*pid))
    });
    assert!(
        gone,
        "workers outlived a SIGKILLed master:\n{}",
        master.log()
    );
}
