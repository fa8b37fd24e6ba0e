// handoff's preload for unmodified node apps: `handoff run --node -- node app.js` starts
// node with NODE_OPTIONS=--require <this file> and an IPC channel to the master
// (NODE_CHANNEL_FD). The app's `server.listen(...)` binds nothing: the server takes the
// connections the master accepted and hands over (`process.on('message', (m, socket))`),
// as node's own cluster round-robin mode does. The app's code is not touched.
//
// What it tells the master, with `process.send()` (see src/ipc/node.rs):
//   {"handoff":"ready"}                once the app's first server "listens"
//   {"handoff":"status","closed":N}    connections finished so far; also the heartbeat
// When the master closes the channel (a rolling restart, a stop) the worker drains: idle
// keep-alive connections are closed, in-flight requests finish, then the process exits.
'use strict';

(() => {
  if (typeof process.send !== 'function' || process.env.HANDOFF_WORKER === undefined) {
    return;
  }
  const net = require('net');
  const heartbeat = Number(process.env.HANDOFF_HEARTBEAT_MS) || 1000;
  const drainTimeout = Number(process.env.HANDOFF_DRAIN_TIMEOUT_MS) || 30000;
  const addresses = (process.env.HANDOFF_LISTEN || '').split(',').filter(Boolean);
  // Node's children must not take the master's channel for their own.
  delete process.env.HANDOFF_FD;

  const servers = [];
  const open = new Set();
  let closed = 0;
  let ready = false;
  let draining = false;
  let reportQueued = false;

  const send = (message) => {
    if (process.connected) {
      process.send(message, () => {});
    }
  };
  // One report per turn of the event loop, however many connections closed in it.
  const report = () => {
    if (reportQueued) return;
    reportQueued = true;
    setImmediate(() => {
      reportQueued = false;
      send({ handoff: 'status', closed });
    });
  };
  const finish = () => process.exit(0);

  // "127.0.0.1:8000", "[::1]:8000" or "unix:/path", as the master writes HANDOFF_LISTEN.
  const parseAddress = (text) => {
    if (!text) return null;
    if (text.startsWith('unix:')) return text.slice('unix:'.length);
    const colon = text.lastIndexOf(':');
    let host = text.slice(0, colon);
    if (host.startsWith('[')) host = host.slice(1, -1);
    return { address: host, family: host.includes(':') ? 'IPv6' : 'IPv4', port: Number(text.slice(colon + 1)) };
  };

  net.Server.prototype.listen = function handoffListen(...args) {
    const server = this;
    const index = servers.length;
    servers.push(server);
    const callback = args.reverse().find((arg) => typeof arg === 'function');
    if (callback) server.once('listening', callback);
    server.address = () => parseAddress(addresses[index] ?? addresses[0]);
    Object.defineProperty(server, 'listening', { configurable: true, get: () => !draining });
    process.nextTick(() => {
      server.emit('listening');
      if (!ready) {
        ready = true;
        send({ handoff: 'ready' });
      }
    });
    return server;
  };

  process.on('message', (message, socket) => {
    if (!message || message.handoff !== 'connection' || !socket) return;
    const server = servers[message.listener] || servers[0];
    open.add(socket);
    socket.once('close', () => {
      open.delete(socket);
      closed += 1;
      report();
      if (draining && open.size === 0) finish();
    });
    if (!server) {
      socket.destroy();
      return;
    }
    server.emit('connection', socket);
  });

  setInterval(() => send({ handoff: 'status', closed }), heartbeat).unref();

  process.on('disconnect', () => {
    draining = true;
    for (const server of servers) {
      if (typeof server.closeIdleConnections === 'function') server.closeIdleConnections();
    }
    if (open.size === 0) finish();
    setTimeout(finish, drainTimeout).unref();
  });
})();
