// The unidirectional SSE transport read by a plain EventSource (npm
// `eventsource`, the WHATWG EventSource in Node), no Centrifugo SDK: it
// receives publications, and after the connection drops it reconnects by
// itself with `Last-Event-ID` and gets exactly the publications it missed.
//
// Run:  FANFARE_BIN=/abs/path/to/fanfare node --test tests/sdk/uni-sse.mjs
// Harness (server process, logs on failure): util.mjs.

import assert from 'node:assert/strict';
import { Centrifuge } from 'centrifuge';
import { EventSource } from 'eventsource';
import { WAIT_MS, sdkSuite, withTimeout } from './util.mjs';

function configToml(httpPort, grpcPort) {
  return `[http]
listen = "127.0.0.1:${httpPort}"

[grpc]
listen = "127.0.0.1:${grpcPort}"

[transports]
uni_sse = true

[[namespaces]]
name = ""
allow_publish = true
history_size = 100
history_ttl = "300s"
`;
}

const suite = sdkSuite({ Centrifuge, config: configToml });

async function api(method, body) {
  const res = await fetch(`http://127.0.0.1:${suite.server.httpPort}/api/${method}`, {
    method: 'POST',
    body: JSON.stringify(body),
    signal: AbortSignal.timeout(WAIT_MS),
  });
  assert.equal(res.status, 200, await res.clone().text());
  return res.json();
}

/** Messages of an EventSource, with a way to wait for the next matching one. */
class Inbox {
  constructor(es) {
    this.items = [];
    this.waiters = [];
    this.opens = 0;
    es.addEventListener('open', () => {
      this.opens += 1;
    });
    es.addEventListener('message', (e) => {
      this.items.push({ id: e.lastEventId, data: JSON.parse(e.data) });
      for (const w of [...this.waiters]) w();
    });
  }
  next(pred, what) {
    const find = () => this.items.find(pred);
    return withTimeout(
      new Promise((resolve) => {
        const check = () => {
          const hit = find();
          if (hit) {
            this.waiters.splice(this.waiters.indexOf(check), 1);
            resolve(hit);
          }
        };
        this.waiters.push(check);
        check();
      }),
      WAIT_MS,
      what,
    );
  }
  pubs() {
    return this.items.filter((m) => m.data.pub).map((m) => m.data.pub.data.n);
  }
}

suite.e2e('U1: a plain EventSource receives publications and resumes with Last-Event-ID exactly once', async () => {
  const connect = encodeURIComponent(JSON.stringify({ subs: { feed: {} } }));
  const es = new EventSource(`http://127.0.0.1:${suite.server.httpPort}/connection/uni_sse?cf_connect=${connect}`);
  const inbox = new Inbox(es);
  try {
    const first = await inbox.next((m) => m.data.connect, 'the connect push');
    const client = first.data.connect.client;
    for (let n = 1; n <= 3; n++) await api('publish', { channel: 'feed', data: { n } });
    await inbox.next((m) => m.data.pub?.data.n === 3, 'publication 3');

    // The server drops this connection; meanwhile 4 and 5 are published.
    await api('disconnect', { client });
    await inbox.next((m) => m.data.disconnect, 'the disconnect push');
    for (let n = 4; n <= 5; n++) await api('publish', { channel: 'feed', data: { n } });
    // The EventSource reconnects by itself (its own retry delay), sending the
    // id of the last event it saw.
    await inbox.next((m) => m.data.pub?.data.n === 5, 'the missed publications after the reconnect');
    assert.equal(inbox.opens, 2, 'one reconnect');
    await api('publish', { channel: 'feed', data: { n: 6 } });
    await inbox.next((m) => m.data.pub?.data.n === 6, 'a live publication after the reconnect');
    assert.deepEqual(inbox.pubs(), [1, 2, 3, 4, 5, 6], 'every publication once, in order');
  } finally {
    es.close();
  }
}, 30_000);
