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

import { test } from 'node:test';
import assert from 'node:assert/strict';
import http2 from 'node:http2';
import { Centrifuge } from 'centrifuge';
import WebSocket from 'ws';
import {
  PubCollector,
  WAIT_MS,
  allSockets,
  loggingWebSocket,
  sdkSuite,
  sleep,
  waitEvent,
  withTimeout,
} from './util.mjs';

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

const suite = sdkSuite({ Centrifuge, config: configToml });
const e2e = suite.e2e;

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

  const stopped = await suite.server.stop();
  assert.ok(stopped, 'server was not running');
  const goneCtx = await sGoesAway;
  // Stay down for a while: the SDK's reconnect attempts must fail and back off.
  await sleep(1000);
  assert.equal(s.state, 'connecting', 'S must keep trying to reconnect while the server is down');
  await suite.server.start(); // same config file => same ports

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
    const ws = new WebSocket(suite.server.wsUrl);
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
  const res = await fetch(`http://127.0.0.1:${suite.server.httpPort}/api/${method}`, {
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
      const session = http2.connect(`http://127.0.0.1:${suite.server.grpcPort}`);
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
  const raw = new (loggingWebSocket('raw', env.log))(suite.server.wsUrl);
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
