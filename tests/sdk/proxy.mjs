// Proxies (issue 15) with the real centrifuge-js (JSON and Protobuf builds):
// a tiny Node HTTP backend answers fanfare's proxy calls in Centrifugo's HTTP
// JSON shape (one path per call kind). The SDK connects with no token and a
// session cookie on the WebSocket upgrade (as a browser would send it): the
// connect proxy names the user, a denied subscribe ends as `unsubscribed`
// with code 103, a publication is rewritten by the backend before it is
// delivered, and an RPC makes the round trip.
//
// Run:  FANFARE_BIN=/abs/path/to/fanfare node --test tests/sdk/proxy.mjs

import assert from 'node:assert/strict';
import http from 'node:http';
import { after } from 'node:test';
import { Centrifuge } from 'centrifuge';
import { Centrifuge as ProtobufCentrifuge } from 'centrifuge/build/protobuf';
import { PubCollector, WAIT_MS, sdkSuite, waitEvent, withTimeout } from './util.mjs';

// ---------------------------------------------------------------------------
// The backend: records each call (kind, body, lowercase headers).
// ---------------------------------------------------------------------------

const calls = [];

function cookie(headers, name) {
  for (const part of (headers.cookie || '').split(';')) {
    const [k, v] = part.trim().split('=');
    if (k === name) return v;
  }
  return null;
}

/** The client's payload: `data` (JSON client) or `b64data` (Protobuf client). */
function payload(body) {
  if (body.b64data) return { binary: true, value: Buffer.from(body.b64data, 'base64') };
  return { binary: false, value: body.data };
}

/** A result field `data` in the shape the request came in. */
function dataField(binary, value) {
  return binary ? { b64data: Buffer.from(JSON.stringify(value)).toString('base64') } : { data: value };
}

const answers = {
  connect(body, headers) {
    const user = cookie(headers, 'session');
    if (!user) return { disconnect: { code: 4501, reason: 'no session' } };
    return {
      result: {
        user,
        info: { name: user.toUpperCase() },
        data: { welcome: user },
        channels: ['js-news'],
        meta: { tenant: 'js' },
      },
    };
  },
  subscribe(body) {
    if (body.channel.includes('deny')) return { error: { code: 103, message: 'permission denied' } };
    return { result: { info: { role: 'member' }, data: { motd: `hello ${body.channel}` } } };
  },
  publish(body) {
    if (body.channel.includes('reject')) return { error: { code: 1001, message: 'moderated' } };
    const p = payload(body);
    const original = p.binary ? JSON.parse(p.value.toString()) : p.value;
    return { result: dataField(p.binary, { original, by: body.user, moderated: true }) };
  },
  rpc(body) {
    const p = payload(body);
    const data = p.binary ? JSON.parse(p.value.toString()) : p.value;
    if (body.method !== 'echo') return { error: { code: 1404, message: `no method ${body.method}` } };
    return { result: dataField(p.binary, { echo: data, user: body.user, meta: body.meta }) };
  },
};

const backend = http.createServer((req, res) => {
  let raw = '';
  req.setEncoding('utf8');
  req.on('data', (c) => (raw += c));
  req.on('end', () => {
    const kind = req.url.replace(/^\/centrifugo\//, '');
    const body = JSON.parse(raw);
    calls.push({ kind, body, headers: req.headers });
    const answer = answers[kind] ? answers[kind](body, req.headers) : { error: { code: 100, message: 'kind' } };
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify(answer));
  });
});
await new Promise((resolve) => backend.listen(0, '127.0.0.1', resolve));
const backendPort = backend.address().port;
after(() => new Promise((resolve) => backend.close(resolve)));

function configToml(httpPort, grpcPort) {
  const proxy = (kind) => `[[proxies]]
name = "${kind}"
endpoint = "http://127.0.0.1:${backendPort}/centrifugo/${kind}"
timeout = "5s"
http_headers = ["Cookie"]
static_headers = { "X-From" = "fanfare" }
`;
  return `[http]
listen = "127.0.0.1:${httpPort}"

[grpc]
listen = "127.0.0.1:${grpcPort}"

[auth]
hmac_secret = "js-proxy-secret"

[client]
connect_proxy = "connect"
rpc_proxy = "rpc"

${['connect', 'subscribe', 'publish', 'rpc'].map(proxy).join('\n')}
[[namespaces]]
name = ""

[[namespaces]]
name = "room"
subscribe_proxy = "subscribe"
publish_proxy = "publish"
presence = true
`;
}

const { e2e } = sdkSuite({ Centrifuge, config: configToml });

const enc = new TextEncoder();
const dec = new TextDecoder();
const builds = [
  { name: 'JSON', Centrifuge, wrap: (v) => v, unwrap: (d) => d, protocol: 'json' },
  {
    name: 'Protobuf',
    Centrifuge: ProtobufCentrifuge,
    wrap: (v) => enc.encode(JSON.stringify(v)),
    unwrap: (d) => JSON.parse(dec.decode(d)),
    protocol: 'protobuf',
  },
];

for (const [i, b] of builds.entries()) {
  e2e(`P${i + 1}: ${b.name}: cookie connect via the proxy, subscribe denied 103, publish rewritten, rpc`, async (env) => {
    const user = `js-${b.protocol}`;
    const first = calls.length;
    const c = env.client('a', { Centrifuge: b.Centrifuge, headers: { Cookie: `session=${user}; other=1` } });
    const serverSub = waitEvent(c, 'subscribed', 'the server-side subscription of the connect answer', {
      filter: (ctx) => ctx.channel === 'js-news',
    });
    const connected = await env.connect(c);
    assert.deepEqual(b.unwrap(connected.data), { welcome: user });
    await serverSub;

    const connectCall = calls.slice(first).find((x) => x.kind === 'connect');
    assert.ok(connectCall, 'the connect proxy was called');
    assert.equal(connectCall.body.client, connected.client);
    assert.equal(connectCall.body.transport, 'websocket');
    assert.equal(connectCall.body.protocol, b.protocol);
    assert.equal(connectCall.headers.cookie, `session=${user}; other=1`);
    assert.equal(connectCall.headers['x-from'], 'fanfare');

    // Subscribe denied by the backend: unsubscribed with its code.
    const denied = env.subscription(c, 'room:deny');
    const unsubscribed = waitEvent(denied, 'unsubscribed', 'the denied subscription');
    denied.subscribe();
    const un = await unsubscribed;
    assert.equal(un.code, 103, JSON.stringify(un));

    // Allowed; presence shows the connect info and the subscribe info.
    const room = `room:lobby-${b.protocol}`;
    const sub = env.subscription(c, room);
    const subscribed = await env.subscribe(sub);
    assert.deepEqual(b.unwrap(subscribed.data), { motd: `hello ${room}` });
    const presence = await withTimeout(sub.presence(), WAIT_MS, 'presence');
    const [me] = Object.values(presence.clients);
    assert.equal(me.user, user);
    assert.deepEqual(b.unwrap(me.connInfo), { name: user.toUpperCase() });
    assert.deepEqual(b.unwrap(me.chanInfo), { role: 'member' });

    // A second client (JSON) on the room sees the rewritten publication.
    const watcher = env.client('w', { Centrifuge, headers: { Cookie: 'session=watcher' } });
    await env.connect(watcher);
    const ws = env.subscription(watcher, room);
    const pubs = new PubCollector(ws);
    await env.subscribe(ws);
    await withTimeout(c.publish(room, b.wrap({ text: 'hi' })), WAIT_MS, 'publish');
    await pubs.waitCount(1, 'the rewritten publication');
    assert.deepEqual(pubs.data(), [{ original: { text: 'hi' }, by: user, moderated: true }]);
    const pubCall = calls.slice(first).find((x) => x.kind === 'publish');
    assert.equal(pubCall.body.user, user);
    assert.equal(pubCall.body.channel, room);
    assert.deepEqual(pubCall.body.meta, { tenant: 'js' });

    // Rejected: the backend's code reaches the publish promise.
    await assert.rejects(withTimeout(c.publish('room:reject', b.wrap({ text: 'spam' })), WAIT_MS, 'publish reject'),
      (e) => e.code === 1001 && e.message === 'moderated');

    // RPC round trip with the user and meta of the connect answer.
    const r = await withTimeout(c.rpc('echo', b.wrap({ q: 1 })), WAIT_MS, 'rpc');
    assert.deepEqual(b.unwrap(r.data), { echo: { q: 1 }, user, meta: { tenant: 'js' } });
    await assert.rejects(withTimeout(c.rpc('nope', b.wrap({})), WAIT_MS, 'rpc nope'), (e) => e.code === 1404);
  });
}

e2e('P3: no cookie: the connect proxy answers disconnect 4501, the SDK stops', async (env) => {
  const c = env.client('anon');
  const disconnected = waitEvent(c, 'disconnected', 'the disconnect');
  c.connect();
  const ctx = await disconnected;
  assert.equal(ctx.code, 4501, JSON.stringify(ctx));
  assert.equal(ctx.reason, 'no session');
  assert.equal(c.state, 'disconnected');
});
