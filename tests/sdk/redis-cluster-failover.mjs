// Redis Cluster failover under load, driven by the real centrifuge-js SDK.
//
// Run:  FANFARE_BIN=/abs/path/to/fanfare tests/sdk/run-redis.sh
//       (or: cd tests/sdk && FANFARE_BIN=... node --test redis-cluster-failover.mjs)
//
// Each test builds its own Redis Cluster of 3 masters + 3 replicas
// (tests/common/redis-cluster.mjs: `redis-cli --cluster create
// --cluster-replicas 1`, cluster-node-timeout 2000, appendonly yes) on free
// loopback ports, starts three fanfare nodes
// (`redis.cluster = true`, the three masters as seeds), two recovering SDK
// subscribers on each node, and publishes {seq} through the HTTP API of node A
// every 5 ms. Then the master owning the channel's slot is
//
// 1. SIGKILLed: its replica is promoted after cluster-node-timeout;
// 2. or handed over by `CLUSTER FAILOVER` on its replica (no error, only
//    MOVED, and the old master drops our SSUBSCRIBE with a sunsubscribe push);
// 3. or frozen with SIGSTOP (a master cut off by the network): its replica is
//    promoted, but nothing tells our connections; the periodic slot-owner
//    check has to notice.
//
// Asserted: publishing resumes (the first acknowledged publish after the event
// within RESUME_LIMIT_MS of the promotion, FREEZE_RESUME_LIMIT_MS for 3), and
// every subscriber ends with every acknowledged publication exactly once, in
// order, with consecutive offsets. A publish that failed (or timed out) may have happened or not; it
// may appear at most once. The times (kill -> resumed, promotion -> resumed)
// are printed as one JSON line starting with `failover-timing`, for
// docs/BENCHMARKS.md.

import assert from 'node:assert/strict';
import { RedisCluster, redisCommand } from '../common/redis-cluster.mjs';
import {
  CHANNEL, WAIT_MS, chaosTest, startNodes, waitUntil,
} from './chaos-lib.mjs';
import { sleep } from './util.mjs';

const PUBLISH_EVERY_MS = 5;
// How long publishing runs before the event and after it resumed.
const BEFORE_MS = 2000;
const AFTER_MS = 3000;
// The goal is 1 s; the assertion leaves room for a loaded 2-core machine.
const RESUME_LIMIT_MS = Number(process.env.FAILOVER_RESUME_LIMIT_MS || 3000);
// A frozen master is noticed by the periodic slot-owner check (every 1 s),
// and every try to reach it waits for a timeout: 2.5-7.5 s after the
// promotion on the loaded 2-core VM, and more when the machine is busier.
// Outside issue 13's 1 s goal (which is for SIGKILL and CLUSTER FAILOVER);
// this bound only asserts that it resumes, with room for a slow machine.
const FREEZE_RESUME_LIMIT_MS = 30_000;

// ---------------------------------------------------------------------------
// Publisher: HTTP API, every 5 ms, each seq tried once
// ---------------------------------------------------------------------------

/**
 * Publishes {seq} for seq = 1, 2, ... through POST /api/publish of `node`,
 * one at a time, PUBLISH_EVERY_MS apart, until `stop()`; a failed publish is
 * not retried (the next seq follows). Before each publish it runs the pending
 * `action` (the failover), so every publish started after the event is known.
 */
function startPublisher(env, node) {
  const p = { sent: [], stopped: false, action: null };
  p.done = (async () => {
    for (let seq = 1; !p.stopped; seq++) {
      if (p.action) {
        const act = p.action;
        p.action = null;
        await act();
      }
      const rec = { seq, start: Date.now(), ok: false };
      p.sent.push(rec);
      try {
        const res = await fetch(`http://127.0.0.1:${node.port}/api/publish`, {
          method: 'POST',
          headers: { 'content-type': 'application/json' },
          body: JSON.stringify({ channel: CHANNEL, data: { seq } }),
          signal: AbortSignal.timeout(2000),
        });
        const body = await res.text();
        rec.ok = res.status === 200;
        if (!rec.ok) rec.error = `${res.status} ${body}`;
      } catch (err) {
        rec.error = String(err);
      }
      rec.end = Date.now();
      await sleep(PUBLISH_EVERY_MS);
    }
  })();
  /** Runs `fn` before the next publish; resolves with its time. */
  p.before = (fn) => new Promise((resolve) => {
    p.action = async () => {
      const t = Date.now();
      await fn();
      resolve(t);
    };
  });
  p.stop = async () => {
    p.stopped = true;
    await p.done;
  };
  env.cleanups.push(() => {
    p.stopped = true;
  });
  return p;
}

/**
 * Every subscriber: offsets consecutive, seqs increasing, every acknowledged
 * seq present, nothing that was never sent.
 */
function assertDelivery(subs, sent) {
  const acked = sent.filter((r) => r.ok).map((r) => r.seq);
  const maxSeq = sent.at(-1).seq;
  for (const sub of subs) {
    const { items } = sub;
    const short = () => JSON.stringify(items.map((i) => [i.seq, i.offset]).slice(-50));
    for (let i = 1; i < items.length; i++) {
      assert.equal(items[i].offset, items[i - 1].offset + 1, `${sub.label}: offsets not consecutive at ${i} (${items[i - 1].offset} -> ${items[i].offset}): ${short()}`);
      assert.ok(items[i].seq > items[i - 1].seq, `${sub.label}: seq ${items[i].seq} after ${items[i - 1].seq} (duplicate or out of order)`);
    }
    const got = new Set(items.map((i) => i.seq));
    const missing = acked.filter((s) => !got.has(s));
    assert.deepEqual(missing, [], `${sub.label}: acknowledged publications missing`);
    assert.ok(items.every((i) => i.seq >= 1 && i.seq <= maxSeq), `${sub.label}: a seq that was never sent`);
  }
}

/** A recoverable subscription that also records when each publication arrived. */
async function subscribeTimed(env, client) {
  const sub = await env.subscribe(client, CHANNEL);
  // Runs after env.subscribe's handler, which appended the item.
  sub.on('publication', () => {
    sub.items.at(-1).t = Date.now();
  });
  return sub;
}

async function failoverScenario(env, event) {
  // 3 masters + 3 replicas (tests/common/redis-cluster.mjs), with an AOF;
  // Env.close stops it with the nodes.
  const cluster = new RedisCluster({ log: env.log, masters: 3, replicas: 1, nodeTimeoutMs: 2000, appendonly: true });
  env.processes.push({ kill: () => cluster.stop() });
  await cluster.start();
  const seeds = cluster.masters();
  const slot = await redisCommand(seeds[0].port, 'CLUSTER', 'KEYSLOT', `fanfare.c.{${CHANNEL}}`);
  const { master, replica } = await cluster.owner(slot);
  assert.ok(replica, `master :${master.port} of slot ${slot} has no replica`);
  env.note(`channel slot ${slot}: master :${master.port}, replica :${replica.port}`);
  const nodes = await startNodes(env, { toml: cluster.toml(seeds) }, ['A', 'B', 'C']);

  const subs = [];
  for (const n of nodes) {
    for (const k of [1, 2]) {
      const c = env.client(`s${k}@${n.name}`, n.wsUrl);
      await env.connect(c);
      subs.push(await subscribeTimed(env, c));
    }
  }
  const publisher = startPublisher(env, nodes[0]);
  await sleep(BEFORE_MS);
  assert.ok(publisher.sent.some((r) => r.ok), `nothing published before the failover: ${JSON.stringify(publisher.sent.slice(-3))}`);

  // Promotion: the replica reports role master.
  let promotedAt = 0;
  const eventAt = await publisher.before(async () => {
    if (event === 'kill') {
      env.note(`SIGKILL master :${master.port} pid ${master.child.pid}`);
      await master.kill();
    } else if (event === 'freeze') {
      // Frozen, not dead: its sockets stay open and silent, no disconnection.
      env.note(`SIGSTOP master :${master.port} pid ${master.child.pid}`);
      master.child.kill('SIGSTOP');
    } else {
      env.note(`CLUSTER FAILOVER on replica :${replica.port}`);
      assert.equal(await redisCommand(replica.port, 'CLUSTER', 'FAILOVER'), 'OK');
    }
  });
  // Polled every 5 ms (waitUntil's 50 ms would blur the promotion -> resumed time).
  for (const giveUp = Date.now() + 20_000; !promotedAt; await sleep(5)) {
    const role = await redisCommand(replica.port, 'ROLE').catch(() => null);
    if (Array.isArray(role) && role[0] === 'master') promotedAt = Date.now();
    else if (Date.now() > giveUp) throw new Error(`replica :${replica.port} not promoted within 20 s`);
  }
  env.note(`replica :${replica.port} promoted ${promotedAt - eventAt} ms after the ${event}`);

  // Resumed: the first publish started after the event that was acknowledged.
  const firstOkAfter = (t) => publisher.sent.find((r) => r.start >= t && r.ok && r.end);
  const limit = event === 'freeze' ? FREEZE_RESUME_LIMIT_MS : RESUME_LIMIT_MS;
  // Waits past the limit, so that a late resume fails the limit's assertion
  // below, with the measured times, rather than this wait.
  const resumeWait = Math.max(20_000, limit + 5_000);
  await waitUntil(() => firstOkAfter(eventAt), resumeWait, 'a publish to succeed after the failover').catch((e) => {
    throw new Error(`${e.message}; last: ${JSON.stringify(publisher.sent.slice(-3))}`);
  });
  const resumed = firstOkAfter(eventAt);
  await sleep(AFTER_MS);
  await publisher.stop();

  const acked = publisher.sent.filter((r) => r.ok);
  const lastAcked = acked.at(-1).seq;
  await waitUntil(() => subs.every((s) => s.items.some((i) => i.seq === lastAcked)), WAIT_MS,
    `every subscriber to receive seq ${lastAcked}`).catch((e) => {
    throw new Error(`${e.message}; have ${subs.map((s) => `${s.label}:${s.items.length}/${s.items.at(-1)?.seq}`).join(' ')}`);
  });
  await sleep(300); // duplicates would arrive now

  assertDelivery(subs, publisher.sent);
  for (const s of subs) {
    for (const e of s.subscribedEvents.filter((ev) => ev.t >= eventAt)) {
      assert.equal(e.recovered, true, `${s.label} resubscribed without recovering: ${JSON.stringify(e)}`);
    }
  }
  // Delivery resumed: a publication published after the event reached a subscriber.
  const firstSeqAfter = publisher.sent.find((r) => r.start >= eventAt).seq;
  const delivered = Math.min(...subs.map((s) => s.items.find((i) => i.seq >= firstSeqAfter)?.t ?? Infinity));
  const failed = publisher.sent.filter((r) => !r.ok);
  const timing = {
    event,
    promoted_ms: promotedAt - eventAt,
    event_to_resumed_ms: resumed.end - eventAt,
    promoted_to_resumed_ms: resumed.end - promotedAt,
    event_to_delivered_ms: delivered - eventAt,
    acked: acked.length,
    failed: failed.length,
    resubscribes: subs.map((s) => s.subscribedEvents.filter((ev) => ev.t >= eventAt).length),
  };
  process.stderr.write(`failover-timing ${JSON.stringify(timing)}\n`);
  if (failed.length) env.note(`failed publishes: ${JSON.stringify(failed.slice(0, 3))} ...`);
  assert.ok(resumed.end - promotedAt <= limit,
    `publishing resumed ${resumed.end - promotedAt} ms after the promotion (limit ${limit} ms): ${JSON.stringify(timing)}`);
}

chaosTest('redis cluster: the master of a busy channel SIGKILLed, its replica promoted: publishing resumes, nothing acknowledged lost', async (env) => {
  await failoverScenario(env, 'kill');
}, 60_000);

chaosTest('redis cluster: manual CLUSTER FAILOVER of a busy channel\'s master: publishing resumes, nothing acknowledged lost', async (env) => {
  await failoverScenario(env, 'failover');
}, 60_000);

chaosTest('redis cluster: the master of a busy channel frozen (SIGSTOP), its replica promoted: publishing resumes, nothing acknowledged lost', async (env) => {
  await failoverScenario(env, 'freeze');
}, 90_000); // the cluster's start, up to 20 s to promote, up to 35 s to resume
