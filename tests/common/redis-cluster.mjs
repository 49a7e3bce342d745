// A real Redis Cluster for the Node end-to-end suites: cluster-enabled
// redis-server processes on free loopback ports, joined by
// `redis-cli --cluster create`, and a minimal RESP client to inspect it.
// Used by tests/sdk/redis-cluster-failover.mjs (3 masters + 3 replicas, killed
// and failed over) and tests/browser/admin.mjs (3 masters, no replicas). Like
// harness.mjs it imports only node: builtins and the harness, because
// tests/sdk and tests/browser have separate node_modules.

import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { freePort, spawnLogged, stopChild, waitUntil } from './harness.mjs';

// ---------------------------------------------------------------------------
// A minimal RESP client: one command per connection, replies parsed fully.
// ---------------------------------------------------------------------------

/** Parses one RESP2 reply from `buf` at `i`; returns [value, next] or null if incomplete. */
function parseResp(buf, i = 0) {
  const eol = buf.indexOf('\r\n', i);
  if (eol < 0) return null;
  const kind = String.fromCharCode(buf[i]);
  const line = buf.toString('utf8', i + 1, eol);
  const next = eol + 2;
  switch (kind) {
    case '+': return [line, next];
    case '-': return [new Error(line), next];
    case ':': return [Number(line), next];
    case '$': {
      const n = Number(line);
      if (n < 0) return [null, next];
      if (buf.length < next + n + 2) return null;
      return [buf.toString('utf8', next, next + n), next + n + 2];
    }
    case '*': {
      const n = Number(line);
      const items = [];
      let at = next;
      for (let k = 0; k < n; k++) {
        const r = parseResp(buf, at);
        if (!r) return null;
        items.push(r[0]);
        at = r[1];
      }
      return [items, at];
    }
    default: throw new Error(`bad RESP reply ${JSON.stringify(buf.toString())}`);
  }
}

/**
 * Sends one command to the Redis on loopback `port`; resolves with the reply
 * (an Error value for `-ERR`), rejects when it cannot connect or no reply
 * comes within 2 s.
 */
export function redisCommand(port, ...args) {
  return new Promise((resolve, reject) => {
    const s = net.connect(port, '127.0.0.1');
    let buf = Buffer.alloc(0);
    s.setTimeout(2000, () => {
      s.destroy();
      reject(new Error(`redis :${port} ${args[0]}: timeout`));
    });
    s.on('error', (e) => reject(e));
    s.on('connect', () => {
      s.write(`*${args.length}\r\n${args.map((a) => `$${Buffer.byteLength(String(a))}\r\n${a}\r\n`).join('')}`);
    });
    s.on('data', (d) => {
      buf = Buffer.concat([buf, d]);
      const r = parseResp(buf);
      if (r) {
        s.destroy();
        resolve(r[0]);
      }
    });
  });
}

/** One `field:value` line of an INFO / CLUSTER INFO text. */
export const infoField = (text, field) =>
  typeof text === 'string' ? text.split('\r\n').find((l) => l.startsWith(`${field}:`))?.slice(field.length + 1) : undefined;

/** CLUSTER NODES of the Redis on `port`, one {id, port, flags, master, slots} per line. */
export async function clusterNodes(port) {
  const text = await redisCommand(port, 'CLUSTER', 'NODES');
  if (typeof text !== 'string') throw new Error(`CLUSTER NODES on :${port}: ${text}`);
  const nodes = text.trim().split('\n').map((l) => {
    const f = l.split(' ');
    return { id: f[0], port: Number(f[1].split('@')[0].split(':')[1]), flags: f[2], master: f[3], slots: f.slice(8) };
  });
  return { text, nodes };
}

// ---------------------------------------------------------------------------
// The cluster
// ---------------------------------------------------------------------------

/** The last lines of a server's redis.log (stop() deletes it), for an error message. */
function logTail(server, lines = 20) {
  try {
    return fs.readFileSync(path.join(server.dir, 'redis.log'), 'utf8').trimEnd().split('\n').slice(-lines).join('\n');
  } catch (e) {
    return `(no log: ${e.message})`;
  }
}

/**
 * `masters` cluster-enabled redis-servers with `replicas` replicas each, each
 * in its own temporary directory (its log in `redis.log` there), output and
 * exits pushed onto `log`. `servers` lists them in creation order; as
 * `redis-cli --cluster create` makes the first `masters` of its arguments the
 * masters (all on one host), those are `masters()` until a failover.
 */
export class RedisCluster {
  /**
   * `nodeTimeoutMs`: cluster-node-timeout, how long a silent master goes
   * before its replica is promoted; `appendonly`: an AOF, so a restarted
   * server keeps its data (the failover test's setting).
   */
  constructor({ log, masters = 3, replicas = 0, nodeTimeoutMs = 2000, appendonly = false }) {
    this.log = log;
    this.masterCount = masters;
    this.replicas = replicas;
    this.nodeTimeoutMs = nodeTimeoutMs;
    this.appendonly = appendonly;
    this.servers = [];
  }

  /**
   * Starts the servers, joins them, and waits (bounded) for a healthy cluster:
   * `cluster_state:ok` and every node known on every server, every replica in
   * sync with its master. Throws if it does not get there; `stop()` then
   * still cleans up what was started.
   */
  async start() {
    const total = this.masterCount * (1 + this.replicas);
    // Every client and bus port chosen before any server starts, and all
    // distinct: a port freePort() handed out is free only until its server
    // binds it, so picking the next one after a spawn could return it again
    // (seen: a bus port equal to the previous server's client port).
    const ports = new Set();
    while (ports.size < 2 * total) ports.add(await freePort());
    const [clientPorts, busPorts] = [[...ports].slice(0, total), [...ports].slice(total)];
    for (let k = 0; k < total; k++) {
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fanfare-redis-cluster-'));
      const port = clientPorts[k];
      const args = ['--port', String(port), '--bind', '127.0.0.1', '--protected-mode', 'no',
        '--save', '', '--dir', dir, '--logfile', path.join(dir, 'redis.log'),
        '--appendonly', this.appendonly ? 'yes' : 'no',
        '--cluster-enabled', 'yes', '--cluster-node-timeout', String(this.nodeTimeoutMs),
        '--cluster-config-file', 'nodes.conf',
        // The bus port defaults to port + 10000: maybe taken or out of range.
        '--cluster-port', String(busPorts[k])];
      const server = { port, dir, child: spawnLogged(`redis:${port}`, 'redis-server', args, this.log) };
      server.kill = () => stopChild(server.child, { signal: 'SIGKILL' });
      this.servers.push(server);
    }
    for (const s of this.servers) {
      await waitUntil(async () => {
        if (s.child.exitInfo) throw new Error(`redis-server :${s.port} exited: ${JSON.stringify(s.child.exitInfo)}; its log:\n${logTail(s)}`);
        // This process, not another suite's server that took the port.
        const info = await redisCommand(s.port, 'INFO', 'server').catch(() => '');
        return infoField(info, 'process_id') === String(s.child.pid);
      }, 10_000, `redis :${s.port} INFO server`);
    }
    const create = spawnLogged('redis-cli', 'redis-cli', ['--cluster', 'create',
      ...this.servers.map((s) => `127.0.0.1:${s.port}`), '--cluster-replicas', String(this.replicas), '--cluster-yes'], this.log);
    let timer;
    const exit = await Promise.race([create.exited, new Promise((resolve) => (timer = setTimeout(() => resolve(null), 30_000)))]);
    clearTimeout(timer);
    if (!exit) {
      await stopChild(create, { signal: 'SIGKILL' });
      throw new Error('redis-cli --cluster create did not finish within 30 s');
    }
    if (exit.code !== 0) throw new Error(`redis-cli --cluster create failed: ${JSON.stringify(exit)} (see the log)`);
    await waitUntil(async () => {
      for (const s of this.servers) {
        const info = await redisCommand(s.port, 'CLUSTER', 'INFO').catch(() => '');
        if (infoField(info, 'cluster_state') !== 'ok' || infoField(info, 'cluster_known_nodes') !== String(total)) return false;
        const repl = await redisCommand(s.port, 'INFO', 'replication').catch(() => '');
        if (infoField(repl, 'role') === 'slave' && infoField(repl, 'master_link_status') !== 'up') return false;
      }
      return true;
    }, 30_000, `cluster_state:ok, ${total} known nodes${this.replicas ? ' and every replica in sync' : ''}`);
    // masters() relies on it: the seeds handed to fanfare are the masters.
    for (const s of this.masters()) {
      const role = await redisCommand(s.port, 'ROLE');
      if (!Array.isArray(role) || role[0] !== 'master') throw new Error(`redis :${s.port} was created as a master but is ${JSON.stringify(role)}`);
    }
  }

  /** The servers created as masters: the seeds for fanfare. */
  masters() {
    return this.servers.slice(0, this.masterCount);
  }

  server(port) {
    return this.servers.find((s) => s.port === port);
  }

  /**
   * The master serving `slot` and its first replica (undefined without
   * replicas), from CLUSTER NODES of a live server.
   */
  async owner(slot) {
    const live = this.servers.find((s) => !s.child.exitInfo);
    const { text, nodes } = await clusterNodes(live.port);
    const master = nodes.find((n) => n.flags.includes('master') && !n.flags.includes('fail') && n.slots.some((r) => {
      const [lo, hi = lo] = r.split('-').map(Number);
      return slot >= lo && slot <= hi;
    }));
    if (!master) throw new Error(`no master serves slot ${slot}:\n${text}`);
    const replica = nodes.find((n) => n.master === master.id);
    return { master: this.server(master.port), replica: replica && this.server(replica.port) };
  }

  /** The `[redis]` section of a fanfare node: `seeds` (by default the masters) as seeds. */
  toml(seeds = this.masters()) {
    return `[redis]\nurls = [${seeds.map((s) => `"redis://127.0.0.1:${s.port}"`).join(', ')}]\ncluster = true\n`;
  }

  /** SIGKILLs every server by PID (nothing to keep) and removes their directories. */
  async stop() {
    for (const s of this.servers) await s.kill().catch(() => {});
    for (const s of this.servers) fs.rmSync(s.dir, { recursive: true, force: true });
  }
}
