// End-to-end test of fanfare's Protobuf client protocol with the Protobuf
// build of centrifuge-js (`centrifuge/build/protobuf`: subprotocol
// centrifuge-protobuf, binary frames, payloads are bytes), next to JSON
// clients of the default build on the same channels.
//
// Run:  FANFARE_BIN=/abs/path/to/fanfare node --test tests/sdk/protobuf.mjs
//  or:  FANFARE_BIN=/abs/path/to/fanfare tests/sdk/run.sh
// Harness (server process, frame logs on failure): util.mjs.

import assert from 'node:assert/strict';
import { Centrifuge as JsonCentrifuge } from 'centrifuge';
import { Centrifuge } from 'centrifuge/build/protobuf';
import { PubCollector, WAIT_MS, sdkSuite, sleep, waitEvent, waitUntil, withTimeout } from './util.mjs';

function configToml(httpPort, grpcPort) {
  return `[http]
listen = "127.0.0.1:${httpPort}"

[grpc]
listen = "127.0.0.1:${grpcPort}"

# Short pings, so the SDKs' pongs over Protobuf are exercised (P4). The pong
# timeout is just under the interval (the node wants it shorter): every
# client of every test must pong within it, and a test process stalled on a
# loaded machine must not turn into a 3012 close and a reconnect.
[client]
ping_interval = "2s"
pong_timeout = "1900ms"

[[namespaces]]
name = ""
allow_publish = true
allow_subscribe = true
history_size = 100
history_ttl = "300s"
presence = true
`;
}

const { e2e } = sdkSuite({ Centrifuge, config: configToml });

const enc = new TextEncoder();
const json = (v) => enc.encode(JSON.stringify(v));
/** Publication data as a plain byte array (the SDK hands out Uint8Array). */
const bytes = (d) => Array.from(d ?? []);

e2e('P1: Protobuf clients connect, subscribe, publish bytes, and read presence and history', async (env) => {
  const pub = env.client('pub');
  const sub = env.client('sub');
  const [connected] = await Promise.all([env.connect(sub), env.connect(pub)]);
  assert.ok(connected.client, 'connect result carries the client id');

  const s = env.subscription(sub, 'pb-room');
  const pubs = new PubCollector(s);
  await env.subscribe(s);

  // Any bytes: zero, 0xff, a newline, an invalid UTF-8 sequence.
  const binary = new Uint8Array([0, 1, 0xff, 10, 0xc3, 0x28]);
  await withTimeout(pub.publish('pb-room', binary), WAIT_MS, 'publish binary');
  await withTimeout(pub.publish('pb-room', json({ n: 2 })), WAIT_MS, 'publish JSON bytes');
  await pubs.waitCount(2, 'both publications');
  assert.deepEqual(bytes(pubs.items[0].data), bytes(binary), 'binary data byte for byte');
  assert.deepEqual(bytes(pubs.items[1].data), bytes(json({ n: 2 })));
  assert.ok(pubs.items[0].info?.client, `publisher info: ${JSON.stringify(pubs.items[0].info)}`);
  assert.deepEqual(pubs.items.map((p) => p.offset), [1, 2]);

  const presence = await withTimeout(s.presence(), WAIT_MS, 'presence');
  assert.equal(Object.keys(presence.clients).length, 1);
  const stats = await withTimeout(s.presenceStats(), WAIT_MS, 'presence stats');
  assert.equal(stats.numClients, 1);
  const history = await withTimeout(s.history({ limit: -1 }), WAIT_MS, 'history');
  assert.deepEqual(history.publications.map((p) => bytes(p.data)), [bytes(binary), bytes(json({ n: 2 }))]);
  assert.equal(history.offset, 2);
  assert.ok(history.epoch);
});

e2e('P2: a Protobuf subscription recovers what it missed while disconnected', async (env) => {
  const a = env.client('a');
  const p = env.client('p');
  await Promise.all([env.connect(a), env.connect(p)]);
  const sub = env.subscription(a, 'pb-recover', { recoverable: true });
  const pubs = new PubCollector(sub);
  await env.subscribe(sub);
  await withTimeout(p.publish('pb-recover', new Uint8Array([1])), WAIT_MS, 'publish 1');
  await pubs.waitCount(1, 'publication 1');

  const disconnected = waitEvent(a, 'disconnected', 'A disconnected');
  a.disconnect();
  await disconnected;
  for (const b of [2, 3, 4]) {
    await withTimeout(p.publish('pb-recover', new Uint8Array([b, 0xff])), WAIT_MS, `publish ${b}`);
  }
  const resubscribed = waitEvent(sub, 'subscribed', 'A resubscribed');
  a.connect();
  const ctx = await resubscribed;
  assert.equal(ctx.wasRecovering, true);
  assert.equal(ctx.recovered, true, `recovery: ${JSON.stringify(ctx)}`);
  await pubs.waitCount(4, 'the missed publications');
  await sleep(200);
  assert.deepEqual(pubs.items.map((x) => bytes(x.data)), [[1], [2, 0xff], [3, 0xff], [4, 0xff]]);
  assert.deepEqual(pubs.items.map((x) => x.offset), [1, 2, 3, 4]);
});

e2e('P3: JSON and Protobuf subscribers share a channel; binary data closes the JSON one with 3506', async (env) => {
  const pbSub = env.client('pb-sub');
  const jsonSub = env.client('json-sub', { Centrifuge: JsonCentrifuge });
  const pbPub = env.client('pb-pub');
  const jsonPub = env.client('json-pub', { Centrifuge: JsonCentrifuge });
  await Promise.all([pbSub, jsonSub, pbPub, jsonPub].map((c) => env.connect(c)));
  const pbS = env.subscription(pbSub, 'mixed');
  const jsonS = env.subscription(jsonSub, 'mixed');
  const pbPubs = new PubCollector(pbS);
  const jsonPubs = new PubCollector(jsonS);
  await Promise.all([env.subscribe(pbS), env.subscribe(jsonS)]);

  // JSON data from either kind of publisher reaches both kinds of subscriber.
  await withTimeout(jsonPub.publish('mixed', { from: 'json' }), WAIT_MS, 'JSON publish');
  await withTimeout(pbPub.publish('mixed', json({ from: 'protobuf' })), WAIT_MS, 'Protobuf publish of JSON');
  await Promise.all([pbPubs.waitCount(2, 'Protobuf subscriber'), jsonPubs.waitCount(2, 'JSON subscriber')]);
  assert.deepEqual(jsonPubs.data(), [{ from: 'json' }, { from: 'protobuf' }]);
  assert.deepEqual(pbPubs.items.map((p) => JSON.parse(new TextDecoder().decode(p.data))), [{ from: 'json' }, { from: 'protobuf' }]);

  // Binary data: the Protobuf subscriber gets the bytes, the JSON client is
  // disconnected with 3506 (inappropriate protocol, terminal), as Centrifugo does.
  const jsonGone = waitEvent(jsonSub, 'disconnected', 'the JSON client to be disconnected');
  const binary = new Uint8Array([0xde, 0xad, 0xbe, 0xef, 0]);
  await withTimeout(pbPub.publish('mixed', binary), WAIT_MS, 'binary publish');
  await pbPubs.waitCount(3, 'the binary publication');
  assert.deepEqual(bytes(pbPubs.items[2].data), bytes(binary));
  const gone = await jsonGone;
  assert.equal(gone.code, 3506, `close seen by the JSON SDK: ${JSON.stringify(gone)}`);
  assert.equal(gone.reason, 'inappropriate protocol');
  await sleep(300);
  assert.equal(jsonSub.state, 'disconnected', 'a terminal code: the JSON SDK does not reconnect into the same failure');
  assert.equal(jsonPubs.items.length, 2, 'the JSON subscriber got nothing it could not parse');

  // The JSON publisher (not subscribed) and the Protobuf clients go on.
  await withTimeout(jsonPub.publish('mixed', { after: true }), WAIT_MS, 'JSON publish after');
  await pbPubs.waitCount(4, 'the publication after the binary one');
  assert.deepEqual(JSON.parse(new TextDecoder().decode(pbPubs.items[3].data)), { after: true });
});

e2e('P4: server pings over Protobuf are answered by the SDK and keep the connection', async (env) => {
  const c = env.client('pinged');
  await env.connect(c);
  // Three pings (the first 1-2 s after connecting, then every 2 s), counted
  // rather than slept for, so a slow node only makes this take longer; then
  // past the last one's pong timeout. An unanswered ping closes the
  // connection with 3012 1.9 s after it, and the SDK reconnects.
  await waitUntil(() => c.pingsReceived >= 3, 20_000, 'three server pings');
  await sleep(2500);
  assert.equal(c.state, 'connected');
  assert.equal(c.connectedCount, 1, `reconnected: ${JSON.stringify(c.closeEvents)}`);
  const s = env.subscription(c, 'pb-ping');
  await env.subscribe(s);
});
