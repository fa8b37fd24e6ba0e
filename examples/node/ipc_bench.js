// node's cluster IPC (process.send), measured as examples/message_bench.rs measures
// handoff's messages: worker -> primary -> worker round trips, primary -> every worker
// broadcast latency, and messages per second into the primary. The anchor in
// docs/benchmarks.md.
//
// Run with: node examples/node/ipc_bench.js --workers 16 --seconds 2
"use strict";
const cluster = require("node:cluster");

const arg = (name, fallback) => {
  const i = process.argv.indexOf(name);
  return i > 0 ? Number(process.argv[i + 1]) : fallback;
};
const WORKERS = arg("--workers", 16);
const SECONDS = arg("--seconds", 2);
const now = () => process.hrtime.bigint(); // CLOCK_MONOTONIC: comparable across processes

function summary(what, samples) {
  samples.sort((a, b) => a - b);
  const at = (p) => samples[Math.round((p / 100) * (samples.length - 1))] / 1000;
  console.log(
    `${what}: n=${samples.length} p50=${at(50).toFixed(1)}µs p99=${at(99).toFixed(1)}µs ` +
      `max=${at(100).toFixed(1)}µs`
  );
}

if (cluster.isPrimary) {
  const workers = [];
  let trips = [], latencies = [], reported = 0, flooded = 0, fired = 0, sent = 0, started;
  const broadcast = () => {
    const end = Date.now() + SECONDS * 1000;
    const timer = setInterval(() => {
      const tick = now().toString();
      for (const w of workers) w.send({ tick });
      if (Date.now() >= end) {
        clearInterval(timer);
        for (const w of workers) w.send({ flood: true });
      }
    }, 1);
  };
  for (let i = 0; i < WORKERS; i++) {
    const w = cluster.fork();
    workers.push(w);
    w.on("message", (m) => {
      if (m.ping !== undefined) return w.send({ pong: m.ping });
      if (m.trips) {
        trips = trips.concat(m.trips);
        if (++reported === WORKERS) {
          summary("request/reply round trip (worker -> primary -> worker)", trips);
          broadcast();
        }
        return;
      }
      if (m.latencies) return (latencies = latencies.concat(m.latencies));
      if (m.fire) {
        started ??= Date.now();
        return fired++;
      }
      if (m.fired !== undefined) {
        sent += m.fired;
        if (++flooded === WORKERS) {
          summary(`broadcast latency to ${WORKERS} workers`, latencies);
          const elapsed = (Date.now() - started) / 1000;
          console.log(
            `messages into the primary: ${fired} in ${elapsed.toFixed(2)}s = ` +
              `${(fired / elapsed).toFixed(0)}/s (${sent} sent)`
          );
          for (const w of workers) w.kill();
        }
      }
    });
  }
} else {
  const trips = [], latencies = [];
  let pending = null;
  process.on("message", (m) => {
    if (m.pong !== undefined) return pending(m);
    if (m.tick) return latencies.push(Number(now() - BigInt(m.tick)));
    if (m.flood) {
      process.send({ latencies });
      flood();
    }
  });
  const ask = () => new Promise((resolve) => {
    pending = resolve;
    process.send({ ping: 1 });
  });
  (async () => {
    const end = Date.now() + SECONDS * 1000;
    while (Date.now() < end) {
      const start = now();
      await ask();
      trips.push(Number(now() - start));
    }
    process.send({ trips });
  })();
  function flood() {
    const end = Date.now() + SECONDS * 1000;
    let fired = 0;
    const more = () => {
      if (Date.now() >= end) return process.send({ fired });
      for (let i = 0; i < 63; i++) process.send({ fire: 1 });
      fired += 64;
      process.send({ fire: 1 }, more); // the next batch once this one is written
    };
    more();
  }
}
