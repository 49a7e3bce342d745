//! JSON encoding: newline-delimited objects per frame; `bytes` fields carry raw
//! JSON values embedded verbatim; zero-valued fields are omitted.
//!
//! Decoding goes through serde with borrowed raw values. Encoding is written by
//! hand: replies are small and fixed in shape, and a publication push is encoded
//! once and shared by every subscriber, so it should not pay for a generic mapper.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::codec::DecodeError;
use crate::command::{
    Command, ConnectRequest, HistoryRequest, Request, StreamPosition, SubscribeRequest,
};
use crate::reply::{
    ClientInfo, ConnectResult, HistoryResult, Publication, Push, PushBody, Reply, ReplyBody,
    SubscribeResult,
};

/// Whether `data` is one JSON value in UTF-8, i.e. can be embedded verbatim in
/// a JSON message. (serde_json skips string contents without checking their
/// UTF-8, hence the separate check.)
pub fn is_json(data: &[u8]) -> bool {
    std::str::from_utf8(data).is_ok()
        && serde_json::from_slice::<serde::de::IgnoredAny>(data).is_ok()
}

/// Whether every publication's data in `reply` can be embedded in JSON.
///
/// Data that is not JSON can only come from a Protobuf publisher (every other
/// path enters JSON, see `fanfare_core::ingress`). Checked here, once per
/// publication and codec (not per subscriber), rather than marked on the
/// publication: the check holds for data from any broker or history, whoever
/// wrote it. Only publication data is checked: info comes from tokens and
/// other payloads from JSON paths.
pub(crate) fn payloads_are_json(reply: &Reply) -> bool {
    let ok = |pubs: &[Publication]| pubs.iter().all(|p| p.data.is_empty() || is_json(&p.data));
    match &reply.body {
        ReplyBody::Push(Push { body: PushBody::Pub(p), .. }) => ok(std::slice::from_ref(p)),
        ReplyBody::Subscribe(r) => ok(&r.publications),
        ReplyBody::Connect(r) => r.subs.iter().all(|(_, s)| ok(&s.publications)),
        ReplyBody::History(r) => ok(&r.publications),
        _ => true,
    }
}

// ---------------------------------------------------------------- decoding

#[derive(Deserialize)]
struct WireCommand<'a> {
    #[serde(default)]
    id: u32,
    #[serde(borrow, default)]
    connect: Option<WireConnect<'a>>,
    #[serde(borrow, default)]
    subscribe: Option<WireSubscribe<'a>>,
    #[serde(default)]
    unsubscribe: Option<WireChannel>,
    #[serde(borrow, default)]
    publish: Option<WirePublish<'a>>,
    #[serde(default)]
    presence: Option<WireChannel>,
    #[serde(default)]
    presence_stats: Option<WireChannel>,
    #[serde(default)]
    history: Option<WireHistory>,
    #[serde(default)]
    ping: Option<WireEmpty>,
    #[serde(borrow, default)]
    send: Option<WireData<'a>>,
    #[serde(borrow, default)]
    rpc: Option<WireRpc<'a>>,
    #[serde(default)]
    refresh: Option<WireToken>,
    #[serde(default)]
    sub_refresh: Option<WireSubRefresh>,
}

#[derive(Deserialize, Default)]
struct WireEmpty {}

#[derive(Deserialize)]
struct WireConnect<'a> {
    #[serde(default)]
    token: String,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(borrow, default)]
    subs: Option<std::collections::BTreeMap<String, WireSubscribe<'a>>>,
    #[serde(default)]
    name: String,
    #[serde(default)]
    version: String,
}

#[derive(Deserialize)]
struct WireSubscribe<'a> {
    #[serde(default)]
    channel: String,
    #[serde(default)]
    token: String,
    #[serde(default)]
    recover: bool,
    #[serde(default)]
    epoch: String,
    #[serde(default)]
    offset: u64,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    positioned: bool,
    #[serde(default)]
    recoverable: bool,
    #[serde(default)]
    join_leave: bool,
    #[serde(default)]
    delta: String,
}

#[derive(Deserialize)]
struct WireChannel {
    #[serde(default)]
    channel: String,
}

#[derive(Deserialize)]
struct WirePublish<'a> {
    #[serde(default)]
    channel: String,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct WireHistory {
    #[serde(default)]
    channel: String,
    #[serde(default)]
    limit: i32,
    #[serde(default)]
    since: Option<WirePosition>,
    #[serde(default)]
    reverse: bool,
}

#[derive(Deserialize)]
struct WirePosition {
    #[serde(default)]
    offset: u64,
    #[serde(default)]
    epoch: String,
}

#[derive(Deserialize)]
struct WireData<'a> {
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct WireRpc<'a> {
    #[serde(default)]
    method: String,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct WireToken {
    #[serde(default)]
    token: String,
}

#[derive(Deserialize)]
struct WireSubRefresh {
    #[serde(default)]
    channel: String,
    #[serde(default)]
    token: String,
}

fn raw(v: Option<&RawValue>) -> Bytes {
    match v {
        Some(v) if v.get() != "null" => Bytes::copy_from_slice(v.get().as_bytes()),
        _ => Bytes::new(),
    }
}

fn subscribe_request(w: WireSubscribe<'_>) -> SubscribeRequest {
    SubscribeRequest {
        channel: w.channel,
        token: w.token,
        recover: w.recover,
        epoch: w.epoch,
        offset: w.offset,
        data: raw(w.data),
        positioned: w.positioned,
        recoverable: w.recoverable,
        join_leave: w.join_leave,
        delta: w.delta,
    }
}

fn into_command(w: WireCommand<'_>) -> Command {
    let request = if let Some(c) = w.connect {
        Request::Connect(ConnectRequest {
            token: c.token,
            data: raw(c.data),
            subs: c
                .subs
                .unwrap_or_default()
                .into_iter()
                .map(|(ch, s)| {
                    let mut s = subscribe_request(s);
                    s.channel = ch.clone();
                    (ch, s)
                })
                .collect(),
            name: c.name,
            version: c.version,
        })
    } else if let Some(s) = w.subscribe {
        Request::Subscribe(subscribe_request(s))
    } else if let Some(u) = w.unsubscribe {
        Request::Unsubscribe { channel: u.channel }
    } else if let Some(p) = w.publish {
        Request::Publish { channel: p.channel, data: raw(p.data) }
    } else if let Some(p) = w.presence {
        Request::Presence { channel: p.channel }
    } else if let Some(p) = w.presence_stats {
        Request::PresenceStats { channel: p.channel }
    } else if let Some(h) = w.history {
        Request::History(HistoryRequest {
            channel: h.channel,
            limit: h.limit,
            since: h.since.map(|p| StreamPosition { offset: p.offset, epoch: p.epoch }),
            reverse: h.reverse,
        })
    } else if w.ping.is_some() {
        Request::Ping
    } else if let Some(s) = w.send {
        Request::Send { data: raw(s.data) }
    } else if let Some(r) = w.rpc {
        Request::Rpc { method: r.method, data: raw(r.data) }
    } else if let Some(r) = w.refresh {
        Request::Refresh { token: r.token }
    } else if let Some(r) = w.sub_refresh {
        Request::SubRefresh { channel: r.channel, token: r.token }
    } else {
        Request::Empty
    };
    Command { id: w.id, request }
}

/// What went wrong where, without serde's quote of the input (`invalid type:
/// string "..."`): the message is logged, and frames carry tokens and data.
fn position(e: &serde_json::Error) -> String {
    let what = match e.classify() {
        serde_json::error::Category::Io => "read error",
        serde_json::error::Category::Syntax => "syntax error",
        serde_json::error::Category::Data => "unexpected field type or value",
        serde_json::error::Category::Eof => "unexpected end",
    };
    format!("{what} at line {} column {}", e.line(), e.column())
}

/// Decodes every JSON command in a frame (objects separated by whitespace, usually `\n`).
pub(crate) fn decode_commands(frame: &[u8]) -> Result<Vec<Command>, DecodeError> {
    let mut out = Vec::new();
    for item in serde_json::Deserializer::from_slice(frame).into_iter::<WireCommand<'_>>() {
        let cmd = into_command(item.map_err(|e| DecodeError::Malformed(position(&e)))?);
        // Only `send` and the empty pong may go without an id.
        let id_optional = matches!(cmd.request, Request::Send { .. } | Request::Empty);
        if cmd.id == 0 && !id_optional {
            return Err(DecodeError::MissingId);
        }
        out.push(cmd);
    }
    if out.is_empty() {
        return Err(DecodeError::Empty);
    }
    Ok(out)
}

// ---------------------------------------------------------------- encoding

/// Writes one JSON object, field by field, omitting zero values.
struct Obj<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
}

impl<'a> Obj<'a> {
    fn open(out: &'a mut Vec<u8>) -> Self {
        out.push(b'{');
        Self { out, first: true }
    }

    fn key(&mut self, name: &str) {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        self.out.push(b'"');
        self.out.extend_from_slice(name.as_bytes());
        self.out.extend_from_slice(b"\":");
    }

    fn str(&mut self, name: &str, v: &str) -> &mut Self {
        if !v.is_empty() {
            self.key(name);
            write_str(self.out, v);
        }
        self
    }

    fn uint(&mut self, name: &str, v: u64) -> &mut Self {
        if v != 0 {
            self.key(name);
            self.out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
        }
        self
    }

    fn int(&mut self, name: &str, v: i64) -> &mut Self {
        if v != 0 {
            self.key(name);
            self.out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
        }
        self
    }

    fn bool(&mut self, name: &str, v: bool) -> &mut Self {
        if v {
            self.key(name);
            self.out.extend_from_slice(b"true");
        }
        self
    }

    /// Embeds a raw JSON value (a `bytes` field).
    ///
    /// Messages are newline-delimited, so a raw line break here would split
    /// the frame inside this message and break every client reading it. Data
    /// enters the node compact (`fanfare_core::ingress`), but whatever reaches
    /// the encoder (e.g. history written by an older version) is made safe:
    /// outside strings a line break is insignificant whitespace and becomes a
    /// space; inside a string it is invalid JSON anyway. One `memchr`-style
    /// scan per encode (once per publication and codec, not per subscriber).
    fn raw(&mut self, name: &str, v: &[u8]) -> &mut Self {
        if !v.is_empty() {
            self.key(name);
            let start = self.out.len();
            self.out.extend_from_slice(v);
            if v.iter().any(|&b| b == b'\n' || b == b'\r') {
                for b in &mut self.out[start..] {
                    if *b == b'\n' || *b == b'\r' {
                        *b = b' ';
                    }
                }
            }
        }
        self
    }

    /// Opens a nested object field; the caller writes into it and closes it.
    fn nested(&mut self, name: &str) -> Obj<'_> {
        self.key(name);
        Obj::open(self.out)
    }

    fn close(self) {
        self.out.push(b'}');
    }
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(&mut *out, s).expect("writing a str into a Vec cannot fail");
}

fn client_info(o: &mut Obj<'_>, name: &str, info: &ClientInfo) {
    let mut i = o.nested(name);
    i.str("user", &info.user)
        .str("client", &info.client)
        .raw("conn_info", &info.conn_info)
        .raw("chan_info", &info.chan_info);
    i.close();
}

fn publication(o: &mut Obj<'_>, name: &str, p: &Publication) {
    let mut po = o.nested(name);
    write_publication_fields(&mut po, p);
    po.close();
}

fn write_publication_fields(po: &mut Obj<'_>, p: &Publication) {
    po.raw("data", &p.data);
    if let Some(info) = &p.info {
        client_info(po, "info", info);
    }
    po.uint("offset", p.offset);
    if let Some(tags) = p.tags.as_deref().filter(|t| !t.is_empty()) {
        let mut t = po.nested("tags");
        for (k, v) in tags {
            t.key_escaped(k);
            write_str(t.out, v);
        }
        t.close();
    }
    po.bool("delta", p.delta).int("time", p.time);
}

fn publications(o: &mut Obj<'_>, name: &str, pubs: &[Publication]) {
    if pubs.is_empty() {
        return;
    }
    o.key(name);
    o.out.push(b'[');
    for (i, p) in pubs.iter().enumerate() {
        if i > 0 {
            o.out.push(b',');
        }
        let mut po = Obj::open(o.out);
        write_publication_fields(&mut po, p);
        po.close();
    }
    o.out.push(b']');
}

fn subscribe_result(o: &mut Obj<'_>, r: &SubscribeResult) {
    o.bool("expires", r.expires)
        .uint("ttl", r.ttl.into())
        .bool("recoverable", r.recoverable)
        .str("epoch", &r.epoch);
    publications(o, "publications", &r.publications);
    o.bool("recovered", r.recovered)
        .uint("offset", r.offset)
        .bool("positioned", r.positioned)
        .raw("data", &r.data)
        .bool("was_recovering", r.was_recovering)
        .bool("delta", r.delta);
}

fn connect_result(o: &mut Obj<'_>, r: &ConnectResult) {
    o.str("client", &r.client)
        .str("version", &r.version)
        .bool("expires", r.expires)
        .uint("ttl", r.ttl.into())
        .raw("data", &r.data);
    if !r.subs.is_empty() {
        let mut subs = o.nested("subs");
        for (ch, s) in &r.subs {
            subs.key_escaped(ch);
            let mut so = Obj::open(subs.out);
            subscribe_result(&mut so, s);
            so.close();
        }
        subs.close();
    }
    o.uint("ping", r.ping.into())
        .bool("pong", r.pong)
        .str("session", &r.session)
        .str("node", &r.node);
}

fn history_result(o: &mut Obj<'_>, r: &HistoryResult) {
    publications(o, "publications", &r.publications);
    o.str("epoch", &r.epoch).uint("offset", r.offset);
}

impl Obj<'_> {
    /// A key taken from user input (channel names, tag keys): escaped.
    fn key_escaped(&mut self, name: &str) {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        write_str(self.out, name);
        self.out.push(b':');
    }
}

/// Encodes one reply as a single JSON object (no trailing newline).
pub(crate) fn encode_reply(reply: &Reply, out: &mut Vec<u8>) {
    let mut o = Obj::open(out);
    o.uint("id", reply.id.into());
    match &reply.body {
        ReplyBody::Error(e) => {
            let mut eo = o.nested("error");
            eo.uint("code", e.code.into())
                .str("message", &e.message)
                .bool("temporary", e.temporary);
            eo.close();
        }
        ReplyBody::Connect(r) => {
            let mut c = o.nested("connect");
            connect_result(&mut c, r);
            c.close();
        }
        ReplyBody::Subscribe(r) => {
            let mut s = o.nested("subscribe");
            subscribe_result(&mut s, r);
            s.close();
        }
        ReplyBody::Unsubscribe => o.nested("unsubscribe").close(),
        ReplyBody::Publish => o.nested("publish").close(),
        ReplyBody::Presence(map) => {
            let mut p = o.nested("presence");
            let mut m = p.nested("presence");
            for (client, info) in map {
                m.key_escaped(client);
                let mut io = Obj::open(m.out);
                io.str("user", &info.user)
                    .str("client", &info.client)
                    .raw("conn_info", &info.conn_info)
                    .raw("chan_info", &info.chan_info);
                io.close();
            }
            m.close();
            p.close();
        }
        ReplyBody::PresenceStats { num_clients, num_users } => {
            let mut p = o.nested("presence_stats");
            p.uint("num_clients", (*num_clients).into()).uint("num_users", (*num_users).into());
            p.close();
        }
        ReplyBody::History(r) => {
            let mut h = o.nested("history");
            history_result(&mut h, r);
            h.close();
        }
        ReplyBody::Ping => {
            if reply.id != 0 {
                o.nested("ping").close();
            }
        }
        ReplyBody::Rpc { data } => {
            let mut r = o.nested("rpc");
            r.raw("data", data);
            r.close();
        }
        ReplyBody::Refresh { client, version, expires, ttl } => {
            let mut r = o.nested("refresh");
            r.str("client", client)
                .str("version", version)
                .bool("expires", *expires)
                .uint("ttl", (*ttl).into());
            r.close();
        }
        ReplyBody::SubRefresh { expires, ttl } => {
            let mut r = o.nested("sub_refresh");
            r.bool("expires", *expires).uint("ttl", (*ttl).into());
            r.close();
        }
        ReplyBody::Push(push) => {
            let mut p = o.nested("push");
            p.str("channel", &push.channel);
            match &push.body {
                PushBody::Pub(pub_) => publication(&mut p, "pub", pub_),
                PushBody::Join(info) => {
                    let mut j = p.nested("join");
                    client_info(&mut j, "info", info);
                    j.close();
                }
                PushBody::Leave(info) => {
                    let mut l = p.nested("leave");
                    client_info(&mut l, "info", info);
                    l.close();
                }
                PushBody::Unsubscribe { code, reason } => {
                    let mut u = p.nested("unsubscribe");
                    u.uint("code", (*code).into()).str("reason", reason);
                    u.close();
                }
                PushBody::Message { data } => {
                    let mut m = p.nested("message");
                    m.raw("data", data);
                    m.close();
                }
                PushBody::Subscribe { recoverable, epoch, offset, positioned, data } => {
                    let mut s = p.nested("subscribe");
                    s.bool("recoverable", *recoverable)
                        .str("epoch", epoch)
                        .uint("offset", *offset)
                        .bool("positioned", *positioned)
                        .raw("data", data);
                    s.close();
                }
                PushBody::Disconnect(d) => {
                    let mut dd = p.nested("disconnect");
                    dd.uint("code", d.code.0.into())
                        .str("reason", d.code.reason())
                        .bool("reconnect", d.code.reconnect());
                    dd.close();
                }
                PushBody::Refresh { expires, ttl } => {
                    let mut r = p.nested("refresh");
                    r.bool("expires", *expires).uint("ttl", (*ttl).into());
                    r.close();
                }
            }
            p.close();
        }
    }
    o.close();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codes::ErrorCode;
    use std::sync::Arc;

    fn enc(r: &Reply) -> String {
        let mut v = Vec::new();
        encode_reply(r, &mut v);
        String::from_utf8(v).unwrap()
    }

    #[test]
    fn encoded_messages_never_contain_a_line_break_whatever_the_data() {
        let p = Publication {
            data: Bytes::from_static(b"{\n  \"a\": 2\r\n}"),
            info: Some(Arc::new(ClientInfo {
                user: "u".into(),
                client: "c".into(),
                conn_info: Bytes::from_static(b"[1,\n2]"),
                chan_info: Bytes::new(),
            })),
            offset: 1,
            ..Default::default()
        };
        let s = enc(&Reply::push("c", PushBody::Pub(p)));
        assert!(!s.contains(['\n', '\r']), "{s}");
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["push"]["pub"]["data"]["a"], 2);
    }

    #[test]
    fn binary_publication_data_is_not_encodable_as_json() {
        use crate::codec::{Codec, EncodeError};
        let binary = Publication { data: Bytes::from_static(b"\x00\xff{"), ..Default::default() };
        let push = Reply::push("c", PushBody::Pub(binary.clone()));
        assert_eq!(Codec::Json.encode(&push), Err(EncodeError::NotJson));
        assert!(Codec::Protobuf.encode(&push).is_ok());
        let history = Reply::new(
            2,
            ReplyBody::History(HistoryResult { publications: vec![binary], ..Default::default() }),
        );
        assert_eq!(Codec::Json.encode(&history), Err(EncodeError::NotJson));
        // Text that is not JSON is not JSON either; JSON text is.
        assert!(!is_json(b"hello"));
        assert!(!is_json(b"\"\xff\""));
        assert!(is_json(br#"{"a":[1,"x"]}"#));
    }

    #[test]
    fn decodes_batched_commands_with_raw_data() {
        let frame = br#"{"id":1,"connect":{"token":"t","name":"js"}}
{"id":2,"publish":{"channel":"news","data":{"text":"hi"}}}
"#;
        let cmds = decode_commands(frame).unwrap();
        assert_eq!(cmds.len(), 2);
        assert_eq!(cmds[0].id, 1);
        assert!(matches!(&cmds[0].request, Request::Connect(c) if c.token == "t"));
        match &cmds[1].request {
            Request::Publish { channel, data } => {
                assert_eq!(channel, "news");
                assert_eq!(&data[..], br#"{"text":"hi"}"#);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn empty_object_is_pong_and_missing_id_is_rejected() {
        assert_eq!(decode_commands(b"{}").unwrap()[0].request, Request::Empty);
        assert_eq!(
            decode_commands(br#"{"subscribe":{"channel":"a"}}"#),
            Err(DecodeError::MissingId)
        );
        assert!(matches!(decode_commands(b"{\"id\":1,"), Err(DecodeError::Malformed(_))));
        assert_eq!(decode_commands(b"  \n"), Err(DecodeError::Empty));
    }

    #[test]
    fn encodes_publication_push_with_raw_data_and_no_zero_fields() {
        let p = Publication {
            data: Bytes::from_static(br#"{"n":1}"#),
            info: Some(Arc::new(ClientInfo {
                user: "u\"1".into(),
                client: "c".into(),
                ..Default::default()
            })),
            offset: 7,
            ..Default::default()
        };
        let r = Reply::push("chat:\"x\"", PushBody::Pub(p));
        assert_eq!(
            enc(&r),
            r#"{"push":{"channel":"chat:\"x\"","pub":{"data":{"n":1},"info":{"user":"u\"1","client":"c"},"offset":7}}}"#
        );
    }

    #[test]
    fn encodes_error_ping_and_subscribe() {
        assert_eq!(
            enc(&Reply::error(3, ErrorCode::ALREADY_SUBSCRIBED)),
            r#"{"id":3,"error":{"code":105,"message":"already subscribed"}}"#
        );
        assert_eq!(enc(&Reply::new(0, ReplyBody::Ping)), "{}");
        let s = SubscribeResult {
            recoverable: true,
            epoch: "e".into(),
            offset: 2,
            recovered: true,
            was_recovering: true,
            publications: vec![Publication {
                data: Bytes::from_static(b"1"),
                offset: 2,
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(
            enc(&Reply::new(4, ReplyBody::Subscribe(Box::new(s)))),
            r#"{"id":4,"subscribe":{"recoverable":true,"epoch":"e","publications":[{"data":1,"offset":2}],"recovered":true,"offset":2,"was_recovering":true}}"#
        );
    }

    #[test]
    fn delta_fields_in_json() {
        let cmds =
            decode_commands(br#"{"id":1,"subscribe":{"channel":"c","delta":"fossil"}}"#).unwrap();
        assert!(matches!(&cmds[0].request, Request::Subscribe(s) if s.delta == "fossil"));
        let p = Publication {
            data: Bytes::from_static(br#""3\n1:x""#),
            offset: 2,
            delta: true,
            ..Default::default()
        };
        assert_eq!(
            enc(&Reply::push("c", PushBody::Pub(p))),
            r#"{"push":{"channel":"c","pub":{"data":"3\n1:x","offset":2,"delta":true}}}"#
        );
        let s = SubscribeResult { delta: true, ..Default::default() };
        assert_eq!(
            enc(&Reply::new(3, ReplyBody::Subscribe(Box::new(s)))),
            r#"{"id":3,"subscribe":{"delta":true}}"#
        );
    }
}
