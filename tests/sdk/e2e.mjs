// End-to-end test of the fanfare binary against the real centrifuge-js SDK.
//
// Run:  FANFARE_BIN=/abs/path/to/fanfare node --test tests/sdk/e2e.mjs
//  or:  FANFARE_BIN=/abs/path/to/fanfare tests/sdk/run.sh
//
// The script starts its own fanfare process on free loopback ports, with a
// temporary TOML config, and stops it (SIGTERM, then SIGKILL after 5 s) at the
// end. Every wait is bounded. On a failure the raw WebSocket frames of the
// clients involved and the tail of the server's output are printed to stderr.
// Set FANFARE_E2E_VERBOSE=1 to print the frames of every test.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import http2 from 'node:http2';
import os from 'node:os';
import path from 'node:path';
import { Centrifuge } from 'centrifuge';
import WebSocket from 'ws';
import { freePort, sleep, stamp, withTimeout } from './util.mjs';

const WAIT_MS = 10_000; // bound for every single wait
const HEALTH_TIMEOUT_MS = 20_000; // bound for the server to become healthy
const STOP_GRACE_MS = 5_000; // SIGTERM -> SIGKILL
const VERBOSE = process.env.FANFARE_E2E_VERBOSE === '1';


// ---------------------------------------------------------------------------
// Generic helpers
// ---------------------------------------------------------------------------

/**
 * Resolves with the first `event` of `emitter` whose ctx passes `filter`.
 * The listener is registered synchronously, so call this BEFORE triggering the event.
 */
function waitEvent(emitter, event, what, { filter = () => true, timeout = WAIT_MS } = {}) {
  let listener;
  const p = new Promise((resolve) => {
    listener = (ctx) => {
      if (filter(ctx)) {
        emitter.off(event, listener);
        resolve(ctx);
      }
    };
    emitter.on(event, listener);
  });
  return withTimeout(p, timeout, what).finally(() => emitter.off(event, listener));
}

/** Collects publications of a subscription and lets a test wait for a count. */
class PubCollector {
  constructor(sub) {
    this.items = [];
    this.waiters = [];
    sub.on('publication', (ctx) => {
      this.items.push(ctx);
      for (const w of [...this.waiters]) {
        if (this.items.length >= w.n) {
          this.waiters.splice(this.waiters.indexOf(w), 1);
          w.resolve();
        }
      }
    });
  }
  /** Waits until at least `n` publications were collected in total. */
  waitCount(n, what, timeout = WAIT_MS) {
    if (this.items.length >= n) return Promise.resolve();
    const p = new Promise((resolve) => this.waiters.push({ n, resolve }));
    return withTimeout(p, timeout, `${what} (have ${this.items.length}/${n}: ${this.describe()})`);
  }
  data() {
    return this.items.map((p) => p.data);
  }
  describe() {
    return JSON.stringify(this.items.map((p) => ({ data: p.data, offset: p.offset })));
  }
}

// ---------------------------------------------------------------------------
// Ports, config, server process
// ---------------------------------------------------------------------------

async function twoDistinctFreePorts() {
  const a = await freePort();
  for (let i = 0; i < 20; i++) {
    const b = await freePort();
    if (b !== a) return [a, b];
  }
  throw new Error('could not find two distinct free ports');
}

function configToml(httpPort, grpcPort) {
  return `[http]
listen = "127.0.0.1:${httpPort}"

[grpc]
listen = "127.0.0.1:${grpcPort}"

[[namespaces]]
name = ""
allow_publish = true
allow_subscribe = true
history_size = 100
history_ttl = "300s"
presence = true

[[namespaces]]
name = "forced"
allow_publish = true
history_size = 100
history_ttl = "300s"
force_recovery = true
`;
}

/** Keeps the last lines of the server's stdout/stderr for failure reports. */
class RingLog {
  constructor(limit) {
    this.limit = limit;
    this.lines = [];
  }
  push(line) {
    this.lines.push(line);
    if (this.lines.length > this.limit) this.lines.splice(0, this.lines.length - this.limit);
  }
}

const serverLog = new RingLog(400);

class Server {
  constructor(bin, configPath, httpPort) {
    this.bin = bin;
    this.configPath = configPath;
    this.httpPort = httpPort;
    this.child = null;
    this.generation = 0;
  }

  get wsUrl() {
    return `ws://127.0.0.1:${this.httpPort}/connection/websocket`;
  }

  async start() {
    assert.equal(this.child, null, 'server already running');
    this.generation += 1;
    const gen = this.generation;
    const env = { ...process.env };
    if (!env.RUST_LOG) env.RUST_LOG = 'info';
    const child = spawn(this.bin, ['--config', this.configPath], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env,
    });
    this.child = child;
    child.exitInfo = null;
    child.exited = new Promise((resolve) => {
      child.on('exit', (code, signal) => {
        child.exitInfo = { code, signal };
        serverLog.push(`${stamp()} [server#${gen} pid ${child.pid}] exited code=${code} signal=${signal}`);
        resolve(child.exitInfo);
      });
    });
    child.on('error', (err) => {
      serverLog.push(`${stamp()} [server#${gen}] spawn error: ${err.message}`);
      child.exitInfo = child.exitInfo || { code: null, signal: null, error: err };
    });
    for (const [name, stream] of [['out', child.stdout], ['err', child.stderr]]) {
      let buf = '';
      stream.setEncoding('utf8');
      stream.on('data', (chunk) => {
        buf += chunk;
        let i;
        while ((i = buf.indexOf('\n')) >= 0) {
          serverLog.push(`${stamp()} [server#${gen} ${name}] ${buf.slice(0, i)}`);
          buf = buf.slice(i + 1);
        }
      });
    }
    serverLog.push(`${stamp()} [server#${gen}] spawned pid ${child.pid}: ${this.bin} --config ${this.configPath}`);

    // Poll /health until 200, the process dies, or the bound is reached.
    const deadline = Date.now() + HEALTH_TIMEOUT_MS;
    let last = 'no attempt';
    while (Date.now() < deadline) {
      if (child.exitInfo) {
        this.child = null;
        throw new Error(
          `fanfare exited before becoming healthy: ${JSON.stringify(child.exitInfo)}\n${serverTail()}`,
        );
      }
      try {
        const res = await fetch(`http://127.0.0.1:${this.httpPort}/health`, {
          signal: AbortSignal.timeout(1000),
        });
        await res.arrayBuffer().catch(() => {});
        if (res.status === 200) return;
        last = `HTTP ${res.status}`;
      } catch (err) {
        last = err.cause?.code || err.name || String(err);
      }
      await sleep(100);
    }
    throw new Error(
      `fanfare did not answer 200 on /health within ${HEALTH_TIMEOUT_MS} ms (last: ${last})\n${serverTail()}`,
    );
  }

  /** SIGTERM, SIGKILL after STOP_GRACE_MS. Resolves with how it ended. */
  async stop() {
    const child = this.child;
    if (!child) return null;
    this.child = null;
    if (child.exitInfo) return { ...child.exitInfo, killed: false };
    child.kill('SIGTERM');
    let timer;
    const graceful = await Promise.race([
      child.exited.then(() => true),
      new Promise((resolve) => (timer = setTimeout(() => resolve(false), STOP_GRACE_MS))),
    ]);
    clearTimeout(timer);
    if (!graceful) {
      serverLog.push(`${stamp()} [server pid ${child.pid}] no exit ${STOP_GRACE_MS} ms after SIGTERM: SIGKILL`);
      child.kill('SIGKILL');
      await withTimeout(child.exited, 5000, 'fanfare to exit after SIGKILL');
    }
    return { ...child.exitInfo, killed: !graceful };
  }

  /** Synchronous last resort for process exit paths. */
  killNow() {
    if (this.child && !this.child.exitInfo) {
      try {
        this.child.kill('SIGKILL');
      } catch {
        // already gone
      }
    }
  }
}

function serverTail(n = 60) {
  return `--- last server output ---\n${serverLog.lines.slice(-n).join('\n')}\n--- end server output ---`;
}

// ---------------------------------------------------------------------------
// SDK clients with raw frame logging
// ---------------------------------------------------------------------------

const allSockets = new Set();
const allClients = new Set();
const unhandled = [];

process.on('unhandledRejection', (reason) => {
  // centrifuge-js reports exceptions while dispatching replies as unhandled
  // rejections; record them (they mean the SDK choked on something) instead of
  // crashing the test process.
  unhandled.push(reason);
  process.stderr.write(`${stamp()} unhandled rejection: ${reason?.stack || reason}\n`);
});

function truncate(s, n = 2000) {
  return s.length > n ? `${s.slice(0, n)}...(${s.length} bytes)` : s;
}

/** A `ws` WebSocket subclass that records every frame in `log`. */
function loggingWebSocket(label, log) {
  return class LoggingWebSocket extends WebSocket {
    constructor(url, protocols) {
      super(url, protocols);
      allSockets.add(this);
      log.push(`${stamp()} ${label} ~ dial ${url}`);
      this.on('open', () => log.push(`${stamp()} ${label} ~ open`));
      this.on('message', (data, isBinary) => {
        if (isBinary) {
          log.push(`${stamp()} ${label} < [binary ${data.length} bytes] ${data.toString('hex').slice(0, 200)}`);
          return;
        }
        // One frame may carry several newline-delimited replies.
        for (const line of data.toString().split('\n')) log.push(`${stamp()} ${label} < ${truncate(line)}`);
      });
      this.on('close', (code, reason) => {
        allSockets.delete(this);
        log.push(`${stamp()} ${label} ~ close code=${code} reason=${JSON.stringify(reason.toString())}`);
      });
      this.on('error', (err) => log.push(`${stamp()} ${label} ~ error ${err.message}`));
    }
    send(data, ...rest) {
      if (typeof data === 'string') {
        // One frame may carry several newline-delimited commands.
        for (const line of data.split('\n')) log.push(`${stamp()} ${label} > ${truncate(line)}`);
      } else {
        log.push(`${stamp()} ${label} > [binary ${data.length ?? data.byteLength} bytes]`);
      }
      return super.send(data, ...rest);
    }
  };
}

/** Per-test environment: creates clients, dumps their frames on failure, cleans up. */
class Env {
  constructor(name) {
    this.name = name;
    this.clients = [];
    this.log = [];
  }

  client(label) {
    const c = new Centrifuge(server.wsUrl, {
      websocket: loggingWebSocket(label, this.log),
      minReconnectDelay: 100,
      maxReconnectDelay: 500,
      timeout: 5000,
    });
    c.label = label;
    c.connectedCount = 0;
    c.closeEvents = []; // { event, code, reason }
    // An 'error' event without listener would throw inside the SDK.
    c.on('error', (ctx) => this.log.push(`${stamp()} ${label} ! client error ${JSON.stringify(ctx.error)} (${ctx.type})`));
    c.on('connected', (ctx) => {
      c.connectedCount += 1;
      this.log.push(`${stamp()} ${label} ! connected client=${ctx.client}`);
    });
    c.on('connecting', (ctx) => {
      c.closeEvents.push({ event: 'connecting', code: ctx.code, reason: ctx.reason });
      this.log.push(`${stamp()} ${label} ! connecting code=${ctx.code} reason=${ctx.reason}`);
    });
    c.on('disconnected', (ctx) => {
      c.closeEvents.push({ event: 'disconnected', code: ctx.code, reason: ctx.reason });
      this.log.push(`${stamp()} ${label} ! disconnected code=${ctx.code} reason=${ctx.reason}`);
    });
    this.clients.push(c);
    allClients.add(c);
    return c;
  }

  /** Connects `c` and waits for its `connected` event. */
  async connect(c) {
    const connected = waitEvent(c, 'connected', `${c.label} to connect`);
    c.connect();
    return connected;
  }

  subscription(c, channel, options = {}) {
    const sub = c.newSubscription(channel, options);
    sub.subscribedCount = 0;
    sub.on('error', (ctx) => this.log.push(`${stamp()} ${c.label} ! sub ${channel} error ${JSON.stringify(ctx.error)} (${ctx.type})`));
    sub.on('subscribed', (ctx) => {
      sub.subscribedCount += 1;
      this.log.push(`${stamp()} ${c.label} ! sub ${channel} subscribed ${JSON.stringify(ctx)}`);
    });
    sub.on('subscribing', (ctx) => this.log.push(`${stamp()} ${c.label} ! sub ${channel} subscribing code=${ctx.code} reason=${ctx.reason}`));
    sub.on('unsubscribed', (ctx) => this.log.push(`${stamp()} ${c.label} ! sub ${channel} unsubscribed code=${ctx.code} reason=${ctx.reason}`));
    return sub;
  }

  /** Subscribes `sub` and waits for its `subscribed` event. */
  async subscribe(sub) {
    const subscribed = waitEvent(sub, 'subscribed', `subscription to ${sub.channel}`);
    sub.subscribe();
    return subscribed;
  }

  dump(err) {
    process.stderr.write(
      `\n===== ${this.name}: ${err ? 'FAILED' : 'frames'} =====\n` +
        (err ? `${err.stack || err}\n` : '') +
        `--- client frames/events (> sent, < received, ~ socket, ! SDK event) ---\n` +
        `${this.log.join('\n')}\n` +
        `${serverTail()}\n` +
        `===== end ${this.name} =====\n\n`,
    );
  }

  close() {
    for (const c of this.clients) {
      try {
        c.disconnect();
      } catch {
        // ignore
      }
      allClients.delete(c);
    }
  }
}

/** Declares a test that runs `fn(env)` and dumps diagnostics on failure. */
function e2e(name, fn, timeout = 40_000) {
  test(name, { timeout }, async () => {
    const env = new Env(name);
    const unhandledBefore = unhandled.length;
    try {
      await fn(env);
      assert.equal(
        unhandled.length,
        unhandledBefore,
        `the SDK reported exceptions while handling server replies: ${unhandled.slice(unhandledBefore).map(String).join('; ')}`,
      );
      if (VERBOSE) env.dump(null);
    } catch (err) {
      env.dump(err);
      throw err;
    } finally {
      env.close();
    }
  });
}

// ---------------------------------------------------------------------------
// Setup / teardown
// ---------------------------------------------------------------------------

let server = null;
let tmpDir = null;

function killEverythingSync() {
  for (const c of allClients) {
    try {
      c.disconnect();
    } catch {
      // ignore
    }
  }
  for (const s of allSockets) {
    try {
      s.terminate();
    } catch {
      // ignore
    }
  }
  if (server) server.killNow();
}

process.on('exit', killEverythingSync);
for (const sig of ['SIGINT', 'SIGTERM']) {
  process.once(sig, () => {
    killEverythingSync();
    process.exit(130);
  });
}

before(async () => {
  const bin = process.env.FANFARE_BIN;
  assert.ok(bin, 'FANFARE_BIN must be set to the path of the fanfare binary');
  assert.ok(path.isAbsolute(bin), `FANFARE_BIN must be an absolute path, got ${bin}`);
  assert.ok(fs.existsSync(bin), `FANFARE_BIN does not exist: ${bin}`);
  const [httpPort, grpcPort] = await twoDistinctFreePorts();
  tmpDir = fs.mkdtempSync(path.join(os.tmpdir(), 'fanfare-e2e-'));
  const configPath = path.join(tmpDir, 'config.toml');
  fs.writeFileSync(configPath, configToml(httpPort, grpcPort));
  server = new Server(bin, configPath, httpPort);
  server.grpcPort = grpcPort;
  await server.start();
});

after(async () => {
  for (const c of allClients) {
    try {
      c.disconnect();
    } catch {
      // ignore
    }
  }
  allClients.clear();
  if (server) {
    const how = await server.stop();
    if (how?.killed) process.stderr.write(`fanfare did not exit within ${STOP_GRACE_MS} ms of SIGTERM; killed\n`);
  }
  for (const s of allSockets) {
    try {
      s.terminate();
    } catch {
      // ignore
    }
  }
  allSockets.clear();
  if (tmpDir) fs.rmSync(tmpDir, { recursive: true, force: true });
});

// ---------------------------------------------------------------------------
// Test A: client-side publish reaches a subscriber, in order
// ---------------------------------------------------------------------------

e2e('A: publish from one client reaches another client subscribed, exactly and in order', async (env) => {
  const c1 = env.client('c1');
  const c2 = env.client('c2');
  await Promise.all([env.connect(c1), env.connect(c2)]);

  const sub = env.subscription(c2, 'news');
  const pubs = new PubCollector(sub);
  const subCtx = await env.subscribe(sub);
  assert.equal(subCtx.channel, 'news');

  // c1 publishes without being subscribed.
  await withTimeout(c1.publish('news', { text: 'hi', n: 1 }), WAIT_MS, 'c1 publish to news');
  await pubs.waitCount(1, 'c2 to receive the first publication');
  assert.equal(pubs.items[0].channel, 'news');
  assert.deepEqual(pubs.items[0].data, { text: 'hi', n: 1 });

  // Ordering: 50 publications, each awaited before the next.
  for (let n = 1; n <= 50; n++) {
    await withTimeout(c1.publish('news', { seq: n }), WAIT_MS, `c1 publish seq ${n}`);
  }
  await pubs.waitCount(51, 'c2 to receive 50 more publications');
  await sleep(300); // anything extra (duplicates) would show up now
  const seqs = pubs.items.slice(1).map((p) => p.data.seq);
  assert.deepEqual(seqs, Array.from({ length: 50 }, (_, i) => i + 1), 'publications out of order, missing or duplicated');
  assert.equal(pubs.items.length, 51, `unexpected extra publications: ${pubs.describe()}`);
  // History is on for the namespace: offsets must increase strictly.
  const offsets = pubs.items.map((p) => p.offset);
  if (offsets.every((o) => typeof o === 'number')) {
    for (let i = 1; i < offsets.length; i++) {
      assert.ok(offsets[i] > offsets[i - 1], `offsets not increasing: ${offsets.join(',')}`);
    }
  }
});

// ---------------------------------------------------------------------------
// Test C: recovery after a client disconnect, without server restart
// ---------------------------------------------------------------------------

/**
 * centrifuge-js 5.x keeps a subscription's stream position (offset/epoch) across
 * a manual disconnect()/connect(): disconnect() only moves subscriptions to
 * `subscribing`, and the resubscribe after connect() carries
 * {recover: true, offset, epoch} as long as the last subscribe reply said
 * `recoverable: true`. So disconnect()+connect() is a faithful client-side cut.
 */
e2e('C: missed publications are recovered after reconnect (disconnect/connect, no restart)', async (env) => {
  const a = env.client('A');
  const b = env.client('B');
  await Promise.all([env.connect(a), env.connect(b)]);

  const sub = env.subscription(a, 'room1', { recoverable: true });
  const pubs = new PubCollector(sub);
  const first = await env.subscribe(sub);
  assert.equal(first.recoverable, true, `first subscribe reply must be recoverable: ${JSON.stringify(first)}`);
  assert.equal(first.wasRecovering, false);
  assert.ok(first.streamPosition, 'recoverable subscribe must carry a stream position');
  assert.equal(typeof first.streamPosition.epoch, 'string');

  await withTimeout(b.publish('room1', { n: 1 }), WAIT_MS, 'B publish n=1');
  await pubs.waitCount(1, 'A to receive n=1');
  assert.deepEqual(pubs.items[0].data, { n: 1 });
  const offset1 = pubs.items[0].offset;
  assert.equal(typeof offset1, 'number', 'publication in a namespace with history must carry an offset');

  // Cut A.
  const disconnected = waitEvent(a, 'disconnected', 'A disconnected');
  a.disconnect();
  await disconnected;
  await sleep(200); // let the server notice the close

  for (let n = 2; n <= 6; n++) {
    await withTimeout(b.publish('room1', { n }), WAIT_MS, `B publish n=${n}`);
  }

  // Reconnect A: the SDK resubscribes with recover:true from offset1.
  const resubscribed = waitEvent(sub, 'subscribed', 'A resubscribed to room1');
  await env.connect(a);
  const ctx = await resubscribed;
  assert.equal(ctx.wasRecovering, true, `resubscribe must be a recovery: ${JSON.stringify(ctx)}`);
  assert.equal(ctx.recovered, true, `recovery must succeed (history_size 100, ttl 300s): ${JSON.stringify(ctx)}`);
  assert.equal(ctx.recoverable, true);
  assert.equal(ctx.streamPosition?.epoch, first.streamPosition.epoch, 'epoch must not change without a restart');

  await pubs.waitCount(6, 'A to receive n=2..6 after recovery');
  await sleep(300); // duplicates would show up now
  assert.deepEqual(
    pubs.data(),
    [1, 2, 3, 4, 5, 6].map((n) => ({ n })),
    `A must get every publication exactly once, in order: ${pubs.describe()}`,
  );
  const offsets = pubs.items.map((p) => p.offset);
  assert.deepEqual(
    offsets,
    [0, 1, 2, 3, 4, 5].map((d) => offset1 + d),
    `offsets must be consecutive: ${offsets.join(',')}`,
  );

  // And the subscription is live again after recovery.
  await withTimeout(b.publish('room1', { n: 7 }), WAIT_MS, 'B publish n=7');
  await pubs.waitCount(7, 'A to receive live n=7 after recovery');
  assert.deepEqual(pubs.items[6].data, { n: 7 });
});

// ---------------------------------------------------------------------------
// Test C2: abrupt transport loss (socket terminated), SDK reconnects by itself
// ---------------------------------------------------------------------------

e2e('C2: abrupt socket loss while publications flow: exactly-once, in order', async (env) => {
  const a = env.client('A2');
  const b = env.client('B2');
  await Promise.all([env.connect(a), env.connect(b)]);

  const sub = env.subscription(a, 'room2', { recoverable: true });
  const pubs = new PubCollector(sub);
  await env.subscribe(sub);

  await withTimeout(b.publish('room2', { n: 1 }), WAIT_MS, 'B2 publish n=1');
  await pubs.waitCount(1, 'A2 to receive n=1');

  // Kill A2's TCP connection without a close handshake (network drop); the SDK
  // sees code 1006 and reconnects after 100-500 ms. Meanwhile B2 keeps publishing,
  // so some publications land while A2 is away, some maybe while it resubscribes.
  const resubscribed = waitEvent(sub, 'subscribed', 'A2 resubscribed to room2');
  const socket = a._transport?._transport;
  assert.ok(socket instanceof WebSocket, 'could not reach the SDK websocket to cut it');
  socket.terminate();
  for (let n = 2; n <= 11; n++) {
    await withTimeout(b.publish('room2', { n }), WAIT_MS, `B2 publish n=${n}`);
    await sleep(30);
  }
  const ctx = await resubscribed;
  assert.equal(ctx.wasRecovering, true, `resubscribe must be a recovery: ${JSON.stringify(ctx)}`);
  assert.equal(ctx.recovered, true, `recovery must succeed: ${JSON.stringify(ctx)}`);
  await withTimeout(b.publish('room2', { n: 12 }), WAIT_MS, 'B2 publish n=12');
  await pubs.waitCount(12, 'A2 to receive n=1..12');
  await sleep(300);
  assert.deepEqual(
    pubs.data(),
    Array.from({ length: 12 }, (_, i) => ({ n: i + 1 })),
    `A2 must get every publication exactly once, in order: ${pubs.describe()}`,
  );
});

// ---------------------------------------------------------------------------
// Test B: server restart on the same port; the SDK reconnects and resubscribes
// ---------------------------------------------------------------------------

e2e('B: after a server restart (SIGTERM) the SDK reconnects and resubscribes by itself', async (env) => {
  const s = env.client('S');
  const p = env.client('P');
  await Promise.all([env.connect(s), env.connect(p)]);

  const sub = env.subscription(s, 'restart1', { recoverable: true });
  const pubs = new PubCollector(sub);
  const first = await env.subscribe(sub);
  assert.equal(first.recoverable, true, `subscribe reply must be recoverable: ${JSON.stringify(first)}`);

  for (let n = 1; n <= 3; n++) {
    await withTimeout(p.publish('restart1', { n }), WAIT_MS, `P publish n=${n}`);
  }
  await pubs.waitCount(3, 'S to receive n=1..3');
  assert.deepEqual(pubs.data(), [{ n: 1 }, { n: 2 }, { n: 3 }]);

  // Listeners for what must happen after the restart (registered before it).
  const sGoesAway = waitEvent(s, 'connecting', 'S to notice the shutdown');
  const sReconnected = waitEvent(s, 'connected', 'S to reconnect after restart', { timeout: 30_000 });
  const pReconnected = waitEvent(p, 'connected', 'P to reconnect after restart', { timeout: 30_000 });
  const sResubscribed = waitEvent(sub, 'subscribed', 'S to resubscribe after restart', { timeout: 30_000 });
  const connectedBefore = s.connectedCount;
  const subscribedBefore = sub.subscribedCount;

  const stopped = await server.stop();
  assert.ok(stopped, 'server was not running');
  const goneCtx = await sGoesAway;
  // Stay down for a while: the SDK's reconnect attempts must fail and back off.
  await sleep(1000);
  assert.equal(s.state, 'connecting', 'S must keep trying to reconnect while the server is down');
  await server.start(); // same config file => same ports

  await Promise.all([sReconnected, pReconnected]);
  const resub = await sResubscribed;
  assert.ok(s.connectedCount > connectedBefore, '`connected` must fire again');
  assert.ok(sub.subscribedCount > subscribedBefore, 'subscription `subscribed` must fire again');
  // The memory broker starts a new stream: a recovery attempt may not claim success
  // across an epoch change.
  assert.equal(resub.wasRecovering, true, `resubscribe must attempt recovery: ${JSON.stringify(resub)}`);
  if (resub.streamPosition && resub.streamPosition.epoch !== first.streamPosition?.epoch) {
    assert.equal(resub.recovered, false, `recovered:true across an epoch change: ${JSON.stringify(resub)}`);
  }

  await withTimeout(p.publish('restart1', { n: 100 }), WAIT_MS, 'P publish n=100 after restart');
  await pubs.waitCount(4, 'S to receive n=100 after restart');
  await sleep(300);
  assert.deepEqual(pubs.data(), [{ n: 1 }, { n: 2 }, { n: 3 }, { n: 100 }], `unexpected publications: ${pubs.describe()}`);

  // Checked last, so the main flow's result shows first: the graceful shutdown.
  assert.equal(stopped.killed, false, 'fanfare did not exit within 5 s of SIGTERM');
  assert.equal(goneCtx.code, 3001, `clients must be closed with code 3001 on shutdown, SDK saw ${JSON.stringify(goneCtx)}`);
  assert.equal(goneCtx.reason, 'shutdown', `close reason on shutdown: ${JSON.stringify(goneCtx)}`);
});

// ---------------------------------------------------------------------------
// D: WebSocket closing handshake (RFC 6455 §5.5.1) on a client-initiated close
// ---------------------------------------------------------------------------

// Without the echoed Close frame clients would see 1006 (abnormal closure).
test(
  'D: the server echoes the Close frame when the client closes (raw ws)',
  { timeout: 15_000 },
  async () => {
    const ws = new WebSocket(server.wsUrl);
    allSockets.add(ws);
    try {
      await withTimeout(
        new Promise((resolve, reject) => {
          ws.once('open', resolve);
          ws.once('error', reject);
        }),
        WAIT_MS,
        'raw ws to open',
      );
      const reply = withTimeout(
        new Promise((resolve) => ws.once('message', (d) => resolve(JSON.parse(d.toString())))),
        WAIT_MS,
        'connect reply',
      );
      ws.send(JSON.stringify({ id: 1, connect: { name: 'raw' } }));
      assert.ok((await reply).connect, 'expected a connect reply');
      const closed = withTimeout(
        new Promise((resolve) => ws.once('close', (code, reason) => resolve({ code, reason: reason.toString() }))),
        WAIT_MS,
        'close event',
      );
      ws.close(1000, 'bye');
      const { code } = await closed;
      assert.equal(code, 1000, `server must echo Close(1000); ws saw code ${code} (1006 = no Close frame received)`);
    } finally {
      ws.terminate();
      allSockets.delete(ws);
    }
  },
);

// ---------------------------------------------------------------------------
// Tests I: the ingress rule for publication data and bounded replies (issue 13).
// One bad publisher must never break a channel's subscribers.
// ---------------------------------------------------------------------------

/** POSTs `body` (a string, sent as is) to the HTTP API: { status, json }. */
async function apiPost(method, body) {
  const res = await fetch(`http://127.0.0.1:${server.httpPort}/api/${method}`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body,
    signal: AbortSignal.timeout(WAIT_MS),
  });
  const text = await res.text();
  let json = null;
  try {
    json = JSON.parse(text);
  } catch {
    // not JSON: leave null
  }
  return { status: res.status, json, text };
}

/** A protobuf length-delimited field (string or bytes). */
function pbField(field, value) {
  const bytes = Buffer.isBuffer(value) ? value : Buffer.from(value, 'utf8');
  const len = [];
  let n = bytes.length;
  do {
    let b = n & 0x7f;
    n >>>= 7;
    if (n) b |= 0x80;
    len.push(b);
  } while (n);
  return Buffer.concat([Buffer.from([(field << 3) | 2, ...len]), bytes]);
}

/** Unary fanfare.v1.ControlService/Publish over node:http2: { status, message }. */
function grpcPublish(channel, data) {
  const msg = Buffer.concat([pbField(1, channel), pbField(2, data)]);
  const prefix = Buffer.alloc(5);
  prefix.writeUInt32BE(msg.length, 1);
  return withTimeout(
    new Promise((resolve, reject) => {
      const session = http2.connect(`http://127.0.0.1:${server.grpcPort}`);
      session.on('error', reject);
      const req = session.request({
        ':method': 'POST',
        ':path': '/fanfare.v1.ControlService/Publish',
        'content-type': 'application/grpc',
        te: 'trailers',
      });
      let headers = {};
      req.on('response', (h) => {
        headers = h;
      });
      req.on('trailers', (t) => {
        headers = { ...headers, ...t };
      });
      req.on('data', () => {});
      req.on('error', reject);
      req.on('close', () => {
        session.close();
        resolve({
          status: Number(headers['grpc-status']),
          message: decodeURIComponent(headers['grpc-message'] || ''),
        });
      });
      req.end(Buffer.concat([prefix, msg]));
    }),
    WAIT_MS,
    'gRPC Publish',
  );
}

/** Nested arrays `depth` levels deep around a number. */
function nested(depth) {
  return `${'['.repeat(depth)}1${']'.repeat(depth)}`;
}

/** A subscriber that must stay connected through a test: returns its collector. */
async function steadySubscriber(env, label, channel) {
  const c = env.client(label);
  await env.connect(c);
  const sub = env.subscription(c, channel);
  const pubs = new PubCollector(sub);
  await env.subscribe(sub);
  return { c, sub, pubs };
}

/** The subscriber never lost its connection or subscription. */
function assertUndisturbed({ c, sub }) {
  const lost = c.closeEvents.filter((e) => !(e.event === 'connecting' && e.code === 0));
  assert.deepEqual(lost, [], `${c.label} was disconnected`);
  assert.equal(c.connectedCount, 1, `${c.label} reconnected`);
  assert.equal(sub.subscribedCount, 1, `${c.label} resubscribed`);
}

e2e('I1: a pretty-printed HTTP publish reaches SDK subscribers compact and the next one follows without a reconnect', async (env) => {
  const s = await steadySubscriber(env, 'sub', 'ingress-pretty');
  const r = await apiPost('publish', '{"channel":"ingress-pretty","data":{\n  "a": 2,\n  "b": [ 1,\n 2 ],\n  "s": "x  y"\n}\n}');
  assert.equal(r.status, 200, r.text);
  await s.pubs.waitCount(1, 'the pretty-printed publication');
  assert.deepEqual(s.pubs.items[0].data, { a: 2, b: [1, 2], s: 'x  y' });
  // Stored compact: history gives the same value back, whitespace inside strings kept.
  const h = await apiPost('history', '{"channel":"ingress-pretty","limit":-1}');
  assert.equal(h.status, 200, h.text);
  assert.ok(h.text.includes('{"a":2,"b":[1,2],"s":"x  y"}'), `history is not compact: ${h.text}`);
  assert.equal((await apiPost('publish', '{"channel":"ingress-pretty","data":{"next":1}}')).status, 200);
  await s.pubs.waitCount(2, 'the next publication');
  assert.deepEqual(s.pubs.items[1].data, { next: 1 });
  assertUndisturbed(s);
});

e2e('I2: a raw line break inside a client publish is normalised and subscribers are undisturbed', async (env) => {
  const s = await steadySubscriber(env, 'sub', 'ingress-lf');
  const raw = new (loggingWebSocket('raw', env.log))(server.wsUrl);
  await withTimeout(new Promise((resolve, reject) => {
    raw.on('open', resolve);
    raw.on('error', reject);
  }), WAIT_MS, 'raw socket open');
  const replies = [];
  raw.on('message', (d) => replies.push(...d.toString().split('\n').filter(Boolean).map((l) => JSON.parse(l))));
  raw.send('{"id":1,"connect":{}}');
  raw.send('{"id":2,"publish":{"channel":"ingress-lf","data":{\n"text":\n"two\\nlines"\n}}}');
  await s.pubs.waitCount(1, 'the publication with raw line breaks');
  assert.deepEqual(s.pubs.items[0].data, { text: 'two\nlines' });
  const reply = replies.find((r) => r.id === 2);
  assert.deepEqual(reply, { id: 2, publish: {} });
  await withTimeout(s.c.publish('ingress-lf', { next: true }), WAIT_MS, 'next publish');
  await s.pubs.waitCount(2, 'the next publication');
  raw.close();
  assertUndisturbed(s);
});

e2e('I3: data that is not UTF-8 JSON or nested too deep is refused on every path, and depth 64 round-trips', async (env) => {
  const s = await steadySubscriber(env, 'sub', 'ingress-bad');
  // gRPC: bytes that are not UTF-8 inside a JSON string.
  const notUtf8 = await grpcPublish('ingress-bad', Buffer.from([0x22, 0xff, 0xfe, 0x22]));
  assert.equal(notUtf8.status, 3, `INVALID_ARGUMENT expected: ${JSON.stringify(notUtf8)}`);
  assert.match(notUtf8.message, /UTF-8/);
  const notJson = await grpcPublish('ingress-bad', Buffer.from('{"a":'));
  assert.equal(notJson.status, 3, JSON.stringify(notJson));
  const deepGrpc = await grpcPublish('ingress-bad', Buffer.from(nested(10000)));
  assert.equal(deepGrpc.status, 3, JSON.stringify(deepGrpc));
  assert.match(deepGrpc.message, /max_publication_depth/);
  // HTTP: too deep.
  const deepHttp = await apiPost('publish', `{"channel":"ingress-bad","data":${nested(65)}}`);
  assert.equal(deepHttp.status, 400, deepHttp.text);
  assert.equal(deepHttp.json.error.code, 'INVALID_ARGUMENT');
  // Client: too deep is a 107 reply, the publisher stays connected.
  const pub = env.client('pub');
  await env.connect(pub);
  await assert.rejects(
    withTimeout(pub.publish('ingress-bad', JSON.parse(nested(65))), WAIT_MS, 'deep client publish'),
    (e) => e.code === 107,
  );
  // The deepest accepted value comes back whole from the HTTP API's history
  // (it used to read back as null from 128 levels on).
  const ok = await apiPost('publish', `{"channel":"ingress-bad","data":${nested(64)}}`);
  assert.equal(ok.status, 200, ok.text);
  await s.pubs.waitCount(1, 'the depth-64 publication');
  assert.deepEqual(s.pubs.items[0].data, JSON.parse(nested(64)));
  const h = await apiPost('history', '{"channel":"ingress-bad","limit":1,"reverse":true}');
  assert.equal(h.status, 200, h.text);
  assert.ok(h.text.includes(`"data":${nested(64)}`), `history lost the data: ${h.text.slice(0, 300)}`);
  await withTimeout(pub.publish('ingress-bad', { after: 1 }), WAIT_MS, 'publish after refusals');
  await s.pubs.waitCount(2, 'the publication after the refusals');
  assert.equal(s.pubs.items.length, 2, `refused data reached a subscriber: ${s.pubs.describe()}`);
  assert.ok(pub.closeEvents.every((e) => e.code === 0), JSON.stringify(pub.closeEvents));
  assertUndisturbed(s);
});

e2e('I4: a 2 MB publication is refused on all three paths while subscribers stay connected', async (env) => {
  const s = await steadySubscriber(env, 'sub', 'ingress-big');
  const big = JSON.stringify({ pad: 'x'.repeat(2 << 20) });
  const http = await apiPost('publish', `{"channel":"ingress-big","data":${big}}`);
  assert.equal(http.status, 413, http.text.slice(0, 200));
  const grpc = await grpcPublish('ingress-big', Buffer.from(big));
  assert.equal(grpc.status, 8, `RESOURCE_EXHAUSTED expected: ${JSON.stringify(grpc)}`);
  // Over the default 64 KiB limit but within the API's request size: refused
  // by the publication size rule itself.
  const mid = JSON.stringify({ pad: 'x'.repeat(100_000) });
  const httpMid = await apiPost('publish', `{"channel":"ingress-big","data":${mid}}`);
  assert.equal(httpMid.status, 413, httpMid.text.slice(0, 200));
  assert.match(httpMid.json.error.message, /max_publication_size/);
  const grpcMid = await grpcPublish('ingress-big', Buffer.from(mid));
  assert.equal(grpcMid.status, 8, JSON.stringify(grpcMid));
  // A client message that large is refused by closing that client (1009),
  // as Centrifugo does; nobody else notices.
  const pub = env.client('pub');
  await env.connect(pub);
  const gone = waitEvent(pub, 'disconnected', 'the oversized publisher to be closed');
  pub.publish('ingress-big', { pad: 'x'.repeat(2 << 20) }).catch(() => {});
  const ctx = await gone;
  // centrifuge-js reports the 1009 close as its terminal code 3.
  assert.equal(ctx.code, 3, JSON.stringify(ctx));
  assert.match(ctx.reason, /message size limit/);
  assert.equal((await apiPost('publish', '{"channel":"ingress-big","data":{"small":1}}')).status, 200);
  await s.pubs.waitCount(1, 'the small publication after the refusals');
  assert.deepEqual(s.pubs.data(), [{ small: 1 }]);
  assertUndisturbed(s);
});

e2e('I5: recovery after 30 x 40 KB publications ends in recovered: false, history in a bounded list, never 3008', async (env) => {
  const c = env.client('rec');
  await env.connect(c);
  const sub = env.subscription(c, 'ingress-recover', { recoverable: true });
  const pubs = new PubCollector(sub);
  await env.subscribe(sub);
  assert.equal((await apiPost('publish', '{"channel":"ingress-recover","data":{"first":1}}')).status, 200);
  await pubs.waitCount(1, 'the first publication');
  c.disconnect();
  const pad = 'x'.repeat(40_000);
  for (let i = 0; i < 30; i++) {
    const r = await apiPost('publish', `{"channel":"ingress-recover","data":{"i":${i},"pad":"${pad}"}}`);
    assert.equal(r.status, 200, r.text.slice(0, 200));
  }
  const resubscribed = waitEvent(sub, 'subscribed', 'the recovering resubscribe');
  c.connect();
  const ctx = await resubscribed;
  assert.equal(ctx.wasRecovering, true, JSON.stringify(ctx));
  assert.equal(ctx.recovered, false, 'missed publications larger than a reply must not be replayed');
  // History asked for "everything" comes back bounded, as a prefix in order.
  const h = await withTimeout(sub.history({ limit: -1, since: { offset: 1, epoch: ctx.streamPosition.epoch } }), WAIT_MS, 'history');
  assert.ok(h.publications.length > 0 && h.publications.length < 30, `history length ${h.publications.length}`);
  h.publications.forEach((p, k) => assert.equal(p.data.i, k, 'history not in order from the position'));
  assert.equal(h.offset, 31);
  const small = await withTimeout(sub.history({ limit: 5 }), WAIT_MS, 'history limit 5');
  assert.equal(small.publications.length, 5);
  await sleep(300);
  assert.ok(!c.closeEvents.some((e) => e.code === 3008), `closed as slow: ${JSON.stringify(c.closeEvents)}`);
  assert.equal(c.state, 'connected');
});

// ---------------------------------------------------------------------------
// Tests N: namespace options the SDK's behaviour depends on (issue 14).
// ---------------------------------------------------------------------------

e2e('N1: a subscription created without recoverable recovers missed publications on a force_recovery namespace', async (env) => {
  const c = env.client('plain');
  await env.connect(c);
  const sub = env.subscription(c, 'forced:room'); // no `recoverable` option
  const pubs = new PubCollector(sub);
  const first = await env.subscribe(sub);
  assert.equal(first.recoverable, true, JSON.stringify(first));
  c.disconnect();
  for (let n = 1; n <= 5; n++) {
    const r = await apiPost('publish', JSON.stringify({ channel: 'forced:room', data: { n } }));
    assert.equal(r.status, 200, r.text);
  }
  const again = waitEvent(sub, 'subscribed', 'the resubscribe');
  c.connect();
  const ctx = await again;
  assert.equal(ctx.wasRecovering, true, JSON.stringify(ctx));
  assert.equal(ctx.recovered, true, JSON.stringify(ctx));
  await pubs.waitCount(5, 'the recovered publications');
  assert.deepEqual(pubs.data(), [1, 2, 3, 4, 5].map((n) => ({ n })));
});

e2e('N2: an RPC without a handler is answered 108 not available and the connection stays', async (env) => {
  const c = env.client('rpc');
  await env.connect(c);
  await assert.rejects(withTimeout(c.rpc('sum', { a: 1 }), WAIT_MS, 'rpc'), (e) => e.code === 108);
  assert.equal(c.state, 'connected');
});
