//! The slice of the Centrifugo client protocol v2 (JSON) a load generator
//! needs: encoding commands, decoding replies and publication pushes, and the
//! probe payload every publication carries.

use std::borrow::Cow;
use std::fmt::Write;

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

/// Appends `{"id":N,"subscribe":{"channel":..}}` (newline-separated from what precedes).
pub fn subscribe(out: &mut String, id: u32, channel: &str) {
    if !out.is_empty() {
        out.push('\n');
    }
    let _ = write!(out, "{{\"id\":{id},\"subscribe\":{{\"channel\":");
    push_str(out, channel);
    out.push_str("}}");
}

/// Appends `{"id":N,"publish":{"channel":..,"data":DATA}}`; `data` is raw JSON.
pub fn publish(out: &mut String, id: u32, channel: &str, data: &str) {
    if !out.is_empty() {
        out.push('\n');
    }
    let _ = write!(out, "{{\"id\":{id},\"publish\":{{\"channel\":");
    push_str(out, channel);
    out.push_str(",\"data\":");
    out.push_str(data);
    out.push_str("}}");
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
        let mut s = String::new();
        subscribe(&mut s, 2, "a");
        publish(&mut s, 3, "a", r#"{"x":1}"#);
        let v: Vec<serde_json::Value> =
            s.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(v[0]["subscribe"]["channel"], "a");
        assert_eq!(v[1]["publish"]["data"]["x"], 1);
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
