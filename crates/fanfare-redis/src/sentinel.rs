//! Redis Sentinel: which server is the primary of a monitored master name.
//!
//! Asked on every (re)connect and once a second while connected
//! ([`crate::subscriptions`]): `SENTINEL get-master-addr-by-name` on the first
//! sentinel that answers, then `ROLE` on the address it names, which must say
//! `master`. A sentinel that has not yet learnt of a failover, or a demoted
//! primary still reachable, therefore never gets our connections: the caller
//! retries (with the usual short backoff) until a sentinel names a server that
//! agrees it is the primary.

use redis::{AsyncConnectionConfig, RedisResult, Value};
use std::time::Duration;

use crate::conn::{Tls, node_url};

/// How long one sentinel or the named primary may take to answer. Short: a
/// dead sentinel must not hold up the next one.
const ASK_TIMEOUT: Duration = Duration::from_millis(500);

/// The sentinels to ask and the master name they monitor.
#[derive(Debug, Clone)]
pub struct Sentinel {
    /// `redis://[user:password@]host:port` (or `rediss://`) of each sentinel.
    pub urls: Vec<String>,
    /// The monitored master's name (`sentinel monitor <name> ...`).
    pub master: String,
}

async fn connect(url: &str, tls: &Tls) -> RedisResult<redis::aio::MultiplexedConnection> {
    let cfg = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(ASK_TIMEOUT))
        .set_response_timeout(Some(ASK_TIMEOUT));
    tls.client(url)?.get_multiplexed_async_connection_with_config(&cfg).await
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

fn not_ready(what: String) -> redis::RedisError {
    (redis::ErrorKind::Io, "redis sentinel", what).into()
}

impl Sentinel {
    /// `host:port` of the current primary, confirmed by its `ROLE`.
    /// `template`: the configured data URL, whose scheme, credentials and
    /// database the primary's URL takes.
    pub async fn primary(&self, template: &str, tls: &Tls) -> RedisResult<String> {
        let mut last = not_ready(format!("no sentinel of {:?} answered", self.master));
        for url in &self.urls {
            match self.ask(url, template, tls).await {
                Ok(addr) => return Ok(addr),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn ask(&self, url: &str, template: &str, tls: &Tls) -> RedisResult<String> {
        let mut c = connect(url, tls).await?;
        let reply: Value = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(&self.master)
            .query_async(&mut c)
            .await?;
        let addr = match &reply {
            Value::Array(parts) if parts.len() == 2 => {
                let (Some(host), Some(port)) = (text(&parts[0]), text(&parts[1])) else {
                    return Err(not_ready(format!("unexpected sentinel reply {reply:?}")));
                };
                if host.contains(':') {
                    format!("[{host}]:{port}")
                } else {
                    format!("{host}:{port}")
                }
            }
            _ => {
                let msg = format!("sentinel {url} does not know master {:?}", self.master);
                return Err(not_ready(msg));
            }
        };
        let mut primary = connect(&node_url(template, &addr), tls).await?;
        let role: Value = redis::cmd("ROLE").query_async(&mut primary).await?;
        match &role {
            Value::Array(parts) if parts.first().and_then(text).as_deref() == Some("master") => {
                Ok(addr)
            }
            _ => Err(not_ready(format!("{addr}, named primary by {url}, is not one yet"))),
        }
    }
}
