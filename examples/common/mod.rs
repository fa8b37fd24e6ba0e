//! What the examples share: their flags, and the log subscriber a program installs itself
//! (handoff installs none: it only emits `tracing` events).

/// The examples' flags: `--listen ADDR` (default 127.0.0.1:3000), `--workers N` (default 4)
/// and `--threads N`, each worker's runtime threads (default 1).
#[derive(Debug)]
pub struct Flags {
    pub listen: handoff::ListenAddr,
    pub workers: usize,
    pub threads: usize,
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
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => listen = value,
            "--workers" => workers = value.parse().expect("--workers N"),
            "--threads" => threads = value.parse().expect("--threads N"),
            other => panic!("unknown flag {other}: use --listen ADDR --workers N --threads N"),
        }
    }
    Flags {
        listen: listen.parse().expect("--listen ADDR"),
        workers,
        threads,
    }
}
