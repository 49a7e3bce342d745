//! Fossil delta compression of publications: a subscribe request with
//! `delta: "fossil"` in a namespace whose `allowed_delta_types` has it.
//!
//! Such a subscription receives each publication either in full or as a
//! fossil delta against the previous publication of the channel, which the
//! client must already hold; the hub decides that per subscriber
//! (`hub::Subscriber`), this module builds the forms. Every form is built at
//! most once per publication and codec, never per subscriber.
//!
//! The wire forms follow the SDKs' decoders. Protobuf carries the bytes (full
//! data, or the delta) as they are. JSON carries a delta subscription's data
//! as a JSON *string*: centrifuge-js' `JsonCodec.applyDeltaIfNeeded` parses a
//! full payload from the string and UTF-8-encodes a delta string back into
//! the fossil bytes, so both forms are strings there, never raw JSON.

use bytes::Bytes;
use fanfare_protocol::{Codec, Publication, is_json};
use serde::{Deserialize, Serialize};

/// A delta encoding a namespace may allow (`allowed_delta_types`). Unknown
/// names are refused when the configuration is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum DeltaType {
    Fossil,
}

impl TryFrom<String> for DeltaType {
    type Error = String;

    fn try_from(name: String) -> Result<Self, String> {
        match name.as_str() {
            "fossil" => Ok(DeltaType::Fossil),
            _ => Err(format!("unknown delta type {name:?} (known: \"fossil\")")),
        }
    }
}

impl DeltaType {
    /// The name a subscribe request uses.
    pub fn as_str(self) -> &'static str {
        match self {
            DeltaType::Fossil => "fossil",
        }
    }
}

/// The fossil delta turning `base` into `target`, when it is shorter than
/// `target` (otherwise sending the full data costs less).
pub fn fossil(base: &[u8], target: &[u8]) -> Option<Bytes> {
    // `fossil_delta::delta` takes the target first.
    let d = fossil_delta::delta(target, base);
    (d.len() < target.len()).then(|| Bytes::from(d))
}

/// `data` as a JSON string literal; `None` when it is not UTF-8.
fn json_string(data: &[u8]) -> Option<Bytes> {
    let s = std::str::from_utf8(data).ok()?;
    Some(Bytes::from(serde_json::to_vec(s).expect("serializing a str into a Vec cannot fail")))
}

/// The full publication as a delta subscription receives it in `codec`.
/// `None`: a JSON client cannot receive this data (it is not JSON), which
/// closes it with 3506 as it would without delta.
pub fn full_form(p: &Publication, codec: Codec) -> Option<Publication> {
    match codec {
        Codec::Protobuf => Some(Publication { delta: false, ..p.clone() }),
        Codec::Json => {
            if !is_json(&p.data) {
                return None;
            }
            Some(Publication { data: json_string(&p.data)?, delta: false, ..p.clone() })
        }
    }
}

/// `p` carried as the fossil delta `patch`. `None` when `codec` cannot carry
/// it and the full form must go instead: for JSON, a delta whose bytes are
/// not UTF-8 (a copy boundary can split a multi-byte character, and the SDK
/// re-encodes the string it gets as UTF-8), or data that is not JSON.
pub fn delta_form(p: &Publication, patch: &Bytes, codec: Codec) -> Option<Publication> {
    let data = match codec {
        Codec::Protobuf => patch.clone(),
        Codec::Json => {
            if !is_json(&p.data) {
                return None;
            }
            json_string(patch)?
        }
    };
    Some(Publication { data, delta: true, ..p.clone() })
}

/// Recovered publications for a delta subscription (subscribe reply): the
/// first in full, each next one as a delta against the one before it when
/// that is shorter. Done once per subscribe, not on the publication path.
pub fn recovered(pubs: Vec<Publication>, codec: Codec) -> Vec<Publication> {
    let mut out = Vec::with_capacity(pubs.len());
    for (i, p) in pubs.iter().enumerate() {
        let as_delta = i
            .checked_sub(1)
            .and_then(|prev| fossil(&pubs[prev].data, &p.data))
            .and_then(|patch| delta_form(p, &patch, codec));
        // Data a JSON client cannot receive stays as it is: the encoder
        // refuses it and the session closes with 3506, as for a push.
        out.push(as_delta.or_else(|| full_form(p, codec)).unwrap_or_else(|| p.clone()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(version: u32, text: &str) -> Vec<u8> {
        let body: String = (0..60).map(|i| format!("\"k{i}\":\"value {i} {text}\",")).collect();
        format!("{{{body}\"version\":{version}}}").into_bytes()
    }

    #[test]
    fn a_fossil_delta_applies_back_to_the_target_and_is_smaller() {
        let a = doc(1, "same");
        let b = doc(2, "same");
        let patch = fossil(&a, &b).expect("a one-digit change is worth a delta");
        assert!(patch.len() < 40, "{} bytes for a one-digit change", patch.len());
        assert_eq!(fossil_delta::apply(&a, &patch).unwrap(), b);
        // Unrelated data: the delta would not be shorter.
        assert_eq!(fossil(b"{\"a\":1}", b"[\"something else entirely\"]"), None);
    }

    #[test]
    fn json_forms_are_strings_holding_the_data_or_the_delta() {
        let a = doc(1, "x");
        let b = doc(2, "x");
        let p = Publication { data: Bytes::from(b.clone()), offset: 2, ..Default::default() };
        let full = full_form(&p, Codec::Json).unwrap();
        let s: String = serde_json::from_slice(&full.data).unwrap();
        assert_eq!(s.as_bytes(), b);
        assert!(!full.delta);
        let patch = fossil(&a, &b).unwrap();
        let d = delta_form(&p, &patch, Codec::Json).unwrap();
        let s: String = serde_json::from_slice(&d.data).unwrap();
        assert_eq!(fossil_delta::apply(&a, s.as_bytes()).unwrap(), b);
        assert!(d.delta);
        // Protobuf: the bytes as they are.
        assert_eq!(delta_form(&p, &patch, Codec::Protobuf).unwrap().data, patch);
        assert_eq!(full_form(&p, Codec::Protobuf).unwrap().data, p.data);
    }

    #[test]
    fn a_delta_that_splits_a_character_goes_to_json_clients_in_full() {
        let p = Publication { data: Bytes::from_static(b"\"\xc3\xa9\""), ..Default::default() };
        let split = Bytes::from_static(b"3\n2:\"\xc3");
        assert_eq!(delta_form(&p, &split, Codec::Json), None);
        assert!(delta_form(&p, &split, Codec::Protobuf).is_some());
        // Binary data cannot reach a JSON client in any form.
        let bin = Publication { data: Bytes::from_static(b"\x00\xff"), ..Default::default() };
        assert_eq!(full_form(&bin, Codec::Json), None);
    }

    #[test]
    fn recovered_publications_chain_from_a_full_first_one() {
        let pubs: Vec<Publication> = (1..=4)
            .map(|v| Publication {
                data: Bytes::from(doc(v, "y")),
                offset: v as u64,
                ..Default::default()
            })
            .collect();
        for codec in [Codec::Json, Codec::Protobuf] {
            let out = recovered(pubs.clone(), codec);
            assert_eq!(out.iter().map(|p| p.delta).collect::<Vec<_>>(), [false, true, true, true]);
            let raw = |p: &Publication| match codec {
                Codec::Json => serde_json::from_slice::<String>(&p.data).unwrap().into_bytes(),
                Codec::Protobuf => p.data.to_vec(),
            };
            let mut base = raw(&out[0]);
            assert_eq!(base, pubs[0].data);
            for (got, want) in out[1..].iter().zip(&pubs[1..]) {
                base = fossil_delta::apply(&base, raw(got)).unwrap();
                assert_eq!(base, want.data, "{codec:?}");
                assert_eq!(got.offset, want.offset);
            }
        }
    }
}
