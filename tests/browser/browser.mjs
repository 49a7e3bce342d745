// centrifuge-js in headless Chromium (Playwright) against the real fanfare
// binary, once per transport the client is limited to: websocket, http_stream
// and sse (the last two through `/emulation` for the client's commands).
//
// Run:  FANFARE_BIN=/abs/path/to/fanfare tests/browser/run.sh
//
// The page is served by a static server of this script on its own loopback
// port, so the SDK talks to the nodes cross-origin, as a site does that runs
// its fanfare nodes on another host: the nodes allow that origin
// (`websocket.allowed_origins`), and the HTTP transports need CORS.
//
// Per transport: a client connects (as a JWT user), subscribes to a channel
// with history, presence and forced recovery, publishes and receives, reads
// presence and history; then its node is stopped (SIGTERM by PID), a second
// node on the same Redis publishes what the client misses, the first node is
// started again on the same port, and the client must come back by itself
// with exactly the missed publications, once and in order. http_stream and
// sse run a second time with `/emulation` on the other node, as behind a load
// balancer without session affinity. Last, the same page served from an
// origin the nodes do not list must get no connection over any transport.
//
// Every wait is bounded; on a failure the page's console, its network traffic
// and the output of the processes during that test are printed
// (FANFARE_E2E_VERBOSE=1: for passing tests too).

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { launchChromium } from './chromium.mjs';
import { freePort, redisPing, sleep, spawnLogged as spawnInto, stamp, stopChild as stopGracefully, redisNodeToml, startRetrying, waitFanfare, waitReady } from '../common/harness.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const BIN = process.env.FANFARE_BIN;
const SECRET = 'browser-e2e-secret';
const WAIT_MS = 10_000; // bound for every single wait
const STOP_GRACE_MS = 5_000; // SIGTERM -> SIGKILL
/** SIGTERM, then SIGKILL after STOP_GRACE_MS; resolves once the process is gone. */
const stopChild = (child) => stopGracefully(child, { graceMs: STOP_GRACE_MS });
const VERBOSE = process.env.FANFARE_E2E_VERBOSE === '1'; // print the logs of passing scenarios too

/** An HS256 connection JWT for `user`, valid for an hour. */
function jwt(user) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const payload = { sub: user, exp: Math.floor(Date.now() / 1000) + 3600 };
  const head = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(payload)}`;
  return `${head}.${crypto.createHmac('sha256', SECRET).update(head).digest('base64url')}`;
}

// ---------------------------------------------------------------------------
// Processes (killed by PID at exit at the latest, see tests/common/harness.mjs);
// their output lines go to the suite log that a failure prints.
// ---------------------------------------------------------------------------

// Unbounded: a run writes a few hundred lines; each scenario prints its own part.
const processLog = [];
const spawnLogged = (label, cmd, args) => spawnInto(label, cmd, args, processLog);

/**
 * A fanfare node on the suite's Redis. `start()` may be called again after
 * `stop()`: it then comes back on the same ports with the same config.
 */
class Node {
  constructor(name, { redisPort, pageOrigin, dir }) {
    this.name = name;
    this.child = null;
    this.httpPort = null;
    this.toml = (httpPort, grpcPort) => `${redisNodeToml(name, httpPort, grpcPort)}
[redis]
urls = ["redis://127.0.0.1:${redisPort}"]

[auth]
hmac_secret = "${SECRET}"

[websocket]
# The page's origin only: a deployment lists its sites, not "*".
allowed_origins = ["${pageOrigin}"]

[shutdown]
# The clients reconnect at once; no need to wait the default 5 s for them.
drain_timeout = "1s"

[transports]
# On by default; said here because the page depends on them.
http_stream = true
sse = true

[[namespaces]]
name = "room"
allow_publish = true
presence = true
history_size = 100
history_ttl = "300s"
# The page's subscription does not ask for recovery; the namespace makes it recoverable.
force_recovery = true
`;
    this.configPath = path.join(dir, `${name}.toml`);
  }

  get origin() {
    return `http://127.0.0.1:${this.httpPort}`;
  }

  /** Starts the node: on fresh ports the first time, on the same ones after a stop. */
  async start() {
    if (this.httpPort !== null) return this.startOnce();
    return startRetrying(async () => {
      this.httpPort = await freePort();
      let grpcPort = await freePort();
      while (grpcPort === this.httpPort) grpcPort = await freePort();
      fs.writeFileSync(this.configPath, this.toml(this.httpPort, grpcPort));
      return this.startOnce();
    });
  }

  async startOnce() {
    this.child = spawnLogged(`fanfare ${this.name}:${this.httpPort}`, BIN, ['--config', this.configPath]);
    await waitFanfare(this.child, `fanfare ${this.name}`, async () => {
      const res = await fetch(`${this.origin}/ready`, { signal: AbortSignal.timeout(1000) });
      await res.arrayBuffer();
      return res.status === 200;
    });
  }

  async stop() {
    await stopChild(this.child);
    this.child = null;
  }

  /** The value of gauge `name` with `labels` in `/metrics` (0 when not shown). */
  async gauge(name, labels) {
    const res = await fetch(`${this.origin}/metrics`, { signal: AbortSignal.timeout(WAIT_MS) });
    const want = `${name}{${Object.entries(labels).map(([k, v]) => `${k}="${v}"`).join(',')}} `;
    const line = (await res.text()).split('\n').find((l) => l.startsWith(want));
    return line ? Number(line.slice(want.length)) : 0;
  }

  /** `POST /api/<method>` (loopback callers need no key); the JSON reply. */
  async api(method, body) {
    const res = await fetch(`${this.origin}/api/${method}`, {
      method: 'POST',
      body: JSON.stringify(body),
      signal: AbortSignal.timeout(WAIT_MS),
    });
    const text = await res.text();
    assert.equal(res.status, 200, `${this.name} /api/${method} answered ${res.status}: ${text}`);
    return JSON.parse(text);
  }
}

// ---------------------------------------------------------------------------
// The suite: one Redis, one static server for the page, one browser.
// ---------------------------------------------------------------------------

const suite = {
  redis: null,
  redisPort: null,
  pageServer: null, // serves the page from the origin the nodes allow
  pageOrigin: null,
  strangerServer: null, // the same page from an origin the nodes do not list
  strangerOrigin: null,
  browser: null,
  dir: null,
};

/**
 * Serves page.html at `/`, centrifuge-js's ESM build (self-contained: no bare
 * imports) at `/centrifuge.mjs` and the package's browser bundle of its
 * Protobuf build at `/centrifuge.protobuf.js`.
 */
function startPageServer() {
  const js = 'text/javascript; charset=utf-8';
  const files = {
    '/': ['text/html; charset=utf-8', path.join(HERE, 'page.html')],
    '/centrifuge.mjs': [js, path.join(HERE, 'node_modules/centrifuge/build/index.mjs')],
    '/centrifuge.protobuf.js': [js, path.join(HERE, 'node_modules/centrifuge/dist/centrifuge.protobuf.js')],
  };
  const server = http.createServer((req, res) => {
    const file = files[new URL(req.url, 'http://x').pathname];
    if (!file) {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(200, { 'content-type': file[0], 'cache-control': 'no-store' });
    fs.createReadStream(file[1]).pipe(res);
  });
  return new Promise((resolve, reject) => {
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => resolve(server));
  });
}

before(async () => {
  assert.ok(BIN && path.isAbsolute(BIN) && fs.existsSync(BIN), `FANFARE_BIN must be the absolute path of the fanfare binary, got ${BIN}`);
  suite.dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fanfare-browser-'));

  // History lives in Redis, so it outlives the node restart. Nothing is saved
  // to disk: the Redis itself is never restarted here.
  suite.redisPort = await freePort();
  suite.redis = spawnLogged(`redis:${suite.redisPort}`, 'redis-server', [
    '--port', String(suite.redisPort), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', suite.dir, '--loglevel', 'warning',
  ]);
  await waitReady(suite.redis, 'redis-server', () => redisPing(suite.redisPort, suite.redis.pid));

  suite.pageServer = await startPageServer();
  suite.pageOrigin = `http://127.0.0.1:${suite.pageServer.address().port}`;
  suite.strangerServer = await startPageServer();
  suite.strangerOrigin = `http://127.0.0.1:${suite.strangerServer.address().port}`;
  suite.browser = await launchChromium();
});

after(async () => {
  if (suite.browser) await suite.browser.close().catch(() => {});
  for (const server of [suite.pageServer, suite.strangerServer]) {
    if (!server) continue;
    server.closeAllConnections();
    server.close();
  }
  await stopChild(suite.redis);
  if (suite.dir) fs.rmSync(suite.dir, { recursive: true, force: true });
});

// ---------------------------------------------------------------------------
// A page with its console and network traffic logged.
// ---------------------------------------------------------------------------

function short(s, n = 300) {
  return s.length > n ? `${s.slice(0, n)}...(${s.length} chars)` : s;
}

/**
 * A new page at `origin`, its console and traffic written to `log`;
 * `pageErrors` collects uncaught exceptions (the SDK choking on something).
 */
async function openPage(log, { origin = suite.pageOrigin, build = 'json' } = {}) {
  const context = await suite.browser.newContext();
  const page = await context.newPage();
  const pageErrors = [];
  page.on('console', (m) => log.push(`${stamp()} [console.${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => {
    pageErrors.push(String(e));
    log.push(`${stamp()} [pageerror] ${e.stack || e}`);
  });
  page.on('request', (r) => {
    if (r.url().startsWith(origin)) return;
    log.push(`${stamp()} [net >] ${r.method()} ${short(r.url())} ${short(r.postData() || '')}`);
  });
  page.on('response', (r) => {
    if (r.url().startsWith(origin)) return;
    const h = r.headers();
    const cors = Object.keys(h).filter((k) => k.startsWith('access-control-')).map((k) => `${k}: ${h[k]}`).join('; ');
    log.push(`${stamp()} [net <] ${r.status()} ${r.request().method()} ${short(r.url())} ${h['content-type'] || ''} {${cors}}`);
  });
  page.on('requestfailed', (r) => log.push(`${stamp()} [net !] ${r.method()} ${short(r.url())} failed: ${r.failure()?.errorText}`));
  page.on('websocket', (ws) => {
    log.push(`${stamp()} [ws ~] open ${ws.url()}`);
    ws.on('framesent', (f) => log.push(`${stamp()} [ws >] ${short(String(f.payload))}`));
    ws.on('framereceived', (f) => log.push(`${stamp()} [ws <] ${short(String(f.payload))}`));
    ws.on('socketerror', (e) => log.push(`${stamp()} [ws !] ${e}`));
    ws.on('close', () => log.push(`${stamp()} [ws ~] close ${ws.url()}`));
  });
  await page.goto(`${origin}/?build=${build}`, { timeout: WAIT_MS });
  await page.waitForFunction(() => window.fxReady === true, null, { timeout: WAIT_MS });
  return { context, page, pageErrors };
}

/** Waits (bounded) until `fn(arg)` is truthy in the page. */
function pageWait(page, fn, arg, what) {
  return page.waitForFunction(fn, arg, { timeout: WAIT_MS, polling: 50 }).catch((err) => {
    throw new Error(`timed out after ${WAIT_MS} ms waiting for ${what} (${err.message.split('\n')[0]})`);
  });
}

/** The page's record of SDK events (see page.html). */
const pageState = (page) =>
  page.evaluate(() => {
    const { client, sub, ...rest } = window.fx.state;
    return { ...rest, clientState: client?.state, subState: sub?.state };
  });

// ---------------------------------------------------------------------------
// One scenario per transport.
// ---------------------------------------------------------------------------

const TRANSPORTS = {
  websocket: (node) => ({ transport: 'websocket', endpoint: `ws://127.0.0.1:${node.httpPort}/connection/websocket` }),
  http_stream: (node) => ({ transport: 'http_stream', endpoint: `${node.origin}/connection/http_stream` }),
  sse: (node) => ({ transport: 'sse', endpoint: `${node.origin}/connection/sse` }),
};

/** Prints a scenario's page log and the process output since `processFrom`. */
function dump(name, err, log, processFrom) {
  process.stderr.write(
    `\n===== ${name}: ${err ? `FAILED =====\n${err.stack || err}` : 'passed ====='}\n` +
      `--- page console, SDK events and network (net/ws: > sent, < received, ! failed) ---\n${log.join('\n')}\n` +
      `--- processes (redis, fanfare nodes) ---\n${processLog.slice(processFrom).join('\n')}\n` +
      `===== end ${name} =====\n\n`,
  );
}

/**
 * Declares a test that runs `fn(log)` with a fresh log for the page, and
 * prints that log and the processes' output on a failure. A `todo` test (a
 * known server bug, named in `todo`) runs and reports, but does not fail the
 * run; its logs are printed only with FANFARE_E2E_VERBOSE=1.
 */
function browserTest(name, fn, { todo } = {}) {
  test(name, { timeout: 90_000, todo }, async () => {
    const log = [];
    const processFrom = processLog.length;
    try {
      await fn(log);
      if (todo) process.stderr.write(`${name}: passes now; drop its todo (${todo})\n`);
      if (VERBOSE) dump(name, null, log, processFrom);
    } catch (err) {
      if (todo && !VERBOSE) process.stderr.write(`${name}: fails as expected (TODO: ${todo}): ${err.message.split('\n')[0]}\n`);
      else dump(name, err, log, processFrom);
      throw err;
    }
  });
}

/**
 * The scenario over `transport`, with centrifuge-js's `build` ('json' or
 * 'protobuf'). With `commandsViaOtherNode` the client's `/emulation` requests
 * go to the second node, as behind a load balancer without session affinity:
 * that node forwards them to the session's node.
 */
function scenario(transport, { build = 'json', commandsViaOtherNode = false, todo } = {}) {
  const variant = `${transport}${build === 'json' ? '' : `-${build}`}${commandsViaOtherNode ? '-via-b' : ''}`;
  const title =
    `${transport}${build === 'json' ? '' : ` (${build} build)`}` +
    `${commandsViaOtherNode ? ' with /emulation on the other node' : ''}`;
  browserTest(`${title}: connect, publish, receive, presence, history; recovery after the node restarts`, async (log) => {
    const nodeOpts = { redisPort: suite.redisPort, pageOrigin: suite.pageOrigin, dir: suite.dir };
    const a = new Node(`a-${variant}`, nodeOpts);
    const b = new Node(`b-${variant}`, nodeOpts);
    const channel = `room:${variant}`;
    const user = `user-${variant}`;
    let context = null;
    try {
      await Promise.all([a.start(), b.start()]);
      let page, pageErrors;
      ({ context, page, pageErrors } = await openPage(log, { build }));

      await page.evaluate((args) => window.fx.start(args), {
        transports: [TRANSPORTS[transport](a)],
        options: { emulationEndpoint: `${(commandsViaOtherNode ? b : a).origin}/emulation`, token: jwt(user) },
        channel,
      });
      // A client that gave up (`disconnected`) will not come back: stop waiting.
      await pageWait(
        page,
        () => window.fx.state.subscribed.length === 1 || window.fx.state.disconnected.length > 0,
        null,
        `the page's client to connect over ${transport} and subscribe to ${channel}`,
      );
      let st = await pageState(page);
      assert.deepEqual(st.disconnected, [], `the client gave up connecting over ${transport}`);
      assert.equal(st.connected.length, 1);
      assert.equal(st.connected[0].transport, transport, 'the client connected over another transport than the only one it was given');
      const firstClient = st.connected[0].client;
      assert.equal(st.subscribed[0].recoverable, true, 'force_recovery should make the subscription recoverable');

      // Publish from the page; the page's own subscription receives it, in order.
      const sent = [1, 2, 3].map((n) => ({ from: 'page', n }));
      for (const data of sent) await page.evaluate((d) => window.fx.publish(d), data);
      await pageWait(page, () => window.fx.state.pubs.length >= 3, null, 'the page to receive its 3 publications');
      st = await pageState(page);
      assert.deepEqual(st.pubs.map((p) => p.data), sent);
      const base = st.pubs[0].offset;
      assert.deepEqual(st.pubs.map((p) => p.offset), [base, base + 1, base + 2], 'offsets of consecutive publications');

      // Presence: this client, as the token's user.
      assert.deepEqual(await page.evaluate(() => window.fx.presence()), [{ client: firstClient, user }]);

      // History: the three publications, oldest first.
      assert.deepEqual(await page.evaluate(() => window.fx.history(100)), st.pubs);

      // The node goes away (SIGTERM by PID: it closes clients with 3001 and exits).
      await a.stop();
      await pageWait(page, () => window.fx.clientState() === 'connecting', null, 'the client to notice the node is gone and try to reconnect');
      // Told why over its own transport (a close frame, or a disconnect push on
      // the stream), not left to find a broken connection.
      st = await pageState(page);
      assert.deepEqual(st.connecting.slice(1), [{ code: 3001, reason: 'shutdown' }], 'why the client reconnects');

      // Published on the other node while the client's node is down: missed.
      const missed = [1, 2, 3].map((n) => ({ from: 'api', n }));
      for (const [i, data] of missed.entries()) {
        const res = await b.api('publish', { channel, data });
        assert.equal(res.offset, base + 3 + i, `offset of publication ${i + 1} published on the second node`);
      }
      st = await pageState(page);
      assert.equal(st.pubs.length, 3, 'nothing can reach the client while its node is down');

      // The node comes back on the same port; the client returns by itself and
      // recovers exactly what it missed, once, in order.
      await a.start();
      await pageWait(page, () => window.fx.state.subscribed.length === 2, null, 'the client to reconnect and resubscribe');
      await pageWait(page, () => window.fx.state.pubs.length >= 6, null, 'the 3 missed publications');
      await sleep(500); // a duplicate would show up by now
      st = await pageState(page);
      assert.equal(st.subscribed[1].wasRecovering, true, `the resubscribe should have asked to recover: ${JSON.stringify(st.subscribed[1])}`);
      assert.equal(st.subscribed[1].recovered, true, `the resubscribe should report a recovery: ${JSON.stringify(st.subscribed[1])}`);
      assert.deepEqual(st.pubs.map((p) => p.data), [...sent, ...missed], 'publications after the restart (missed ones exactly once, in order)');
      assert.deepEqual(st.pubs.map((p) => p.offset), [0, 1, 2, 3, 4, 5].map((i) => base + i));
      assert.equal(st.connected.length, 2);
      assert.equal(st.connected[1].transport, transport, 'reconnected over another transport');
      assert.deepEqual(st.disconnected, [], 'the client gave up instead of reconnecting');
      const secondClient = st.connected[1].client;

      // Live again: a publication from the page arrives, history kept everything
      // across the restart, and presence shows the new connection only.
      await page.evaluate((d) => window.fx.publish(d), { from: 'page', n: 4 });
      await pageWait(page, () => window.fx.state.pubs.length >= 7, null, 'the publication after the restart');
      st = await pageState(page);
      assert.deepEqual(st.pubs[6], { data: { from: 'page', n: 4 }, offset: base + 6 });
      assert.deepEqual(await page.evaluate(() => window.fx.history(100)), st.pubs);
      assert.deepEqual(await page.evaluate(() => window.fx.presence()), [{ client: secondClient, user }]);
      // The Protobuf build hands the page bytes, the JSON build parsed JSON.
      const dataType = build === 'protobuf' ? 'bytes' : 'json';
      assert.deepEqual(st.dataTypes, st.pubs.map(() => dataType), `publication data as the ${build} build gives it`);
      assert.deepEqual(pageErrors, [], 'uncaught exceptions in the page');
    } finally {
      if (context) await context.close().catch(() => {});
      await Promise.all([a.stop(), b.stop()]);
    }
  }, { todo });
}

for (const transport of Object.keys(TRANSPORTS)) scenario(transport);
scenario('http_stream', { commandsViaOtherNode: true });
scenario('sse', { commandsViaOtherNode: true });
// SSE carries text only: centrifuge-js offers it to the JSON build alone.
// The Protobuf scenarios have a JWT user, so the connect reply carries the
// personal channel's (empty) server-side subscription: its map value must be
// written even when empty (protobufjs decodes a missing one as null and
// centrifuge-js throws), which anonymous Protobuf clients never exercised.
scenario('websocket', { build: 'protobuf' });
scenario('http_stream', { build: 'protobuf' });

// The nodes list only the page's origin: the same page served from another
// origin must not get a connection over any transport, and the refusal must
// be the node's (no connection held), not just the browser hiding a reply.
browserTest('a page from an origin the nodes do not allow connects over no transport', async (log) => {
  const node = new Node('origin-check', { redisPort: suite.redisPort, pageOrigin: suite.pageOrigin, dir: suite.dir });
  try {
    await node.start();
    for (const [transport, endpoint] of Object.entries(TRANSPORTS)) {
      log.push(`${stamp()} ----- ${transport} from ${suite.strangerOrigin}`);
      const { context, page } = await openPage(log, { origin: suite.strangerOrigin });
      try {
        await page.evaluate((args) => window.fx.start(args), {
          transports: [endpoint(node)],
          options: { emulationEndpoint: `${node.origin}/emulation`, token: jwt('stranger') },
          channel: 'room:stranger',
        });
        // Two failed attempts (refused, and refused again on the retry), or a connection.
        await pageWait(page, () => window.fx.state.errors.length >= 2 || window.fx.state.connected.length > 0, null, `${transport}: two failed connection attempts`);
        const st = await pageState(page);
        assert.deepEqual(st.connected, [], `${transport}: connected from ${suite.strangerOrigin}, which websocket.allowed_origins does not list`);
        assert.equal(await node.gauge('fanfare_transport_connections', { transport }), 0, `${transport}: the node holds a connection from the refused origin`);
      } finally {
        await context.close().catch(() => {});
      }
    }
  } finally {
    await node.stop();
  }
});
