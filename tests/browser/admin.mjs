// The admin console (`/admin`, decision 33) in headless Chromium (Playwright)
// against three real fanfare nodes on a real Redis Cluster of three masters
// (no replicas; tests/common/redis-cluster.mjs, `redis.cluster = true` with the
// masters as seeds), the console enabled on the first: a wrong password is
// refused and the right one accepted; the Nodes page lists all three nodes
// (and each master serves them); a centrifuge-js client on
// another node (in a second page) receives what the console publishes, and
// the Channels and Channel pages show its subscription, presence and the
// publication in history; disconnecting its user from the console closes its
// connection; the live in/out rates move. A screenshot of each page is saved
// as admin-*.png in target/admin-screenshots/, or in ADMIN_SCREENSHOTS
// (=docs/images for the README's, committed). Also, without
// the browser: the console's API calls without a token get 401, and a node
// without admin.enabled has no /admin (404).
//
// Run:  FANFARE_BIN=/abs/path/to/fanfare tests/browser/run.sh
// (token expiry and the sign-in rate limit: crates/fanfare-server/tests/admin.rs)

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { launchChromium } from './chromium.mjs';
import { freePort, sleep, spawnLogged as spawnInto, redisNodeToml, stamp, startRetrying, stopChild, waitFanfare } from '../common/harness.mjs';
import { RedisCluster, infoField, redisCommand } from '../common/redis-cluster.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const BIN = process.env.FANFARE_BIN;
// Where the screenshots go: ADMIN_SCREENSHOTS=docs/images refreshes the
// README's (a fresh run differs in uptimes and client ids, so not by default).
const IMAGES = path.resolve(process.env.ADMIN_SCREENSHOTS || path.join(HERE, '../../target/admin-screenshots'));
const SECRET = 'admin-e2e-jwt-secret';
const API_KEY = 'admin-e2e-api-key';
const PASSWORD = 'admin-e2e password';
const ADMIN_SECRET = crypto.randomBytes(32).toString('hex');
const WAIT_MS = 15_000; // bound for every single wait (node announcements come every 5 s)
const VERBOSE = process.env.FANFARE_E2E_VERBOSE === '1';
// The client page's origin: a static server of this script on loopback (a
// page Playwright made up is of no address space, and Chromium blocks its
// connections to loopback: Local Network Access).
let CLIENT_ORIGIN = null;

const processLog = [];
const spawnLogged = (label, cmd, args) => spawnInto(label, cmd, args, processLog);

function jwt(user) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const head = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64({ sub: user, exp: Math.floor(Date.now() / 1000) + 3600 })}`;
  return `${head}.${crypto.createHmac('sha256', SECRET).update(head).digest('base64url')}`;
}

/** The client page (its parameters in the query) and centrifuge-js's ESM build. */
const CLIENT_PAGE = `<!doctype html><script type="module">
import { Centrifuge } from '/centrifuge.mjs';
const q = new URLSearchParams(location.search);
window.events = [];
const push = (e) => window.events.push(e);
// No reconnect within the test: a closed connection stays closed.
const c = new Centrifuge(q.get('endpoint'), { token: q.get('token'), minReconnectDelay: 60000, maxReconnectDelay: 60000 });
c.on('connected', (ctx) => push({ type: 'connected', client: ctx.client }));
c.on('connecting', (ctx) => push({ type: 'connecting', code: ctx.code }));
c.on('disconnected', (ctx) => push({ type: 'disconnected', code: ctx.code }));
const sub = c.newSubscription(q.get('channel'));
sub.on('subscribed', () => push({ type: 'subscribed' }));
sub.on('publication', (ctx) => push({ type: 'publication', data: ctx.data }));
sub.subscribe();
c.connect();
</script>`;

function startClientServer() {
  const sdk = path.join(HERE, 'node_modules/centrifuge/build/index.mjs');
  const server = http.createServer((req, res) => {
    const p = new URL(req.url, 'http://x').pathname;
    if (p === '/') {
      res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' }).end(CLIENT_PAGE);
    } else if (p === '/centrifuge.mjs') {
      res.writeHead(200, { 'content-type': 'text/javascript; charset=utf-8' });
      fs.createReadStream(sdk).pipe(res);
    } else {
      res.writeHead(404).end();
    }
  });
  return new Promise((resolve, reject) => {
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => resolve(server));
  });
}

const suite = { redis: null, nodes: [], browser: null, dir: null, page: null, context: null, pageLog: [] };

/**
 * A fanfare node named `name` on fresh ports, `redisToml` its `[redis]`
 * section, the console on if `admin`.
 */
const startNode = (name, redisToml, admin) => startRetrying(() => startNodeOnce(name, redisToml, admin));

async function startNodeOnce(name, redisToml, admin) {
  const httpPort = await freePort();
  let grpcPort = await freePort();
  while (grpcPort === httpPort) grpcPort = await freePort();
  const toml = `${redisNodeToml(name, httpPort, grpcPort)}
${redisToml}
[api]
# With a key, a call without one (or without a session token) is refused even from loopback.
key = "${API_KEY}"

[auth]
hmac_secret = "${SECRET}"

[admin]
enabled = ${admin}
${admin ? `password = "${PASSWORD}"\nsecret = "${ADMIN_SECRET}"` : ''}

[[namespaces]]
name = "room"
presence = true
history_size = 50
history_ttl = "300s"
`;
  const configPath = path.join(suite.dir, `${name}.toml`);
  fs.writeFileSync(configPath, toml);
  const child = spawnLogged(`fanfare ${name}:${httpPort}`, BIN, ['--config', configPath]);
  const origin = `http://127.0.0.1:${httpPort}`;
  await waitFanfare(child, `fanfare ${name}`, async () => (await fetch(`${origin}/ready`, { signal: AbortSignal.timeout(1000) })).status === 200);
  return { name, child, httpPort, origin };
}

before(async () => {
  assert.ok(BIN && path.isAbsolute(BIN) && fs.existsSync(BIN), `FANFARE_BIN must be the absolute path of the fanfare binary, got ${BIN}`);
  suite.dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fanfare-admin-'));
  // Set before start(): after() stops whatever it started, also when it failed.
  suite.redis = new RedisCluster({ log: processLog, masters: 3, replicas: 0 });
  await suite.redis.start().catch((e) => {
    console.error(`--- Redis Cluster did not start ---\n${processLog.join('\n')}`);
    throw e;
  });
  const redisToml = suite.redis.toml();
  suite.nodes = await Promise.all([
    startNode('admin-node-1', redisToml, true),
    startNode('admin-node-2', redisToml, false),
    startNode('admin-node-3', redisToml, false),
  ]);
  suite.clientServer = await startClientServer();
  CLIENT_ORIGIN = `http://127.0.0.1:${suite.clientServer.address().port}`;
  suite.browser = await launchChromium();
  suite.context = await suite.browser.newContext({ viewport: { width: 1100, height: 640 } });
  suite.page = await suite.context.newPage();
  const log = suite.pageLog;
  suite.page.on('console', (m) => log.push(`${stamp()} [console.${m.type()}] ${m.text()}`));
  suite.page.on('pageerror', (e) => log.push(`${stamp()} [pageerror] ${e.stack || e}`));
  suite.page.on('response', (r) => log.push(`${stamp()} [net <] ${r.status()} ${r.request().method()} ${r.url()}`));
  fs.mkdirSync(IMAGES, { recursive: true });
});

after(async () => {
  if (suite.browser) await suite.browser.close().catch(() => {});
  if (suite.clientServer) {
    suite.clientServer.closeAllConnections();
    suite.clientServer.close();
  }
  for (const n of suite.nodes) await stopChild(n.child);
  if (suite.redis) await suite.redis.stop();
  if (suite.dir) fs.rmSync(suite.dir, { recursive: true, force: true });
});

/** Runs `fn`; on a failure (or with FANFARE_E2E_VERBOSE=1) prints the logs. */
async function logged(name, fn) {
  const from = { p: processLog.length, g: suite.pageLog.length };
  try {
    await fn();
  } catch (e) {
    console.error(`--- ${name}: page log ---\n${suite.pageLog.slice(from.g).join('\n')}\n--- processes ---\n${processLog.slice(from.p).join('\n')}`);
    throw e;
  }
  if (VERBOSE) console.log(`--- ${name} ---\n${suite.pageLog.slice(from.g).join('\n')}\n${processLog.slice(from.p).join('\n')}`);
}

const tid = (id) => `[data-testid="${id}"]`;
const shot = (name) => suite.page.screenshot({ path: path.join(IMAGES, `admin-${name}.png`) });
const admin = () => suite.nodes[0];

/** A centrifuge-js client (the package's ESM build) in its own page, as `user` on `node`, subscribed to `channel`. */
async function clientPage(node, user, channel) {
  const context = await suite.browser.newContext();
  const page = await context.newPage();
  const log = suite.pageLog;
  page.on('console', (m) => log.push(`${stamp()} [client ${user} console.${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => log.push(`${stamp()} [client ${user} pageerror] ${e.stack || e}`));
  page.on('websocket', (ws) => {
    ws.on('framesent', (f) => log.push(`${stamp()} [client ${user} ws >] ${String(f.payload).slice(0, 300)}`));
    ws.on('framereceived', (f) => log.push(`${stamp()} [client ${user} ws <] ${String(f.payload).slice(0, 300)}`));
  });
  const endpoint = `ws://127.0.0.1:${node.httpPort}/connection/websocket`;
  const query = new URLSearchParams({ endpoint, token: jwt(user), channel });
  await page.goto(`${CLIENT_ORIGIN}/?${query}`, { timeout: WAIT_MS });
  await page.waitForFunction(() => window.events?.some((e) => e.type === 'subscribed'), null, { timeout: WAIT_MS }).catch(async (e) => {
    throw new Error(`client ${user} did not subscribe: ${JSON.stringify(await page.evaluate(() => window.events))} (${e.message.split('\n')[0]})`);
  });
  return { context, page, events: () => page.evaluate(() => window.events) };
}

test('the console API refuses calls without a session token and a node without admin.enabled has no console', async () => {
  await logged('security', async () => {
    const r = await fetch(`${admin().origin}/api/info`, { method: 'POST', body: '{}' });
    assert.equal(r.status, 401);
    const forged = await fetch(`${admin().origin}/api/info`, { method: 'POST', body: '{}', headers: { authorization: `token ${Date.now() + 3600_000}.AAAA` } });
    assert.equal(forged.status, 401);
    for (const p of ['/admin', '/admin/console.js']) {
      assert.equal((await fetch(`${suite.nodes[1].origin}${p}`)).status, 404, p);
    }
  });
});

test('sign-in is refused with a wrong password and accepted with the right one', async () => {
  await logged('sign-in', async () => {
    const page = suite.page;
    await page.goto(`${admin().origin}/admin`, { timeout: WAIT_MS });
    await page.fill(tid('password'), 'not the password');
    await page.click(tid('login'));
    await page.waitForFunction((s) => document.querySelector(s)?.textContent.includes('Wrong password'), tid('login-error'), { timeout: WAIT_MS });
    assert.equal(await page.isVisible(tid('nodes')), false, 'the console stays closed');
    await shot('signin');
    await page.fill(tid('password'), PASSWORD);
    await page.click(tid('login'));
    await page.waitForSelector(tid('nodes'), { state: 'visible', timeout: WAIT_MS });
  });
});

test('the nodes page shows all three nodes of the Redis Cluster started by the test', async () => {
  await logged('nodes', async () => {
    const page = suite.page;
    // The page refreshes every 3 s; nodes announce themselves every 5 s.
    await page.waitForFunction(() => document.querySelectorAll('[data-testid="node-row"]').length === 3, null, { timeout: WAIT_MS });
    const names = await page.$$eval('[data-testid="node-row"] td:first-child', (tds) => tds.map((td) => td.textContent));
    assert.deepEqual(names, ['admin-node-1', 'admin-node-2', 'admin-node-3']);
    // They share the cluster, not one of its servers: every master has
    // clients besides the one asking (the nodes' per-master connections).
    for (const m of suite.redis.masters()) {
      const clients = Number(infoField(await redisCommand(m.port, 'INFO', 'clients'), 'connected_clients'));
      assert.ok(clients > 1, `Redis master :${m.port} has no fanfare connection (connected_clients ${clients})`);
    }
    // The live rates show numbers once two samples of /metrics are in.
    await page.waitForFunction(() => /^[0-9.]+$/.test(document.querySelector('[data-testid="rate-out"]').textContent), null, { timeout: WAIT_MS });
    await shot('nodes');
  });
});

test('publishing from the console reaches a centrifuge-js client on another node', async () => {
  await logged('publish', async () => {
    const page = suite.page;
    const client = await clientPage(suite.nodes[1], 'alice', 'room:lobby');
    try {
      // Channels: the client's subscription, found with the filter.
      await page.click(tid('tab-channels'));
      await page.fill(tid('channels-filter'), 'lobby');
      await page.waitForFunction(() => [...document.querySelectorAll('[data-testid="channel-row"]')].some((tr) => tr.textContent === 'room:lobby1'), null, { timeout: WAIT_MS });
      await shot('channels');

      await page.click(tid('tab-publish'));
      await page.fill(tid('publish-channel'), 'room:lobby');
      await page.fill(tid('publish-data'), '{"text": "hello from the console"}');
      await page.click(tid('publish'));
      await page.waitForFunction((s) => document.querySelector(s).textContent.startsWith('Published'), tid('publish-result'), { timeout: WAIT_MS });
      await shot('publish');
      await client.page.waitForFunction(() => window.events.some((e) => e.type === 'publication' && e.data?.text === 'hello from the console'), null, { timeout: WAIT_MS });

      // Channel: presence lists alice, history holds the publication.
      await page.click(tid('tab-channel'));
      await page.fill(tid('channel-name'), 'room:lobby');
      await page.click(tid('channel-load'));
      await page.waitForFunction(() => document.querySelector('[data-testid="presence"] tbody').textContent.includes('alice')
        && document.querySelector('[data-testid="history"] tbody').textContent.includes('hello from the console'), null, { timeout: WAIT_MS })
        .catch(async (e) => {
          const shown = await page.evaluate(() => ['presence', 'history', 'api-error'].map((t) => document.querySelector(`[data-testid="${t}"]`).textContent));
          throw new Error(`presence/history not shown: ${JSON.stringify(shown)} (${e.message.split('\n')[0]})`);
        });
      await shot('channel');
    } finally {
      await client.context.close();
    }
  });
});

test('the live rates show the messages this node writes to its clients', async () => {
  await logged('rates', async () => {
    const page = suite.page;
    const client = await clientPage(admin(), 'carol', 'room:rates');
    try {
      const rateOut = () => page.$eval(tid('rate-out'), (b) => Number(b.textContent));
      // Publications (through another node) for the client on this node,
      // until the rate shows them: at most 60, over at most WAIT_MS.
      const deadline = Date.now() + WAIT_MS;
      let seen = 0;
      for (let i = 0; i < 60 && seen === 0 && Date.now() < deadline; i++) {
        const r = await fetch(`${suite.nodes[1].origin}/api/publish`, {
          method: 'POST',
          headers: { authorization: `apikey ${API_KEY}` },
          body: JSON.stringify({ channel: 'room:rates', data: { i } }),
        });
        assert.equal(r.status, 200);
        await sleep(100);
        seen = await rateOut();
      }
      assert.ok(seen > 0, `rate-out stayed ${seen} while publications went out`);
    } finally {
      await client.context.close();
    }
  });
});

test('disconnecting a user from the console closes its connection', async () => {
  await logged('disconnect', async () => {
    const page = suite.page;
    const client = await clientPage(suite.nodes[2], 'bob', 'room:bob');
    try {
      await page.click(tid('tab-disconnect'));
      await page.fill(tid('disconnect-user'), 'bob');
      await page.click(tid('disconnect'));
      await page.waitForFunction((s) => document.querySelector(s).textContent.startsWith('Disconnected'), tid('disconnect-result'), { timeout: WAIT_MS });
      // The SDK reports the server's close code (3000 and up) in `disconnected`
      // or, for a code it may reconnect after, in `connecting`.
      const closedByServer = (e) => (e.type === 'disconnected' || e.type === 'connecting') && e.code >= 3000;
      await client.page.waitForFunction(`window.events.some(${closedByServer})`, null, { timeout: WAIT_MS }).catch(async (e) => {
        throw new Error(`bob's connection was not closed: ${JSON.stringify(await client.events())} (${e.message.split('\n')[0]})`);
      });
      const before = (await client.events()).filter(closedByServer);
      assert.equal(before.length, 1, JSON.stringify(before));
      await shot('disconnect');
    } finally {
      await client.context.close();
    }
  });
});
