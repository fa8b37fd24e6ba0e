//! The library used as a user would: `examples/echo.rs` (a plain tokio echo server on
//! `Server::builder().run`) started as its own binary, which the master re-executes as its
//! workers.

mod util;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::mpsc;

use util::{send_signal, PATIENCE};

/// target/debug/examples/echo: `cargo test` builds the examples before it runs any test
/// (`cargo test --test library` alone does not: build them with `cargo build --examples`).
fn echo_example() -> std::path::PathBuf {
    let deps = std::env::current_exe().unwrap();
    let path = deps
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join("echo");
    assert!(
        path.exists(),
        "{path:?} is missing: run `cargo test` or `cargo build --examples`"
    );
    path
}

#[test]
fn the_echo_example_serves_through_its_workers_and_stops_cleanly() {
    let mut child = Command::new(echo_example())
        .arg("127.0.0.1:0")
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the echo example is built by cargo test");
    let (lines_tx, lines) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let mut addr: Option<SocketAddr> = None;
    let mut ready = 0;
    while addr.is_none() || ready < 4 {
        let line = lines
            .recv_timeout(PATIENCE)
            .expect("the master logs its address and 4 ready workers");
        let plain: String = line.chars().filter(|c| !c.is_control()).collect();
        if let Some(rest) = plain.split("address=").nth(1) {
            addr = rest.split_whitespace().next().and_then(|a| a.parse().ok());
        }
        ready += usize::from(plain.contains("worker ready"));
    }
    for i in 0..8 {
        let mut stream = TcpStream::connect(addr.unwrap()).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let message = format!("hello {i}\n");
        stream.write_all(message.as_bytes()).unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        let mut echoed = String::new();
        stream.read_to_string(&mut echoed).unwrap();
        assert_eq!(echoed, message);
    }
    send_signal(child.id(), "TERM");
    let mut status = None;
    assert!(util::wait_until(PATIENCE, || {
        status = child.try_wait().unwrap();
        status.is_some()
    }));
    assert!(status.unwrap().success());
}
