// Chaos tests of fanfare nodes sharing Redis, driven by the real centrifuge-js SDK.
//
// Run:  FANFARE_BIN=/abs/path/to/fanfare tests/sdk/run-redis.sh
//
// Each test starts its own redis-server (on a free port, in a temp dir) and
// fanfare nodes, and stops every process it started by PID at the end. Every
// wait is bounded. On a failure the client events and the tail of every
// process log are printed to stderr.
//
// 1. Redis is SIGKILLed and restarted on the same port while a publisher keeps
//    publishing: /ready goes 503 and back, delivery resumes by itself, and
//    subscribers using recovery end with every publication exactly once, in
//    order. Redis runs with an fsynced append-only file, so the stream
//    survives the restart and recovery can succeed.
// 2. The same without persistence: the stream is lost, and clients are told so
//    (recovered: false), never left with a silent gap.
// 3. One fanfare node is SIGKILLed: its clients reconnect (through a TCP proxy
//    standing in for a load balancer) to another node and recover.

import assert from 'node:assert/strict';
import {
  CHANNEL, WAIT_MS, assertExactlyOnce, chaosTest, distinctSeqs, jwt, publishAll,
  startNodes, startProxy, startRedis, waitUntil, watchReady,
} from './chaos-lib.mjs';
import { sleep, withTimeout } from './util.mjs';

// ---------------------------------------------------------------------------
// 1. Redis SIGKILLed and restarted mid-stream (persistent Redis)
// ---------------------------------------------------------------------------

chaosTest('redis killed and restarted mid-stream: delivery resumes, /ready 503 then 200, recovery is exact', async (env) => {
  const N = 400;
  const KILL_AT = 120;
  const DOWN_MS = 1500;
  const redis = await startRedis(env, { persistent: true });
  const [a, b, c] = await startNodes(env, redis, ['A', 'B', 'C']);

  const publisher = env.client('publisher@A', a.wsUrl);
  const subscribers = [
    env.client('s1@B', b.wsUrl),
    env.client('s2@B', b.wsUrl),
    env.client('s3@C', c.wsUrl),
    // A user: the node also joins it to its personal channel (server-side).
    env.client('sam@C', c.wsUrl, jwt({ sub: 'sam', exp: Math.floor(Date.now() / 1000) + 600 })),
  ];
  await Promise.all([publisher, ...subscribers].map((cl) => env.connect(cl)));
  const subs = [];
  for (const cl of subscribers) subs.push(await env.subscribe(cl, CHANNEL));

  const ready = watchReady([a, b, c]);
  let killedAt = 0;
  let restartedAt = 0;
  let resumedAt = 0;
  let restart = Promise.resolve();
  const { ambiguous, errors } = await publishAll(env, publisher, N, {
    onSeq: async (seq) => {
      if (seq === KILL_AT + 1) resumedAt = Date.now(); // the first publish acknowledged after the kill
      if (seq !== KILL_AT) return;
      env.note(`SIGKILL redis pid ${redis.child.pid}`);
      killedAt = Date.now();
      await redis.kill();
      restart = (async () => {
        await sleep(DOWN_MS);
        await redis.start();
        restartedAt = Date.now();
        env.note(`redis restarted, pid ${redis.child.pid}`);
      })();
    },
  });
  await withTimeout(restart, WAIT_MS, 'redis restart');
  await waitUntil(() => subs.every((s) => distinctSeqs(s) >= N), WAIT_MS,
    `every subscriber to have ${N} publications (have ${subs.map(distinctSeqs)})`).catch((e) => {
    throw new Error(`${e.message}; have ${subs.map((s) => `${s.label}:${distinctSeqs(s)}`).join(' ')}`);
  });
  await sleep(500); // duplicates would arrive now
  await waitUntil(() => [a, b, c].every((n) => ready.seen.get(n.name).at(-1)?.status === 200), 5000, '/ready 200 on every node');
  await ready.stop();

  assert.ok(errors > 0, 'the publisher never saw the outage (kill too late?)');
  for (const n of [a, b, c]) {
    const seen = ready.seen.get(n.name);
    const during = seen.filter((s) => s.t >= killedAt && s.status === 503);
    assert.ok(during.length > 0, `/ready of ${n.name} never answered 503 during the outage: ${JSON.stringify(seen)}`);
    assert.equal(seen.at(-1).status, 200, `/ready of ${n.name} at the end: ${JSON.stringify(seen)}`);
  }
  let retried = 0;
  for (const s of subs) {
    retried += assertExactlyOnce(s, N, ambiguous);
    // Resubscribed after the restart, and the recovery succeeded.
    const after = s.subscribedEvents.filter((e) => e.t >= killedAt);
    assert.ok(after.length > 0, `${s.label} never resubscribed after the Redis restart`);
    for (const e of after) {
      assert.equal(e.wasRecovering, true, `${s.label}: ${JSON.stringify(e)}`);
      assert.equal(e.recovered, true, `${s.label}: persistent Redis keeps the stream, recovery must succeed: ${JSON.stringify(e)}`);
    }
  }
  // The user's server-side (personal) subscription cannot be resubscribed by
  // the SDK: its connection was closed with 3010 and it reconnected.
  const sam = subscribers[3];
  assert.ok(sam.codes.includes(3010), `sam must be reconnected with 3010, saw ${JSON.stringify(sam.codes)}`);
  assert.ok(sam.connectedCount >= 2, 'sam reconnected');
  process.stderr.write(`redis outage: ${restartedAt - killedAt} ms, ${errors} failed publishes retried, ${ambiguous.size} ambiguous seqs, ${retried} duplicates of retried publishes seen\n`);
  // For docs/BENCHMARKS.md, next to the Redis Cluster failover times. The
  // publisher retries every 100 ms, so this is exact to ~100 ms.
  process.stderr.write(`standalone-timing ${JSON.stringify({ kill_to_resumed_ms: resumedAt - killedAt, restarted_to_resumed_ms: resumedAt - restartedAt })}\n`);
});

// ---------------------------------------------------------------------------
// 2. Redis without persistence: the loss is reported, never silent
// ---------------------------------------------------------------------------

chaosTest('redis restarted without persistence: subscribers are told they could not recover', async (env) => {
  const redis = await startRedis(env, { persistent: false });
  const [a, b] = await startNodes(env, redis, ['A', 'B']);
  const publisher = env.client('publisher@A', a.wsUrl);
  const subscriber = env.client('s@B', b.wsUrl);
  await Promise.all([env.connect(publisher), env.connect(subscriber)]);
  const sub = await env.subscribe(subscriber, CHANNEL);
  await publishAll(env, publisher, 5);
  await waitUntil(() => sub.items.length >= 5, WAIT_MS, 'the first 5 publications');
  const firstEpoch = sub.subscribedEvents[0].streamPosition?.epoch;

  const ready = watchReady([a, b]);
  const killedAt = Date.now();
  await redis.kill();
  await sleep(500);
  await redis.start();
  await waitUntil(() => sub.subscribedEvents.length >= 2, WAIT_MS, 'the subscriber to resubscribe');
  const resub = sub.subscribedEvents[1];
  assert.equal(resub.wasRecovering, true, JSON.stringify(resub));
  assert.equal(resub.recovered, false, `the stream was lost with Redis; recovered:true would hide a gap: ${JSON.stringify(resub)}`);
  assert.notEqual(resub.streamPosition?.epoch, firstEpoch, 'a new stream has a new epoch');

  await publisher.publish(CHANNEL, { seq: 6 });
  await waitUntil(() => sub.items.length >= 6, WAIT_MS, 'publication 6 after the restart');
  assert.deepEqual(sub.items.map((i) => i.seq), [1, 2, 3, 4, 5, 6]);
  assert.equal(sub.items[5].offset, 1, 'first publication of the new stream');
  await waitUntil(() => [a, b].every((n) => ready.seen.get(n.name).at(-1)?.status === 200), 5000, '/ready 200');
  await ready.stop();
  for (const n of [a, b]) {
    const seen = ready.seen.get(n.name);
    assert.ok(seen.some((s) => s.t >= killedAt && s.status === 503), `/ready of ${n.name}: ${JSON.stringify(seen)}`);
  }
});

// ---------------------------------------------------------------------------
// 3. A fanfare node SIGKILLed: its clients move to another node and recover
// ---------------------------------------------------------------------------

chaosTest('a node killed with SIGKILL: its clients reconnect to another node and recover', async (env) => {
  const N = 300;
  const KILL_AT = 100;
  const redis = await startRedis(env, { persistent: false });
  const [a, b, c] = await startNodes(env, redis, ['A', 'B', 'C']);
  const proxy = await startProxy(env, a.port);
  const lbUrl = `ws://127.0.0.1:${proxy.port}/connection/websocket`;

  const publisher = env.client('publisher@C', c.wsUrl);
  const movers = [env.client('m1@lb', lbUrl), env.client('m2@lb', lbUrl), env.client('m3@lb', lbUrl)];
  const stayer = env.client('s@B', b.wsUrl);
  await Promise.all([publisher, stayer, ...movers].map((cl) => env.connect(cl)));
  const subs = [];
  for (const cl of [...movers, stayer]) subs.push(await env.subscribe(cl, CHANNEL));
  assert.equal(proxy.accepted.get(a.port), movers.length, 'the movers start on node A');

  let killedAt = 0;
  const { ambiguous } = await publishAll(env, publisher, N, {
    onSeq: async (seq) => {
      if (seq !== KILL_AT) return;
      // From now on the "load balancer" sends new connections to B.
      proxy.target = b.port;
      env.note(`SIGKILL node A pid ${a.child.pid}`);
      killedAt = Date.now();
      await a.kill();
    },
  });
  await waitUntil(() => subs.every((s) => distinctSeqs(s) >= N), WAIT_MS,
    `every subscriber to have ${N} publications`).catch((e) => {
    throw new Error(`${e.message}; have ${subs.map((s) => `${s.label}:${distinctSeqs(s)}`).join(' ')}`);
  });
  await sleep(500);

  for (const s of subs) assertExactlyOnce(s, N, ambiguous);
  assert.equal(proxy.accepted.get(b.port), movers.length, 'each mover reconnected once, to node B');
  for (const [i, cl] of movers.entries()) {
    assert.equal(cl.connectedCount, 2, `${cl.label} connected twice`);
    const after = subs[i].subscribedEvents.filter((e) => e.t >= killedAt);
    assert.equal(after.length, 1, `${cl.label} resubscribed once: ${JSON.stringify(after)}`);
    assert.equal(after[0].wasRecovering, true, JSON.stringify(after[0]));
    assert.equal(after[0].recovered, true, `${cl.label} must recover what it missed: ${JSON.stringify(after[0])}`);
  }
  assert.equal(stayer.connectedCount, 1, 'the client on B was not disturbed');
});
