//! Command-line flags and TOML scenario files, resolved into one [`Plan`].
//!
//! Every flag has a TOML key of the same name (`--payload-size` is
//! `payload_size`); a flag given on the command line wins over the file.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use serde::{Deserialize, Serialize};

/// What a run does; see README.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// N connections subscribe to K channels each and stay idle.
    Idle,
    /// Publishers at a target rate, subscribers measuring latency and loss.
    Fanout,
    /// Every client publishes into its room and receives the room.
    Chat,
    /// Every client disconnects and reconnects at once.
    Storm,
}

/// How fanout publishers publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishMode {
    /// `publish` commands over WebSocket (needs `allow_publish` on the namespace).
    Client,
    /// `POST /api/publish` with `X-API-Key`.
    Http,
    /// fanfare's gRPC `ControlService/Publish` at `--grpc-url`.
    Grpc,
}

/// The client protocol the generator's connections speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// JSON: text frames, newline-delimited messages.
    #[default]
    Json,
    /// Protobuf: subprotocol `centrifuge-protobuf`, binary frames, varint
    /// length-delimited messages.
    Protobuf,
}

/// A duration given as `"250ms"`, `"10s"`, `"2m"`, `"1h"` or plain seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dur(pub Duration);

impl FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: f64 = num.parse().map_err(|_| format!("{s:?} is not a duration like 10s"))?;
        let secs = match unit.trim() {
            "" | "s" => n,
            "ms" => n / 1000.0,
            "m" | "min" => n * 60.0,
            "h" => n * 3600.0,
            other => return Err(format!("unknown duration unit {other:?} in {s:?}")),
        };
        if !secs.is_finite() || secs < 0.0 {
            return Err(format!("{s:?} is not a duration"));
        }
        Ok(Dur(Duration::from_secs_f64(secs)))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(f64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Num(n) => Dur::from_str(&n.to_string()),
            Raw::Str(s) => Dur::from_str(&s),
        }
        .map_err(serde::de::Error::custom)
    }
}

/// fanfare-loadtest: drives fanfare or Centrifugo (client protocol v2, JSON or
/// Protobuf over WebSocket) with idle, fanout, chat and reconnect-storm load, and reports
/// handshake rate, memory and CPU per connection, delivery rate, latency
/// percentiles and lost/duplicated/reordered messages.
#[derive(Parser, Debug, Default, Deserialize)]
#[command(version, about, long_about = None)]
#[serde(deny_unknown_fields, default)]
pub struct Options {
    /// Scenario to run (or `scenario = "..."` in the scenario file).
    #[arg(value_enum)]
    pub scenario: Option<Scenario>,

    /// TOML scenario file; its keys are the long flag names with `_` for `-`.
    #[arg(long, short = 'f')]
    #[serde(skip)]
    pub scenario_file: Option<PathBuf>,

    /// WebSocket URL of a node; repeat for several nodes (clients spread evenly).
    /// Default ws://127.0.0.1:8000/connection/websocket.
    #[arg(long)]
    pub url: Vec<String>,

    /// Clients (idle, chat, storm) or subscribers (fanout). Default 1000.
    #[arg(long, short = 'n')]
    pub connections: Option<usize>,

    /// New connections per second, all workers together; 0 = as fast as the
    /// handshake concurrency allows. Default 1000.
    #[arg(long)]
    pub ramp: Option<f64>,

    /// Handshakes in flight at once (all workers together). Default 256.
    #[arg(long)]
    pub concurrency: Option<usize>,

    /// Distinct channels. Default: connections (idle, storm), 10 (fanout),
    /// connections / room-size (chat).
    #[arg(long)]
    pub channels: Option<usize>,

    /// Channels each client subscribes to (K). Default 1; idle accepts 0
    /// (connections only: the connect rate is then pure handshakes).
    #[arg(long)]
    pub subs: Option<usize>,

    /// Idle: how long to hold the connections. Default 10s.
    #[arg(long)]
    pub hold: Option<Dur>,

    /// Fanout, chat: how long to publish. Default 10s.
    #[arg(long, short = 'd')]
    pub duration: Option<Dur>,

    /// Pause after all clients are connected before measuring. Default 2s.
    #[arg(long)]
    pub settle: Option<Dur>,

    /// Fanout, chat: publications per second, all publishers together. Default 1000.
    #[arg(long)]
    pub rate: Option<f64>,

    /// Fanout: publishers (each owns channels c with c % publishers == its index). Default 1.
    #[arg(long)]
    pub publishers: Option<usize>,

    /// Publications one publisher may have sent without a reply; beyond it the
    /// publisher waits (so an overloaded server slows it down instead of
    /// queueing seconds of commands, pongs included, behind each other). Default 1000.
    #[arg(long)]
    pub max_in_flight: Option<usize>,

    /// Bytes of each publication's `data` (at least the ~60 bytes of the header). Default 128.
    #[arg(long)]
    pub payload_size: Option<usize>,

    /// Chat: clients per room (channel). Default 10.
    #[arg(long)]
    pub room_size: Option<usize>,

    /// Fanout: publish with `publish` commands (client), `POST /api/publish` (http) or
    /// fanfare's gRPC `ControlService/Publish` (grpc, needs --grpc-url). Default client.
    #[arg(long, value_enum)]
    pub publish_mode: Option<PublishMode>,

    /// Client protocol: json (text frames) or protobuf (WebSocket subprotocol
    /// `centrifuge-protobuf`, binary frames). Default json.
    #[arg(long, value_enum)]
    pub protocol: Option<Protocol>,

    /// HTTP publish endpoint. Default: http://<host:port of the first --url>/api/publish.
    #[arg(long)]
    pub api_url: Option<String>,

    /// gRPC control API endpoint for `--publish-mode grpc`, e.g. http://127.0.0.1:9000.
    #[arg(long)]
    pub grpc_url: Option<String>,

    /// API key: `X-API-Key` for HTTP publishing, `authorization: apikey <key>` for gRPC.
    #[arg(long)]
    pub api_key: Option<String>,

    /// Connection token sent by every client (default: empty = anonymous).
    #[arg(long)]
    pub token: Option<String>,

    /// Mint an HS256 token per client (`sub` = lt-<index>) with this secret.
    #[arg(long)]
    pub hmac_secret: Option<String>,

    /// PID of a server process to measure (RSS, CPU); repeat for several.
    #[arg(long)]
    pub server_pid: Vec<u32>,

    /// Storm: count Redis commands (INFO commandstats) on this server, e.g. redis://127.0.0.1:6379.
    #[arg(long)]
    pub redis_url: Option<String>,

    /// Worker processes (this binary re-executed); 0 = run in this process. Default 0.
    #[arg(long, short = 'w')]
    pub workers: Option<usize>,

    /// Spread client source addresses over 127.0.0.2 .. 127.0.0.(1+N) for loopback
    /// targets; 0 = let the kernel choose. Default 250.
    #[arg(long)]
    pub source_ips: Option<u8>,

    /// Storm: how many disconnect/reconnect rounds. Default 1.
    #[arg(long)]
    pub storms: Option<usize>,

    /// Storm: give up on a round after this long. Default 60s.
    #[arg(long)]
    pub storm_timeout: Option<Dur>,

    /// Longest wait for in-flight publications after publishing stops. Default 10s.
    #[arg(long)]
    pub drain: Option<Dur>,

    /// Handshake (TCP + WebSocket + connect reply) timeout per client. Default 10s.
    #[arg(long)]
    pub connect_timeout: Option<Dur>,

    /// Hard bound on the whole run; default: ramp time + hold/duration + 2 min.
    #[arg(long)]
    pub max_time: Option<Dur>,

    /// Channel name prefix. Default `lt<pid>-` (default namespace).
    #[arg(long)]
    pub channel_prefix: Option<String>,

    /// Print every figure as JSON on stdout (the table goes to stderr).
    #[arg(long)]
    pub json: bool,

    /// No progress line.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

/// Everything a run needs, resolved from flags, file and defaults. Sent to
/// workers as is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub scenario: Scenario,
    pub urls: Vec<String>,
    pub connections: usize,
    pub ramp: f64,
    pub concurrency: usize,
    pub channels: usize,
    pub subs: usize,
    #[serde(with = "secs")]
    pub hold: Duration,
    #[serde(with = "secs")]
    pub duration: Duration,
    #[serde(with = "secs")]
    pub settle: Duration,
    pub rate: f64,
    pub publishers: usize,
    pub max_in_flight: usize,
    pub payload_size: usize,
    pub room_size: usize,
    pub publish_mode: PublishMode,
    #[serde(default)]
    pub protocol: Protocol,
    pub api_url: String,
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub grpc_url: String,
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub api_key: String,
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub token: String,
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub hmac_secret: String,
    pub server_pids: Vec<u32>,
    pub redis_url: Option<String>,
    pub workers: usize,
    pub source_ips: u8,
    pub storms: usize,
    #[serde(with = "secs")]
    pub storm_timeout: Duration,
    #[serde(with = "secs")]
    pub drain: Duration,
    #[serde(with = "secs")]
    pub connect_timeout: Duration,
    #[serde(with = "secs")]
    pub max_time: Duration,
    pub channel_prefix: String,
}

/// Hard caps, so a typo cannot start an unbounded run.
const MAX_CONNECTIONS: usize = 1_000_000;
const MAX_RATE: f64 = 10_000_000.0;
const MAX_PHASE: Duration = Duration::from_secs(3600);

mod secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_secs_f64(f64::deserialize(d)?))
    }
}

impl Options {
    /// Fills flags not given on the command line from the scenario file.
    pub fn merge_file(mut self) -> anyhow::Result<Options> {
        let Some(path) = self.scenario_file.clone() else { return Ok(self) };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading scenario file {}", path.display()))?;
        let file: Options =
            toml::from_str(&text).with_context(|| format!("scenario file {}", path.display()))?;
        macro_rules! take {
            ($($f:ident),*) => { $( if self.$f.is_none() { self.$f = file.$f; } )* };
        }
        take!(
            scenario,
            connections,
            ramp,
            concurrency,
            channels,
            subs,
            hold,
            duration,
            settle,
            rate,
            publishers,
            max_in_flight,
            payload_size,
            room_size,
            publish_mode,
            protocol,
            api_url,
            grpc_url,
            api_key,
            token,
            hmac_secret,
            redis_url,
            workers,
            source_ips,
            storms,
            storm_timeout,
            drain,
            connect_timeout,
            max_time,
            channel_prefix
        );
        if self.url.is_empty() {
            self.url = file.url;
        }
        if self.server_pid.is_empty() {
            self.server_pid = file.server_pid;
        }
        self.json |= file.json;
        self.quiet |= file.quiet;
        Ok(self)
    }

    /// Applies defaults and checks bounds.
    pub fn resolve(self) -> anyhow::Result<Plan> {
        let Some(scenario) = self.scenario else {
            bail!(
                "no scenario: give one of idle, fanout, chat, storm (or `scenario` in --scenario-file)"
            );
        };
        let d = |o: Option<Dur>, def: u64| o.map(|d| d.0).unwrap_or(Duration::from_secs(def));
        let urls = if self.url.is_empty() {
            vec!["ws://127.0.0.1:8000/connection/websocket".to_string()]
        } else {
            self.url
        };
        let connections = self.connections.unwrap_or(1000);
        if connections == 0 || connections > MAX_CONNECTIONS {
            bail!("--connections must be between 1 and {MAX_CONNECTIONS}");
        }
        let room_size = self.room_size.unwrap_or(10).max(1);
        let channels = self
            .channels
            .unwrap_or(match scenario {
                Scenario::Idle | Scenario::Storm => connections,
                Scenario::Fanout => 10,
                Scenario::Chat => connections.div_ceil(room_size),
            })
            .max(1);
        let channels = match scenario {
            Scenario::Chat => connections.div_ceil(room_size),
            _ => channels,
        };
        let subs = match scenario {
            Scenario::Chat => 1,
            // Idle with 0: handshakes only (TCP + WebSocket upgrade + connect).
            Scenario::Idle => self.subs.unwrap_or(1).min(channels),
            _ => self.subs.unwrap_or(1).clamp(1, channels),
        };
        let publishers = match scenario {
            Scenario::Fanout => self.publishers.unwrap_or(1).clamp(1, channels),
            Scenario::Chat => connections,
            _ => 0,
        };
        let rate = self.rate.unwrap_or(1000.0);
        if !(rate > 0.0 && rate <= MAX_RATE) {
            bail!("--rate must be > 0 and at most {MAX_RATE}");
        }
        let ramp = self.ramp.unwrap_or(1000.0);
        if !(ramp >= 0.0 && ramp.is_finite()) {
            bail!("--ramp must be >= 0");
        }
        let hold = d(self.hold, 10);
        let duration = d(self.duration, 10);
        let settle = d(self.settle, 2);
        let storm_timeout = d(self.storm_timeout, 60);
        let storms = self.storms.unwrap_or(1).max(1);
        for (name, v) in [("hold", hold), ("duration", duration), ("storm-timeout", storm_timeout)]
        {
            if v > MAX_PHASE {
                bail!("--{name} is longer than {MAX_PHASE:?}");
            }
        }
        if storms > 100 {
            bail!("--storms is at most 100");
        }
        let publish_mode = match scenario {
            Scenario::Fanout => self.publish_mode.unwrap_or(PublishMode::Client),
            _ => PublishMode::Client,
        };
        let api_url = match self.api_url {
            Some(u) => u,
            None => default_api_url(&urls[0])?,
        };
        let grpc_url = self.grpc_url.unwrap_or_default();
        if publish_mode == PublishMode::Grpc && grpc_url.is_empty() {
            bail!(
                "--publish-mode grpc needs --grpc-url (the node's grpc.listen, e.g. http://127.0.0.1:9000)"
            );
        }
        let ramp_time =
            if ramp > 0.0 { connections as f64 / ramp } else { connections as f64 / 500.0 };
        let main = match scenario {
            Scenario::Idle => hold,
            Scenario::Fanout | Scenario::Chat => duration + d(self.drain, 10),
            Scenario::Storm => (storm_timeout + settle) * storms as u32,
        };
        let max_time = self.max_time.map(|d| d.0).unwrap_or(
            Duration::from_secs_f64(ramp_time) + settle + main + Duration::from_secs(120),
        );
        Ok(Plan {
            scenario,
            urls,
            connections,
            ramp,
            concurrency: self.concurrency.unwrap_or(256).max(1),
            channels,
            subs,
            hold,
            duration,
            settle,
            rate,
            publishers,
            max_in_flight: self.max_in_flight.unwrap_or(1000).max(1),
            payload_size: self.payload_size.unwrap_or(128),
            room_size,
            publish_mode,
            protocol: self.protocol.unwrap_or_default(),
            api_url,
            grpc_url,
            api_key: self.api_key.unwrap_or_default(),
            token: self.token.unwrap_or_default(),
            hmac_secret: self.hmac_secret.unwrap_or_default(),
            server_pids: self.server_pid,
            redis_url: self.redis_url,
            workers: self.workers.unwrap_or(0),
            source_ips: self.source_ips.unwrap_or(250).min(250),
            storms,
            storm_timeout,
            drain: d(self.drain, 10),
            connect_timeout: d(self.connect_timeout, 10),
            max_time,
            channel_prefix: self
                .channel_prefix
                .unwrap_or_else(|| format!("lt{}-", std::process::id())),
        })
    }
}

/// `ws://h:p/...` -> `http://h:p/api/publish` (wss -> https).
fn default_api_url(ws: &str) -> anyhow::Result<String> {
    let (scheme, rest) =
        ws.split_once("://").context("--url must look like ws://host:port/path")?;
    let authority = rest.split('/').next().unwrap_or(rest);
    let http = if scheme == "wss" { "https" } else { "http" };
    Ok(format!("{http}://{authority}/api/publish"))
}

impl Plan {
    /// Channel name of channel index `c`.
    pub fn channel_name(&self, c: u32) -> String {
        format!("{}{c}", self.channel_prefix)
    }

    /// Channel index of a channel name, when it is one of ours.
    pub fn channel_index(&self, name: &str) -> Option<u32> {
        name.strip_prefix(self.channel_prefix.as_str())?.parse().ok()
    }

    /// Channels client `g` subscribes to.
    pub fn client_channels(&self, g: usize) -> Vec<u32> {
        match self.scenario {
            Scenario::Chat => vec![(g / self.room_size) as u32],
            _ => (0..self.subs).map(|j| ((g * self.subs + j) % self.channels) as u32).collect(),
        }
    }

    /// Channels publisher `p` publishes to (fanout: owned channels; chat: its room).
    pub fn publisher_channels(&self, p: usize) -> Vec<u32> {
        match self.scenario {
            Scenario::Fanout => {
                (0..self.channels).filter(|c| c % self.publishers == p).map(|c| c as u32).collect()
            }
            Scenario::Chat => vec![(p / self.room_size) as u32],
            _ => Vec::new(),
        }
    }

    /// Publications per second of one publisher.
    pub fn publisher_rate(&self) -> f64 {
        if self.publishers == 0 { 0.0 } else { self.rate / self.publishers as f64 }
    }
}

/// One worker's share of a plan.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Share {
    pub index: usize,
    pub count: usize,
    /// Client indices `[start, end)`.
    pub clients: (usize, usize),
    /// Fanout publisher indices.
    pub publishers: Vec<usize>,
}

impl Share {
    /// Splits the plan evenly over `count` workers.
    pub fn split(plan: &Plan, count: usize) -> Vec<Share> {
        let count = count.max(1);
        let fanout_pubs = if plan.scenario == Scenario::Fanout { plan.publishers } else { 0 };
        (0..count)
            .map(|i| Share {
                index: i,
                count,
                clients: (plan.connections * i / count, plan.connections * (i + 1) / count),
                publishers: (0..fanout_pubs).filter(|p| p % count == i).collect(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(args: &[&str]) -> Plan {
        let mut v = vec!["fanfare-loadtest"];
        v.extend_from_slice(args);
        Options::parse_from(v).resolve().unwrap()
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(Dur::from_str("250ms").unwrap().0, Duration::from_millis(250));
        assert_eq!(Dur::from_str("2m").unwrap().0, Duration::from_secs(120));
        assert_eq!(Dur::from_str("1.5").unwrap().0, Duration::from_millis(1500));
        assert!(Dur::from_str("soon").is_err());
    }

    #[test]
    fn fanout_channels_are_owned_by_exactly_one_publisher() {
        let p = plan(&["fanout", "--channels", "7", "--publishers", "3"]);
        let mut all: Vec<u32> = (0..3).flat_map(|i| p.publisher_channels(i)).collect();
        all.sort();
        assert_eq!(all, (0..7).collect::<Vec<_>>());
        assert_eq!(p.api_url, "http://127.0.0.1:8000/api/publish");
    }

    #[test]
    fn idle_may_subscribe_to_nothing_other_scenarios_to_at_least_one() {
        let p = plan(&["idle", "-n", "10", "--subs", "0"]);
        assert!(p.client_channels(3).is_empty());
        let p = plan(&["fanout", "-n", "10", "--subs", "0"]);
        assert_eq!(p.client_channels(3).len(), 1);
    }

    #[test]
    fn shares_cover_every_client_once() {
        let p = plan(&["idle", "-n", "1001"]);
        let shares = Share::split(&p, 3);
        assert_eq!(shares[0].clients.0, 0);
        assert_eq!(shares[2].clients.1, 1001);
        assert_eq!(shares[0].clients.1, shares[1].clients.0);
    }

    #[test]
    fn file_values_fill_flags_not_given() {
        let dir = std::env::temp_dir().join(format!("lt-opts-{}", std::process::id()));
        std::fs::write(
            &dir,
            "scenario = \"chat\"\nconnections = 40\nroom_size = 4\nhold = \"3s\"\n",
        )
        .unwrap();
        let o = Options::parse_from(["x", "-f", dir.to_str().unwrap(), "-n", "20"]);
        let p = o.merge_file().unwrap().resolve().unwrap();
        std::fs::remove_file(&dir).ok();
        assert_eq!(p.scenario, Scenario::Chat);
        assert_eq!(p.connections, 20);
        assert_eq!(p.channels, 5);
        assert_eq!(p.hold, Duration::from_secs(3));
    }
}
