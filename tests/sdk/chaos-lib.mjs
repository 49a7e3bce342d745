// Processes, SDK clients and assertions shared by the Redis chaos tests
// (redis-chaos.mjs, redis-cluster-failover.mjs). Every child process is
// tracked and SIGKILLed by PID at exit at the latest; every wait is bounded.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { Centrifuge } from 'centrifuge';
import WebSocket from 'ws';
import { freePort, redisPing, sleep, spawnLogged, stamp, waitFanfare, waitUntil, withTimeout } from '../common/harness.mjs';

export const BIN = process.env.FANFARE_BIN;
export const SECRET = 'redis-chaos-secret';
export const CHANNEL = 'chaos';
export const WAIT_MS = 20_000;

// Polls `cond` every 50 ms until it is true; fails after `ms`.
export { waitUntil };

/** An HS256 JWT. */
export function jwt(payload) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const head = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(payload)}`;
  return `${head}.${crypto.createHmac('sha256', SECRET).update(head).digest('base64url')}`;
}

// ---------------------------------------------------------------------------
// Processes: spawned with spawnLogged (tests/common/harness.mjs), which
// SIGKILLs every child by PID at exit at the latest.
// ---------------------------------------------------------------------------

export { spawnLogged };

/** SIGKILL by PID and wait (bounded) for the exit. */
export async function killChild(child) {
  if (!child || child.exitInfo) return;
  child.kill('SIGKILL');
  await withTimeout(child.exited, 5000, `pid ${child.pid} to exit after SIGKILL`);
}

export class Redis {
  constructor(env, { persistent }) {
    this.env = env;
    this.persistent = persistent;
    this.dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fanfare-chaos-redis-'));
    env.dirs.push(this.dir);
    this.port = null;
    this.child = null;
  }

  get url() {
    return `redis://127.0.0.1:${this.port}`;
  }

  /** The `[redis]` section of a node using this Redis. */
  get toml() {
    return `[redis]\nurls = ["${this.url}"]\n`;
  }

  /** Starts (again, on the same port and directory) and waits for PING. */
  async start() {
    for (let attempt = 0; ; attempt++) {
      if (this.port === null || (attempt > 0 && this.fresh)) this.port = await freePort();
      const args = ['--port', String(this.port), '--bind', '127.0.0.1', '--protected-mode', 'no',
        '--save', '', '--dir', this.dir, '--logfile', path.join(this.dir, 'redis.log')];
      args.push(...(this.persistent ? ['--appendonly', 'yes', '--appendfsync', 'always'] : ['--appendonly', 'no']));
      this.child = spawnLogged(`redis:${this.port}`, 'redis-server', args, this.env.log);
      const deadline = Date.now() + 10_000;
      while (Date.now() < deadline && !this.child.exitInfo) {
        if (await redisPing(this.port, this.child.pid)) return;
        await sleep(30);
      }
      await killChild(this.child);
      // The port may linger after a kill, or was taken: retry within bounds.
      if (attempt >= 20) throw new Error(`redis-server did not start on ${this.port}`);
      await sleep(200);
    }
  }

  async kill() {
    await killChild(this.child);
  }
}

export class Node {
  constructor(env, name, redis) {
    this.env = env;
    this.name = name;
    this.redis = redis;
    this.child = null;
  }

  get wsUrl() {
    return `ws://127.0.0.1:${this.port}/connection/websocket`;
  }

  async start() {
    this.port = await freePort();
    const grpc = await freePort();
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fanfare-chaos-node-'));
    this.env.dirs.push(dir);
    const config = path.join(dir, 'fanfare.toml');
    fs.writeFileSync(config, `[node]
name = "${this.name}"

[http]
listen = "127.0.0.1:${this.port}"

[grpc]
listen = "127.0.0.1:${grpc}"

[broker]
kind = "redis"

${this.redis.toml}

[auth]
hmac_secret = "${SECRET}"
allow_anonymous = true

# These tests assert that every acknowledged publication reaches every
# subscriber across outages of several seconds at ~110 publications/s: more
# than the default recovery limit (300, beyond which a client is told
# recovered: false) when a node notices a frozen master late.
[client]
recovery_max_publication_limit = 1000

[[namespaces]]
name = ""
allow_publish = true
history_size = 1000
history_ttl = "300s"
`);
    this.child = spawnLogged(`node ${this.name}:${this.port}`, BIN, ['--config', config], this.env.log);
    await waitFanfare(this.child, `fanfare ${this.name}`, async () => (await httpStatus(this.port, '/health')) === 200);
  }

  async kill() {
    await killChild(this.child);
  }
}

export async function httpStatus(port, p) {
  try {
    const res = await fetch(`http://127.0.0.1:${port}${p}`, { signal: AbortSignal.timeout(1000) });
    await res.arrayBuffer().catch(() => {});
    return res.status;
  } catch {
    return 0;
  }
}

/** Polls /ready of every node every 50 ms, recording each status change. */
export function watchReady(nodes) {
  const w = { stopped: false, seen: new Map(nodes.map((n) => [n.name, []])) };
  w.done = (async () => {
    while (!w.stopped) {
      await Promise.all(nodes.map(async (n) => {
        if (n.child?.exitInfo) return;
        const s = await httpStatus(n.port, '/ready');
        const list = w.seen.get(n.name);
        if (list.at(-1)?.status !== s) list.push({ t: Date.now(), status: s });
      }));
      await sleep(50);
    }
  })();
  w.stop = async () => {
    w.stopped = true;
    await w.done;
  };
  return w;
}

/** A TCP proxy standing in for a load balancer: forwards new connections to `target`. */
export async function startProxy(env, target) {
  const p = { target, accepted: new Map(), pairs: new Set() };
  p.server = net.createServer((client) => {
    const port = p.target;
    p.accepted.set(port, (p.accepted.get(port) || 0) + 1);
    const upstream = net.connect(port, '127.0.0.1');
    const pair = { client, upstream };
    p.pairs.add(pair);
    const done = () => {
      client.destroy();
      upstream.destroy();
      p.pairs.delete(pair);
    };
    for (const s of [client, upstream]) {
      s.on('error', done);
      s.on('close', done);
    }
    client.pipe(upstream);
    upstream.pipe(client);
  });
  await new Promise((resolve) => p.server.listen(0, '127.0.0.1', resolve));
  p.port = p.server.address().port;
  p.close = () => {
    for (const { client, upstream } of p.pairs) {
      client.destroy();
      upstream.destroy();
    }
    p.server.close();
  };
  env.cleanups.push(p.close);
  return p;
}

// ---------------------------------------------------------------------------
// SDK clients
// ---------------------------------------------------------------------------

export class Env {
  constructor(name) {
    this.name = name;
    this.log = [];
    this.dirs = [];
    this.clients = [];
    this.cleanups = [];
    this.processes = [];
  }

  note(line) {
    this.log.push(`${stamp()} ${line}`);
  }

  client(label, url, token) {
    const c = new Centrifuge(url, {
      websocket: WebSocket,
      token,
      minReconnectDelay: 100,
      maxReconnectDelay: 1000,
      timeout: 5000,
    });
    c.label = label;
    c.connectedCount = 0;
    c.codes = [];
    c.on('error', (ctx) => this.note(`${label} ! error ${JSON.stringify(ctx.error)} (${ctx.type})`));
    c.on('connected', (ctx) => {
      c.connectedCount += 1;
      this.note(`${label} ! connected ${ctx.client}`);
    });
    c.on('connecting', (ctx) => {
      c.codes.push(ctx.code);
      this.note(`${label} ! connecting code=${ctx.code} reason=${ctx.reason}`);
    });
    c.on('disconnected', (ctx) => this.note(`${label} ! disconnected code=${ctx.code} reason=${ctx.reason}`));
    this.clients.push(c);
    return c;
  }

  async connect(c) {
    const connected = new Promise((resolve) => c.once('connected', resolve));
    c.connect();
    await withTimeout(connected, WAIT_MS, `${c.label} to connect`);
  }

  /** A recoverable subscription collecting {seq, offset} of every publication. */
  async subscribe(c, channel) {
    const sub = c.newSubscription(channel, { recoverable: true });
    sub.items = [];
    sub.subscribedEvents = [];
    sub.on('publication', (ctx) => sub.items.push({ seq: ctx.data.seq, offset: ctx.offset }));
    sub.on('subscribed', (ctx) => {
      sub.subscribedEvents.push({ t: Date.now(), ...ctx });
      this.note(`${c.label} ! subscribed ${JSON.stringify(ctx)}`);
    });
    sub.on('subscribing', (ctx) => this.note(`${c.label} ! subscribing code=${ctx.code} reason=${ctx.reason}`));
    sub.on('unsubscribed', (ctx) => this.note(`${c.label} ! unsubscribed code=${ctx.code} reason=${ctx.reason}`));
    sub.on('error', (ctx) => this.note(`${c.label} ! sub error ${JSON.stringify(ctx.error)}`));
    const subscribed = new Promise((resolve) => sub.once('subscribed', resolve));
    sub.subscribe();
    await withTimeout(subscribed, WAIT_MS, `${c.label} to subscribe`);
    sub.label = c.label;
    return sub;
  }

  dump(err, lines = 400) {
    const head = err ? `FAILED =====\n${err?.stack || err}` : 'passed =====';
    process.stderr.write(`\n===== ${this.name}: ${head}\n` +
      `--- events and process output (last ${lines} lines) ---\n${this.log.slice(-lines).join('\n')}\n` +
      `===== end ${this.name} =====\n\n`);
  }

  async close() {
    for (const c of this.clients) {
      try {
        c.disconnect();
      } catch {
        // ignore
      }
    }
    for (const f of this.cleanups) f();
    for (const p of this.processes) await p.kill().catch(() => {});
    for (const d of this.dirs) fs.rmSync(d, { recursive: true, force: true });
  }
}

export function chaosTest(name, fn, timeout = 90_000) {
  test(name, { timeout }, async () => {
    assert.ok(BIN && path.isAbsolute(BIN) && fs.existsSync(BIN), `FANFARE_BIN must be the absolute path of the fanfare binary, got ${BIN}`);
    const env = new Env(name);
    try {
      await fn(env);
      // FANFARE_CHAOS_LOG=1: the whole log of a passing test too.
      if (process.env.FANFARE_CHAOS_LOG) env.dump(null, env.log.length);
    } catch (err) {
      env.dump(err);
      throw err;
    } finally {
      await env.close();
    }
  });
}

export async function startRedis(env, opts) {
  const r = new Redis(env, opts);
  env.processes.push(r);
  await r.start();
  return r;
}

export async function startNodes(env, redis, names) {
  const nodes = [];
  for (const name of names) {
    const n = new Node(env, name, redis);
    env.processes.push(n);
    await n.start();
    nodes.push(n);
  }
  return nodes;
}

/**
 * Publishes {seq} for seq = 1..n, one at a time, `paceMs` apart, retrying a
 * failed publish (after 100 ms) until it succeeds. A publish that failed may
 * still have happened (the reply was lost), so its retry can duplicate it:
 * such seqs are returned as `ambiguous`. `onSeq(seq)` runs after each success.
 */
export async function publishAll(env, client, n, { paceMs = 10, onSeq = () => {}, deadlineMs = 60_000 } = {}) {
  const deadline = Date.now() + deadlineMs;
  const ambiguous = new Set();
  let errors = 0;
  for (let seq = 1; seq <= n; seq++) {
    for (;;) {
      try {
        await client.publish(CHANNEL, { seq });
        break;
      } catch (err) {
        errors += 1;
        ambiguous.add(seq);
        env.note(`publisher: seq ${seq} failed: ${JSON.stringify(err)}`);
        if (Date.now() > deadline) throw new Error(`publishing seq ${seq} kept failing: ${JSON.stringify(err)}`);
        await sleep(100);
      }
    }
    await onSeq(seq);
    await sleep(paceMs);
  }
  return { ambiguous, errors };
}

/**
 * Every publication exactly once, in order: offsets strictly consecutive (no
 * offset missing or repeated), and the seqs are 1..n, where only a publish the
 * publisher saw fail (and retried) may appear twice, back to back.
 */
export function assertExactlyOnce(sub, n, ambiguous) {
  const { items } = sub;
  const short = () => JSON.stringify(items.map((i) => [i.seq, i.offset]));
  for (let i = 1; i < items.length; i++) {
    assert.equal(items[i].offset, items[i - 1].offset + 1, `${sub.label}: offsets not consecutive at ${i}: ${short()}`);
  }
  const seqs = [];
  let retried = 0;
  for (const it of items) {
    if (seqs.length && seqs.at(-1) === it.seq && ambiguous.has(it.seq)) {
      retried += 1;
      continue;
    }
    seqs.push(it.seq);
  }
  assert.deepEqual(seqs, Array.from({ length: n }, (_, i) => i + 1), `${sub.label}: seqs missing, duplicated or out of order: ${short()}`);
  return retried;
}

export const distinctSeqs = (sub) => new Set(sub.items.map((i) => i.seq)).size;

