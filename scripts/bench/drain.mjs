// How long a SIGTERM drain takes with N connected clients (docs/BENCHMARKS.md,
// "Drain: how long shutdown takes"). Starts the fanfare binary with the
// default shutdown settings (or FANFARE__SHUTDOWN__* from the environment),
// connects N WebSocket clients (anonymous, JSON), sends SIGTERM and reports
// when the first and last 3001 arrived and when the process exited.
//
//   node scripts/bench/drain.mjs target/release/fanfare 1000 10000
// (`ws` from tests/sdk/node_modules: run tests/sdk/run.sh once, or set WS_FROM
// to a directory whose node_modules has it)
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { createRequire } from 'node:module';

const WebSocket = createRequire(path.resolve(process.env.WS_FROM ?? 'tests/sdk') + '/')('ws');

const [bin, ...sizes] = process.argv.slice(2);
if (!bin || sizes.length === 0) throw new Error('usage: drain.mjs <fanfare binary> <clients>...');

const freePort = () => new Promise((resolve) => {
  const s = net.createServer().listen(0, '127.0.0.1', () => { const p = s.address().port; s.close(() => resolve(p)); });
});
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function run(n) {
  const [port, gport] = [await freePort(), await freePort()];
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'drain-'));
  const cfg = path.join(dir, 'fanfare.toml');
  fs.writeFileSync(cfg, `[http]\nlisten = "127.0.0.1:${port}"\n[grpc]\nlisten = "127.0.0.1:${gport}"\n[auth]\nallow_anonymous = true\n`);
  const child = spawn(bin, ['--config', cfg], { stdio: ['ignore', 'ignore', 'inherit'] });
  const exited = new Promise((r) => child.on('exit', (code) => r({ code, at: performance.now() })));
  for (let i = 0; i < 300; i++) {
    try { if ((await fetch(`http://127.0.0.1:${port}/health`)).ok) break; } catch { /* not yet */ }
    await sleep(20);
  }
  const closes = [];
  const open = async () => new Promise((resolve, reject) => {
    const ws = new WebSocket(`ws://127.0.0.1:${port}/connection/websocket`);
    ws.on('open', () => ws.send('{"id":1,"connect":{}}'));
    ws.on('message', (m) => { if (String(m) === '{}') ws.send('{}'); else resolve(ws); });
    ws.on('close', (code) => closes.push({ code, at: performance.now() }));
    ws.on('error', reject);
  });
  const batch = 200;
  for (let i = 0; i < n; i += batch) {
    await Promise.all(Array.from({ length: Math.min(batch, n - i) }, open));
  }
  const t0 = performance.now();
  child.kill('SIGTERM');
  const exit = await exited;
  await sleep(200);
  const codes = new Set(closes.map((c) => c.code));
  const first = Math.min(...closes.map((c) => c.at)) - t0;
  const last = Math.max(...closes.map((c) => c.at)) - t0;
  console.log(JSON.stringify({
    clients: n, closed: closes.length, codes: [...codes], exit_code: exit.code,
    first_close_s: +(first / 1000).toFixed(2), last_close_s: +(last / 1000).toFixed(2),
    exit_s: +((exit.at - t0) / 1000).toFixed(2),
  }));
  fs.rmSync(dir, { recursive: true, force: true });
}

for (const n of sizes) await run(Number(n));
