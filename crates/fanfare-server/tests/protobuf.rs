//! The Protobuf client protocol against the real binary: negotiation, batches
//! of length-delimited messages in binary frames, bad input, and JSON and
//! Protobuf clients sharing a channel (binary data included).

mod common;

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::{Bystander, Server, TIMEOUT, assert_survived};
use fanfare_protocol::pb;
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use serde_json::json;
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::Role;

const NS: &str = r#"
[[namespaces]]
name = "h"
allow_publish = true
presence = true
history_size = 100
history_ttl = "60s"
"#;

/// A WebSocket client speaking the Protobuf protocol. Server pings (empty
/// replies) are answered with an empty command and never returned.
struct PbClient {
    ws: WebSocketStream<TcpStream>,
    buf: VecDeque<pb::Reply>,
    next_id: u32,
    /// Server pings seen (and answered when `auto_pong`).
    pings: usize,
    auto_pong: bool,
}

/// How a client asks for Protobuf.
enum Ask {
    Subprotocol,
    Query(&'static str),
}

impl PbClient {
    async fn open(server: &Server, ask: Ask) -> PbClient {
        let url = match ask {
            Ask::Subprotocol => server.ws_url(),
            Ask::Query(q) => format!("{}?{q}", server.ws_url()),
        };
        let mut req = url.into_client_request().unwrap();
        if let Ask::Subprotocol = ask {
            req.headers_mut()
                .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("centrifuge-protobuf"));
        }
        let stream = TcpStream::connect(("127.0.0.1", server.port)).await.unwrap();
        let (ws, resp) = tokio_tungstenite::client_async(req, stream).await.unwrap();
        let answered = resp.headers().get("Sec-WebSocket-Protocol").map(|v| v.to_str().unwrap());
        match ask {
            Ask::Subprotocol => assert_eq!(answered, Some("centrifuge-protobuf")),
            Ask::Query(_) => assert_eq!(answered, None),
        }
        PbClient { ws, buf: VecDeque::new(), next_id: 1, pings: 0, auto_pong: true }
    }

    async fn connected(server: &Server) -> PbClient {
        let mut c = Self::open(server, Ask::Subprotocol).await;
        let r =
            c.call(pb::Command { connect: Some(Default::default()), ..Default::default() }).await;
        assert!(r.connect.is_some(), "connect failed: {r:?}");
        c
    }

    /// Sends `cmds` (ids assigned here) in one binary frame; returns the ids.
    async fn send(&mut self, cmds: Vec<pb::Command>) -> Vec<u32> {
        let mut frame = Vec::new();
        let mut ids = Vec::new();
        for mut c in cmds {
            c.id = self.next_id;
            self.next_id += 1;
            ids.push(c.id);
            c.encode_length_delimited(&mut frame).unwrap();
        }
        self.send_raw(frame).await;
        ids
    }

    async fn send_raw(&mut self, frame: Vec<u8>) {
        self.ws.send(Message::binary(frame)).await.unwrap();
    }

    async fn call(&mut self, cmd: pb::Command) -> pb::Reply {
        let id = self.send(vec![cmd]).await[0];
        self.reply(id).await
    }

    async fn reply(&mut self, id: u32) -> pb::Reply {
        self.matching(&format!("reply {id}"), |r| r.id == id).await
    }

    async fn push(&mut self) -> pb::Push {
        self.matching("a push", |r| r.id == 0 && r.push.is_some()).await.push.unwrap()
    }

    async fn matching(&mut self, what: &str, pred: impl Fn(&pb::Reply) -> bool) -> pb::Reply {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(i) = self.buf.iter().position(&pred) {
                return self.buf.remove(i).unwrap();
            }
            if let Err(end) = self.fill(deadline).await {
                panic!("waiting for {what}: {end}; buffered: {:?}", self.buf);
            }
        }
    }

    /// Reads one frame into the buffer; `Err` describes how reading ended.
    async fn fill(&mut self, deadline: Instant) -> Result<(), String> {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = match tokio::time::timeout(left, self.ws.next()).await {
            Err(_) => return Err("timeout".into()),
            Ok(None) => return Err("stream ended".into()),
            Ok(Some(Err(e))) => return Err(e.to_string()),
            Ok(Some(Ok(m))) => m,
        };
        match msg {
            Message::Binary(b) => {
                let mut buf = &b[..];
                while !buf.is_empty() {
                    let r = pb::Reply::decode_length_delimited(&mut buf).expect("a reply");
                    if r == pb::Reply::default() {
                        // Server ping: answer with the empty command.
                        self.pings += 1;
                        if self.auto_pong {
                            let _ = self.ws.send(Message::binary(vec![0u8])).await;
                        }
                    } else {
                        self.buf.push_back(r);
                    }
                }
                Ok(())
            }
            Message::Close(f) => Err(match f {
                Some(f) => format!("closed {} {}", u16::from(f.code), f.reason),
                None => "closed without code".into(),
            }),
            Message::Text(t) => panic!("text frame on the Protobuf protocol: {t}"),
            _ => Ok(()),
        }
    }

    /// Reads until `n` server pings arrived in all.
    async fn wait_pings(&mut self, n: usize, within: Duration) {
        let deadline = Instant::now() + within;
        while self.pings < n {
            if let Err(end) = self.fill(deadline).await {
                panic!("waiting for ping {n}: {end}");
            }
        }
    }

    async fn expect_close(&mut self) -> (u16, String) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.ws.next()).await {
                Ok(Some(Ok(Message::Close(Some(f))))) => {
                    return (f.code.into(), f.reason.to_string());
                }
                Ok(Some(Ok(_))) => {}
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    }
}

fn subscribe(channel: &str, recover: Option<(u64, &str)>) -> pb::Command {
    let mut s = pb::SubscribeRequest { channel: channel.into(), ..Default::default() };
    if let Some((offset, epoch)) = recover {
        s.recover = true;
        s.offset = offset;
        s.epoch = epoch.into();
    }
    pb::Command { subscribe: Some(s), ..Default::default() }
}

fn publish(channel: &str, data: &[u8]) -> pb::Command {
    pb::Command {
        publish: Some(pb::PublishRequest { channel: channel.into(), data: data.to_vec().into() }),
        ..Default::default()
    }
}

/// The headers of the 101 answer to an upgrade request with `extra` headers.
fn handshake(server: &Server, path: &str, extra: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8];
    while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap() == 1 {
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap().to_ascii_lowercase()
}

#[tokio::test]
async fn subprotocol_and_query_negotiation() {
    let server = Server::start(NS);
    let ws = "/connection/websocket";
    let h = handshake(&server, ws, "Sec-WebSocket-Protocol: foo, centrifuge-protobuf\r\n");
    assert!(h.starts_with("http/1.1 101"), "{h}");
    assert!(h.contains("sec-websocket-protocol: centrifuge-protobuf\r\n"), "{h}");
    let h = handshake(&server, ws, "Sec-WebSocket-Protocol: centrifuge-json\r\n");
    assert!(h.contains("sec-websocket-protocol: centrifuge-json\r\n"), "{h}");
    // An unknown subprotocol is not answered (a browser then fails the connection).
    let h = handshake(&server, ws, "Sec-WebSocket-Protocol: mqtt\r\n");
    assert!(h.starts_with("http/1.1 101") && !h.contains("sec-websocket-protocol"), "{h}");

    // The subprotocol and both query forms give a Protobuf connection.
    for ask in
        [Ask::Subprotocol, Ask::Query("cf_protocol=protobuf"), Ask::Query("x=1&format=protobuf")]
    {
        let mut c = PbClient::open(&server, ask).await;
        let r =
            c.call(pb::Command { connect: Some(Default::default()), ..Default::default() }).await;
        let connect = r.connect.expect("connect result");
        assert!(!connect.client.is_empty() && connect.ping > 0 && connect.pong);
    }
    // No query and no subprotocol: JSON as before.
    server.connected("anyone").await;
}

#[tokio::test]
async fn protobuf_client_connects_subscribes_publishes_and_reads_history_and_presence() {
    let server = Server::start(NS);
    let mut sub = PbClient::connected(&server).await;
    let r = sub.call(subscribe("h:room", None)).await;
    let s = r.subscribe.expect("subscribe result");
    assert!(s.epoch.is_empty(), "no position asked for");

    // Three publishes in one frame: three replies, batched by the server.
    let mut publisher = PbClient::connected(&server).await;
    let binary: &[u8] = &[0, 0xff, b'\n', 0x80, b'{'];
    let ids = publisher
        .send(vec![
            publish("h:room", binary),
            publish("h:room", b"{ \"a\" : 1 }"),
            publish("h:room", b"x"),
        ])
        .await;
    for id in ids {
        let r = publisher.reply(id).await;
        assert!(r.publish.is_some() && r.error.is_none(), "{r:?}");
    }
    let got: Vec<(Vec<u8>, u64)> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            let p = sub.push().await;
            assert_eq!(p.channel, "h:room");
            let p = p.r#pub.expect("publication");
            assert!(p.info.is_some(), "publisher info");
            v.push((p.data.to_vec(), p.offset));
        }
        v
    };
    assert_eq!(
        got,
        vec![(binary.to_vec(), 1), (br#"{"a":1}"#.to_vec(), 2), (b"x".to_vec(), 3)],
        "binary data byte for byte; JSON data compacted as for every client"
    );

    // History and presence.
    let r = sub
        .call(pb::Command {
            history: Some(pb::HistoryRequest {
                channel: "h:room".into(),
                limit: -1,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await;
    let h = r.history.expect("history result");
    assert_eq!(h.offset, 3);
    assert_eq!(h.publications[0].data.as_ref(), binary);
    let r = sub
        .call(pb::Command {
            presence: Some(pb::PresenceRequest { channel: "h:room".into() }),
            ..Default::default()
        })
        .await;
    assert_eq!(r.presence.expect("presence result").presence.len(), 1);

    // Recovery from offset 1 on a new connection: publications 2 and 3.
    let epoch = h.epoch;
    let mut again = PbClient::connected(&server).await;
    let s = again.call(subscribe("h:room", Some((1, &epoch)))).await.subscribe.unwrap();
    assert!(s.recovered && s.was_recovering);
    assert_eq!(s.publications.iter().map(|p| p.offset).collect::<Vec<_>>(), vec![2, 3]);

    // Errors are replies, as in JSON: an unknown namespace is 102.
    let r = sub.call(subscribe("nope:x", None)).await;
    assert_eq!(r.error.expect("error").code, 102);
}

#[tokio::test]
async fn json_and_protobuf_subscribers_share_a_channel_and_binary_data_closes_json_ones() {
    let server = Server::start(NS);
    let mut json_sub = server.connected("j").await;
    json_sub.subscribe_ok("h:mixed", json!({})).await;
    let mut pb_sub = PbClient::connected(&server).await;
    assert!(pb_sub.call(subscribe("h:mixed", None)).await.subscribe.is_some());

    // A JSON publisher: both get the publication.
    let mut json_pub = server.connected("p").await;
    json_pub.publish("h:mixed", json!({"from": "json"})).await;
    let p = json_sub.recv_matching("push", |v| v.get("push").is_some()).await;
    assert_eq!(p["push"]["pub"]["data"], json!({"from": "json"}));
    assert_eq!(pb_sub.push().await.r#pub.unwrap().data.as_ref(), br#"{"from":"json"}"#);

    // A Protobuf publisher sending JSON: both get it.
    let mut pb_pub = PbClient::connected(&server).await;
    assert!(pb_pub.call(publish("h:mixed", br#"{"from":"pb"}"#)).await.publish.is_some());
    let p = json_sub.recv_matching("push", |v| v.get("push").is_some()).await;
    assert_eq!(p["push"]["pub"]["data"], json!({"from": "pb"}));
    assert_eq!(p["push"]["pub"]["offset"], 2);
    assert_eq!(pb_sub.push().await.r#pub.unwrap().data.as_ref(), br#"{"from":"pb"}"#);

    // Binary data: the Protobuf subscriber gets the exact bytes; the JSON one
    // is closed with 3506 (inappropriate protocol), as Centrifugo does.
    let binary: &[u8] = b"\x00\x01\xfe\xff not json";
    assert!(pb_pub.call(publish("h:mixed", binary)).await.publish.is_some());
    let p = pb_sub.push().await.r#pub.unwrap();
    assert_eq!((p.data.as_ref(), p.offset), (binary, 3));
    assert_eq!(json_sub.expect_close().await, (3506, "inappropriate protocol".to_string()));

    // A JSON client recovering across the binary publication is closed too;
    // one that starts at the binary one's offset recovers normally.
    let history = pb::HistoryRequest { channel: "h:mixed".into(), ..Default::default() };
    let r = pb_sub.call(pb::Command { history: Some(history), ..Default::default() }).await;
    let epoch = r.history.expect("history result").epoch;
    let mut late = server.connected("late").await;
    let req = json!({"id": 2, "subscribe": {"channel": "h:mixed", "recover": true, "offset": 1, "epoch": epoch}});
    late.send_json(&req).await;
    // (The subscribe reply is never sent: the close comes instead.)
    assert_eq!(late.expect_close().await.0, 3506);
    let mut fine = server.connected("fine").await;
    let s =
        fine.subscribe_ok("h:mixed", json!({"recover": true, "offset": 3, "epoch": epoch})).await;
    assert_eq!(s["recovered"], true);
    assert!(s.get("publications").is_none());
    // And the Protobuf client keeps working.
    assert!(pb_pub.call(publish("h:mixed", b"\x01")).await.publish.is_some());
    assert_eq!(pb_sub.push().await.r#pub.unwrap().data.as_ref(), b"\x01");
}

/// A Protobuf client connected and subscribed before a test misbehaves; it
/// must still get publications afterwards (the Protobuf counterpart of
/// `common::Bystander`, which speaks JSON).
struct PbBystander {
    client: PbClient,
    channel: &'static str,
    n: u8,
}

impl PbBystander {
    async fn join(server: &Server, channel: &'static str) -> PbBystander {
        let mut client = PbClient::connected(server).await;
        assert!(client.call(subscribe(channel, None)).await.subscribe.is_some());
        PbBystander { client, channel, n: 0 }
    }

    /// Publishes into its channel and receives exactly that publication.
    async fn check(&mut self) {
        self.n += 1;
        let data = [b'p', b'b', 0, self.n];
        let r = self.client.call(publish(self.channel, &data)).await;
        assert!(r.publish.is_some() && r.error.is_none(), "bystander publish failed: {r:?}");
        let p = self.client.push().await;
        assert_eq!(p.channel, self.channel);
        assert_eq!(p.r#pub.expect("publication").data.as_ref(), data);
    }
}

/// A frame whose first varint says `len`, padded with zero bytes to `total`.
fn length_then_zeros(len: u64, total: usize) -> Vec<u8> {
    let mut frame = Vec::new();
    prost::encoding::encode_varint(len, &mut frame);
    frame.resize(total.max(frame.len()), 0);
    frame
}

#[tokio::test]
async fn bad_protobuf_input_closes_with_3501_and_other_clients_keep_their_publications() {
    let server = Server::start(&format!("{NS}\n[websocket]\nmax_message_size = 1024\n"));
    let bad_request = (3501, "bad request".to_string());
    let mut json_bystander = Bystander::join(&server).await;
    let mut pb_bystander = PbBystander::join(&server, "h:pb-bystander").await;

    let mut frame_with_a_cut_second_command = Vec::new();
    let ping = pb::Command { id: 2, ping: Some(pb::PingRequest {}), ..Default::default() };
    ping.encode_length_delimited(&mut frame_with_a_cut_second_command).unwrap();
    frame_with_a_cut_second_command.extend_from_slice(&[5, 0x08]);
    let mut without_id = Vec::new();
    subscribe("h:a", None).encode_length_delimited(&mut without_id).unwrap();
    let cases: Vec<(&str, Message)> = vec![
        ("a text frame on the Protobuf subprotocol", Message::text(r#"{"id":2,"ping":{}}"#)),
        ("a varint that never ends", Message::binary(vec![0xff; 11])),
        // The frame itself is within max_message_size (1024); the length in
        // it is past that limit, so no frame could ever hold the command.
        ("a length of max_message_size + 1", Message::binary(length_then_zeros(1025, 1024))),
        ("a length of 2^20 in a 4-byte frame", Message::binary(length_then_zeros(1 << 20, 4))),
        ("a length of 2^64 - 1", Message::binary(length_then_zeros(u64::MAX, 12))),
        ("a second command cut short", Message::binary(frame_with_a_cut_second_command)),
        ("a command without id", Message::binary(without_id)),
        // Field 1 as a length-delimited string running past the message.
        ("bytes that are not a Command", Message::binary(vec![3, 0x0a, 0x09, b'x'])),
    ];
    for (what, msg) in cases {
        let mut c = PbClient::connected(&server).await;
        c.ws.send(msg).await.unwrap();
        assert_eq!(c.expect_close().await, bad_request, "{what}");
        json_bystander.check().await;
        pb_bystander.check().await;
    }

    // A command before connect.
    let mut c = PbClient::open(&server, Ask::Subprotocol).await;
    c.send(vec![subscribe("h:a", None)]).await;
    assert_eq!(c.expect_close().await, bad_request, "command before connect");
    pb_bystander.check().await;

    // A frame larger than websocket.max_message_size: 1009, as for JSON.
    let mut c = PbClient::connected(&server).await;
    c.send(vec![publish("h:a", &[1u8; 2000])]).await;
    assert_eq!(c.expect_close().await.0, 1009, "frame too big");
    pb_bystander.check().await;

    // The node still serves both protocols, old connections and new ones.
    let mut c = PbClient::connected(&server).await;
    assert!(
        c.call(pb::Command { ping: Some(pb::PingRequest {}), ..Default::default() })
            .await
            .ping
            .is_some()
    );
    assert_survived(&server, &mut json_bystander).await;
    pb_bystander.check().await;
}

/// Upgrades with `protocols` in `Sec-WebSocket-Protocol` without checking the
/// answer (tungstenite's client refuses an unanswered subprotocol, as a
/// browser does); returns the lower-cased response head and the connection.
async fn upgrade_offering(
    server: &Server,
    protocols: &str,
) -> (String, WebSocketStream<TcpStream>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(("127.0.0.1", server.port)).await.unwrap();
    let request = format!(
        "GET /connection/websocket HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {protocols}\r\n\r\n"
    );
    s.write_all(request.as_bytes()).await.unwrap();
    // Byte by byte, so nothing after the head is read here.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let b = tokio::time::timeout(TIMEOUT, s.read_u8()).await.expect("response head").unwrap();
        head.push(b);
    }
    let ws = WebSocketStream::from_raw_socket(s, Role::Client, None).await;
    (String::from_utf8(head).unwrap().to_ascii_lowercase(), ws)
}

#[tokio::test]
async fn an_unknown_subprotocol_is_not_answered_and_the_connection_speaks_json() {
    let server = Server::start(NS);
    let mut json_bystander = Bystander::join(&server).await;
    let mut pb_bystander = PbBystander::join(&server, "h:pb-bystander").await;

    // Not answered: a browser (and tungstenite) then fails the connection
    // itself (RFC 6455 4.1: a subprotocol was asked for, none was chosen).
    let (head, mut ws) = upgrade_offering(&server, "centrifuge-unknown").await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(!head.contains("sec-websocket-protocol"), "{head}");
    // A client that speaks Protobuf anyway is on a JSON connection: its
    // binary frame is a bad request (3501), as in Centrifugo.
    let connect = pb::Command { id: 1, connect: Some(Default::default()), ..Default::default() };
    ws.send(Message::binary(connect.encode_length_delimited_to_vec())).await.unwrap();
    let mut pb_anyway =
        PbClient { ws, buf: VecDeque::new(), next_id: 2, pings: 0, auto_pong: true };
    assert_eq!(pb_anyway.expect_close().await, (3501, "bad request".to_string()));
    json_bystander.check().await;
    pb_bystander.check().await;

    // One that speaks JSON is served as JSON.
    let (head, mut ws) = upgrade_offering(&server, "centrifuge-unknown, mqtt").await;
    assert!(head.starts_with("http/1.1 101") && !head.contains("sec-websocket-protocol"), "{head}");
    ws.send(Message::text(r#"{"id":1,"connect":{}}"#)).await.unwrap();
    let reply = loop {
        match tokio::time::timeout(TIMEOUT, ws.next()).await.expect("connect reply") {
            Some(Ok(Message::Text(t))) => break t.to_string(),
            Some(Ok(_)) => {}
            other => panic!("expected the connect reply, got {other:?}"),
        }
    };
    let reply: serde_json::Value = serde_json::from_str(reply.lines().next().unwrap()).unwrap();
    assert_eq!(reply["id"], 1, "{reply}");
    assert!(reply["connect"]["client"].as_str().is_some_and(|c| !c.is_empty()), "{reply}");

    assert_survived(&server, &mut json_bystander).await;
    pb_bystander.check().await;
}

#[tokio::test]
async fn server_pings_are_empty_replies_answered_by_empty_commands() {
    let server = Server::start(&format!(
        "{NS}\n[client]\nping_interval = \"1s\"\npong_timeout = \"500ms\"\n"
    ));
    // Answered: three pings and the connection is still served.
    let mut c = PbClient::connected(&server).await;
    c.wait_pings(3, Duration::from_secs(6)).await;
    let ping = pb::Command { ping: Some(pb::PingRequest {}), ..Default::default() };
    assert!(c.call(ping).await.ping.is_some());
    // Not answered: 3012 (no pong).
    let mut c = PbClient::connected(&server).await;
    c.auto_pong = false;
    c.wait_pings(1, Duration::from_secs(3)).await;
    assert_eq!(c.expect_close().await, (3012, "no pong".to_string()));
}

#[tokio::test]
async fn binary_data_crosses_nodes_through_redis_and_is_recovered_from_its_history() {
    let redis = common::redis::RedisServer::start();
    let nodes = common::redis::start_nodes(2, &[redis.url()], false, NS);
    let mut pb_sub = PbClient::connected(&nodes[1]).await;
    let s = pb_sub.call(subscribe("h:x", None)).await.subscribe.expect("subscribe");
    assert!(s.epoch.is_empty());
    let mut json_sub = nodes[1].connected("j").await;
    json_sub.subscribe_ok("h:x", json!({})).await;
    let mut publisher = PbClient::connected(&nodes[0]).await;

    let binary: &[u8] = &[0xff, 0, 0x80, b'\n'];
    assert!(publisher.call(publish("h:x", br#"{"n":1}"#)).await.publish.is_some());
    assert!(publisher.call(publish("h:x", binary)).await.publish.is_some());
    let first = pb_sub.push().await.r#pub.unwrap();
    let second = pb_sub.push().await.r#pub.unwrap();
    assert_eq!((first.data.as_ref(), first.offset), (&br#"{"n":1}"#[..], 1));
    assert_eq!((second.data.as_ref(), second.offset), (binary, 2), "byte for byte through Redis");
    let p = json_sub.recv_matching("push", |v| v.get("push").is_some()).await;
    assert_eq!(p["push"]["pub"]["data"], json!({"n": 1}));
    assert_eq!(json_sub.expect_close().await.0, 3506);

    // Recovery from Redis history on the other node gives the same bytes.
    let history = pb::HistoryRequest { channel: "h:x".into(), ..Default::default() };
    let h = pb_sub.call(pb::Command { history: Some(history), ..Default::default() }).await;
    let epoch = h.history.expect("history").epoch;
    let mut again = PbClient::connected(&nodes[0]).await;
    let s = again.call(subscribe("h:x", Some((0, &epoch)))).await.subscribe.expect("subscribe");
    assert!(s.recovered, "{s:?}");
    let data: Vec<&[u8]> = s.publications.iter().map(|p| p.data.as_ref()).collect();
    assert_eq!(data, vec![&br#"{"n":1}"#[..], binary]);
}
