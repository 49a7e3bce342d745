//! Connections: the command connection (pipelined) and the pub/sub connection
//! (RESP3 pushes), for a standalone Redis or a Redis Cluster.

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, Cmd, Pipeline, PushInfo, RedisFuture, RedisResult, Value};
use tokio::sync::mpsc::UnboundedSender;

/// How long one Redis command may take before the caller gets an error.
const COMMAND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// The command connection: reconnects by itself (standalone: `ConnectionManager`;
/// cluster: the cluster connection follows MOVED and re-connects nodes).
#[derive(Clone)]
pub enum CmdConn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for CmdConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            CmdConn::Single(c) => c.req_packed_command(cmd),
            CmdConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            CmdConn::Single(c) => c.req_packed_commands(cmd, offset, count),
            CmdConn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            CmdConn::Single(c) => c.get_db(),
            CmdConn::Cluster(c) => c.get_db(),
        }
    }
}

/// Where pub/sub connections come from (kept to reconnect).
pub enum PubSubTarget {
    Single { url: String, client: redis::Client },
    Cluster { urls: Vec<String> },
}

/// A live pub/sub connection.
pub enum PubSubConn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

fn with_resp3(url: &str) -> String {
    if url.contains("protocol=") {
        url.to_string()
    } else if url.contains('?') {
        format!("{url}&protocol=resp3")
    } else {
        format!("{url}?protocol=resp3")
    }
}

/// Opens the command connection and describes the pub/sub target.
pub async fn open(urls: &[String], cluster: bool) -> RedisResult<(CmdConn, PubSubTarget)> {
    if cluster {
        let client = ClusterClientBuilder::new(urls.to_vec())
            .response_timeout(COMMAND_TIMEOUT)
            .connection_timeout(std::time::Duration::from_secs(2))
            .build()?;
        let cmd = client.get_async_connection().await?;
        Ok((CmdConn::Cluster(cmd), PubSubTarget::Cluster { urls: urls.to_vec() }))
    } else {
        let url = urls[0].clone();
        let client = redis::Client::open(url.as_str())?;
        // The default 500 ms response timeout fails commands spuriously on a busy
        // machine. One quick retry per reconnect: while Redis is down every command
        // waits for the reconnect in progress, and the default (6 retries with
        // exponential backoff, ~9 s) would hold each API call that long.
        let cfg = ConnectionManagerConfig::new()
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_connection_timeout(Some(std::time::Duration::from_secs(2)))
            .set_number_of_retries(1);
        let cmd = client.get_connection_manager_with_config(cfg).await?;
        let sub_client = redis::Client::open(with_resp3(&url).as_str())?;
        Ok((CmdConn::Single(cmd), PubSubTarget::Single { url, client: sub_client }))
    }
}

impl PubSubTarget {
    pub fn describe(&self) -> String {
        match self {
            PubSubTarget::Single { url, .. } => url.clone(),
            PubSubTarget::Cluster { urls } => format!("cluster {}", urls.join(",")),
        }
    }

    /// A new pub/sub connection delivering pushes to `push`.
    pub async fn connect(&self, push: UnboundedSender<PushInfo>) -> RedisResult<PubSubConn> {
        match self {
            PubSubTarget::Single { client, .. } => {
                let cfg = AsyncConnectionConfig::new()
                    .set_push_sender(push)
                    .set_connection_timeout(Some(std::time::Duration::from_secs(3)))
                    .set_response_timeout(Some(std::time::Duration::from_secs(10)));
                Ok(PubSubConn::Single(
                    client.get_multiplexed_async_connection_with_config(&cfg).await?,
                ))
            }
            PubSubTarget::Cluster { urls } => {
                let client = ClusterClientBuilder::new(
                    urls.iter().map(|u| with_resp3(u)).collect::<Vec<_>>(),
                )
                .use_protocol(redis::ProtocolVersion::RESP3)
                .push_sender(push)
                .build()?;
                Ok(PubSubConn::Cluster(client.get_async_connection().await?))
            }
        }
    }
}

/// CRC16 (XMODEM) as Redis Cluster uses it for key slots.
fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

/// The cluster slot of a key or channel name (hash tags honoured).
pub fn slot(name: &str) -> u16 {
    let b = name.as_bytes();
    let key = match b.iter().position(|&c| c == b'{') {
        Some(open) => match b[open + 1..].iter().position(|&c| c == b'}') {
            Some(len) if len > 0 => &b[open + 1..open + 1 + len],
            _ => b,
        },
        None => b,
    };
    crc16(key) % 16384
}

/// Largest number of channels in one SUBSCRIBE/UNSUBSCRIBE.
const CHUNK: usize = 1000;

impl PubSubConn {
    /// Subscribes to every name; one command per chunk (standalone) or per slot
    /// (cluster: SSUBSCRIBE needs all channels of one command on one slot).
    pub async fn subscribe(&mut self, names: &[String]) -> RedisResult<()> {
        match self {
            PubSubConn::Single(c) => {
                for chunk in names.chunks(CHUNK) {
                    c.subscribe(chunk).await?;
                }
                Ok(())
            }
            PubSubConn::Cluster(c) => {
                let calls = by_slot(names).into_iter().map(|group| {
                    let mut c = c.clone();
                    async move { c.ssubscribe(group).await }
                });
                for r in futures_util::future::join_all(calls).await {
                    r?;
                }
                Ok(())
            }
        }
    }

    pub async fn unsubscribe(&mut self, names: &[String]) -> RedisResult<()> {
        match self {
            PubSubConn::Single(c) => {
                for chunk in names.chunks(CHUNK) {
                    c.unsubscribe(chunk).await?;
                }
                Ok(())
            }
            PubSubConn::Cluster(c) => {
                let calls = by_slot(names).into_iter().map(|group| {
                    let mut c = c.clone();
                    async move { c.sunsubscribe(group).await }
                });
                for r in futures_util::future::join_all(calls).await {
                    r?;
                }
                Ok(())
            }
        }
    }

    /// A round trip proving the connection works.
    pub async fn ping(&mut self) -> RedisResult<()> {
        match self {
            PubSubConn::Single(c) => redis::cmd("PING").exec_async(c).await,
            PubSubConn::Cluster(c) => redis::cmd("PING").exec_async(c).await,
        }
    }
}

fn by_slot(names: &[String]) -> Vec<Vec<String>> {
    let mut groups: std::collections::BTreeMap<u16, Vec<String>> = Default::default();
    for n in names {
        groups.entry(slot(n)).or_default().push(n.clone());
    }
    groups
        .into_values()
        .flat_map(|g| g.chunks(CHUNK).map(|c| c.to_vec()).collect::<Vec<_>>())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Values from the Redis Cluster specification / CLUSTER KEYSLOT.
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot("{user1000}.following"), slot("user1000"));
        assert_eq!(slot("a{}b"), crc16(b"a{}b") % 16384);
        assert_eq!(with_resp3("redis://h:1"), "redis://h:1?protocol=resp3");
        assert_eq!(with_resp3("redis://h:1/0"), "redis://h:1/0?protocol=resp3");
        assert_eq!(with_resp3("redis://h:1/0?x=1"), "redis://h:1/0?x=1&protocol=resp3");
    }
}
