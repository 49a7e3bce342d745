// Helpers shared by the SDK test scripts (e2e.mjs, protobuf.mjs,
// redis-chaos.mjs): the harness of the node:test suites (a fanfare process per
// script, SDK clients whose frames are logged and dumped on failure), and
// timing, ports and child output from tests/common/harness.mjs.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import WebSocket from 'ws';
import { EventSource } from 'eventsource';
import { freePort, onLines, sleep, spawnLogged, stamp, stopChild, waitUntil, withTimeout } from '../common/harness.mjs';

// The suites import these from here, with the harness below.
export { freePort, onLines, sleep, stamp, waitUntil, withTimeout };

export const WAIT_MS = 10_000; // bound for every single wait
const HEALTH_TIMEOUT_MS = 20_000; // bound for the server to become healthy
export const STOP_GRACE_MS = 5_000; // SIGTERM -> SIGKILL
const VERBOSE = process.env.FANFARE_E2E_VERBOSE === '1';


// ---------------------------------------------------------------------------
// Generic helpers
// ---------------------------------------------------------------------------

/**
 * Resolves with the first `event` of `emitter` whose ctx passes `filter`.
 * The listener is registered synchronously, so call this BEFORE triggering the event.
 */
export function waitEvent(emitter, event, what, { filter = () => true, timeout = WAIT_MS } = {}) {
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
export class PubCollector {
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

export async function twoDistinctFreePorts() {
  const a = await freePort();
  for (let i = 0; i < 20; i++) {
    const b = await freePort();
    if (b !== a) return [a, b];
  }
  throw new Error('could not find two distinct free ports');
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

export class Server {
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
    // spawnLogged: no drain delay or period (stopped with SIGTERM and
    // expected gone at once); child.listening once it holds its ports.
    const child = spawnLogged(`server#${gen}`, this.bin, ['--config', this.configPath], serverLog, {
      RUST_LOG: process.env.RUST_LOG || 'info',
    });
    this.child = child;

    // Poll /health until 200, the process dies, or the bound is reached;
    // only after the process logged that it holds its ports, as a /health
    // answer alone may come from another suite's node that took the port.
    const deadline = Date.now() + HEALTH_TIMEOUT_MS;
    let last = 'no attempt';
    while (Date.now() < deadline) {
      if (child.exitInfo) {
        this.child = null;
        throw new Error(
          `fanfare exited before becoming healthy: ${JSON.stringify(child.exitInfo)}\n${serverTail()}`,
        );
      }
      if (!child.listening) {
        last = 'not listening yet';
        await sleep(50);
        continue;
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
    const info = await stopChild(child, { graceMs: STOP_GRACE_MS });
    return { ...info, killed: info.signal === 'SIGKILL' };
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

export function serverTail(n = 60) {
  return `--- last server output ---\n${serverLog.lines.slice(-n).join('\n')}\n--- end server output ---`;
}

// ---------------------------------------------------------------------------
// SDK clients with raw frame logging
// ---------------------------------------------------------------------------

export const allSockets = new Set();
const allClients = new Set();
const unhandled = [];

function truncate(s, n = 2000) {
  return s.length > n ? `${s.slice(0, n)}...(${s.length} bytes)` : s;
}

/** A `ws` WebSocket subclass that records every frame in `log` (and, when
 * given, reports every received frame to `onBytes(size, data, isBinary)`);
 * `wsOptions` go to the `ws` constructor (e.g. `{ headers }` of the upgrade
 * request, which a browser would send as its cookies). */
export function loggingWebSocket(label, log, onBytes = () => {}, wsOptions = undefined) {
  return class LoggingWebSocket extends WebSocket {
    constructor(url, protocols) {
      super(url, protocols, wsOptions);
      allSockets.add(this);
      log.push(`${stamp()} ${label} ~ dial ${url}`);
      this.on('open', () => log.push(`${stamp()} ${label} ~ open`));
      this.on('message', (raw, isBinary) => {
        // A Buffer, or an ArrayBuffer where the SDK set binaryType (the
        // Protobuf build).
        const data = raw instanceof ArrayBuffer ? Buffer.from(raw) : raw;
        onBytes(data.length, data, isBinary);
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

/** Whether a WebSocket frame is a server ping alone: the empty reply, `{}` in
 * JSON, a zero length prefix (one 0x00 byte) in Protobuf. */
function isServerPing(data, isBinary) {
  if (isBinary) return data.length === 1 && data[0] === 0;
  return data.toString() === '{}';
}

/** `fetch` that logs the emulation requests and stream responses of `label`. */
function loggingFetch(label, log) {
  return async (url, init = {}) => {
    const what = String(url).replace(/^http:\/\/[^/]+/, '');
    const body = typeof init.body === 'string' ? truncate(init.body) : `[${init.body?.length ?? 0} bytes]`;
    log.push(`${stamp()} ${label} > ${init.method ?? 'GET'} ${what} ${body}`);
    const r = await fetch(url, init);
    log.push(`${stamp()} ${label} < ${r.status} ${what}`);
    return r;
  };
}

/** Per-test environment: creates clients, dumps their frames on failure, cleans up. */
class Env {
  constructor(name, suite) {
    this.name = name;
    this.suite = suite;
    this.clients = [];
    this.log = [];
  }

  /**
   * A client built with the suite's Centrifuge class, or with `Centrifuge`
   * when given; over the WebSocket, or only over `transport` ('http_stream'
   * or 'sse', the bidirectional emulation centrifuge-js falls back to).
   * `headers`: extra headers of the WebSocket upgrade request (a browser's
   * cookies); `options`: more SDK options.
   */
  client(label, { Centrifuge = this.suite.Centrifuge, transport = 'websocket', headers, options: extra } = {}) {
    const counter = { bytes: 0, pings: 0 };
    const onFrame = (n, data, isBinary) => {
      counter.bytes += n;
      if (isServerPing(data, isBinary)) counter.pings += 1;
    };
    const options = {
      websocket: loggingWebSocket(label, this.log, onFrame, headers ? { headers } : undefined),
      minReconnectDelay: 100,
      maxReconnectDelay: 500,
      timeout: 5000,
    };
    let endpoint = this.suite.server.wsUrl;
    if (transport !== 'websocket') {
      const base = `http://127.0.0.1:${this.suite.server.httpPort}`;
      endpoint = [{ transport, endpoint: `${base}/connection/${transport}` }];
      Object.assign(options, {
        emulationEndpoint: `${base}/emulation`,
        fetch: loggingFetch(label, this.log),
        readableStream: ReadableStream,
        eventsource: EventSource,
      });
    }
    const c = new Centrifuge(endpoint, { ...options, ...extra });
    c.label = label;
    // WebSocket payload bytes received over all of the client's connections
    // (emulated transports are not counted).
    Object.defineProperty(c, 'bytesReceived', { get: () => counter.bytes });
    // Server pings received over its WebSocket connections (frames that are
    // a ping alone; an idle client gets them so).
    Object.defineProperty(c, 'pingsReceived', { get: () => counter.pings });
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

/**
 * Declares the suite of one test script: registers `before`/`after` hooks that
 * start a fanfare process with `config(httpPort, grpcPort)` (TOML) on free
 * loopback ports and stop it, and returns `{ server, e2e }`: `server` is set
 * once `before` ran; `e2e(name, fn)` declares a test that runs `fn(env)` with
 * an `Env` whose clients are built with `Centrifuge` (the JSON or the Protobuf
 * build of centrifuge-js) and dumps diagnostics on failure.
 */
export function sdkSuite({ Centrifuge, config }) {
  const suite = { Centrifuge, server: null, e2e: null };
  let tmpDir = null;

  process.on('unhandledRejection', (reason) => {
    // centrifuge-js reports exceptions while dispatching replies as unhandled
    // rejections; record them (they mean the SDK choked on something) instead of
    // crashing the test process.
    unhandled.push(reason);
    process.stderr.write(`${stamp()} unhandled rejection: ${reason?.stack || reason}\n`);
  });

  suite.e2e = function e2e(name, fn, timeout = 40_000) {
    test(name, { timeout }, async () => {
      const env = new Env(name, suite);
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
  };

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
    if (suite.server) suite.server.killNow();
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
    tmpDir = fs.mkdtempSync(path.join(os.tmpdir(), 'fanfare-e2e-'));
    const configPath = path.join(tmpDir, 'config.toml');
    // A port picked free can be taken before the node binds it (it exits
    // then): retry on new ports.
    for (let attempt = 1; ; attempt++) {
      const [httpPort, grpcPort] = await twoDistinctFreePorts();
      fs.writeFileSync(configPath, config(httpPort, grpcPort));
      suite.server = new Server(bin, configPath, httpPort);
      suite.server.grpcPort = grpcPort;
      try {
        await suite.server.start();
        break;
      } catch (err) {
        if (attempt === 3 || suite.server.child !== null) throw err;
      }
    }
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
    if (suite.server) {
      const how = await suite.server.stop();
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

  return suite;
}
