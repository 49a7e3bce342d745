// Fossil delta compression with the real centrifuge-js decoders: a
// subscription with `delta: 'fossil'` must hand the app exactly what a
// subscription without it gets, over 100 publications of a slowly changing
// 2 KB document with a recovery in the middle, in the JSON build (data as
// JSON strings, `JsonCodec.applyDeltaIfNeeded`) and in the Protobuf build
// (`centrifuge/build/protobuf`, binary deltas), also over the http_stream and
// sse fallbacks. Bytes on the wire are measured per WebSocket client and
// printed (docs/BENCHMARKS.md, "Delta compression").
//
// Run:  FANFARE_BIN=/abs/path/to/fanfare node --test tests/sdk/delta.mjs
//  or:  FANFARE_BIN=/abs/path/to/fanfare tests/sdk/run.sh

import assert from 'node:assert/strict';
import { Centrifuge } from 'centrifuge';
import { Centrifuge as ProtobufCentrifuge } from 'centrifuge/build/protobuf';
import { PubCollector, WAIT_MS, sdkSuite, sleep, waitEvent, withTimeout } from './util.mjs';

function configToml(httpPort, grpcPort) {
  return `[http]
listen = "127.0.0.1:${httpPort}"

[grpc]
listen = "127.0.0.1:${grpcPort}"

[[namespaces]]
name = "doc"
allow_publish = true
history_size = 200
history_ttl = "300s"
allowed_delta_types = ["fossil"]

[[namespaces]]
name = "plain"
allow_publish = true
history_size = 200
history_ttl = "300s"
`;
}

const { e2e } = sdkSuite({ Centrifuge, config: configToml });

/** Version `v` of a ~2 KB document: one of its 40 fields and the version change. */
function doc(v) {
  const d = {};
  for (let i = 0; i < 40; i++) {
    const touched = i === v % 40 ? v : 0;
    d[`field${String(i).padStart(2, '0')}`] = `value of field ${i}, last touched by version ${touched}`;
  }
  d.version = v;
  return d;
}

const text = (v) => JSON.stringify(doc(v));

/**
 * A subscriber without delta and one with it follow `channel` over 100
 * publications; both go away after 50, miss ten, and recover them. Returns
 * both clients and subscriptions for the caller's checks. `asText` turns a
 * publication's data as the SDK hands it out into the JSON text.
 */
async function hundredPublicationsWithRecovery(env, SubCentrifuge, channel, asText) {
  const publisher = env.client('publisher');
  const plain = env.client('plain', { Centrifuge: SubCentrifuge });
  const delta = env.client('delta', { Centrifuge: SubCentrifuge });
  await Promise.all([publisher, plain, delta].map((c) => env.connect(c)));
  const ps = env.subscription(plain, channel, { recoverable: true });
  const ds = env.subscription(delta, channel, { recoverable: true, delta: 'fossil' });
  const plainPubs = new PubCollector(ps);
  const deltaPubs = new PubCollector(ds);
  await Promise.all([env.subscribe(ps), env.subscribe(ds)]);
  const publish = (v) => withTimeout(publisher.publish(channel, doc(v)), WAIT_MS, `publish ${v}`);

  for (let v = 1; v <= 50; v++) await publish(v);
  await Promise.all([plainPubs.waitCount(50, 'plain: 1..50'), deltaPubs.waitCount(50, 'delta: 1..50')]);

  for (const c of [plain, delta]) {
    const gone = waitEvent(c, 'disconnected', `${c.label} to disconnect`);
    c.disconnect();
    await gone;
  }
  for (let v = 51; v <= 60; v++) await publish(v);
  const recovered = [ps, ds].map((s) =>
    waitEvent(s, 'subscribed', `${s.channel} resubscribed`, { filter: (ctx) => ctx.wasRecovering }),
  );
  plain.connect();
  delta.connect();
  for (const ctx of await Promise.all(recovered)) {
    assert.equal(ctx.recovered, true, `recovery: ${JSON.stringify(ctx)}`);
  }
  await Promise.all([plainPubs.waitCount(60, 'plain: 51..60'), deltaPubs.waitCount(60, 'delta: 51..60')]);
  for (let v = 61; v <= 100; v++) await publish(v);
  await Promise.all([plainPubs.waitCount(100, 'plain: 61..100'), deltaPubs.waitCount(100, 'delta: 61..100')]);
  await sleep(200);

  assert.equal(plainPubs.items.length, 100, 'no duplicate');
  assert.equal(deltaPubs.items.length, 100, 'no duplicate');
  for (let i = 0; i < 100; i++) {
    const want = text(i + 1);
    assert.equal(asText(plainPubs.items[i].data), want, `without delta, version ${i + 1}`);
    assert.equal(asText(deltaPubs.items[i].data), want, `with delta, version ${i + 1}, byte for byte`);
    assert.equal(deltaPubs.items[i].offset, plainPubs.items[i].offset);
  }
  // Full: the first live one (nothing to apply it to) and the first recovered
  // one (the base may be gone after a reconnect); all others are deltas.
  const stats = ds.deltaStats();
  assert.equal(stats.numPublications, 100, JSON.stringify(stats));
  assert.equal(stats.numFullPayloads, 2, JSON.stringify(stats));
  assert.equal(stats.numDeltaPayloads, 98, JSON.stringify(stats));
  assert.equal(ps.deltaStats().numDeltaPayloads, 0);

  const dataBytes = plainPubs.items.reduce((n, _p, i) => n + text(i + 1).length, 0);
  process.stderr.write(
    `delta (${SubCentrifuge === Centrifuge ? 'JSON' : 'Protobuf'}): 100 publications, ${dataBytes} B of data; ` +
      `WebSocket payload bytes received without delta ${plain.bytesReceived}, with fossil delta ` +
      `${delta.bytesReceived} (${(plain.bytesReceived / delta.bytesReceived).toFixed(1)}x less); ` +
      `SDK deltaStats ${JSON.stringify(stats)}\n`,
  );
  assert.ok(delta.bytesReceived * 5 < plain.bytesReceived, `${delta.bytesReceived} B with delta, ${plain.bytesReceived} B without`);
}

e2e('D1: JSON build: a delta subscription gets exactly what one without gets, across a recovery, for far fewer bytes', async (env) => {
  await hundredPublicationsWithRecovery(env, Centrifuge, 'doc:json', (data) => JSON.stringify(data));
}, 60_000);

e2e('D2: Protobuf build: the same with binary fossil deltas', async (env) => {
  const dec = new TextDecoder('utf-8', { fatal: true });
  await hundredPublicationsWithRecovery(env, ProtobufCentrifuge, 'doc:protobuf', (data) => dec.decode(data));
}, 60_000);

e2e('D3: delta in a namespace that does not allow it is declined; publications come in full', async (env) => {
  for (const SubCentrifuge of [Centrifuge, ProtobufCentrifuge]) {
    const publisher = env.client('publisher');
    const c = env.client('sub', { Centrifuge: SubCentrifuge });
    await Promise.all([env.connect(publisher), env.connect(c)]);
    const channel = `plain:${SubCentrifuge === Centrifuge ? 'json' : 'protobuf'}`;
    const s = env.subscription(c, channel, { delta: 'fossil' });
    const pubs = new PubCollector(s);
    await env.subscribe(s);
    for (let v = 1; v <= 3; v++) await withTimeout(publisher.publish(channel, doc(v)), WAIT_MS, `publish ${v}`);
    await pubs.waitCount(3, 'three publications');
    const asText = SubCentrifuge === Centrifuge ? (d) => JSON.stringify(d) : (d) => new TextDecoder().decode(d);
    assert.deepEqual(pubs.items.map((p) => asText(p.data)), [1, 2, 3].map(text));
    assert.equal(s.deltaStats().numDeltaPayloads, 0);
  }
});

e2e('D4: delta over the browser fallbacks (http_stream in both builds, sse) decodes the same', async (env) => {
  const publisher = env.client('publisher');
  const subs = [
    ['http_stream JSON', Centrifuge, 'http_stream'],
    ['http_stream Protobuf', ProtobufCentrifuge, 'http_stream'],
    ['sse JSON', Centrifuge, 'sse'],
  ].map(([label, SubCentrifuge, transport]) => {
    const c = env.client(label, { Centrifuge: SubCentrifuge, transport });
    const asText = SubCentrifuge === Centrifuge ? (d) => JSON.stringify(d) : (d) => new TextDecoder().decode(d);
    return { c, asText };
  });
  await Promise.all([publisher, ...subs.map((s) => s.c)].map((c) => env.connect(c)));
  for (const s of subs) {
    s.sub = env.subscription(s.c, 'doc:fallback', { recoverable: true, delta: 'fossil' });
    s.pubs = new PubCollector(s.sub);
  }
  await Promise.all(subs.map((s) => env.subscribe(s.sub)));
  for (let v = 1; v <= 20; v++) await withTimeout(publisher.publish('doc:fallback', doc(v)), WAIT_MS, `publish ${v}`);
  for (const s of subs) {
    await s.pubs.waitCount(20, `${s.c.label}: 20 publications`);
    assert.deepEqual(s.pubs.items.map((p) => s.asText(p.data)), Array.from({ length: 20 }, (_, i) => text(i + 1)), s.c.label);
    assert.equal(s.sub.deltaStats().numDeltaPayloads, 19, `${s.c.label}: ${JSON.stringify(s.sub.deltaStats())}`);
  }
});
