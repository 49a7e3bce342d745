//! The slice of the Centrifugo client protocol v2 (JSON) a load generator
//! needs: encoding commands, decoding replies and publication pushes, and the
//! probe payload every publication carries (in both protocols: the Protobuf
//! form, `protobuf.rs`, carries the same probe text as its `bytes` data).

use std::borrow::Cow;
use std::io::Write;

use serde::Deserialize;
use serde_json::value::RawValue;

/// Appends a JSON string literal.
fn push_str(out: &mut String, s: &str) {
    out.push_str(&serde_json::to_string(s).expect("a str always serializes"));
}

/// `{"id":N,"connect":{"token":..,"name":"fanfare-loadtest"}}`
pub fn connect(id: u32, token: &str) -> String {
    let mut s = format!("{{\"id\":{id},\"connect\":{{\"token\":");
    push_str(&mut s, token);
    s.push_str(",\"name\":\"fanfare-loadtest\"}}");
    s
}

/// Appends a JSON string literal to bytes.
fn push_str_bytes(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(out, s).expect("a str always serializes");
}

/// Appends `{"id":N,"subscribe":{"channel":..}}` (newline-separated from what precedes).
pub fn subscribe(out: &mut Vec<u8>, id: u32, channel: &str) {
    if !out.is_empty() {
        out.push(b'\n');
    }
    let _ = write!(out, "{{\"id\":{id},\"subscribe\":{{\"channel\":");
    push_str_bytes(out, channel);
    out.extend_from_slice(b"}}");
}

/// Appends `{"id":N,"publish":{"channel":..,"data":DATA}}`; `data` is raw JSON.
pub fn publish(out: &mut Vec<u8>, id: u32, channel: &str, data: &str) {
    if !out.is_empty() {
        out.push(b'\n');
    }
    let _ = write!(out, "{{\"id\":{id},\"publish\":{{\"channel\":");
    push_str_bytes(out, channel);
    out.extend_from_slice(b",\"data\":");
    out.extend_from_slice(data.as_bytes());
    out.extend_from_slice(b"}}");
}

/// Body of `POST /api/publish`: `{"channel":..,"data":DATA}`.
pub fn api_publish(channel: &str, data: &str) -> String {
    let mut s = String::from("{\"channel\":");
    push_str(&mut s, channel);
    s.push_str(",\"data\":");
    s.push_str(data);
    s.push('}');
    s
}

/// The data of every publication: send time (unix nanoseconds), sequence
/// number per (channel, publisher), publisher index, padding to the payload size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Probe {
    pub ts: u64,
    pub seq: u64,
    pub p: u32,
}

impl Probe {
    /// Encodes the probe padded with `x` to `size` bytes (never shorter than the header).
    pub fn encode(&self, size: usize) -> String {
        let mut s =
            format!("{{\"ts\":{},\"seq\":{},\"p\":{},\"pad\":\"", self.ts, self.seq, self.p);
        let pad = size.saturating_sub(s.len() + 2);
        s.extend(std::iter::repeat_n('x', pad));
        s.push_str("\"}");
        s
    }
}

/// One reply or push from the server (only the fields used here).
#[derive(Debug, Deserialize)]
pub struct Incoming<'a> {
    #[serde(default)]
    pub id: u32,
    #[serde(default)]
    pub error: Option<ReplyError>,
    #[serde(borrow, default)]
    pub push: Option<Push<'a>>,
}

#[derive(Debug, Deserialize)]
pub struct ReplyError {
    #[serde(default)]
    pub code: u32,
    #[serde(default)]
    pub message: String,
}

#[derive(Debug, Deserialize)]
pub struct Push<'a> {
    #[serde(borrow, default)]
    pub channel: Cow<'a, str>,
    #[serde(borrow, default, rename = "pub")]
    pub publication: Option<PubBody<'a>>,
    #[serde(default)]
    pub disconnect: Option<DisconnectPush>,
    #[serde(default)]
    pub unsubscribe: Option<UnsubscribePush>,
}

#[derive(Debug, Deserialize)]
pub struct PubBody<'a> {
    #[serde(borrow, default)]
    pub data: Option<&'a RawValue>,
}

#[derive(Debug, Deserialize)]
pub struct DisconnectPush {
    #[serde(default)]
    pub code: u32,
    #[serde(default)]
    pub reason: String,
}

#[derive(Debug, Deserialize)]
pub struct UnsubscribePush {
    #[serde(default)]
    pub code: u32,
}

/// What one line of a server frame is.
#[derive(Debug)]
pub enum Line<'a> {
    /// The server ping `{}`: answer with `{}`.
    Ping,
    Message(Incoming<'a>),
}

/// Splits a frame into its newline-delimited objects.
pub fn lines(frame: &str) -> impl Iterator<Item = Result<Line<'_>, serde_json::Error>> {
    frame.split('\n').map(str::trim).filter(|l| !l.is_empty()).map(|l| {
        if l == "{}" { Ok(Line::Ping) } else { serde_json::from_str(l).map(Line::Message) }
    })
}

/// What a line is, told apart without a JSON parse for the shapes the hot
/// path sees: pings, publications carrying our probe, and replies without an
/// error. Anything else is [`Fast::Other`]: decode it with [`lines`]' parser.
#[derive(Debug, PartialEq, Eq)]
pub enum Fast<'a> {
    Ping,
    /// A publication push on `channel` whose data starts with our probe
    /// (as [`Probe::encode`] writes it; servers embed `data` verbatim).
    Probe {
        channel: &'a str,
        probe: Probe,
    },
    /// A reply to command `id` that carries no `"error"`.
    Reply(u32),
    Other,
}

/// Classifies one line (already trimmed) of a server frame.
pub fn fast(line: &str) -> Fast<'_> {
    if line == "{}" {
        return Fast::Ping;
    }
    if !line.ends_with('}') {
        return Fast::Other;
    }
    if let Some(rest) = line.strip_prefix("{\"push\":{") {
        return fast_probe(rest).unwrap_or(Fast::Other);
    }
    if let Some(rest) = line.strip_prefix("{\"id\":") {
        let (id, tail) = digits(rest.as_bytes()).unwrap_or((0, b""));
        // The digits are ASCII: what follows them is a str again.
        let rest = &rest[rest.len() - tail.len()..];
        if id > 0
            && id <= u64::from(u32::MAX)
            && rest.starts_with(',')
            && !rest.contains("\"error\"")
        {
            return Fast::Reply(id as u32);
        }
    }
    Fast::Other
}

/// The probe publication in the body of a push, if it is one.
fn fast_probe(push: &str) -> Option<Fast<'_>> {
    const CHANNEL: &str = "\"channel\":\"";
    const DATA: &str = "\"data\":{\"ts\":";
    // fanfare's field order, checked in place: `"channel":"C","pub":{"data":{"ts":`.
    if let Some(rest) = push.strip_prefix(CHANNEL) {
        let end = rest.find('"')?;
        if let Some(data) = rest[end..].strip_prefix("\",\"pub\":{\"data\":{\"ts\":") {
            return probe_fields(&rest[..end], data.as_bytes());
        }
    }
    // Any other order: search for the fields.
    let at = push.find(CHANNEL)? + CHANNEL.len();
    let end = push[at..].find('"')?;
    push.find("\"pub\":{")?;
    let data = &push[push.find(DATA)? + DATA.len()..];
    probe_fields(&push[at..at + end], data.as_bytes())
}

/// `data` follows `{"ts":` of a probe: `N,"seq":N,"p":N` and more.
fn probe_fields<'a>(channel: &'a str, data: &[u8]) -> Option<Fast<'a>> {
    if channel.bytes().any(|b| b == b'\\') {
        return None;
    }
    Some(Fast::Probe { channel, probe: probe_after_ts(data)? })
}

/// The probe whose text (as [`Probe::encode`] writes it) is `data`, read
/// without a JSON parse: `{"ts":N,"seq":N,"p":N` and more.
pub fn fast_probe_bytes(data: &[u8]) -> Option<Probe> {
    probe_after_ts(data.strip_prefix(b"{\"ts\":")?)
}

fn probe_after_ts(data: &[u8]) -> Option<Probe> {
    let (ts, rest) = digits(data)?;
    let (seq, rest) = digits(rest.strip_prefix(b",\"seq\":")?)?;
    let (p, rest) = digits(rest.strip_prefix(b",\"p\":")?)?;
    if !rest.starts_with(b",") && !rest.starts_with(b"}") {
        return None;
    }
    Some(Probe { ts, seq, p: u32::try_from(p).ok()? })
}

/// A decimal number at the start of `s` and what follows it.
fn digits(s: &[u8]) -> Option<(u64, &[u8])> {
    let n = s.iter().take_while(|b| b.is_ascii_digit()).count();
    if n == 0 || n > 19 {
        return None;
    }
    let v = s[..n].iter().fold(0u64, |v, d| v * 10 + u64::from(d - b'0'));
    Some((v, &s[n..]))
}

impl PubBody<'_> {
    /// The probe in the publication's data, when it carries one.
    pub fn probe(&self) -> Option<Probe> {
        serde_json::from_str(self.data?.get()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_valid_json() {
        let c: serde_json::Value = serde_json::from_str(&connect(1, "t\"k")).unwrap();
        assert_eq!(c["connect"]["token"], "t\"k");
        let mut s = Vec::new();
        subscribe(&mut s, 2, "a");
        publish(&mut s, 3, "a", r#"{"x":1}"#);
        let s = String::from_utf8(s).unwrap();
        let v: Vec<serde_json::Value> =
            s.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(v[0]["subscribe"]["channel"], "a");
        assert_eq!(v[1]["publish"]["data"]["x"], 1);
    }

    #[test]
    fn fast_path_agrees_with_the_full_parse() {
        let probe = Probe { ts: 1_700_000_000_123_456_789, seq: 42, p: 3 };
        let data = probe.encode(128);
        let fanfare = format!(
            "{{\"push\":{{\"channel\":\"lt-7\",\"pub\":{{\"data\":{data},\"offset\":5}}}}}}"
        );
        // Other field orders and extra fields, as another server may write them.
        let other = format!(
            "{{\"push\":{{\"pub\":{{\"info\":{{\"user\":\"u\"}},\"data\":{data}}},\"channel\":\"lt-7\"}}}}"
        );
        for line in [&fanfare, &other] {
            assert_eq!(fast(line), Fast::Probe { channel: "lt-7", probe }, "{line}");
            let Ok(Line::Message(m)) = lines(line).next().unwrap() else { panic!() };
            let push = m.push.unwrap();
            assert_eq!(push.channel, "lt-7");
            assert_eq!(push.publication.unwrap().probe(), Some(probe));
        }
        assert_eq!(fast("{}"), Fast::Ping);
        assert_eq!(fast(r#"{"id":17,"publish":{}}"#), Fast::Reply(17));
        // Everything unusual goes the slow, complete way.
        for line in [
            r#"{"id":17,"error":{"code":103,"message":"permission denied"}}"#,
            r#"{"id":0,"publish":{}}"#,
            r#"{"push":{"channel":"a\"b","pub":{"data":{"ts":1,"seq":1,"p":0}}}}"#,
            r#"{"push":{"channel":"a","pub":{"data":{"text":"hi"}}}}"#,
            r#"{"push":{"channel":"a","pub":{"data":{"ts":1,"seq":1,"p":99999999999}}}}"#,
            r#"{"push":{"channel":"a","join":{"info":{"user":"u"}}}}"#,
            r#"{"push":{"channel":"a","unsubscribe":{"code":2000}}}"#,
            r#"{"push":{"disconnect":{"code":3001,"reason":"shutdown"}}}"#,
            r#"{"id":1,"connect":{"client":"c"}}"#.trim_end_matches('}'),
        ] {
            assert_eq!(fast(line), Fast::Other, "{line}");
        }
    }

    #[test]
    fn probe_round_trips_at_the_requested_size() {
        let p = Probe { ts: 1_700_000_000_000_000_000, seq: 42, p: 3 };
        let s = p.encode(200);
        assert_eq!(s.len(), 200);
        let frame = format!(
            "{{}}\n{{\"push\":{{\"channel\":\"c\",\"pub\":{{\"data\":{s},\"offset\":5}}}}}}\n"
        );
        let parsed: Vec<_> = lines(&frame).collect::<Result<_, _>>().unwrap();
        assert!(matches!(parsed[0], Line::Ping));
        let Line::Message(m) = &parsed[1] else { panic!() };
        let push = m.push.as_ref().unwrap();
        assert_eq!(push.channel, "c");
        assert_eq!(push.publication.as_ref().unwrap().probe(), Some(p));
    }
}
