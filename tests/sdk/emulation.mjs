// End-to-end test of the bidirectional emulation (`/connection/http_stream`,
// `/connection/sse`, `POST /emulation`) with the real centrifuge-js, forced
// to one transport each: the JSON build over HTTP streaming and SSE, the
// Protobuf build over HTTP streaming (binary stream and emulation requests).
// The same SDK in headless Chromium: tests/browser.
//
// Run:  FANFARE_BIN=/abs/path/to/fanfare node --test tests/sdk/emulation.mjs
// Harness (server process, logs on failure): util.mjs.

import assert from 'node:assert/strict';
import { Centrifuge } from 'centrifuge';
import { Centrifuge as ProtobufCentrifuge } from 'centrifuge/build/protobuf';
import { PubCollector, WAIT_MS, sdkSuite, sleep, waitEvent, waitUntil, withTimeout } from './util.mjs';

function configToml(httpPort, grpcPort) {
  return `[http]
listen = "127.0.0.1:${httpPort}"

[grpc]
listen = "127.0.0.1:${grpcPort}"

# Short pings: the streams must carry them without any pong coming back (E4).
# The pong timeout is just under the interval (the node wants it shorter):
# the WebSocket clients must pong within it, and a test process stalled on a
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
const dec = new TextDecoder();

const variants = [
  { name: 'JSON over http_stream', transport: 'http_stream', Centrifuge, wrap: (v) => v, unwrap: (d) => d },
  { name: 'JSON over sse', transport: 'sse', Centrifuge, wrap: (v) => v, unwrap: (d) => d },
  {
    name: 'Protobuf over http_stream',
    transport: 'http_stream',
    Centrifuge: ProtobufCentrifuge,
    wrap: (v) => enc.encode(JSON.stringify(v)),
    unwrap: (d) => JSON.parse(dec.decode(d)),
  },
];

for (const [i, v] of variants.entries()) {
  e2e(`E${i + 1}: ${v.name}: connect, subscribe, publish, receive, presence, history, recovery`, async (env) => {
    const channel = `emu-${v.transport}-${i}`;
    const a = env.client('a', { Centrifuge: v.Centrifuge, transport: v.transport });
    // A WebSocket client of the JSON build on the same channel: both
    // directions cross transports.
    const w = env.client('ws', { Centrifuge });
    const [connected] = await Promise.all([env.connect(a), env.connect(w)]);
    assert.equal(connected.transport, v.transport, 'the forced transport is the one used');

    const sa = env.subscription(a, channel, { recoverable: true });
    const sw = env.subscription(w, channel);
    const pa = new PubCollector(sa);
    const pw = new PubCollector(sw);
    await Promise.all([env.subscribe(sa), env.subscribe(sw)]);

    await withTimeout(a.publish(channel, v.wrap({ from: 'a', n: 1 })), WAIT_MS, 'publish from a');
    await withTimeout(w.publish(channel, { from: 'ws', n: 2 }), WAIT_MS, 'publish from ws');
    await pa.waitCount(2, 'both publications at a');
    await pw.waitCount(2, 'both publications at ws');
    assert.deepEqual(pa.items.map((p) => v.unwrap(p.data)), [{ from: 'a', n: 1 }, { from: 'ws', n: 2 }]);
    assert.deepEqual(pw.items.map((p) => p.data), [{ from: 'a', n: 1 }, { from: 'ws', n: 2 }]);

    const presence = await withTimeout(sa.presence(), WAIT_MS, 'presence');
    assert.equal(Object.keys(presence.clients).length, 2, JSON.stringify(presence));
    const history = await withTimeout(sa.history({ limit: 10 }), WAIT_MS, 'history');
    assert.deepEqual(history.publications.map((p) => p.offset), [1, 2]);

    // Recovery: a is disconnected, misses two publications, comes back over
    // the same transport and gets exactly those two, in order.
    a.disconnect();
    await withTimeout(w.publish(channel, { n: 3 }), WAIT_MS, 'publish 3');
    await withTimeout(w.publish(channel, { n: 4 }), WAIT_MS, 'publish 4');
    const resubscribed = waitEvent(sa, 'subscribed', 'resubscribe with recovery');
    a.connect();
    const ctx = await resubscribed;
    assert.equal(ctx.recovered, true, JSON.stringify(ctx));
    await pa.waitCount(4, 'the two missed publications');
    assert.deepEqual(pa.items.slice(2).map((p) => v.unwrap(p.data)), [{ n: 3 }, { n: 4 }]);
    assert.deepEqual(pa.items.map((p) => p.offset), [1, 2, 3, 4]);

    // An RPC without a handler: 108, and the connection stays usable.
    await assert.rejects(withTimeout(a.rpc('nothing', v.wrap({})), WAIT_MS, 'rpc'), (e) => e.code === 108);
    await withTimeout(a.publish(channel, v.wrap({ n: 5 })), WAIT_MS, 'publish after the rpc');
    await pw.waitCount(5, 'the last publication at ws');
  });
}

e2e(`E${variants.length + 1}: pings over the streams expect no pong: the emulated clients stay connected across several pings`, async (env) => {
  const clients = variants.map((v, i) => env.client(`${v.transport}-${i}`, { Centrifuge: v.Centrifuge, transport: v.transport }));
  // A WebSocket client next to them: its pings are counted (the streams'
  // are not visible to the test), so the wait does not depend on the
  // node's speed.
  const ws = env.client('ws');
  await Promise.all([...clients, ws].map((c) => env.connect(c)));
  // Three pings reach the WebSocket client (the first 1-2 s after
  // connecting, every 2 s after that); the emulated sessions get theirs on
  // the same schedule. A session that waited for a pong would be closed
  // with 3012 1.9 s after its first ping, and the SDK would reconnect.
  await waitUntil(() => ws.pingsReceived >= 3, 20_000, 'three server pings at the WebSocket client');
  await sleep(2500);
  for (const c of [...clients, ws]) {
    assert.equal(c.state, 'connected', c.label);
    assert.equal(c.connectedCount, 1, `${c.label} reconnected: ${JSON.stringify(c.closeEvents)}`);
  }
});
