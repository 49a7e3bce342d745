//! The Protobuf form of the client protocol v2 (`--protocol protobuf`): the
//! WebSocket subprotocol `centrifuge-protobuf`, binary frames, each frame a
//! batch of `Command`s (client) or `Reply`s (server), each behind its length
//! as a varint. Message types are generated from the project's
//! `proto/centrifuge/client.proto` (the public protocol's names and field
//! numbers).
//!
//! Publication data is opaque bytes here; the generator puts the same probe
//! text into it as in JSON mode (`wire::Probe::encode`), so both modes
//! publish the same payload size and a server may mix JSON and Protobuf
//! clients on one channel.
//!
//! The hot paths do not go through prost's generated structs: a publish
//! command is written by hand into the frame buffer (no `String`/`Vec` per
//! publication), and [`fast`] reads pings, publish replies and probe
//! publications by walking the fields in place. Everything else is decoded
//! with prost ([`decode`]).

use prost::Message as _;
use prost::encoding::{encode_varint, encoded_len_varint};

use crate::wire::{self, Fast};

/// The generated client protocol types (`fanfare.client.v2`).
#[allow(clippy::all, missing_docs)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/fanfare.client.v2.rs"));
}

/// The WebSocket subprotocol that asks for Protobuf.
pub const SUBPROTOCOL: &str = "centrifuge-protobuf";

/// The client's pong: an empty `Command` (length 0), answering the server's
/// ping, an empty `Reply`.
pub const PONG: &[u8] = &[0];

/// One `connect` command (length-delimited) with `token` and our name.
pub fn connect(id: u32, token: &str) -> Vec<u8> {
    pb::Command {
        id,
        connect: Some(pb::ConnectRequest {
            token: token.to_string(),
            name: "fanfare-loadtest".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_length_delimited_to_vec()
}

/// Appends one `subscribe` command (length-delimited).
pub fn subscribe(out: &mut Vec<u8>, id: u32, channel: &str) {
    let cmd = pb::Command {
        id,
        subscribe: Some(pb::SubscribeRequest {
            channel: channel.to_string(),
            ..Default::default()
        }),
        ..Default::default()
    };
    cmd.encode_length_delimited(out).expect("a Vec grows as needed");
}

/// Field keys: (field number << 3) | wire type (0 varint, 2 length-delimited).
const KEY_ID: u64 = 1 << 3;
const KEY_PUBLISH: u64 = (7 << 3) | 2;
const KEY_CHANNEL: u64 = (1 << 3) | 2;
const KEY_DATA: u64 = (2 << 3) | 2;

/// Appends `Command { id, publish: PublishRequest { channel, data } }`,
/// length-delimited, written field by field (what prost would write, without
/// building the message first; checked against prost's decoder in the tests).
pub fn publish(out: &mut Vec<u8>, id: u32, channel: &str, data: &[u8]) {
    let field = |len: usize| 1 + encoded_len_varint(len as u64) + len;
    let request = field(channel.len()) + field(data.len());
    let command = 1 + encoded_len_varint(u64::from(id)) + field(request);
    encode_varint(command as u64, out);
    encode_varint(KEY_ID, out);
    encode_varint(u64::from(id), out);
    encode_varint(KEY_PUBLISH, out);
    encode_varint(request as u64, out);
    encode_varint(KEY_CHANNEL, out);
    encode_varint(channel.len() as u64, out);
    out.extend_from_slice(channel.as_bytes());
    encode_varint(KEY_DATA, out);
    encode_varint(data.len() as u64, out);
    out.extend_from_slice(data);
}

/// The length-delimited messages of a binary frame, in order; an `Err` (a
/// bad varint or a length past the end of the frame) ends the iteration.
pub fn messages(frame: &[u8]) -> impl Iterator<Item = Result<&[u8], String>> {
    let mut rest = frame;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let r = match prost::encoding::decode_varint(&mut rest) {
            Err(e) => Err(format!("message length: {e}")),
            Ok(len) if len > rest.len() as u64 => {
                Err(format!("message length {len} past the end of the frame ({} left)", rest.len()))
            }
            Ok(len) => {
                let (msg, after) = rest.split_at(len as usize);
                rest = after;
                Ok(msg)
            }
        };
        if r.is_err() {
            rest = &[];
        }
        Some(r)
    })
}

/// Decodes one `Reply` (without its length prefix) completely.
pub fn decode(msg: &[u8]) -> Result<pb::Reply, prost::DecodeError> {
    pb::Reply::decode(msg)
}

/// A field's value as read in place.
enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    /// Fixed 32/64-bit values: skipped (the fields read here have none).
    Fixed,
}

/// The next field of a message: (field number, value); `None` at the end or
/// on anything malformed (the caller then takes the complete decode).
fn next_field<'a>(buf: &mut &'a [u8]) -> Option<(u64, Value<'a>)> {
    if buf.is_empty() {
        return None;
    }
    let key = prost::encoding::decode_varint(buf).ok()?;
    let value = match key & 7 {
        0 => Value::Varint(prost::encoding::decode_varint(buf).ok()?),
        2 => {
            let len = usize::try_from(prost::encoding::decode_varint(buf).ok()?).ok()?;
            let (v, rest) = (buf.get(..len)?, buf.get(len..)?);
            *buf = rest;
            Value::Bytes(v)
        }
        1 | 5 => {
            let n = if key & 7 == 1 { 8 } else { 4 };
            *buf = buf.get(n..)?;
            Value::Fixed
        }
        _ => return None,
    };
    Some((key >> 3, value))
}

/// Classifies one `Reply` (without its length prefix) without decoding it:
/// the server ping (an empty reply), a reply to command `id` without an
/// error, or a publication push whose data starts with our probe. Fields may
/// come in any order; anything else (errors, other pushes, unknown shapes)
/// is [`Fast::Other`]: decode it with [`decode`].
pub fn fast(msg: &[u8]) -> Fast<'_> {
    if msg.is_empty() {
        return Fast::Ping;
    }
    fast_reply(msg).unwrap_or(Fast::Other)
}

fn fast_reply(mut msg: &[u8]) -> Option<Fast<'_>> {
    let (mut id, mut push, mut result) = (0u64, None, false);
    while !msg.is_empty() {
        match next_field(&mut msg)? {
            (1, Value::Varint(v)) => id = v,
            // error
            (2, _) => return None,
            (4, Value::Bytes(p)) => push = Some(p),
            // connect, subscribe, publish, … results
            (5..=15, Value::Bytes(_)) => result = true,
            _ => {}
        }
    }
    match push {
        Some(p) if id == 0 => fast_push(p),
        None if id > 0 && id <= u64::from(u32::MAX) && result => Some(Fast::Reply(id as u32)),
        _ => None,
    }
}

/// A push whose only body is a publication carrying our probe.
fn fast_push(mut push: &[u8]) -> Option<Fast<'_>> {
    let (mut channel, mut publication) = (None, None);
    while !push.is_empty() {
        match next_field(&mut push)? {
            (2, Value::Bytes(c)) => channel = Some(c),
            (4, Value::Bytes(p)) => publication = Some(p),
            // join, leave, unsubscribe, message, subscribe, connect, disconnect, refresh
            (5..=12, _) => return None,
            _ => {}
        }
    }
    let mut publication = publication?;
    let mut data = None;
    while !publication.is_empty() {
        if let (4, Value::Bytes(d)) = next_field(&mut publication)? {
            data = Some(d);
        }
    }
    let channel = std::str::from_utf8(channel?).ok()?;
    Some(Fast::Probe { channel, probe: wire::fast_probe_bytes(data?)? })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Probe;

    fn one(frame: &[u8]) -> &[u8] {
        let msgs: Vec<_> = messages(frame).collect::<Result<_, _>>().unwrap();
        assert_eq!(msgs.len(), 1);
        msgs[0]
    }

    #[test]
    fn hand_written_publish_is_what_prost_decodes() {
        let data = Probe { ts: 1_700_000_000_123_456_789, seq: 42, p: 3 }.encode(300);
        let mut frame = Vec::new();
        subscribe(&mut frame, 1, "lt-1");
        publish(&mut frame, 300, "lt-1", data.as_bytes());
        publish(&mut frame, 1, "", b"");
        let cmds: Vec<pb::Command> =
            messages(&frame).map(|m| pb::Command::decode(m.unwrap()).unwrap()).collect();
        assert_eq!(cmds.len(), 3);
        assert_eq!(cmds[0].subscribe.as_ref().unwrap().channel, "lt-1");
        let p = cmds[1].publish.as_ref().unwrap();
        assert_eq!(
            (cmds[1].id, p.channel.as_str(), p.data.as_slice()),
            (300, "lt-1", data.as_bytes())
        );
        assert_eq!(cmds[2].id, 1);
        assert_eq!(cmds[2].publish, Some(pb::PublishRequest::default()));
        let c = pb::Command::decode(one(&connect(1, "tok"))).unwrap();
        assert_eq!(c.connect.unwrap().token, "tok");
    }

    fn reply(r: pb::Reply) -> Vec<u8> {
        r.encode_length_delimited_to_vec()
    }

    fn publication_push(channel: &str, data: &[u8]) -> pb::Reply {
        pb::Reply {
            push: Some(pb::Push {
                channel: channel.into(),
                r#pub: Some(pb::Publication {
                    data: data.to_vec(),
                    offset: 17,
                    info: Some(pb::ClientInfo { user: "u".into(), ..Default::default() }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn fast_path_agrees_with_the_complete_decode() {
        let probe = Probe { ts: 1_700_000_000_123_456_789, seq: 42, p: 3 };
        let data = probe.encode(128);
        let mut frame = reply(pb::Reply::default());
        frame.extend(reply(publication_push("lt-7", data.as_bytes())));
        frame.extend(reply(pb::Reply {
            id: 9,
            publish: Some(pb::PublishResult {}),
            ..Default::default()
        }));
        let msgs: Vec<&[u8]> = messages(&frame).collect::<Result<_, _>>().unwrap();
        assert_eq!(fast(msgs[0]), Fast::Ping);
        assert_eq!(fast(msgs[1]), Fast::Probe { channel: "lt-7", probe });
        let full = decode(msgs[1]).unwrap().push.unwrap();
        assert_eq!(full.channel, "lt-7");
        assert_eq!(full.r#pub.unwrap().data, data.as_bytes());
        assert_eq!(fast(msgs[2]), Fast::Reply(9));

        // Fields in another order (the pub before the channel, data last) as
        // another encoder may write them: still the fast path.
        let mut publication = Vec::new();
        prost::encoding::uint64::encode(6, &17, &mut publication);
        prost::encoding::bytes::encode(4, &data.as_bytes().to_vec(), &mut publication);
        let mut push = Vec::new();
        prost::encoding::bytes::encode(4, &publication, &mut push);
        prost::encoding::string::encode(2, &"lt-7".to_string(), &mut push);
        let mut msg = Vec::new();
        prost::encoding::bytes::encode(4, &push, &mut msg);
        assert_eq!(fast(&msg), Fast::Probe { channel: "lt-7", probe });
        assert_eq!(decode(&msg).unwrap().push.unwrap().channel, "lt-7");

        // Everything unusual goes the complete way.
        let others = [
            pb::Reply {
                id: 3,
                error: Some(pb::Error { code: 103, ..Default::default() }),
                ..Default::default()
            },
            // A publish result with id 0.
            pb::Reply { publish: Some(pb::PublishResult {}), ..Default::default() },
            publication_push("a", b"{\"text\":\"hi\"}"),
            publication_push("a", b"\x00\x01binary"),
            publication_push("a", b"{\"ts\":1,\"seq\":1,\"p\":99999999999}"),
            pb::Reply {
                push: Some(pb::Push {
                    channel: "a".into(),
                    unsubscribe: Some(pb::Unsubscribe { code: 2000, ..Default::default() }),
                    ..Default::default()
                }),
                ..Default::default()
            },
            pb::Reply {
                push: Some(pb::Push {
                    disconnect: Some(pb::Disconnect { code: 3001, ..Default::default() }),
                    ..Default::default()
                }),
                ..Default::default()
            },
        ];
        for r in others {
            let bytes = reply(r.clone());
            assert_eq!(fast(one(&bytes)), Fast::Other, "{r:?}");
            assert_eq!(decode(one(&bytes)).unwrap(), r);
        }
        // Malformed: a length past the message's end.
        assert_eq!(fast(&[0x22, 0x05, 0x12]), Fast::Other);
    }

    #[test]
    fn frames_with_bad_lengths_end_in_an_error() {
        let mut frame = reply(pb::Reply::default());
        frame.extend_from_slice(&[0x05, 0x08]);
        let got: Vec<_> = messages(&frame).collect();
        assert_eq!(got.len(), 2);
        assert!(got[0].is_ok() && got[1].is_err());
        assert!(messages(&[0xff; 11]).next().unwrap().is_err());
    }
}
