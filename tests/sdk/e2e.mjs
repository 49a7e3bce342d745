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
