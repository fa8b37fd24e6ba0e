#!/usr/bin/env node
// The seed example on node's cluster module: an external anchor for `handoff bench`.
//
// Run with:
//   NODE_CLUSTER_SCHED_POLICY=rr node scripts/node-cluster.js --workers 4 --port 0 \
//     --work-us 50 --heavy 2:2500
//
// The primary forks --workers workers; each serves HTTP/1.1 answering `hola, mundo\n` with an
// `x-worker-pid` header, after busy-waiting --work-us microseconds (or, for --heavy PCT:US,
// PCT percent of requests busy-wait US microseconds instead): the same cost knobs as
// `handoff run --work-us --heavy`. NODE_CLUSTER_SCHED_POLICY picks who spreads connections:
// `rr` (the primary accepts and round-robins handles, node's default) or `none` (every worker
// accepts on the shared socket; the kernel decides). The knobs may also come from the
// environment: WORKERS, PORT, HOST, WORK_US, HEAVY.
//
// With --single the script is one plain server process, no cluster: what `handoff run --node`
// runs as each worker (the `handoff-node` contender), the very same server code.
//
// Once every worker listens, the primary prints one line of JSON on stdout:
//   {"port":PORT,"pid":PRIMARY_PID,"workers":[PID,...]}
// On SIGTERM or SIGINT it stops its workers and exits.
'use strict';

const cluster = require('node:cluster');
const http = require('node:http');

function option(name, env, fallback) {
  const i = process.argv.indexOf(`--${name}`);
  if (i !== -1 && i + 1 < process.argv.length) return process.argv[i + 1];
  if (process.env[env] !== undefined) return process.env[env];
  return fallback;
}

const workers = Number(option('workers', 'WORKERS', '4'));
const port = Number(option('port', 'PORT', '0'));
const host = option('host', 'HOST', '127.0.0.1');
const workUs = Number(option('work-us', 'WORK_US', '0'));
const heavySpec = option('heavy', 'HEAVY', '');
let heavyPct = 0;
let heavyUs = 0;
if (heavySpec) {
  const [pct, us] = heavySpec.split(':').map(Number);
  if (!(pct >= 0 && pct <= 100) || !(us >= 0)) {
    console.error(`bad --heavy ${JSON.stringify(heavySpec)}: expected PCT:US`);
    process.exit(2);
  }
  heavyPct = pct;
  heavyUs = us;
}
if (!(workers >= 1) || !(workUs >= 0) || !(port >= 0)) {
  console.error('bad --workers, --work-us or --port');
  process.exit(2);
}

function burn(us) {
  const end = process.hrtime.bigint() + BigInt(Math.round(us * 1000));
  while (process.hrtime.bigint() < end) {
    // busy-wait: stands in for request work, like the demo worker's burn()
  }
}

const single = process.argv.includes('--single');

if (cluster.isPrimary && !single) {
  let listening = 0;
  let boundPort = port;
  cluster.on('listening', (worker, address) => {
    boundPort = address.port;
    listening += 1;
    if (listening === workers) {
      const pids = Object.values(cluster.workers).map((w) => w.process.pid);
      process.stdout.write(JSON.stringify({ port: boundPort, pid: process.pid, workers: pids }) + '\n');
    }
  });
  cluster.on('exit', (worker, code, signal) => {
    if (!stopping) console.error(`worker ${worker.process.pid} exited (${signal || code})`);
  });
  let stopping = false;
  const stop = () => {
    if (stopping) return;
    stopping = true;
    for (const w of Object.values(cluster.workers)) w.process.kill('SIGTERM');
    setTimeout(() => process.exit(0), 2000).unref();
    const check = setInterval(() => {
      if (Object.keys(cluster.workers).length === 0) {
        clearInterval(check);
        process.exit(0);
      }
    }, 20);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  for (let i = 0; i < workers; i += 1) cluster.fork();
} else {
  const body = Buffer.from('hola, mundo\n');
  const pid = String(process.pid);
  const server = http.createServer((req, res) => {
    burn(heavyPct > 0 && Math.random() * 100 < heavyPct ? heavyUs : workUs);
    res.writeHead(200, {
      'content-type': 'text/plain',
      'content-length': body.length,
      'x-worker-pid': pid,
    });
    res.end(body);
  });
  // Long-lived benchmark connections may idle for seconds: keep them.
  server.keepAliveTimeout = 120000;
  server.headersTimeout = 121000;
  server.listen(port, host);
  process.on('SIGTERM', () => process.exit(0));
}
