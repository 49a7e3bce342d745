// What every Node end-to-end suite (tests/sdk, tests/browser) and the chat
// example's launcher (examples/chat/run.mjs) need of their surroundings: log
// stamps, bounded waits, free loopback ports, child processes (logged,
// stopped and at exit killed by PID), and whether a Redis answers (a Redis
// Cluster: redis-cluster.mjs). No npm dependencies, so each imports it
// whatever its own node_modules hold.

import { spawn } from 'node:child_process';
import net from 'node:net';

const T0 = Date.now();
/** Milliseconds since the script started, for log lines. */
export const stamp = () => `+${String(Date.now() - T0).padStart(6)}ms`;

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Calls `fn` with every complete line a child process writes to `stream`. */
export function onLines(stream, fn) {
  let buf = '';
  stream.setEncoding('utf8');
  stream.on('data', (chunk) => {
    buf += chunk;
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      fn(buf.slice(0, i));
      buf = buf.slice(i + 1);
    }
  });
}

/** Polls `cond` (may be async; may throw to give up) every 50 ms until it is true; fails after `ms`. */
export async function waitUntil(cond, ms, what) {
  const deadline = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(50);
  }
}

/** Rejects with a descriptive error when `promise` does not settle within `ms`. */
export function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

// Every child of spawnLogged is SIGKILLed (by PID) at exit at the latest.
const children = new Set();
process.on('exit', () => {
  for (const c of children) {
    try {
      c.kill('SIGKILL');
    } catch {
      // already gone
    }
  }
});

/**
 * Spawns `cmd`, pushing its output lines, start and exit onto `log` (an array,
 * or anything with a `push(line)`; stamped, prefixed with `label`), with
 * `extraEnv` added to this process's environment. `child.exited` resolves
 * with `child.exitInfo` once it is gone (also when it could not be spawned).
 */
export function spawnLogged(label, cmd, args, log, extraEnv = {}) {
  // NO_COLOR: fanfare's log lines without ANSI colours, readable in a failure dump.
  // No drain delay or period for a fanfare stopped with SIGTERM (other
  // programs ignore the variables).
  const env = {
    FANFARE__SHUTDOWN__DRAIN_DELAY: '0s',
    FANFARE__SHUTDOWN__DRAIN_PERIOD: '0s',
    ...process.env,
    ...extraEnv,
    NO_COLOR: '1',
  };
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], env });
  children.add(child);
  child.exitInfo = null;
  child.exited = new Promise((resolve) => {
    child.on('exit', (code, signal) => {
      children.delete(child);
      child.exitInfo = { code, signal };
      log.push(`${stamp()} [${label} pid ${child.pid}] exited code=${code} signal=${signal}`);
      resolve(child.exitInfo);
    });
    child.on('error', (err) => {
      children.delete(child);
      child.exitInfo = child.exitInfo || { code: null, signal: null, error: err.message };
      log.push(`${stamp()} [${label}] spawn error: ${err.message}`);
      resolve(child.exitInfo);
    });
  });
  for (const stream of [child.stdout, child.stderr]) {
    onLines(stream, (line) => {
      if (line.includes(FANFARE_LISTENING)) child.listening = true;
      log.push(`${stamp()} [${label}] ${line}`);
    });
  }
  log.push(`${stamp()} [${label}] spawned pid ${child.pid}: ${cmd} ${args.join(' ')}`);
  return child;
}

/**
 * Stops a child of spawnLogged by its PID: `signal` (SIGTERM), then SIGKILL
 * after `graceMs`; resolves with its exitInfo once it is gone.
 */
export async function stopChild(child, { signal = 'SIGTERM', graceMs = 5000 } = {}) {
  if (!child || child.exitInfo) return child?.exitInfo ?? null;
  child.kill(signal);
  let timer;
  const graceful = await Promise.race([
    child.exited.then(() => true),
    new Promise((resolve) => (timer = setTimeout(() => resolve(false), graceMs))),
  ]);
  // A pending timer would keep the process alive for graceMs after its work.
  clearTimeout(timer);
  if (!graceful) {
    child.kill('SIGKILL');
    await withTimeout(child.exited, 5000, `pid ${child.pid} to exit after SIGKILL`);
  }
  return child.exitInfo;
}

/**
 * Polls `probe` (true when ready) every 50 ms until it is, the child exits
 * (an error naming `label` and its exit), or `ms` pass.
 */
export async function waitReady(child, label, probe, ms = 20_000) {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    if (child.exitInfo) {
      const err = new Error(`${label} exited before it was ready: ${JSON.stringify(child.exitInfo)}`);
      err.exitedBeforeReady = true;
      throw err;
    }
    if (await probe().catch(() => false)) return;
    await sleep(50);
  }
  throw new Error(`${label} was not ready within ${ms} ms`);
}

/** What fanfare logs once it holds both its HTTP and gRPC ports. */
export const FANFARE_LISTENING = 'control API listening';

/**
 * waitReady for a fanfare child of spawnLogged: ready once it logged that it
 * holds its ports and `probe` passes. A probe alone may be answered by
 * another suite's node that took the port first (this one then exits, which
 * is an error naming `label`, not a test talking to a stranger).
 */
export function waitFanfare(child, label, probe, ms) {
  return waitReady(child, label, async () => child.listening === true && probe(), ms);
}

/**
 * Calls `start` (which chooses fresh ports on each call) until it resolves,
 * at most `attempts` times. It retries only when the child exited before it
 * was ready (a port chosen free was taken before the child bound it).
 */
export async function startRetrying(start, attempts = 3) {
  for (let attempt = 1; ; attempt++) {
    try {
      return await start();
    } catch (err) {
      if (!err.exitedBeforeReady || attempt >= attempts) throw err;
    }
  }
}

/** The head of a test node's TOML: its name, HTTP and gRPC ports, the Redis broker. */
export const redisNodeToml = (name, httpPort, grpcPort) => `[node]
name = "${name}"

[http]
listen = "127.0.0.1:${httpPort}"

[grpc]
listen = "127.0.0.1:${grpcPort}"

[broker]
kind = "redis"
`;

/** A loopback TCP port that was free a moment ago. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

/**
 * Whether the Redis on loopback `port` is up and is process `pid` (its
 * `INFO server` within 1 s): a PONG alone may come from another suite's
 * server that took the port first.
 */
export function redisPing(port, pid) {
  return new Promise((resolve) => {
    const s = net.connect(port, '127.0.0.1');
    let data = '';
    const done = (ok) => {
      s.destroy();
      resolve(ok);
    };
    s.setTimeout(1000, () => done(false));
    s.on('error', () => done(false));
    s.on('connect', () => s.write('INFO server\r\n'));
    s.on('data', (d) => {
      data += d;
      // An error (-LOADING, ...) or this server's process id.
      if (data.startsWith('-') && data.includes('\r\n')) return done(false);
      const m = /\r\nprocess_id:(\d+)\r\n/.exec(data);
      if (m) done(Number(m[1]) === pid);
    });
  });
}
