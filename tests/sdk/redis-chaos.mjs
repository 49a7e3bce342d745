// Chaos tests of fanfare nodes sharing Redis, driven by the real centrifuge-js SDK.
//
// Run:  FANFARE_BIN=/abs/path/to/fanfare tests/sdk/run-redis.sh
//
// Each test starts its own redis-server (on a free port, in a temp dir) and
// fanfare nodes, and stops every process it started by PID at the end. Every
// wait is bounded. On a failure the client events and the tail of every
// process log are printed to stderr.
//
// 1. Redis is SIGKILLed and restarted on the same port while a publisher keeps
//    publishing: /ready goes 503 and back, delivery resumes by itself, and
//    subscribers using recovery end with every publication exactly once, in
//    order. Redis runs with an fsynced append-only file, so the stream
//    survives the restart and recovery can succeed.
// 2. The same without persistence: the stream is lost, and clients are told so
//    (recovered: false), never left with a silent gap.
// 3. One fanfare node is SIGKILLed: its clients reconnect (through a TCP proxy
//    standing in for a load balancer) to another node and recover.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { Centrifuge } from 'centrifuge';
import WebSocket from 'ws';
import { freePort, sleep, stamp, withTimeout } from './util.mjs';

const BIN = process.env.FANFARE_BIN;
const SECRET = 'redis-chaos-secret';
const CHANNEL = 'chaos';
const WAIT_MS = 20_000;

/** Polls `cond` every 50 ms until it is true; fails after `ms`. */
async function waitUntil(cond, ms, what) {
  const deadline = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(50);
  }
}

/** An HS256 JWT. */
function jwt(payload) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const head = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(payload)}`;
  return `${head}.${crypto.createHmac('sha256', SECRET).update(head).digest('base64url')}`;
}

// ---------------------------------------------------------------------------
// Processes: every child is tracked and SIGKILLed (by PID) at exit at the latest.
// ---------------------------------------------------------------------------

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

/** Spawns `cmd`, keeping the last lines of its output in `log`. */
function spawnLogged(label, cmd, args, log) {
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  children.add(child);
  child.exited = new Promise((resolve) => {
    child.on('exit', (code, signal) => {
      children.delete(child);
      child.exitInfo = { code, signal };
      log.push(`${stamp()} [${label} pid ${child.pid}] exited code=${code} signal=${signal}`);
      resolve(child.exitInfo);
    });
  });
  child.on('error', (err) => log.push(`${stamp()} [${label}] spawn error: ${err.message}`));
  for (const stream of [child.stdout, child.stderr]) {
    let buf = '';
    stream.setEncoding('utf8');
    stream.on('data', (chunk) => {
      buf += chunk;
      let i;
      while ((i = buf.indexOf('\n')) >= 0) {
        log.push(`${stamp()} [${label}] ${buf.slice(0, i)}`);
        buf = buf.slice(i + 1);
      }
    });
  }
  log.push(`${stamp()} [${label}] spawned pid ${child.pid}`);
  return child;
}

/** SIGKILL by PID and wait (bounded) for the exit. */
async function killChild(child) {
  if (!child || child.exitInfo) return;
  child.kill('SIGKILL');
  await withTimeout(child.exited, 5000, `pid ${child.pid} to exit after SIGKILL`);
}

/** `PING` over RESP; true on `+PONG`. */
function redisPing(port) {
  return new Promise((resolve) => {
    const s = net.connect(port, '127.0.0.1');
    let data = '';
    const done = (ok) => {
      s.destroy();
      resolve(ok);
    };
    s.setTimeout(1000, () => done(false));
    s.on('error', () => done(false));
    s.on('connect', () => s.write('PING\r\n'));
    s.on('data', (d) => {
      data += d;
      if (data.includes('\r\n')) done(data.startsWith('+PONG'));
    });
  });
}

class Redis {
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
        if (await redisPing(this.port)) return;
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

class Node {
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

[redis]
urls = ["${this.redis.url}"]

[auth]
hmac_secret = "${SECRET}"
allow_anonymous = true

[[namespaces]]
name = ""
allow_publish = true
history_size = 1000
history_ttl = "300s"
`);
    this.child = spawnLogged(`node ${this.name}:${this.port}`, BIN, ['--config', config], this.env.log);
    await waitUntil(async () => {
      if (this.child.exitInfo) throw new Error(`fanfare ${this.name} exited: ${JSON.stringify(this.child.exitInfo)}`);
      return (await httpStatus(this.port, '/health')) === 200;
    }, 20_000, `fanfare ${this.name} /health`);
  }

  async kill() {
    await killChild(this.child);
  }
}

async function httpStatus(port, p) {
  try {
    const res = await fetch(`http://127.0.0.1:${port}${p}`, { signal: AbortSignal.timeout(1000) });
    await res.arrayBuffer().catch(() => {});
    return res.status;
  } catch {
    return 0;
  }
}

/** Polls /ready of every node every 50 ms, recording each status change. */
function watchReady(nodes) {
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
async function startProxy(env, target) {
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

class Env {
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

  dump(err) {
    process.stderr.write(`\n===== ${this.name}: FAILED =====\n${err?.stack || err}\n` +
      `--- events and process output (last 400 lines) ---\n${this.log.slice(-400).join('\n')}\n` +
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

function chaosTest(name, fn, timeout = 90_000) {
  test(name, { timeout }, async () => {
    assert.ok(BIN && path.isAbsolute(BIN) && fs.existsSync(BIN), `FANFARE_BIN must be the absolute path of the fanfare binary, got ${BIN}`);
    const env = new Env(name);
    try {
      await fn(env);
    } catch (err) {
      env.dump(err);
      throw err;
    } finally {
      await env.close();
    }
  });
}

async function startRedis(env, opts) {
  const r = new Redis(env, opts);
  env.processes.push(r);
  await r.start();
  return r;
}

async function startNodes(env, redis, names) {
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
async function publishAll(env, client, n, { paceMs = 10, onSeq = () => {}, deadlineMs = 60_000 } = {}) {
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
function assertExactlyOnce(sub, n, ambiguous) {
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

const distinctSeqs = (sub) => new Set(sub.items.map((i) => i.seq)).size;

// ---------------------------------------------------------------------------
// 1. Redis SIGKILLed and restarted mid-stream (persistent Redis)
// ---------------------------------------------------------------------------

chaosTest('redis killed and restarted mid-stream: delivery resumes, /ready 503 then 200, recovery is exact', async (env) => {
  const N = 400;
  const KILL_AT = 120;
  const DOWN_MS = 1500;
  const redis = await startRedis(env, { persistent: true });
  const [a, b, c] = await startNodes(env, redis, ['A', 'B', 'C']);

  const publisher = env.client('publisher@A', a.wsUrl);
  const subscribers = [
    env.client('s1@B', b.wsUrl),
    env.client('s2@B', b.wsUrl),
    env.client('s3@C', c.wsUrl),
    // A user: the node also joins it to its personal channel (server-side).
    env.client('sam@C', c.wsUrl, jwt({ sub: 'sam', exp: Math.floor(Date.now() / 1000) + 600 })),
  ];
  await Promise.all([publisher, ...subscribers].map((cl) => env.connect(cl)));
  const subs = [];
  for (const cl of subscribers) subs.push(await env.subscribe(cl, CHANNEL));

  const ready = watchReady([a, b, c]);
  let killedAt = 0;
  let restartedAt = 0;
  let restart = Promise.resolve();
  const { ambiguous, errors } = await publishAll(env, publisher, N, {
    onSeq: async (seq) => {
      if (seq !== KILL_AT) return;
      env.note(`SIGKILL redis pid ${redis.child.pid}`);
      killedAt = Date.now();
      await redis.kill();
      restart = (async () => {
        await sleep(DOWN_MS);
        await redis.start();
        restartedAt = Date.now();
        env.note(`redis restarted, pid ${redis.child.pid}`);
      })();
    },
  });
  await withTimeout(restart, WAIT_MS, 'redis restart');
  await waitUntil(() => subs.every((s) => distinctSeqs(s) >= N), WAIT_MS,
    `every subscriber to have ${N} publications (have ${subs.map(distinctSeqs)})`).catch((e) => {
    throw new Error(`${e.message}; have ${subs.map((s) => `${s.label}:${distinctSeqs(s)}`).join(' ')}`);
  });
  await sleep(500); // duplicates would arrive now
  await waitUntil(() => [a, b, c].every((n) => ready.seen.get(n.name).at(-1)?.status === 200), 5000, '/ready 200 on every node');
  await ready.stop();

  assert.ok(errors > 0, 'the publisher never saw the outage (kill too late?)');
  for (const n of [a, b, c]) {
    const seen = ready.seen.get(n.name);
    const during = seen.filter((s) => s.t >= killedAt && s.status === 503);
    assert.ok(during.length > 0, `/ready of ${n.name} never answered 503 during the outage: ${JSON.stringify(seen)}`);
    assert.equal(seen.at(-1).status, 200, `/ready of ${n.name} at the end: ${JSON.stringify(seen)}`);
  }
  let retried = 0;
  for (const s of subs) {
    retried += assertExactlyOnce(s, N, ambiguous);
    // Resubscribed after the restart, and the recovery succeeded.
    const after = s.subscribedEvents.filter((e) => e.t >= killedAt);
    assert.ok(after.length > 0, `${s.label} never resubscribed after the Redis restart`);
    for (const e of after) {
      assert.equal(e.wasRecovering, true, `${s.label}: ${JSON.stringify(e)}`);
      assert.equal(e.recovered, true, `${s.label}: persistent Redis keeps the stream, recovery must succeed: ${JSON.stringify(e)}`);
    }
  }
  // The user's server-side (personal) subscription cannot be resubscribed by
  // the SDK: its connection was closed with 3010 and it reconnected.
  const sam = subscribers[3];
  assert.ok(sam.codes.includes(3010), `sam must be reconnected with 3010, saw ${JSON.stringify(sam.codes)}`);
  assert.ok(sam.connectedCount >= 2, 'sam reconnected');
  process.stderr.write(`redis outage: ${restartedAt - killedAt} ms, ${errors} failed publishes retried, ${ambiguous.size} ambiguous seqs, ${retried} duplicates of retried publishes seen\n`);
});

// ---------------------------------------------------------------------------
// 2. Redis without persistence: the loss is reported, never silent
// ---------------------------------------------------------------------------

chaosTest('redis restarted without persistence: subscribers are told they could not recover', async (env) => {
  const redis = await startRedis(env, { persistent: false });
  const [a, b] = await startNodes(env, redis, ['A', 'B']);
  const publisher = env.client('publisher@A', a.wsUrl);
  const subscriber = env.client('s@B', b.wsUrl);
  await Promise.all([env.connect(publisher), env.connect(subscriber)]);
  const sub = await env.subscribe(subscriber, CHANNEL);
  await publishAll(env, publisher, 5);
  await waitUntil(() => sub.items.length >= 5, WAIT_MS, 'the first 5 publications');
  const firstEpoch = sub.subscribedEvents[0].streamPosition?.epoch;

  const ready = watchReady([a, b]);
  const killedAt = Date.now();
  await redis.kill();
  await sleep(500);
  await redis.start();
  await waitUntil(() => sub.subscribedEvents.length >= 2, WAIT_MS, 'the subscriber to resubscribe');
  const resub = sub.subscribedEvents[1];
  assert.equal(resub.wasRecovering, true, JSON.stringify(resub));
  assert.equal(resub.recovered, false, `the stream was lost with Redis; recovered:true would hide a gap: ${JSON.stringify(resub)}`);
  assert.notEqual(resub.streamPosition?.epoch, firstEpoch, 'a new stream has a new epoch');

  await publisher.publish(CHANNEL, { seq: 6 });
  await waitUntil(() => sub.items.length >= 6, WAIT_MS, 'publication 6 after the restart');
  assert.deepEqual(sub.items.map((i) => i.seq), [1, 2, 3, 4, 5, 6]);
  assert.equal(sub.items[5].offset, 1, 'first publication of the new stream');
  await waitUntil(() => [a, b].every((n) => ready.seen.get(n.name).at(-1)?.status === 200), 5000, '/ready 200');
  await ready.stop();
  for (const n of [a, b]) {
    const seen = ready.seen.get(n.name);
    assert.ok(seen.some((s) => s.t >= killedAt && s.status === 503), `/ready of ${n.name}: ${JSON.stringify(seen)}`);
  }
});

// ---------------------------------------------------------------------------
// 3. A fanfare node SIGKILLed: its clients move to another node and recover
// ---------------------------------------------------------------------------

chaosTest('a node killed with SIGKILL: its clients reconnect to another node and recover', async (env) => {
  const N = 300;
  const KILL_AT = 100;
  const redis = await startRedis(env, { persistent: false });
  const [a, b, c] = await startNodes(env, redis, ['A', 'B', 'C']);
  const proxy = await startProxy(env, a.port);
  const lbUrl = `ws://127.0.0.1:${proxy.port}/connection/websocket`;

  const publisher = env.client('publisher@C', c.wsUrl);
  const movers = [env.client('m1@lb', lbUrl), env.client('m2@lb', lbUrl), env.client('m3@lb', lbUrl)];
  const stayer = env.client('s@B', b.wsUrl);
  await Promise.all([publisher, stayer, ...movers].map((cl) => env.connect(cl)));
  const subs = [];
  for (const cl of [...movers, stayer]) subs.push(await env.subscribe(cl, CHANNEL));
  assert.equal(proxy.accepted.get(a.port), movers.length, 'the movers start on node A');

  let killedAt = 0;
  const { ambiguous } = await publishAll(env, publisher, N, {
    onSeq: async (seq) => {
      if (seq !== KILL_AT) return;
      // From now on the "load balancer" sends new connections to B.
      proxy.target = b.port;
      env.note(`SIGKILL node A pid ${a.child.pid}`);
      killedAt = Date.now();
      await a.kill();
    },
  });
  await waitUntil(() => subs.every((s) => distinctSeqs(s) >= N), WAIT_MS,
    `every subscriber to have ${N} publications`).catch((e) => {
    throw new Error(`${e.message}; have ${subs.map((s) => `${s.label}:${distinctSeqs(s)}`).join(' ')}`);
  });
  await sleep(500);

  for (const s of subs) assertExactlyOnce(s, N, ambiguous);
  assert.equal(proxy.accepted.get(b.port), movers.length, 'each mover reconnected once, to node B');
  for (const [i, cl] of movers.entries()) {
    assert.equal(cl.connectedCount, 2, `${cl.label} connected twice`);
    const after = subs[i].subscribedEvents.filter((e) => e.t >= killedAt);
    assert.equal(after.length, 1, `${cl.label} resubscribed once: ${JSON.stringify(after)}`);
    assert.equal(after[0].wasRecovering, true, JSON.stringify(after[0]));
    assert.equal(after[0].recovered, true, `${cl.label} must recover what it missed: ${JSON.stringify(after[0])}`);
  }
  assert.equal(stayer.connectedCount, 1, 'the client on B was not disturbed');
});
