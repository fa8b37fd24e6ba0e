//! [`Incoming`] as an `axum::serve::Listener` (feature `axum`), so a worker serves an axum
//! app with `axum::serve(incoming, app)` and reads the client's address with
//! `ConnectInfo<Peer>`. Draining ends the accepts; pass [`Incoming::shutdown_signal`] to
//! `with_graceful_shutdown` so axum finishes its connections and returns. Runs in workers.

use std::io;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};

use super::{Connection, Incoming};
use crate::sys::socket::Peer;

impl Listener for Incoming {
    type Io = Connection;
    type Addr = Peer;

    async fn accept(&mut self) -> (Connection, Peer) {
        match Incoming::accept(self).await {
            Some(conn) => {
                let peer = conn.peer();
                (conn, peer)
            }
            // Draining: no connection will come again; axum's graceful shutdown (see
            // `Incoming::shutdown_signal`) ends the serve.
            None => std::future::pending().await,
        }
    }

    /// The first of the master's listening addresses (`HANDOFF_LISTEN`).
    fn local_addr(&self) -> io::Result<Peer> {
        self.local_addr()
    }
}

impl Connected<IncomingStream<'_, Incoming>> for Peer {
    fn connect_info(stream: IncomingStream<'_, Incoming>) -> Self {
        *stream.remote_addr()
    }
}
