// Starts the chat example and keeps it running: a Redis (nothing saved to
// disk), a fanfare node on it (fanfare.toml), and the backend (server.mjs),
// which serves the page at http://127.0.0.1:${CHAT_PORT:-3000}/.
// Started by run.sh, which finds or builds the binary and installs centrifuge-js.
//
// Signals (to this process's PID, printed at start):
//   SIGINT (Ctrl-C), SIGTERM  stop the backend, the node and Redis, by PID, and exit 0
//   SIGUSR2                   restart the node on the same ports: watch the tabs
//                             reconnect and recover what they missed
//                             (tests/browser/chat.mjs does this)
// If one of the three exits by itself, the others are stopped and this exits 1.

import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
// The same process helpers as the end-to-end suites (free ports, children
// logged and stopped by PID); they need nothing from npm.
import { freePort, redisPing, sleep, spawnLogged, stopChild, waitFanfare, waitReady } from '../../tests/common/harness.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const BIN = process.env.FANFARE_BIN;
const CHAT_PORT = Number(process.env.CHAT_PORT || 3000);
const READY_MS = 30_000; // the node's own redis.startup_timeout

if (!BIN || !path.isAbsolute(BIN) || !fs.existsSync(BIN)) {
  console.error(`run.mjs: FANFARE_BIN must be the absolute path of the fanfare binary, got '${BIN ?? ''}' (run.sh sets it)`);
  process.exit(2);
}
if (!Number.isInteger(CHAT_PORT) || CHAT_PORT < 1 || CHAT_PORT > 65535) {
  console.error(`run.mjs: CHAT_PORT must be a TCP port number, got '${process.env.CHAT_PORT}'`);
  process.exit(2);
}

// The children's output, stamped and labelled, goes to this process's stdout.
const log = { push: (line) => console.log(line) };

let stopping = false;
let restarting = false;
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fanfare-chat-'));
const children = {}; // name -> child, stopped in reverse order of start
const ports = {};

async function distinctFreePort() {
  for (;;) {
    const p = await freePort();
    if (p !== CHAT_PORT && !Object.values(ports).includes(p)) return p;
  }
}

const httpOk = async (url) => {
  const res = await fetch(url, { signal: AbortSignal.timeout(1000) });
  await res.arrayBuffer();
  return res.status === 200;
};

/** Registers `child` under `name`: its exit ends the chat unless we caused it. */
function watch(name, child) {
  children[name] = child;
  child.exited.then(async (info) => {
    // Ctrl-C in a terminal signals the whole process group: the children may
    // exit a moment before our own SIGINT handler runs. Give it that moment.
    await sleep(300);
    if (stopping || (restarting && name === 'fanfare') || children[name] !== child) return;
    console.error(`run.mjs: ${name} (pid ${child.pid}) exited by itself (${JSON.stringify(info)}): stopping the chat`);
    shutdown(1);
  });
}

const fanfareEnv = (secret) => ({
  FANFARE__HTTP__LISTEN: `127.0.0.1:${ports.http}`,
  FANFARE__GRPC__LISTEN: `127.0.0.1:${ports.grpc}`,
  FANFARE__REDIS__URLS: `redis://127.0.0.1:${ports.redis}`,
  FANFARE__AUTH__HMAC_SECRET: secret,
  // The page is served by the backend on CHAT_PORT, under either loopback name.
  FANFARE__WEBSOCKET__ALLOWED_ORIGINS: `http://127.0.0.1:${CHAT_PORT},http://localhost:${CHAT_PORT}`,
});

async function startNode(secret) {
  const child = spawnLogged(`fanfare :${ports.http}`, BIN, ['--config', path.join(HERE, 'fanfare.toml')], log, fanfareEnv(secret));
  watch('fanfare', child);
  await waitFanfare(child, 'fanfare', () => httpOk(`http://127.0.0.1:${ports.http}/ready`), READY_MS);
  return child;
}

async function shutdown(code) {
  if (stopping) return;
  stopping = true;
  for (const name of ['backend', 'fanfare', 'redis']) {
    const child = children[name];
    if (child && !child.exitInfo) {
      await stopChild(child);
      console.log(`run.mjs: ${name} (pid ${child.pid}) stopped`);
    }
  }
  fs.rmSync(dir, { recursive: true, force: true });
  process.exit(code);
}

process.on('SIGINT', () => shutdown(0));
process.on('SIGTERM', () => shutdown(0));

async function main() {
  // A new secret per run: tokens of an earlier run are void, nothing to keep secret on disk.
  const secret = crypto.randomBytes(32).toString('base64url');
  ports.redis = await distinctFreePort();
  ports.http = await distinctFreePort();
  ports.grpc = await distinctFreePort();

  const redis = spawnLogged(`redis :${ports.redis}`, 'redis-server', [
    '--port', String(ports.redis), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', dir, '--loglevel', 'warning',
  ], log);
  watch('redis', redis);
  await waitReady(redis, 'redis-server', () => redisPing(ports.redis, redis.pid), READY_MS);

  await startNode(secret);

  const backend = spawnLogged(`backend :${CHAT_PORT}`, process.execPath, [path.join(HERE, 'server.mjs')], log, {
    CHAT_PORT: String(CHAT_PORT),
    CHAT_HMAC_SECRET: secret,
    CHAT_FANFARE_PORT: String(ports.http),
  });
  watch('backend', backend);
  await waitReady(backend, 'the backend', () => httpOk(`http://127.0.0.1:${CHAT_PORT}/`), READY_MS);

  process.on('SIGUSR2', async () => {
    if (restarting || stopping) return;
    restarting = true;
    try {
      const old = children.fanfare;
      console.log(`run.mjs: restarting the node (SIGTERM to pid ${old.pid})`);
      await stopChild(old);
      const child = await startNode(secret);
      console.log(`run.mjs: node restarted: pid ${child.pid}`);
    } catch (err) {
      console.error(`run.mjs: the node did not come back: ${err.message}`);
      shutdown(1);
    } finally {
      restarting = false;
    }
  });

  console.log(
    `run.mjs: pids run=${process.pid} redis=${redis.pid} fanfare=${children.fanfare.pid} backend=${backend.pid}\n` +
      `run.mjs: the node: http://127.0.0.1:${ports.http} (Redis 127.0.0.1:${ports.redis})\n` +
      `run.mjs: Ctrl-C stops everything; kill -USR2 ${process.pid} restarts the node\n` +
      `chat ready: http://127.0.0.1:${CHAT_PORT}/  (a second tab or browser is a second user; ?room=NAME for another room)`,
  );
}

main().catch((err) => {
  console.error(`run.mjs: ${err.message}`);
  shutdown(1);
});
