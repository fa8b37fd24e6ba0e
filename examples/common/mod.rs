//! What the examples share: their two flags, and the log subscriber a program installs
//! itself (handoff installs none: it only emits `tracing` events).

/// Installs a text subscriber on stderr (`HANDOFF_LOG`-style filtering is the program's
/// choice; here: info) and reads `--listen ADDR` (default 127.0.0.1:3000) and `--workers N`
/// (default 4).
pub fn setup() -> (handoff::ListenAddr, usize) {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let mut listen = "127.0.0.1:3000".to_owned();
    let mut workers = 4;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => listen = value,
            "--workers" => workers = value.parse().expect("--workers N"),
            other => panic!("unknown flag {other}: use --listen ADDR --workers N"),
        }
    }
    (listen.parse().expect("--listen ADDR"), workers)
}
