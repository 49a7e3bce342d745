// The chat example (examples/chat) in headless Chromium, through the page's
// test hooks (data-testid) as a person would use it, started by its one
// documented command, examples/chat/run.sh, on a free CHAT_PORT.
//
// Run:  FANFARE_BIN=/abs/path/to/fanfare tests/browser/run.sh
//
// Two browser contexts are two users in a room: each sees the other in the
// member list, messages typed in one appear in the other in order, and a third
// user entering sees the history. Then the node is restarted (run.sh's
// SIGUSR2) and both tabs reconnect on their own; one tab loses its network, a
// message is sent meanwhile, and it appears in that tab exactly once when the
// network is back. Last, Ctrl-C (SIGINT) stops everything run.sh started.
//
// CHAT_SCREENSHOT=path saves the page with three users to that file (the
// README's docs/images/chat.png is made so); by default it goes to target/.
//
// Every wait is bounded; on a failure the output of run.sh (its processes)
// and the pages' console and WebSocket traffic are printed.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { launchChromium } from './chromium.mjs';
import { freePort, sleep, spawnLogged, stamp, stopChild } from '../common/harness.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ROOT = path.resolve(HERE, '../..');
const BIN = process.env.FANFARE_BIN;
const SCREENSHOT = path.resolve(process.env.CHAT_SCREENSHOT || path.join(ROOT, 'target/chat.png'));
const WAIT_MS = 15_000; // bound for every single wait
const VERBOSE = process.env.FANFARE_E2E_VERBOSE === '1';

const runLog = []; // run.sh's output: its processes' lines, stamped
const pageLog = []; // every page's console and WebSocket traffic
const chat = { run: null, url: null, browser: null };

/** Polls `fn` (truthy when done) every 50 ms for at most WAIT_MS. */
async function until(fn, what) {
  const deadline = Date.now() + WAIT_MS;
  for (;;) {
    const value = await fn();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${WAIT_MS} ms waiting for ${what}`);
    await sleep(50);
  }
}

/** The first run.sh output line matching `re` at index `from` or later. */
const runLine = (re, from = 0) => until(() => runLog.slice(from).find((l) => re.test(l)), `run.sh to print ${re}`);

before(async () => {
  assert.ok(BIN && path.isAbsolute(BIN) && fs.existsSync(BIN), `FANFARE_BIN must be the absolute path of the fanfare binary, got ${BIN}`);
  const port = await freePort();
  chat.run = spawnLogged('run.sh', path.join(ROOT, 'examples/chat/run.sh'), [], runLog, { CHAT_PORT: String(port), FANFARE_BIN: BIN });
  // run.sh may run `npm ci` first: the first start gets longer.
  const deadline = Date.now() + 120_000;
  while (!runLog.some((l) => l.includes('chat ready: '))) {
    if (chat.run.exitInfo) throw new Error(`run.sh exited before the chat was ready:\n${runLog.join('\n')}`);
    if (Date.now() > deadline) throw new Error(`run.sh did not print 'chat ready' within 120 s:\n${runLog.join('\n')}`);
    await sleep(50);
  }
  chat.url = `http://127.0.0.1:${port}/`;
  assert.ok(runLog.some((l) => l.includes(`chat ready: ${chat.url}`)), `run.sh should announce ${chat.url}`);
  chat.browser = await launchChromium();
});

after(async () => {
  if (chat.browser) await chat.browser.close().catch(() => {});
  // Normally stopped by the last test already; SIGKILL after 10 s at worst.
  await stopChild(chat.run, { signal: 'SIGINT', graceMs: 10_000 });
});

/** Declares a test whose logs are printed when it fails (or with FANFARE_E2E_VERBOSE=1). */
function chatTest(name, fn) {
  test(name, { timeout: 60_000 }, async () => {
    const runFrom = runLog.length;
    const pageFrom = pageLog.length;
    let failure = null;
    try {
      await fn();
    } catch (err) {
      failure = err;
      throw err;
    } finally {
      if (failure || VERBOSE) {
        process.stderr.write(
          `\n===== ${name}: ${failure ? `FAILED =====\n${failure.stack || failure}` : 'passed ====='}\n` +
            `--- pages: console and WebSocket frames (> sent, < received) ---\n${pageLog.slice(pageFrom).join('\n')}\n` +
            `--- run.sh: redis, fanfare, backend ---\n${runLog.slice(runFrom).join('\n')}\n===== end =====\n\n`,
        );
      }
    }
  });
}

/**
 * A user in a tab of their own (a browser context: its own sessionStorage and
 * network): opens the chat at `room` (none: the default room), types `name`
 * and presses Join.
 */
async function openUser(name, room) {
  const context = await chat.browser.newContext({ viewport: { width: 900, height: 420 } });
  const page = await context.newPage();
  const sockets = []; // every WebSocket the page opened, in order
  const subscribed = []; // the node's reply to each subscribe to the room: {recoverable, recovered, ...}
  const short = (s) => (s.length > 200 ? `${s.slice(0, 200)}...` : s);
  page.on('console', (m) => pageLog.push(`${stamp()} [${name} console.${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => pageLog.push(`${stamp()} [${name} pageerror] ${e.stack || e}`));
  page.on('websocket', (ws) => {
    sockets.push(ws);
    pageLog.push(`${stamp()} [${name} ws] open ${ws.url()}`);
    ws.on('framesent', (f) => pageLog.push(`${stamp()} [${name} ws >] ${short(String(f.payload))}`));
    ws.on('framereceived', (f) => {
      pageLog.push(`${stamp()} [${name} ws <] ${short(String(f.payload))}`);
      // One frame may carry several replies, a line each. The room is the
      // page's only subscribe (the personal channel comes with the connect reply).
      for (const line of String(f.payload).split('\n')) {
        const reply = line.startsWith('{"id"') ? JSON.parse(line) : null;
        if (reply?.subscribe) subscribed.push(reply.subscribe);
      }
    });
    ws.on('close', () => pageLog.push(`${stamp()} [${name} ws] closed`));
  });
  await page.goto(room ? `${chat.url}?room=${room}` : chat.url, { timeout: WAIT_MS });
  await page.getByTestId('name').fill(name);
  await page.getByTestId('join').click();
  const user = { name, context, page, sockets, subscribed };
  await until(async () => (await members(user)).includes(name), `${name} to see themself in the member list`);
  return user;
}

/** The names in `user`'s member list. */
const members = (user) => user.page.getByTestId('members').locator('li').allTextContents();

/** `user`'s messages as "who: text", in the order shown. */
const messages = (user) =>
  user.page
    .getByTestId('messages')
    .locator('li')
    .evaluateAll((lis) => lis.map((li) => `${li.querySelector('.user').textContent}: ${li.querySelector('.text').textContent}`));

/** Types `text` into the message box and presses Send; waits until the box is emptied (sent). */
async function say(user, text) {
  const input = user.page.getByTestId('message-input');
  await input.fill(text);
  await user.page.getByTestId('send').click();
  await until(async () => (await input.inputValue()) === '', `${user.name}'s message "${text}" to be sent`);
}

/** Waits until `user`'s member list is exactly `names` (sorted). */
async function waitMembers(user, names) {
  const want = JSON.stringify([...names].sort());
  let seen;
  await until(async () => JSON.stringify((seen = await members(user))) === want, `${user.name} to see members ${want}`).catch((e) => {
    throw new Error(`${e.message}; last seen ${JSON.stringify(seen)}`);
  });
}

/** Waits until `user` shows exactly `want` (in this order); then a moment for a late duplicate. */
async function waitMessages(user, want) {
  let seen;
  await until(async () => (seen = await messages(user)).length >= want.length, `${user.name} to show ${want.length} messages`).catch((e) => {
    throw new Error(`${e.message}; shown: ${JSON.stringify(seen)}`);
  });
  assert.deepEqual(await messages(user), want, `${user.name}'s messages`);
}

const status = (user) => user.page.getByTestId('status').textContent();

chatTest('two users in a room see each other, each other\'s messages in order, and a third user entering sees the history', async () => {
  const alice = await openUser('alice');
  const bob = await openUser('bob');
  try {
    // The default room is the lobby (no ?room=).
    assert.match(await alice.page.locator('#room').textContent(), /#lobby/);
    await waitMembers(alice, ['alice', 'bob']);
    await waitMembers(bob, ['alice', 'bob']);

    await say(alice, 'hi bob');
    await say(alice, 'the release is out');
    await say(bob, 'hi alice');
    await say(alice, 'can you check the chart?');
    const convo = ['alice: hi bob', 'alice: the release is out', 'bob: hi alice', 'alice: can you check the chart?'];
    await waitMessages(bob, convo);
    await waitMessages(alice, convo);

    // Someone entering later gets the last messages, in order, and is seen.
    const carol = await openUser('carol');
    try {
      await waitMessages(carol, convo);
      await waitMembers(carol, ['alice', 'bob', 'carol']);
      await waitMembers(alice, ['alice', 'bob', 'carol']);
      await say(carol, 'morning all');
      await waitMessages(alice, [...convo, 'carol: morning all']);

      fs.mkdirSync(path.dirname(SCREENSHOT), { recursive: true });
      await alice.page.screenshot({ path: SCREENSHOT });
    } finally {
      await carol.context.close();
    }
    // Carol's tab closed: she leaves the others' member lists.
    await waitMembers(alice, ['alice', 'bob']);
    await waitMembers(bob, ['alice', 'bob']);
  } finally {
    await Promise.all([alice.context.close(), bob.context.close()]);
  }
});

chatTest('after a node restart both tabs reconnect on their own, and a message sent while one tab was offline appears in it exactly once', async () => {
  const room = 'restart';
  const alice = await openUser('alice', room);
  const bob = await openUser('bob', room);
  try {
    await waitMembers(alice, ['alice', 'bob']);
    await waitMembers(bob, ['alice', 'bob']);
    await say(alice, 'before the restart');
    await waitMessages(bob, ['alice: before the restart']);

    // The node is stopped (SIGTERM by PID) and started again on the same port.
    const from = runLog.length;
    const oldPid = Number((await runLine(/run\.mjs: pids /)).match(/fanfare=(\d+)/)[1]);
    chat.run.kill('SIGUSR2');
    const newPid = Number((await runLine(/node restarted: pid \d+/, from)).match(/pid (\d+)/)[1]);
    assert.notEqual(newPid, oldPid, 'the node should be a new process');
    // Each tab opens a second WebSocket by itself (no reload, no click) and is back in the room.
    for (const user of [alice, bob]) {
      await until(() => user.sockets.length >= 2, `${user.name}'s tab to open a new WebSocket to the restarted node`);
      await until(async () => (await status(user)).startsWith('connected'), `${user.name}'s tab to be connected again`);
    }
    await waitMembers(alice, ['alice', 'bob']);
    await waitMembers(bob, ['alice', 'bob']);
    // They came back through recovery: the node said nothing was lost.
    for (const user of [alice, bob]) {
      assert.equal(user.subscribed.length, 2, `${user.name}: subscribe replies ${JSON.stringify(user.subscribed)}`);
      assert.equal(user.subscribed[1].recovered, true, `${user.name}'s resubscribe: ${JSON.stringify(user.subscribed[1])}`);
    }
    await say(bob, 'after the restart');
    const afterRestart = ['alice: before the restart', 'bob: after the restart'];
    await waitMessages(alice, afterRestart);
    await waitMessages(bob, afterRestart);

    // Alice's network goes away: her tab notices (the browser's offline
    // event), Bob writes meanwhile, and her tab recovers it when the network
    // is back.
    await alice.context.setOffline(true);
    await until(async () => (await status(alice)).startsWith('connecting'), 'alice\'s tab to notice it is offline');
    await say(bob, 'sent while alice was offline');
    await waitMessages(bob, [...afterRestart, 'bob: sent while alice was offline']);
    assert.deepEqual(await messages(alice), afterRestart, 'an offline tab cannot have received anything');
    await alice.context.setOffline(false);
    await until(async () => (await status(alice)).startsWith('connected'), 'alice\'s tab to reconnect when the network is back');
    const all = [...afterRestart, 'bob: sent while alice was offline'];
    await waitMessages(alice, all);
    // A duplicate (recovery and a second delivery) would show up by now.
    await sleep(500);
    assert.deepEqual(await messages(alice), all, 'the missed message exactly once');
    // ... and it came by recovery, in the resubscribe's reply.
    const resubscribe = alice.subscribed.at(-1);
    assert.equal(resubscribe.recovered, true, `alice's resubscribe: ${JSON.stringify(resubscribe)}`);
    assert.deepEqual(resubscribe.publications?.map((p) => p.data.text), ['sent while alice was offline'], 'what the resubscribe recovered');

    await say(alice, 'back');
    await waitMessages(bob, [...all, 'alice: back']);
    await waitMessages(alice, [...all, 'alice: back']);
    await waitMembers(bob, ['alice', 'bob']);
  } finally {
    await Promise.all([alice.context.close(), bob.context.close()]);
  }
});

chatTest('the backend refuses a token for an empty or overlong name, and the page says why', async () => {
  const post = (body) => fetch(new URL('/token', chat.url), { method: 'POST', body, signal: AbortSignal.timeout(WAIT_MS) });
  for (const [body, error] of [
    ['{"name": "   "}', 'name is empty'],
    [JSON.stringify({ name: 'x'.repeat(33) }), 'name is longer than 32 characters'],
    ['not json', 'body is not JSON; send {"name": "..."}'],
  ]) {
    const res = await post(body);
    assert.equal(res.status, 400, `POST /token ${body}`);
    assert.deepEqual(await res.json(), { error }, `POST /token ${body}`);
  }
  // In the page: a name of spaces gets the backend's reason, and no connection.
  const context = await chat.browser.newContext();
  try {
    const page = await context.newPage();
    let sockets = 0;
    page.on('websocket', () => sockets++);
    await page.goto(chat.url, { timeout: WAIT_MS });
    await page.getByTestId('name').fill('   ');
    await page.getByTestId('join').click();
    await until(async () => (await page.locator('#join-error').textContent()) === 'name is empty', 'the page to say the name is empty');
    assert.equal(sockets, 0, 'the page connected without a token');
  } finally {
    await context.close();
  }
});

chatTest('Ctrl-C (SIGINT) stops the node, Redis and the backend that run.sh started', async () => {
  const pids = (await runLine(/run\.mjs: pids /)).match(/redis=(\d+) fanfare=(\d+) backend=(\d+)/).slice(1).map(Number);
  const restarted = runLog.map((l) => l.match(/node restarted: pid (\d+)/)).filter(Boolean);
  if (restarted.length) pids[1] = Number(restarted.at(-1)[1]);
  const alive = (pid) => {
    try {
      process.kill(pid, 0);
      return true;
    } catch {
      return false;
    }
  };
  assert.deepEqual(pids.map(alive), [true, true, true], `redis, fanfare and the backend should run: ${pids}`);
  const info = await stopChild(chat.run, { signal: 'SIGINT', graceMs: 10_000 });
  assert.deepEqual(info, { code: 0, signal: null }, 'run.sh should exit 0 on Ctrl-C');
  assert.deepEqual(pids.map(alive), [false, false, false], `redis, fanfare and the backend (${pids}) should be gone`);
});
