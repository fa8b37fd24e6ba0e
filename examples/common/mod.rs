//! What the examples share: their flags, and the log subscriber a program installs itself
//! (handoff installs none: it only emits `tracing` events).

/// The examples' flags: `--listen ADDR` (default 127.0.0.1:3000), `--workers N` (default 4)
/// and `--threads N`, each worker's runtime threads (default 1); for the shared map,
/// `--state master|redis://HOST:PORT` (passed to the workers as `HANDOFF_STATE`) and
/// `--state-max-bytes N` (the map's total bound when the master holds it); `--metrics ADDR`
/// serves the master's Prometheus text there.
#[derive(Debug)]
pub struct Flags {
    pub listen: handoff::ListenAddr,
    pub workers: usize,
    pub threads: usize,
    /// Only the examples with a shared map read it.
    #[allow(dead_code)]
    pub state_limits: handoff::state::StateLimits,
    #[allow(dead_code)]
    pub metrics: Option<std::net::SocketAddr>,
}

/// Installs a text subscriber on stderr (`HANDOFF_LOG`-style filtering is the program's
/// choice; here: info) and reads the flags.
pub fn setup() -> Flags {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let mut listen = "127.0.0.1:3000".to_owned();
    let (mut workers, mut threads) = (4, 1);
    let mut state_limits = handoff::state::StateLimits::default();
    let mut metrics = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => listen = value,
            "--workers" => workers = value.parse().expect("--workers N"),
            "--threads" => threads = value.parse().expect("--threads N"),
            // Set before any thread starts; the workers inherit it.
            "--state" => std::env::set_var(handoff::state::ENV_STATE, value),
            "--state-max-bytes" => {
                state_limits.max_total = value.parse().expect("--state-max-bytes N")
            }
            "--metrics" => metrics = Some(value.parse().expect("--metrics ADDR")),
            other => panic!(
                "unknown flag {other}: use --listen ADDR --workers N --threads N \
                 --state URL --state-max-bytes N --metrics ADDR"
            ),
        }
    }
    Flags {
        listen: listen.parse().expect("--listen ADDR"),
        workers,
        threads,
        state_limits,
        metrics,
    }
}
