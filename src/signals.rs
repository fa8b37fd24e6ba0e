//! Signals nobody asked handoff to act on, in the master and in Rust workers. Their default
//! action would end the process without a word (`kill -USR1`, the "reopen your logs" of
//! nginx and gunicorn, leaves a master defunct and its workers gone); handoff catches each
//! one a user may send, logs it and carries on. The signals that do act are handled where
//! they act: SIGTERM/SIGINT/SIGQUIT stop (`master::run`, the worker runtime), SIGHUP,
//! SIGTTIN, SIGTTOU and SIGUSR2 (a live upgrade) drive the lifecycle (`master::lifecycle`).

use tokio::signal::unix::{signal, SignalKind};

/// Signals whose default action ends the process and that handoff does not otherwise use,
/// with their names. Real-time signals (SIGRTMIN..SIGRTMAX) are added by [`stray_signals`].
const STRAY: &[(libc::c_int, &str)] = &[
    (libc::SIGUSR1, "SIGUSR1"),
    (libc::SIGALRM, "SIGALRM"),
    (libc::SIGVTALRM, "SIGVTALRM"),
    (libc::SIGPROF, "SIGPROF"),
    (libc::SIGIO, "SIGIO"),
    (libc::SIGPWR, "SIGPWR"),
    (libc::SIGSTKFLT, "SIGSTKFLT"),
    (libc::SIGXCPU, "SIGXCPU"),
    (libc::SIGXFSZ, "SIGXFSZ"),
];

/// Signals the master acts on that would stop or end a worker: `pkill -HUP app` (gunicorn's
/// habit), `pkill -USR2 app` (nginx's and gunicorn's upgrade) or `pkill -TTIN app` reach the
/// workers too.
const MASTER_ONLY: &[(libc::c_int, &str)] = &[
    (libc::SIGHUP, "SIGHUP"),
    (libc::SIGUSR2, "SIGUSR2"),
    (libc::SIGTTIN, "SIGTTIN"),
    (libc::SIGTTOU, "SIGTTOU"),
];

/// Who catches the stray signals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Master,
    Worker,
}

/// Every signal [`ignore_stray`] catches for `role`, with its name. Signals 32 and 33, below
/// SIGRTMIN, belong to the C library's threads and are left alone.
fn stray_signals(role: Role) -> Vec<(libc::c_int, String)> {
    let realtime = (libc::SIGRTMIN()..=libc::SIGRTMAX())
        .map(|n| (n, format!("SIGRTMIN+{}", n - libc::SIGRTMIN())));
    let master_only = match role {
        Role::Master => &[][..],
        Role::Worker => MASTER_ONLY,
    };
    STRAY
        .iter()
        .chain(master_only)
        .map(|&(n, name)| (n, name.to_owned()))
        .chain(realtime)
        .collect()
}

/// What a stray signal means to whoever receives it, for its log line.
fn meaning(signal: libc::c_int) -> &'static str {
    match signal {
        libc::SIGUSR1 => "handoff logs to stderr and has no log file to reopen: ignored",
        libc::SIGUSR2 => "the master's signal for a live upgrade (send it to the master): ignored",
        _ => "ignored",
    }
}

/// Catches every stray signal on tasks of the current runtime, logging each as `role`
/// receives it. A signal the runtime cannot register (tokio stops at SIGRTMAX - 1) keeps its
/// default action.
pub(crate) fn ignore_stray(role: Role) {
    let role_name = match role {
        Role::Master => "master",
        Role::Worker => "worker",
    };
    for (number, name) in stray_signals(role) {
        let Ok(mut stream) = signal(SignalKind::from_raw(number)) else {
            continue;
        };
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                tracing::warn!(signal = %name, pid = std::process::id(), role = role_name, "{}", meaning(number));
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stray_list_holds_the_habitual_signals_and_none_that_act() {
        let numbers: Vec<_> = stray_signals(Role::Master)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        for habitual in [libc::SIGUSR1, libc::SIGALRM, libc::SIGRTMIN()] {
            assert!(numbers.contains(&habitual), "{habitual}");
        }
        for acting in [
            libc::SIGTERM,
            libc::SIGINT,
            libc::SIGQUIT,
            libc::SIGHUP,
            libc::SIGTTIN,
            libc::SIGTTOU,
            libc::SIGUSR2,
            libc::SIGCHLD,
        ] {
            assert!(!numbers.contains(&acting), "{acting}");
        }
        let worker: Vec<_> = stray_signals(Role::Worker)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        for meant_for_the_master in [libc::SIGHUP, libc::SIGUSR2, libc::SIGTTIN, libc::SIGTTOU] {
            assert!(worker.contains(&meant_for_the_master));
        }
        assert!(
            !worker.contains(&32) && !worker.contains(&33),
            "the C library's own"
        );
    }
}
