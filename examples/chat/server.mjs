// The chat's backend: Node's standard library only, no framework. It serves
// the page (index.html, chat.js, chat.css), centrifuge-js from node_modules (so
// the page needs no CDN), and `POST /token`: a connection JWT for a user name.
// The browser then talks to the fanfare node directly; messages, members and
// history never pass through here.
//
// Started by run.mjs with:
//   CHAT_PORT          where to listen (loopback)
//   CHAT_HMAC_SECRET   the node's auth.hmac_secret: the tokens' HS256 key
//   CHAT_FANFARE_PORT  the node's HTTP port, for the page's WebSocket URL

import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const PORT = Number(process.env.CHAT_PORT);
const SECRET = process.env.CHAT_HMAC_SECRET;
const FANFARE_PORT = Number(process.env.CHAT_FANFARE_PORT);

for (const [name, ok] of [
  ['CHAT_PORT', Number.isInteger(PORT) && PORT > 0 && PORT < 65536],
  ['CHAT_HMAC_SECRET', typeof SECRET === 'string' && SECRET.length >= 32],
  ['CHAT_FANFARE_PORT', Number.isInteger(FANFARE_PORT) && FANFARE_PORT > 0 && FANFARE_PORT < 65536],
]) {
  if (!ok) {
    console.error(`server.mjs: ${name} is missing or invalid (run examples/chat/run.sh, which sets it)`);
    process.exit(2);
  }
}

// Tokens live this long; the page asks for a new one (getToken) when the node
// says its token expired, so a short life costs one request per 10 minutes.
const TOKEN_TTL_S = 600;
const MAX_NAME = 32;
const MAX_BODY = 1024;

/**
 * An HS256 connection JWT whose `sub` (the user fanfare shows in presence and
 * on every publication) is `user`. node:crypto is all it takes: header and
 * claims as base64url JSON, signed with the node's secret.
 */
function connectionToken(user) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const claims = { sub: user, exp: Math.floor(Date.now() / 1000) + TOKEN_TTL_S };
  const signed = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}`;
  return `${signed}.${crypto.createHmac('sha256', SECRET).update(signed).digest('base64url')}`;
}

/** The trimmed user name, or why it is refused. */
function checkName(name) {
  if (typeof name !== 'string') return { error: 'name must be a string' };
  const trimmed = name.trim();
  if (trimmed === '') return { error: 'name is empty' };
  if ([...trimmed].length > MAX_NAME) return { error: `name is longer than ${MAX_NAME} characters` };
  if (/\p{Cc}/u.test(trimmed)) return { error: 'name contains control characters' };
  return { name: trimmed };
}

function reply(res, status, body) {
  res.writeHead(status, { 'content-type': 'application/json', 'cache-control': 'no-store' });
  res.end(JSON.stringify(body));
}

/**
 * `POST /token` with `{"name": "..."}`: `{token, websocket}`.
 *
 * This trusts the name the page sends: anyone may be anyone. A real backend
 * authenticates the request first (its session cookie) and puts its own user
 * id in `sub`; the rest stays the same.
 */
function token(req, res) {
  let body = '';
  let tooLarge = false;
  req.setEncoding('utf8');
  req.on('data', (chunk) => {
    body += chunk;
    if (body.length > MAX_BODY && !tooLarge) {
      tooLarge = true;
      reply(res, 413, { error: `request body larger than ${MAX_BODY} bytes` });
      req.destroy();
    }
  });
  req.on('end', () => {
    if (tooLarge) return;
    let parsed;
    try {
      parsed = JSON.parse(body);
    } catch {
      reply(res, 400, { error: 'body is not JSON; send {"name": "..."}' });
      return;
    }
    const { name, error } = checkName(parsed?.name);
    if (error) {
      reply(res, 400, { error });
      return;
    }
    // The node is on another port of the host the page came from (127.0.0.1
    // or localhost; the node allows both origins). Behind one reverse proxy
    // this would be the same origin's /connection/websocket.
    const host = new URL(`http://${req.headers.host || '127.0.0.1'}`).hostname;
    reply(res, 200, { token: connectionToken(name), websocket: `ws://${host}:${FANFARE_PORT}/connection/websocket` });
  });
}

const JS = 'text/javascript; charset=utf-8';
const STATIC = {
  '/': ['text/html; charset=utf-8', path.join(HERE, 'index.html')],
  '/chat.js': [JS, path.join(HERE, 'chat.js')],
  '/chat.css': ['text/css; charset=utf-8', path.join(HERE, 'chat.css')],
  // The SDK's browser bundle (a UMD script that sets window.Centrifuge),
  // installed by `npm ci` from the committed package-lock.json.
  '/centrifuge.js': [JS, path.join(HERE, 'node_modules/centrifuge/dist/centrifuge.js')],
};

const server = http.createServer((req, res) => {
  const { pathname } = new URL(req.url, 'http://x');
  if (pathname === '/token') {
    if (req.method !== 'POST') {
      res.writeHead(405, { allow: 'POST' }).end();
      return;
    }
    token(req, res);
    return;
  }
  const file = STATIC[pathname];
  if (!file) {
    res.writeHead(404, { 'content-type': 'text/plain' }).end(`no ${pathname} here\n`);
    return;
  }
  if (req.method !== 'GET' && req.method !== 'HEAD') {
    res.writeHead(405, { allow: 'GET, HEAD' }).end();
    return;
  }
  res.writeHead(200, { 'content-type': file[0], 'cache-control': 'no-cache' });
  if (req.method === 'HEAD') res.end();
  else fs.createReadStream(file[1]).pipe(res);
});

server.on('error', (err) => {
  console.error(
    err.code === 'EADDRINUSE' ? `server.mjs: port ${PORT} is in use; set CHAT_PORT to another port` : `server.mjs: ${err.message}`,
  );
  process.exit(1);
});
server.listen(PORT, '127.0.0.1', () => console.log(`serving the page at http://127.0.0.1:${PORT}/`));

// SIGTERM from run.mjs: stop listening and exit.
process.on('SIGTERM', () => {
  server.closeAllConnections();
  server.close(() => process.exit(0));
});
