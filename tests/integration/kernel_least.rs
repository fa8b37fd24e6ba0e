//! `--strategy kernel-least` (and `kernel-p2c`): the eBPF program spreads by load, a SIGKILLed worker's queued
//! connections wait for its replacement on the listener the master holds, a rolling restart
//! keeps serving, and without CAP_BPF the master refuses at start in one line. The tests
//! that load the program need CAP_BPF (CI runs as root); elsewhere they say so and pass.

use std::collections::HashMap;
use std::process::Command;
use std::sync::Mutex;

use crate::util::{
    ready_workers, send_signal, wait_until, worker_pids, Held, Load, Master, Spawned, BIN, PATIENCE,
};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether `kernel-least` can run here (CAP_BPF, and no seccomp filter refusing bpf(2), as
/// in a default container): asked once of the real binary, which either starts or refuses
/// in one line.
pub fn bpf_capable() -> bool {
    static CAN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *CAN.get_or_init(|| {
        let mut probe = Spawned::run(&[
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--strategy",
            "kernel-least",
        ]);
        let mut exited = false;
        let decided = wait_until(PATIENCE, || {
            exited = probe.try_exited();
            exited || probe.log().contains("master starting")
        });
        assert!(
            decided,
            "the probe neither started nor refused:\n{}",
            probe.log()
        );
        !exited
    })
}

fn skip() -> bool {
    if bpf_capable() {
        return false;
    }
    eprintln!("skipped: kernel-least cannot run here (CAP_BPF); CI runs the tests as root");
    true
}

/// The accept queue lengths of the listening sockets on `port` (/proc/net/tcp's rx_queue
/// of a listener is its accept backlog).
fn accept_queues(port: u16) -> Vec<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = u16::from_str_radix(fields[1].rsplit(':').next()?, 16).ok()?;
            let listening = fields[3] == "0A";
            let rx = u64::from_str_radix(fields[4].rsplit(':').next()?, 16).ok()?;
            (listening && local_port == port).then_some(rx)
        })
        .collect()
}

#[test]
fn long_held_connections_land_evenly_and_concurrent_ones_nearly_so() {
    if skip() {
        return;
    }
    let _one = serial();
    let master = Master::start(&["--workers", "4", "--strategy", "kernel-least"]);
    let workers: Vec<u32> = master.worker_pids().into_iter().flatten().collect();
    // One after the other: each pick sees every earlier one, so the spread is exact.
    let held: Vec<Held> = (0..40).map(|_| Held::open(master.addr).unwrap()).collect();
    let mut per_worker: HashMap<u32, usize> = HashMap::new();
    for h in &held {
        *per_worker.entry(h.pid).or_default() += 1;
    }
    for pid in &workers {
        assert_eq!(per_worker.get(pid), Some(&10), "{per_worker:?}");
    }
    drop(held);
    // Concurrent SYNs (8 threads): two CPUs may pick the same slot before either adds; the
    // figure goes to docs/benchmarks.md.
    let addr = master.addr;
    let threads: Vec<_> = (0..8)
        .map(|_| {
            std::thread::spawn(move || {
                (0..10)
                    .map(|_| Held::open(addr).unwrap())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let held: Vec<Held> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let mut per_worker: HashMap<u32, usize> = HashMap::new();
    for h in &held {
        *per_worker.entry(h.pid).or_default() += 1;
    }
    let counts: Vec<usize> = workers
        .iter()
        .map(|p| per_worker.get(p).copied().unwrap_or(0))
        .collect();
    eprintln!("80 concurrent long-held connections over 4 workers: {counts:?}");
    assert_eq!(counts.iter().sum::<usize>(), 80);
    assert!(
        counts.iter().all(|&c| c > 0),
        "every worker got some: {counts:?}"
    );
}

#[test]
fn a_sigkilled_worker_under_load_loses_none_of_the_connections_queued_for_it() {
    sigkilled_worker_loses_nothing("kernel-least");
}

#[test]
fn kernel_p2c_too_loses_none_of_a_sigkilled_worker_s_queued_connections() {
    sigkilled_worker_loses_nothing("kernel-p2c");
}

fn sigkilled_worker_loses_nothing(strategy: &str) {
    if skip() {
        return;
    }
    let _one = serial();
    let master = Master::start(&["--workers", "2", "--strategy", strategy]);
    let pids: Vec<u32> = master.worker_pids().into_iter().flatten().collect();
    // Both workers stop accepting: what the load sends now queues on their listeners.
    for pid in &pids {
        send_signal(*pid, "STOP");
    }
    let load = Load::start(master.addr, 200, 300);
    let port = master.addr.port();
    let both_queued = wait_until(PATIENCE, || {
        let queues = accept_queues(port);
        queues.len() == 2 && queues.iter().all(|&q| q >= 5)
    });
    assert!(both_queued, "queues {:?}", accept_queues(port));
    send_signal(pids[0], "KILL");
    send_signal(pids[1], "CONT");
    let report = load.finish();
    assert!(
        report.failures.is_empty(),
        "{:?}\nlog:\n{}",
        report.failure_kinds(),
        master.log()
    );
    assert_eq!(report.ok, 300);
    let now: Vec<u32> = master.worker_pids().into_iter().flatten().collect();
    assert!(!now.contains(&pids[0]), "slot 0 has a new worker: {now:?}");
    let replacement_served = report.by_pid.keys().any(|pid| !pids.contains(pid));
    assert!(
        replacement_served,
        "the replacement served slot 0's queue: {:?}",
        report.by_pid
    );
}

/// The counts the program compares, by slot, from the control socket.
fn loads(master: &Master) -> Vec<i64> {
    master.status()["kernel_least"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["load"].as_i64().unwrap())
        .collect()
}

#[test]
fn a_dead_worker_s_connections_stop_counting_once_reconciled() {
    if skip() {
        return;
    }
    let _one = serial();
    let master = Master::start(&["--workers", "2", "--strategy", "kernel-least"]);
    let pids: Vec<u32> = master.worker_pids().into_iter().flatten().collect();
    let held: Vec<Held> = (0..6).map(|_| Held::open(master.addr).unwrap()).collect();
    assert!(
        wait_until(PATIENCE, || loads(&master) == [3, 3]),
        "{:?}",
        loads(&master)
    );
    // Its 3 connections die with it; nobody subtracts them but the master's reconciling.
    send_signal(pids[0], "KILL");
    let reconciled = wait_until(PATIENCE, || {
        let status = master.status();
        ready_workers(&status) == 2
            && !worker_pids(&status).contains(&Some(pids[0]))
            && loads(&master) == [0, 3]
    });
    assert!(reconciled, "{}\nlog:\n{}", master.status(), master.log());
    let new_worker = master.worker_pids()[0].unwrap();
    let more: Vec<Held> = (0..3).map(|_| Held::open(master.addr).unwrap()).collect();
    assert!(
        more.iter().all(|h| h.pid == new_worker),
        "the emptier slot gets them"
    );
    drop(held);
}

#[test]
fn a_worker_that_does_not_map_the_loads_is_reconciled_from_its_reports() {
    if skip() {
        return;
    }
    let _one = serial();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/worker.py");
    let master = Master::start(&[
        "--workers",
        "2",
        "--strategy",
        "kernel-least",
        "--",
        "python3",
        "-B",
        script,
    ]);
    for _ in 0..20 {
        assert_eq!(master.get().status, 200);
    }
    // The program added 20; no worker subtracted: the master's reconciling does.
    let settled = wait_until(PATIENCE, || loads(&master) == [0, 0]);
    assert!(settled, "{}\nlog:\n{}", master.status(), master.log());
}

#[test]
fn a_rolling_restart_keeps_serving() {
    if skip() {
        return;
    }
    let _one = serial();
    let master = Master::start(&["--workers", "3", "--strategy", "kernel-least"]);
    let before = master.worker_pids();
    let load = Load::start(master.addr, 150, 600);
    assert!(load.wait_sent(100));
    master.signal("HUP");
    let replaced = wait_until(PATIENCE, || {
        let status = master.status();
        let now = worker_pids(&status);
        ready_workers(&status) == 3 && now.iter().all(|p| p.is_some() && !before.contains(p))
    });
    assert!(replaced, "log:\n{}", master.log());
    let report = load.finish();
    assert!(
        report.failures.is_empty(),
        "{:?}\nlog:\n{}",
        report.failure_kinds(),
        master.log()
    );
    assert_eq!(report.ok, 600);
}

#[test]
fn scaling_down_and_up_under_load_keeps_serving() {
    if skip() {
        return;
    }
    let _one = serial();
    let master = Master::start(&["--workers", "3", "--strategy", "kernel-least"]);
    let load = Load::start(master.addr, 150, 600);
    assert!(load.wait_sent(100));
    // The removed slot leaves the socket array first, then its worker drains.
    master.signal("TTOU");
    let two = wait_until(PATIENCE, || {
        let status = master.status();
        let slots = status["kernel_least"].as_array().unwrap().len();
        slots == 2 && status["draining"].as_array().unwrap().is_empty()
    });
    assert!(two, "{}\nlog:\n{}", master.status(), master.log());
    master.signal("TTIN");
    let three = wait_until(PATIENCE, || {
        let status = master.status();
        ready_workers(&status) == 3
            && status["kernel_least"]
                .as_array()
                .unwrap()
                .iter()
                .all(|s| s["present"] == true)
    });
    assert!(three, "{}\nlog:\n{}", master.status(), master.log());
    let report = load.finish();
    assert!(
        report.failures.is_empty(),
        "{:?}\nlog:\n{}",
        report.failure_kinds(),
        master.log()
    );
    assert_eq!(report.ok, 600);
}

#[test]
fn without_cap_bpf_the_master_refuses_kernel_least_in_one_line() {
    for strategy in ["kernel-least", "kernel-p2c"] {
        refused_without_cap_bpf(strategy);
    }
}

fn refused_without_cap_bpf(strategy: &str) {
    let mut cmd = if bpf_capable() {
        // Drop the capabilities for the master: setpriv from util-linux.
        if Command::new("setpriv").arg("--version").output().is_err() {
            eprintln!("skipped: setpriv (util-linux) is not installed");
            return;
        }
        let mut cmd = Command::new("setpriv");
        cmd.args(["--inh-caps=-all", "--bounding-set=-bpf,-sys_admin", BIN]);
        cmd
    } else {
        Command::new(BIN)
    };
    cmd.args([
        "run",
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--strategy",
        strategy,
    ]);
    let mut master = Spawned::start(cmd);
    let status = master
        .wait_exit(PATIENCE)
        .expect("the master exits at start");
    assert!(!status.success());
    let log = master.log();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {log}");
    assert!(lines[0].contains("CAP_BPF"), "{log}");
    assert!(lines[0].contains(strategy), "{log}");
}
