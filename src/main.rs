//! The `handoff` command: thin flag parsing over the library. `run` supervises workers (the
//! embedded demo or a COMMAND in any language), `ctl` asks a running master for its status.

use std::process::ExitCode;

fn main() -> ExitCode {
    match handoff::cli::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            if is_broken_pipe(&error) {
                return ExitCode::SUCCESS;
            }
            eprintln!("handoff: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error
        .chain()
        .filter_map(|e| e.downcast_ref::<std::io::Error>())
        .any(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
}
