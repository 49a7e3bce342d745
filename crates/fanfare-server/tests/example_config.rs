//! `config/fanfare.example.toml` is the configuration reference README points
//! to ("documents every key"): every key the binary knows appears in it, under
//! its section, with its default, and it passes `fanfare check-config`. Keys
//! and defaults come from the binary itself (`check-config` prints the full
//! effective configuration), so a key added to the code without a line in the
//! example, or a default changed in one place only, fails here.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use common::run_cli;

fn example_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/fanfare.example.toml")
}

/// The effective configuration `fanfare check-config` prints for `toml`.
fn effective(toml: &str) -> toml::Table {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("fanfare.toml");
    std::fs::write(&path, toml).expect("writing config");
    let (status, stdout, stderr) =
        run_cli(&["check-config", "--config", path.to_str().expect("utf-8 path")], &[]);
    assert!(status.success(), "check-config refused {toml:?}: {stderr}");
    stdout.parse().unwrap_or_else(|e| panic!("check-config printed no TOML ({e}): {stdout}"))
}

/// Every key the binary has, as `section.key`; the keys of list sections
/// (`[[namespaces]]`, `[[proxies]]`) as `namespaces[].key`.
fn binary_keys() -> BTreeSet<String> {
    // One entry of each list section so that their keys are printed, and
    // auth.allow_anonymous set: unset (its default) it is not printed at all.
    let probe = "[auth]\nallow_anonymous = true\n\n[[namespaces]]\nname = \"x\"\n\n\
                 [[proxies]]\nname = \"p\"\nendpoint = \"http://127.0.0.1:9/p\"\n";
    let mut keys = BTreeSet::new();
    for (section, body) in effective(probe) {
        let (prefix, table) = match body {
            toml::Value::Table(t) => (section, t),
            toml::Value::Array(entries) => {
                let Some(toml::Value::Table(t)) = entries.into_iter().next() else {
                    panic!("check-config printed no entry of [[{section}]]");
                };
                (format!("{section}[]"), t)
            }
            _ => {
                keys.insert(section);
                continue;
            }
        };
        keys.extend(table.keys().map(|k| format!("{prefix}.{k}")));
    }
    keys
}

/// The section a line opens, commented out or not: `[name]` gives `name`,
/// `[[name]]` gives `name[]`.
fn section_header(line: &str) -> Option<String> {
    let line = line.split(" #").next().unwrap_or_default().trim_end();
    let ident = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_lowercase() || c == '_');
    if let Some(name) = line.strip_prefix("[[").and_then(|l| l.strip_suffix("]]")) {
        return ident(name).then(|| format!("{name}[]"));
    }
    let name = line.strip_prefix('[').and_then(|l| l.strip_suffix(']'))?;
    ident(name).then(|| name.to_string())
}

/// The key a line sets, commented out or not (`key = ...` or `# key = ...`).
fn key_set(line: &str) -> Option<&str> {
    let (key, _) = line.split_once('=')?;
    let key = key.trim_end();
    let mut chars = key.chars();
    let ident = chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    ident.then_some(key)
}

/// Every `section.key` the example shows, set or commented out. Prose
/// comments are told apart by shape: a key line is an identifier and `=`.
fn documented_keys(text: &str) -> BTreeSet<String> {
    let mut section = String::new();
    let mut keys = BTreeSet::new();
    for line in text.lines() {
        let line = line.trim_start();
        let line = line.strip_prefix('#').map(str::trim_start).unwrap_or(line);
        if let Some(s) = section_header(line) {
            section = s;
        } else if let Some(key) = key_set(line) {
            keys.insert(if section.is_empty() {
                key.to_string()
            } else {
                format!("{section}.{key}")
            });
        }
    }
    keys
}

#[test]
fn the_example_config_shows_every_key_the_binary_knows_under_its_section() {
    let text = std::fs::read_to_string(example_path()).expect("reading the example config");
    let known = binary_keys();
    // The probe is worth something only if it saw the whole configuration.
    for key in ["http.listen", "auth.allow_anonymous", "namespaces[].name", "proxies[].endpoint"] {
        assert!(known.contains(key), "check-config did not print {key}: {known:?}");
    }
    let documented = documented_keys(&text);
    let missing: Vec<&String> = known.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "config/fanfare.example.toml does not show {} of the binary's {} keys: {missing:?}",
        missing.len(),
        known.len()
    );
    // The other way round: a key shown there, even commented out, is one the
    // binary accepts (a renamed or misspelt key in a comment would mislead).
    let unknown: Vec<&String> = documented.difference(&known).collect();
    assert!(unknown.is_empty(), "config/fanfare.example.toml shows unknown keys: {unknown:?}");
}

/// Keys whose value in the example is an illustration, not the default; their
/// comment says what the default is.
const SHOWN_NOT_DEFAULT: &[&str] = &[
    "node.name",            // default: the host name, which differs per machine
    "auth.allow_anonymous", // default: true only when no token key is set
];

/// The example's header promises "the values shown are the defaults unless a
/// comment says otherwise": every value shown in a section of its own
/// (`[http]`, ...; not the namespaces and proxies, which are examples), set
/// or commented out, is what the binary uses when the key is left out.
#[test]
fn the_values_the_example_config_shows_are_the_binarys_defaults() {
    let text = std::fs::read_to_string(example_path()).expect("reading the example config");
    // The shown lines, uncommented, under their sections; a commented-out
    // section header (the proxies example) ends the real ones.
    let mut shown = String::new();
    let mut in_section = false;
    for line in text.lines() {
        let commented = line.trim_start().starts_with('#');
        let bare = line.trim_start().trim_start_matches('#').trim_start();
        if let Some(s) = section_header(bare) {
            in_section = !commented && !s.ends_with("[]");
            if in_section {
                shown.push_str(&format!("[{s}]\n"));
            }
        } else if let Some(key) = key_set(bare).filter(|_| in_section) {
            let section = shown.lines().rfind(|l| l.starts_with('[')).unwrap_or_default();
            let full = format!("{}.{key}", section.trim_matches(['[', ']']));
            if !SHOWN_NOT_DEFAULT.contains(&full.as_str()) {
                shown.push_str(bare);
                shown.push('\n');
            }
        }
    }
    // Both through the binary, so that "24h" and "1day" compare equal.
    let defaults = effective("");
    let example = effective(&shown);
    let value = |t: &toml::Table, section: &str, key: &str| {
        t.get(section).and_then(|s| s.get(key)).map(ToString::to_string).unwrap_or_default()
    };
    let shown_table: toml::Table = shown.parse().expect("the shown lines are TOML");
    let mut wrong = Vec::new();
    let mut checked = 0;
    for (section, keys) in &shown_table {
        for key in keys.as_table().into_iter().flat_map(|t| t.keys()) {
            checked += 1;
            let (got, default) = (value(&example, section, key), value(&defaults, section, key));
            if got != default {
                wrong.push(format!("{section}.{key}: shows {got}, the default is {default}"));
            }
        }
    }
    assert!(checked > 80, "only {checked} values were compared: {shown}");
    assert!(wrong.is_empty(), "config/fanfare.example.toml shows non-defaults: {wrong:#?}");
}

#[test]
fn check_config_accepts_the_example_config() {
    let path = example_path();
    let (status, stdout, stderr) =
        run_cli(&["check-config", "--config", path.to_str().expect("utf-8 path")], &[]);
    assert!(status.success(), "check-config refused the example: {stderr}");
    assert!(stdout.starts_with("# configuration is valid"), "{stdout}");
}
