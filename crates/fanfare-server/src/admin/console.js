// The fanfare admin console: plain JavaScript, no framework, no CDN; the
// server embeds this file and forbids every other script (CSP). It signs in
// with POST /admin/login and then calls the control API (/api/<method>) with
// `authorization: token <session token>`, like any API client. The token
// lives in sessionStorage: gone when the tab closes, and unreadable by other
// origins.
"use strict";

const $ = (sel) => document.querySelector(sel);
const KEY = "fanfare-admin-token";
let token = sessionStorage.getItem(KEY);
let timers = [];

function text(tag, value, cls) {
  const el = document.createElement(tag);
  el.textContent = value;
  if (cls) el.className = cls;
  return el;
}

function row(cells, numeric) {
  const tr = document.createElement("tr");
  cells.forEach((c, i) => tr.append(c instanceof Node ? wrap(c) : text("td", String(c), numeric.includes(i) ? "num" : "")));
  return tr;
}

function wrap(node) {
  const td = document.createElement("td");
  td.append(node);
  return td;
}

function uptime(secs) {
  const d = Math.floor(secs / 86400), h = Math.floor(secs / 3600) % 24, m = Math.floor(secs / 60) % 60, s = secs % 60;
  return (d ? d + "d " : "") + (d || h ? h + "h " : "") + (d || h || m ? m + "m " : "") + s + "s";
}

class SignedOut extends Error {}

// One control API call; a 401 (expired or forged token) signs the console out.
async function api(method, body) {
  const r = await fetch("/api/" + method, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: "token " + token },
    body: JSON.stringify(body || {}),
  });
  if (r.status === 401) {
    signOut("Session expired: sign in again.");
    throw new SignedOut();
  }
  const answer = await r.json().catch(() => ({}));
  if (!r.ok) {
    const e = answer.error || {};
    throw new Error(method + ": " + (e.message || r.status));
  }
  return answer;
}

function showError(e) {
  if (!(e instanceof SignedOut)) $("#api-error").textContent = e.message;
}

async function loadNodes() {
  const { nodes } = await api("info");
  nodes.sort((a, b) => a.name.localeCompare(b.name));
  $("[data-testid=nodes] tbody").replaceChildren(...nodes.map((n) => {
    const tr = row([n.name, n.version, uptime(n.uptime_secs), n.num_clients, n.num_subscriptions, n.num_channels], [3, 4, 5]);
    tr.dataset.testid = "node-row";
    return tr;
  }));
}

async function loadChannels() {
  const f = $("#channels-filter").value.trim();
  // A glob as typed; plain text matches anywhere in the name.
  const pattern = !f ? "" : /[*?]/.test(f) ? f : "*" + f + "*";
  const { channels } = await api("channels", { pattern });
  const names = Object.keys(channels).sort();
  $("[data-testid=channels] tbody").replaceChildren(...names.map((c) => {
    const tr = row([c, channels[c].num_clients], [1]);
    tr.className = "link";
    tr.dataset.testid = "channel-row";
    tr.addEventListener("click", () => { $("#channel-name").value = c; location.hash = "#channel"; loadChannel(); });
    return tr;
  }));
}

async function loadChannel() {
  const channel = $("#channel-name").value.trim();
  if (!channel) return;
  const [presence, history] = await Promise.allSettled([
    api("presence", { channel }),
    api("history", { channel, limit: 20, reverse: true }),
  ]);
  const pbody = $("[data-testid=presence] tbody"), hbody = $("[data-testid=history] tbody");
  // A namespace without presence or history answers an error: shown in
  // place of that table.
  pbody.replaceChildren(...(presence.status === "fulfilled"
    ? Object.values(presence.value.clients).map((c) => row([c.client, c.user], []))
    : [row([presence.reason.message, ""], [])]));
  hbody.replaceChildren(...(history.status === "fulfilled"
    ? history.value.publications.map((p) => row([p.offset, text("code", JSON.stringify(p.data))], [0]))
    : [row([history.reason.message, ""], [])]));
}

// Messages in/out per second of this node, from its own Prometheus
// counters (/metrics, same origin): commands read from clients and
// replies/pushes written to them.
let last = null;
async function pollRates() {
  const r = await fetch("/metrics");
  if (!r.ok) return;
  const body = await r.text();
  const read = (name) => {
    const m = body.match(new RegExp("^" + name + " ([0-9.e+]+)$", "m"));
    return m ? Number(m[1]) : 0;
  };
  const now = { t: performance.now(), in: read("fanfare_messages_received_total"), out: read("fanfare_messages_sent_total") };
  if (last) {
    const dt = (now.t - last.t) / 1000;
    $("[data-testid=rate-in]").textContent = Math.max(0, (now.in - last.in) / dt).toFixed(1);
    $("[data-testid=rate-out]").textContent = Math.max(0, (now.out - last.out) / dt).toFixed(1);
  }
  last = now;
}

const pages = { nodes: loadNodes, channels: loadChannels, channel: loadChannel, publish: null, disconnect: null };

const currentPage = () => (location.hash.slice(1) in pages ? location.hash.slice(1) : "nodes");

function show() {
  const page = currentPage();
  document.querySelectorAll("section[data-page]").forEach((s) => s.classList.toggle("shown", s.dataset.page === page));
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.hash === "#" + page));
  $("#api-error").textContent = "";
  if (pages[page]) pages[page]().catch(showError);
}

function signedIn() {
  $("#signin").hidden = true;
  $("#console").hidden = false;
  $("#signout").hidden = false;
  $("#rates").hidden = false;
  show();
  // The nodes page follows the cluster; rates are sampled each second.
  timers.push(setInterval(() => { if (currentPage() === "nodes") loadNodes().catch(showError); }, 3000));
  timers.push(setInterval(() => pollRates().catch(() => {}), 1000));
  pollRates().catch(() => {});
}

function signOut(message) {
  token = null;
  sessionStorage.removeItem(KEY);
  timers.forEach(clearInterval);
  timers = [];
  last = null;
  $("#console").hidden = true;
  $("#signout").hidden = true;
  $("#rates").hidden = true;
  $("#signin").hidden = false;
  $("#login-error").textContent = message || "";
}

$("#login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  $("#login-error").textContent = "";
  const r = await fetch("/admin/login", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ password: $("#password").value }),
  });
  $("#password").value = "";
  if (r.status === 429) {
    $("#login-error").textContent = "Too many failed attempts: try again in " + (r.headers.get("retry-after") || "60") + " s.";
    return;
  }
  if (!r.ok) {
    $("#login-error").textContent = "Wrong password.";
    return;
  }
  token = (await r.json()).token;
  sessionStorage.setItem(KEY, token);
  signedIn();
});

$("#signout").addEventListener("click", () => signOut(""));
window.addEventListener("hashchange", show);
$("#channels-filter").addEventListener("input", () => loadChannels().catch(showError));
$("#channel-form").addEventListener("submit", (ev) => { ev.preventDefault(); loadChannel().catch(showError); });

$("#publish-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const out = $("#publish-result");
  let data;
  try {
    data = JSON.parse($("#publish-data").value);
  } catch (e) {
    out.textContent = "Data is not JSON: " + e.message;
    return;
  }
  try {
    const r = await api("publish", { channel: $("#publish-channel").value.trim(), data });
    out.textContent = "Published" + (r.epoch ? " at offset " + r.offset : "") + ".";
  } catch (e) {
    if (!(e instanceof SignedOut)) out.textContent = e.message;
  }
});

$("#disconnect-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const out = $("#disconnect-result");
  const user = $("#disconnect-user").value.trim();
  try {
    await api("disconnect", { user });
    out.textContent = "Disconnected " + user + ".";
  } catch (e) {
    if (!(e instanceof SignedOut)) out.textContent = e.message;
  }
});

if (token) signedIn();
