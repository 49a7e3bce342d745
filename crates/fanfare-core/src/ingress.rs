//! The one rule for publication data entering the node, on every path (client
//! `publish`, HTTP and gRPC control API): valid UTF-8 JSON, at most
//! `max_size` bytes, nested at most `max_depth` levels, and kept in compact
//! form (insignificant whitespace removed here, once, not per subscriber).
//!
//! The one exception is a Protobuf client's publish ([`DataRules::check_opaque`]):
//! for Protobuf clients data is opaque bytes, so data that is not JSON is kept
//! as it came (size limit still applies). JSON subscribers cannot receive it
//! and are closed with 3506 when it reaches them, as in Centrifugo; data that
//! is JSON follows the JSON rule.
//!
//! Why: JSON clients get data embedded verbatim into newline-delimited frames.
//! A pretty-printed value carries raw newlines, which split the frame inside a
//! message and make every SDK subscriber of the channel fail to parse it (and
//! fail again on every recovery while the publication is kept). Data that is
//! not JSON, or not UTF-8, breaks the same clients in other ways. A value
//! larger than a client's queue bound would close every subscriber with 3008.

use bytes::Bytes;

/// Limits for publication data (`client.max_publication_size`,
/// `client.max_publication_depth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataRules {
    /// Largest accepted data in bytes, before compaction.
    pub max_size: usize,
    /// Deepest accepted nesting of arrays and objects (a scalar is depth 0).
    pub max_depth: usize,
}

impl Default for DataRules {
    fn default() -> Self {
        Self { max_size: 65536, max_depth: 64 }
    }
}

/// Why publication data was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DataError {
    #[error("data: must not be empty")]
    Empty,
    #[error("data: {size} bytes is more than the {max} allowed (client.max_publication_size)")]
    TooLarge { size: usize, max: usize },
    #[error("data: nested deeper than {max} levels (client.max_publication_depth)")]
    TooDeep { max: usize },
    #[error("data: not valid UTF-8")]
    NotUtf8,
    #[error("data: not valid JSON: {0}")]
    NotJson(String),
}

impl DataRules {
    /// Checks `data` and returns it in compact form: the same `Bytes` when it
    /// has no insignificant whitespace (no copy), else a compacted copy.
    pub fn check(&self, data: Bytes) -> Result<Bytes, DataError> {
        self.check_inner(data, true)
    }

    /// [`DataRules::check`] for data that serde_json already accepted as one
    /// JSON value (a `RawValue` of a client frame): the grammar pass is skipped
    /// (serde_json's skipping checks structure, escapes and control
    /// characters, though not UTF-8 or depth, which are checked here).
    pub fn check_parsed(&self, data: Bytes) -> Result<Bytes, DataError> {
        self.check_inner(data, false)
    }

    fn check_inner(&self, data: Bytes, grammar: bool) -> Result<Bytes, DataError> {
        if data.is_empty() {
            return Err(DataError::Empty);
        }
        if data.len() > self.max_size {
            return Err(DataError::TooLarge { size: data.len(), max: self.max_size });
        }
        // UTF-8 first: serde_json skips string contents it does not need
        // (`IgnoredAny`) without validating them.
        if std::str::from_utf8(&data).is_err() {
            return Err(DataError::NotUtf8);
        }
        // Depth before the grammar: serde_json's skipping is not recursive and
        // would accept any depth, while readers that build values (and other
        // JSON libraries in clients) stop at 128 or overflow their stacks.
        let (depth, whitespace) = scan(&data);
        if depth > self.max_depth {
            return Err(DataError::TooDeep { max: self.max_depth });
        }
        if grammar {
            serde_json::from_slice::<serde::de::IgnoredAny>(&data)
                .map_err(|e| DataError::NotJson(e.to_string()))?;
        }
        if !whitespace {
            return Ok(data);
        }
        Ok(Bytes::from(compact(&data)))
    }

    /// The rule for a Protobuf client's data: the size limit always; data
    /// that is JSON is checked and compacted as by [`DataRules::check`];
    /// anything else (binary) is kept byte for byte.
    pub fn check_opaque(&self, data: Bytes) -> Result<Bytes, DataError> {
        if data.is_empty() {
            return Err(DataError::Empty);
        }
        if data.len() > self.max_size {
            return Err(DataError::TooLarge { size: data.len(), max: self.max_size });
        }
        if !fanfare_protocol::is_json(&data) {
            return Ok(data);
        }
        // `is_json` ran the grammar pass already.
        self.check_parsed(data)
    }
}

/// Deepest nesting and whether there is whitespace outside strings. The data
/// need not be valid JSON (brackets inside strings are not counted).
fn scan(data: &[u8]) -> (usize, bool) {
    let (mut depth, mut max, mut whitespace) = (0usize, 0usize, false);
    let mut i = 0;
    while i < data.len() {
        match data[i] {
            b'"' => i = string_end(data, i + 1),
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b' ' | b'\t' | b'\n' | b'\r' => whitespace = true,
            _ => {}
        }
        i += 1;
    }
    (max, whitespace)
}

/// Index of the quote closing the string whose contents start at `from`
/// (`data.len()` when unterminated). A plain loop: strings in typical
/// documents are short, where `memchr` costs more than it saves.
fn string_end(data: &[u8], mut i: usize) -> usize {
    while i < data.len() {
        match data[i] {
            b'"' => return i,
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
    data.len()
}

/// `data` without whitespace outside strings. For valid JSON the result is the
/// same value; raw control characters cannot occur inside valid strings.
fn compact(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut i = 0;
    while i < data.len() {
        match data[i] {
            b' ' | b'\t' | b'\n' | b'\r' => i += 1,
            b'"' => {
                let end = string_end(data, i + 1).min(data.len() - 1);
                out.extend_from_slice(&data[i..=end]);
                i = end + 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(data: &[u8]) -> Result<Bytes, DataError> {
        DataRules::default().check(Bytes::copy_from_slice(data))
    }

    #[test]
    fn pretty_printed_data_is_stored_compact_with_strings_untouched() {
        let out =
            check(b"{\n  \"a\": 2,\n  \"b\": [ 1, 2 ],\n  \"s\": \"x y\\\" z\\n\"\n}\n").unwrap();
        assert_eq!(&out[..], br#"{"a":2,"b":[1,2],"s":"x y\" z\n"}"#);
        assert!(!out.contains(&b'\n'));
    }

    #[test]
    fn compact_data_is_passed_on_without_a_copy() {
        let data = Bytes::from_static(br#"{"text":"hello world"}"#);
        let out = DataRules::default().check(data.clone()).unwrap();
        assert_eq!(out.as_ptr(), data.as_ptr());
    }

    #[test]
    fn invalid_utf8_inside_a_string_is_refused() {
        assert_eq!(check(b"\"\xff\xfe\""), Err(DataError::NotUtf8));
    }

    #[test]
    fn a_raw_newline_inside_a_string_is_not_json() {
        assert!(matches!(check(b"\"a\nb\""), Err(DataError::NotJson(_))));
    }

    #[test]
    fn nesting_deeper_than_the_limit_is_refused_at_any_depth() {
        let rules = DataRules { max_size: 1 << 20, max_depth: 64 };
        let ok = format!("{}{}", "[".repeat(64), "]".repeat(64));
        assert!(rules.check(Bytes::from(ok)).is_ok());
        let deep = format!("{}{}", "[".repeat(65), "]".repeat(65));
        assert_eq!(rules.check(Bytes::from(deep)), Err(DataError::TooDeep { max: 64 }));
        let very = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(rules.check(Bytes::from(very)), Err(DataError::TooDeep { max: 64 }));
        // Brackets inside strings are text, not nesting.
        let text = format!("\"{}\"", "[".repeat(100));
        assert!(rules.check(Bytes::from(text)).is_ok());
    }

    #[test]
    fn size_is_checked_before_anything_else() {
        let rules = DataRules { max_size: 8, max_depth: 64 };
        assert_eq!(
            rules.check(Bytes::from_static(b"\"123456789\"")),
            Err(DataError::TooLarge { size: 11, max: 8 })
        );
        assert_eq!(rules.check(Bytes::new()), Err(DataError::Empty));
    }

    #[test]
    fn protobuf_data_binary_is_kept_as_is_and_json_follows_the_json_rule() {
        let rules = DataRules { max_size: 8, max_depth: 2 };
        let binary = Bytes::from_static(b"\x00\xff\n{");
        let out = rules.check_opaque(binary.clone()).unwrap();
        assert_eq!(out.as_ptr(), binary.as_ptr(), "binary data passes without a copy");
        // Text that is not JSON is opaque bytes too.
        assert_eq!(&rules.check_opaque(Bytes::from_static(b"hello")).unwrap()[..], b"hello");
        // JSON is compacted and depth-checked like any JSON data.
        assert_eq!(&rules.check_opaque(Bytes::from_static(b"[ 1, 2 ]")).unwrap()[..], b"[1,2]");
        assert_eq!(
            rules.check_opaque(Bytes::from_static(b"[[[1]]]")),
            Err(DataError::TooDeep { max: 2 })
        );
        // The size limit holds for every kind of data.
        assert_eq!(
            rules.check_opaque(Bytes::from_static(b"\x00123456789")),
            Err(DataError::TooLarge { size: 10, max: 8 })
        );
        assert_eq!(rules.check_opaque(Bytes::new()), Err(DataError::Empty));
    }

    #[test]
    fn trailing_garbage_and_two_values_are_not_json() {
        assert!(matches!(check(b"{} {}"), Err(DataError::NotJson(_))));
        assert!(matches!(check(b"{\"a\":1"), Err(DataError::NotJson(_))));
    }
}
