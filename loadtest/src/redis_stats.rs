//! Redis commands spent, from `INFO commandstats` before and after (raw RESP
//! over TCP: two commands do not justify a client library).

use std::collections::BTreeMap;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Calls per command, e.g. `{"publish": 10, "ssubscribe": 3}`.
pub type CommandCalls = BTreeMap<String, u64>;

fn resp(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
    }
    out
}

/// `redis://[:password@]host:port[/db]` -> (host:port, password).
fn parse_url(url: &str) -> anyhow::Result<(String, Option<String>)> {
    let rest = url.strip_prefix("redis://").context("--redis-url must start with redis://")?;
    let rest = rest.split('/').next().unwrap_or(rest);
    let (auth, host) = match rest.rsplit_once('@') {
        Some((a, h)) => (Some(a), h),
        None => (None, rest),
    };
    let password = auth.map(|a| a.rsplit(':').next().unwrap_or(a).to_string());
    let host = if host.contains(':') { host.to_string() } else { format!("{host}:6379") };
    Ok((host, password.filter(|p| !p.is_empty())))
}

async fn read_reply(r: &mut BufReader<TcpStream>) -> anyhow::Result<String> {
    let mut line = String::new();
    r.read_line(&mut line).await?;
    match line.as_bytes().first() {
        Some(b'+') => Ok(line[1..].trim_end().to_string()),
        Some(b'-') => bail!("redis: {}", line[1..].trim_end()),
        Some(b'$') => {
            let n: usize = line[1..].trim_end().parse().context("bulk length")?;
            let mut buf = vec![0; n + 2];
            r.read_exact(&mut buf).await?;
            buf.truncate(n);
            Ok(String::from_utf8_lossy(&buf).into_owned())
        }
        _ => bail!("unexpected redis reply {line:?}"),
    }
}

/// Reads `INFO commandstats` from the server at `url`.
pub async fn command_calls(url: &str) -> anyhow::Result<CommandCalls> {
    let (host, password) = parse_url(url)?;
    let stream =
        TcpStream::connect(&host).await.with_context(|| format!("connecting to {host}"))?;
    let mut r = BufReader::new(stream);
    if let Some(p) = password {
        r.get_mut().write_all(&resp(&["AUTH", &p])).await?;
        read_reply(&mut r).await?;
    }
    r.get_mut().write_all(&resp(&["INFO", "commandstats"])).await?;
    Ok(parse_commandstats(&read_reply(&mut r).await?))
}

/// `cmdstat_publish:calls=10,usec=...` lines -> {"publish": 10}.
pub fn parse_commandstats(info: &str) -> CommandCalls {
    info.lines()
        .filter_map(|l| l.strip_prefix("cmdstat_"))
        .filter_map(|l| {
            let (name, fields) = l.split_once(':')?;
            let calls = fields.split(',').find_map(|f| f.strip_prefix("calls="))?;
            Some((name.to_string(), calls.trim().parse().ok()?))
        })
        .collect()
}

/// Calls made between two snapshots (commands with no calls left out).
pub fn delta(before: &CommandCalls, after: &CommandCalls) -> CommandCalls {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v.saturating_sub(before.get(k).copied().unwrap_or(0))))
        .filter(|(_, v)| *v > 0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commandstats_and_urls() {
        let info = "# Commandstats\r\ncmdstat_publish:calls=12,usec=30,usec_per_call=2.5\r\ncmdstat_info:calls=3,usec=1\r\n";
        let a = parse_commandstats(info);
        assert_eq!(a["publish"], 12);
        let mut b = a.clone();
        b.insert("publish".into(), 20);
        b.insert("subscribe".into(), 4);
        let d = delta(&a, &b);
        assert_eq!(d.get("publish"), Some(&8));
        assert_eq!(d.get("subscribe"), Some(&4));
        assert!(!d.contains_key("info"));
        assert_eq!(parse_url("redis://:pw@h:1/0").unwrap(), ("h:1".into(), Some("pw".into())));
        assert_eq!(parse_url("redis://h").unwrap(), ("h:6379".into(), None));
    }
}
