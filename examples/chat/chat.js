// The chat page's script: one room (`?room=`, default `lobby`) = channel
// `chat:<room>` on the fanfare node, through centrifuge-js (window.Centrifuge,
// loaded before this script).
//
// - The user name is kept per tab (sessionStorage); the backend turns it into
//   a connection token (POST /token).
// - Members: presence when entering, then join/leave pushes; shown by user
//   name, once per name however many tabs it has open.
// - Messages: the last HISTORY from history when entering; then publications.
//   After a reconnect the subscription recovers what was missed (the node
//   forces recovery in this namespace). Each message is kept under its offset
//   in the room's stream, so one that arrives twice (history and a live
//   publication racing on entry) is shown once, in offset order.
// - Everything user-written goes into the page as text (textContent), never
//   as HTML.
(() => {
  'use strict';

  const HISTORY = 50;
  // Room names the page accepts: a channel name fanfare takes, and short.
  const ROOM_RE = /^[A-Za-z0-9_-]{1,64}$/;

  const $ = (id) => document.getElementById(id);
  const room = new URLSearchParams(location.search).get('room') || 'lobby';

  const state = {
    sub: null,
    me: null,
    epoch: null, // the room's stream epoch: a new one means the old offsets are void
    messages: new Map(), // offset -> <li>
    members: new Map(), // client id -> user name
  };

  $('room').textContent = `#${room}`;
  $('name').value = sessionStorage.getItem('chat-name') || '';

  function setStatus(text, kind = '') {
    const el = $('status');
    el.textContent = text;
    el.className = `status ${kind}`;
  }

  function canSend(yes) {
    $('message').disabled = !yes;
    $('send').disabled = !yes;
    $('message').placeholder = yes ? 'Write a message' : 'Waiting for the connection';
  }

  /** `{token, websocket}` for `name`, or an Error saying why not. */
  async function postToken(name) {
    const res = await fetch('/token', {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ name }),
    });
    const body = await res.json().catch(() => ({}));
    if (!res.ok) throw new Error(body.error || `the token request failed with HTTP ${res.status}`);
    return body;
  }

  /** Adds a publication (live, recovered or from history) unless already shown. */
  function addMessage(pub) {
    const offset = Number(pub.offset);
    if (state.messages.has(offset)) return;
    if (typeof pub.data?.text !== 'string') return; // not a chat message: ignore it
    const li = document.createElement('li');
    li.dataset.offset = String(offset);
    const user = document.createElement('span');
    user.className = 'user';
    // Who posted comes from the node (the poster's token), not from the data.
    user.textContent = pub.info?.user || '(server)';
    const text = document.createElement('span');
    text.className = 'text';
    text.textContent = pub.data.text;
    li.append(user, text);

    // Almost always the newest: walk back from the end to its place.
    const list = $('messages');
    let after = list.lastElementChild;
    while (after && Number(after.dataset.offset) > offset) after = after.previousElementSibling;
    if (after) after.after(li);
    else list.prepend(li);
    state.messages.set(offset, li);
    list.scrollTop = list.scrollHeight;
  }

  function renderMembers() {
    const names = [...new Set(state.members.values())].sort((a, b) => a.localeCompare(b));
    $('members').replaceChildren(
      ...names.map((n) => {
        const li = document.createElement('li');
        li.textContent = n;
        if (n === state.me) li.className = 'me';
        return li;
      }),
    );
  }

  async function loadHistory() {
    // Newest first, so the limit keeps the last messages.
    const res = await state.sub.history({ limit: HISTORY, reverse: true });
    for (const pub of res.publications) addMessage(pub);
  }

  async function loadPresence() {
    const res = await state.sub.presence();
    state.members = new Map(Object.values(res.clients).map((c) => [c.client, c.user]));
    renderMembers();
  }

  async function onSubscribed(ctx) {
    const epoch = ctx.streamPosition?.epoch ?? null;
    if (state.epoch !== null && epoch !== state.epoch) {
      // The room's stream was reset (its history lost): old offsets mean nothing now.
      state.messages.clear();
      $('messages').replaceChildren();
    }
    state.epoch = epoch;
    setStatus(`connected as ${state.me}`, 'connected');
    canSend(true);
    try {
      // On entering, or when recovery could not fill the gap: the last messages.
      if (!ctx.recovered) await loadHistory();
      // Who is here now; join/leave pushes keep it current from here on.
      await loadPresence();
    } catch (e) {
      setStatus(`connected, but reading the room failed: ${e.message || JSON.stringify(e)}`, 'connected');
    }
  }

  function start(name, { token, websocket }) {
    sessionStorage.setItem('chat-name', name);
    state.me = name;
    const client = new Centrifuge(websocket, {
      token,
      // Asked again when the node says the token expired.
      getToken: async () => (await postToken(name)).token,
      // A restarted node is back within a second or two: retry at most every
      // 5 s (default 20 s). Many thousands of clients of one node would want
      // the longer default, to spread their reconnects.
      maxReconnectDelay: 5000,
    });
    client.on('connecting', (ctx) => {
      setStatus(`connecting (${ctx.reason})`, 'connecting');
      canSend(false);
    });
    client.on('disconnected', (ctx) => {
      setStatus(`disconnected: ${ctx.reason}`);
      canSend(false);
    });

    // joinLeave: what Centrifugo asks for join/leave pushes; fanfare sends
    // them whenever the namespace has join_leave.
    const sub = client.newSubscription(`chat:${room}`, { joinLeave: true });
    sub.on('publication', addMessage);
    sub.on('join', (ctx) => {
      state.members.set(ctx.info.client, ctx.info.user);
      renderMembers();
    });
    sub.on('leave', (ctx) => {
      state.members.delete(ctx.info.client);
      renderMembers();
    });
    sub.on('subscribing', () => canSend(false));
    sub.on('subscribed', onSubscribed);
    sub.on('unsubscribed', (ctx) => {
      setStatus(`not in the room: ${ctx.reason}`);
      canSend(false);
    });
    sub.on('error', (ctx) => console.log('subscription error', ctx.error));
    state.sub = sub;
    sub.subscribe();
    client.connect();
  }

  $('join-form').addEventListener('submit', async (e) => {
    e.preventDefault();
    $('join-error').textContent = '';
    if (!ROOM_RE.test(room)) {
      $('join-error').textContent = 'the room name (?room=) may have letters, digits, "-" and "_" only, at most 64';
      return;
    }
    $('join').disabled = true;
    const name = $('name').value.trim();
    try {
      const answer = await postToken(name);
      $('name').disabled = true;
      start(name, answer);
    } catch (err) {
      $('join-error').textContent = err.message;
      $('join').disabled = false;
    }
  });

  $('send-form').addEventListener('submit', async (e) => {
    e.preventDefault();
    const input = $('message');
    const text = input.value.trim();
    if (!text || !state.sub) return;
    $('send').disabled = true;
    try {
      await state.sub.publish({ text });
      input.value = '';
    } catch (err) {
      setStatus(`not sent: ${err.message || JSON.stringify(err)}`, 'connecting');
    } finally {
      $('send').disabled = input.disabled;
      input.focus();
    }
  });
})();
