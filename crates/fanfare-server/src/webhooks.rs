//! Webhook delivery (decision 26): takes batches from the node's event queue
//! (memory queue or Redis outbox), POSTs them signed to `webhooks.url` on a
//! pooled keep-alive client, retries a failed batch with exponential backoff
//! before anything newer (which keeps per-channel order), and acks it once a
//! 2xx came back.
//!
//! Wire format: `POST <url>` with `Content-Type: application/json`, body
//! `{"events":[<event>, ...]}` (oldest first) and the header
//! `X-Fanfare-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`
//! keyed with `webhooks.secret`. `t` is taken at each attempt, so a receiver
//! may refuse signatures older than a few minutes (replays) without refusing
//! retries.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fanfare_core::events::{Batch, EventQueue};
use fanfare_core::metrics as names;
use fanfare_core::{MemoryQueue, Node};
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full, Limited};
use sha2::Sha256;

use crate::config::WebhooksSection;

/// The signature header.
pub const SIGNATURE_HEADER: &str = "x-fanfare-signature";

/// Largest receiver answer read (to keep its connection reusable); the body
/// itself is ignored.
const MAX_ANSWER: usize = 64 * 1024;

/// `t=<t>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
pub fn sign(secret: &[u8], t: u64, body: &[u8]) -> String {
    // HMAC takes keys of any length: `new_from_slice` cannot fail for it.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts any key length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={t},v1={}", data_encoding::HEXLOWER.encode(&mac.finalize().into_bytes()))
}

/// `{"events":[...]}` from each event's JSON, in order.
pub fn batch_body(events: &[Bytes]) -> Bytes {
    let len = events.iter().map(|e| e.len() + 1).sum::<usize>() + 12;
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(b"{\"events\":[");
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(e);
    }
    out.extend_from_slice(b"]}");
    Bytes::from(out)
}

/// Wait after the `attempt`-th failure (1-based): `initial` doubled per
/// failure, at most `max`. No jitter: one node delivers at a time, so there
/// is no herd to spread.
pub fn backoff(initial: Duration, max: Duration, attempt: u32) -> Duration {
    let factor = 1u32.checked_shl(attempt.saturating_sub(1)).unwrap_or(u32::MAX);
    initial.checked_mul(factor).map_or(max, |d| d.min(max))
}

/// Why a POST failed (the `result` label).
#[derive(Debug, PartialEq, Eq)]
enum Failure {
    /// The receiver answered with a status outside 2xx.
    Status(u16),
    /// No answer: connection refused or reset, or `webhooks.timeout`.
    Error(String),
}

struct Delivery {
    client: crate::outbound::HttpClient,
    uri: http::Uri,
    secret: Vec<u8>,
    timeout: Duration,
    batch_size: usize,
    retry_backoff: Duration,
    retry_backoff_max: Duration,
    max_attempts: u32,
    /// Wait between tries for the delivery lease (Redis outbox).
    lease_retry: Duration,
}

/// Running webhooks: the node's event queue and the delivery task.
pub struct Webhooks {
    queue: Arc<dyn EventQueue>,
    delivery: tokio::task::JoinHandle<()>,
}

impl Webhooks {
    /// At shutdown, after the sessions closed: waits (until `deadline`) for
    /// this node's events to be saved (Redis) or delivered (memory queue),
    /// then stops delivering and gives the lease up, so another node takes
    /// over now rather than after `webhooks.lease_ttl`. A POST cut short here
    /// is not acked and goes out again from the next holder.
    pub async fn stop(self, deadline: tokio::time::Instant) {
        while self.queue.unsaved() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if self.queue.unsaved() > 0 {
            tracing::warn!(
                events = self.queue.unsaved(),
                "webhook events not saved or delivered at exit"
            );
        }
        self.delivery.abort();
        let _ = self.delivery.await;
        self.queue.resign().await;
    }
}

/// Turns webhooks on for `node` (when `webhooks.url` is set): installs the
/// event queue (the Redis outbox with a Redis broker, the memory queue
/// otherwise) and starts the delivery task.
pub async fn start(
    cfg: &WebhooksSection,
    node: &Node,
    redis: Option<&fanfare_redis::RedisBroker>,
) -> anyhow::Result<Option<Webhooks>> {
    if !cfg.enabled() {
        return Ok(None);
    }
    let mask = cfg.mask()?;
    let queue: Arc<dyn EventQueue> = match redis {
        Some(r) => Arc::new(
            r.outbox(
                node.uid(),
                fanfare_redis::OutboxConfig {
                    capacity: cfg.queue_size,
                    lease_ttl: cfg.lease_ttl,
                    mask,
                },
            )
            .await
            .map_err(|e| anyhow::anyhow!("webhooks: the Redis outbox: {e}"))?,
        ),
        None => Arc::new(MemoryQueue::new(cfg.queue_size, mask)),
    };
    node.events().install(mask, queue.clone(), node.uid());
    let delivery = Delivery {
        client: crate::outbound::client(Some(cfg.timeout)),
        uri: cfg.url.parse()?,
        secret: cfg.secret.as_bytes().to_vec(),
        timeout: cfg.timeout,
        batch_size: cfg.batch_size,
        retry_backoff: cfg.retry_backoff,
        retry_backoff_max: cfg.retry_backoff_max,
        max_attempts: cfg.max_attempts,
        // A resigned lease (SIGTERM) is taken within a second; an expired
        // one within this after `lease_ttl`. One small script a second per
        // waiting node.
        lease_retry: (cfg.lease_ttl / 3).min(Duration::from_secs(1)),
    };
    tracing::info!(url = %crate::config::mask_userinfo(&cfg.url), events = ?cfg.events, outbox = if redis.is_some() { "redis" } else { "memory" }, "webhooks on");
    let delivery = tokio::spawn(delivery.run(queue.clone()));
    Ok(Some(Webhooks { queue, delivery }))
}

impl Delivery {
    async fn run(self, queue: Arc<dyn EventQueue>) {
        let depth = metrics::gauge!(names::WEBHOOK_QUEUE_DEPTH);
        loop {
            if !queue.lead().await {
                tokio::time::sleep(self.lease_retry).await;
                continue;
            }
            let batch = match queue.next(self.batch_size).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "reading webhook events failed");
                    tokio::time::sleep(self.retry_backoff).await;
                    continue;
                }
            };
            if let Some(d) = queue.depth().await {
                depth.set(d as f64);
            }
            if batch.events.is_empty() || !self.deliver(&batch, queue.as_ref()).await {
                continue;
            }
            if let Err(e) = queue.ack(&batch).await {
                // Delivered but still pending: it goes out again and the
                // receiver drops it by its ids.
                tracing::warn!(error = %e, "acking delivered webhook events failed");
            }
        }
    }

    /// POSTs `batch` until a 2xx, the attempts run out (the batch is dropped
    /// and counted) or this node lost the delivery lease (the batch is left to
    /// the new holder). True when the batch is done with.
    async fn deliver(&self, batch: &Batch, queue: &dyn EventQueue) -> bool {
        let body = batch_body(&batch.events);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let start = Instant::now();
            let res = self.post(body.clone()).await;
            metrics::histogram!(names::WEBHOOK_DELIVERY).record(start.elapsed().as_secs_f64());
            let result = match &res {
                Ok(()) => "ok",
                Err(Failure::Status(_)) => "status",
                Err(Failure::Error(_)) => "error",
            };
            metrics::counter!(names::WEBHOOK_DELIVERIES, "result" => result).increment(1);
            let failure = match res {
                Ok(()) => {
                    metrics::counter!(names::WEBHOOK_DELIVERED)
                        .increment(batch.events.len() as u64);
                    return true;
                }
                Err(f) => f,
            };
            if self.max_attempts > 0 && attempt >= self.max_attempts {
                tracing::warn!(
                    ?failure,
                    attempts = attempt,
                    events = batch.events.len(),
                    "webhook batch dropped after webhooks.max_attempts"
                );
                metrics::counter!(names::WEBHOOK_DROPPED, "reason" => "attempts")
                    .increment(batch.events.len() as u64);
                return true;
            }
            let wait = backoff(self.retry_backoff, self.retry_backoff_max, attempt);
            // The first failure of a batch is worth a line; repeats of it are
            // in the metric.
            if attempt == 1 {
                tracing::warn!(?failure, retry_in = ?wait, "webhook delivery failed; retrying");
            }
            tokio::time::sleep(wait).await;
            if !queue.lead().await {
                return false;
            }
        }
    }

    async fn post(&self, body: Bytes) -> Result<(), Failure> {
        let t = fanfare_core::auth::unix_now();
        let req = http::Request::post(self.uri.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::USER_AGENT, concat!("fanfare/", env!("CARGO_PKG_VERSION")))
            .header(SIGNATURE_HEADER, sign(&self.secret, t, &body))
            .body(Full::new(body))
            .map_err(|e| Failure::Error(e.to_string()))?;
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| Failure::Error(crate::outbound::error_chain(&e)))?;
            let status = resp.status();
            // Read the answer so the connection goes back to the pool.
            let _ = Limited::new(resp.into_body(), MAX_ANSWER).collect().await;
            if status.is_success() { Ok(()) } else { Err(Failure::Status(status.as_u16())) }
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .unwrap_or_else(|_| Err(Failure::Error("timed out (webhooks.timeout)".into())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body_in_hex() {
        // The MAC covers "<t>.<body>", checked with the hmac crate directly.
        let sig = sign(b"Jefe", 1700000000, b"{\"events\":[]}");
        let (t, v1) = sig.split_once(',').unwrap();
        assert_eq!(t, "t=1700000000");
        let v1 = v1.strip_prefix("v1=").unwrap();
        assert_eq!(v1.len(), 64);
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"1700000000.{\"events\":[]}");
        mac.verify_slice(&data_encoding::HEXLOWER.decode(v1.as_bytes()).unwrap()).unwrap();
        // Known answer: RFC 4231 case 2 ("what do ya want for nothing?").
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        assert_eq!(
            data_encoding::HEXLOWER.encode(&mac.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_ne!(sign(b"Jefe", 1700000001, b"{\"events\":[]}"), sig, "the timestamp is signed");
        assert_ne!(sign(b"other", 1700000000, b"{\"events\":[]}"), sig);
    }

    #[test]
    fn a_batch_body_is_the_events_in_order() {
        let body =
            batch_body(&[Bytes::from_static(b"{\"a\":1}"), Bytes::from_static(b"{\"a\":2}")]);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v, serde_json::json!({"events": [{"a": 1}, {"a": 2}]}));
        assert_eq!(&batch_body(&[])[..], b"{\"events\":[]}");
    }

    #[test]
    fn backoff_doubles_per_failure_up_to_its_cap() {
        let (i, m) = (Duration::from_millis(100), Duration::from_secs(1));
        let waits: Vec<u64> = (1..=6).map(|a| backoff(i, m, a).as_millis() as u64).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(backoff(i, m, 200), m, "no overflow after many failures");
    }

    #[tokio::test]
    async fn a_failing_receiver_gets_the_same_batch_until_it_answers_2xx() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let bodies = Arc::new(std::sync::Mutex::new(Vec::new()));
        {
            let (calls, bodies) = (calls.clone(), bodies.clone());
            tokio::spawn(async move {
                loop {
                    let (sock, _) = listener.accept().await.unwrap();
                    let (calls, bodies) = (calls.clone(), bodies.clone());
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let (calls, bodies) = (calls.clone(), bodies.clone());
                            async move {
                                let sig =
                                    req.headers()[SIGNATURE_HEADER].to_str().unwrap().to_string();
                                let body = req.into_body().collect().await.unwrap().to_bytes();
                                let t: u64 = sig[2..sig.find(',').unwrap()].parse().unwrap();
                                assert_eq!(sign(b"k", t, &body), sig);
                                bodies.lock().unwrap().push(body);
                                let status = if calls.fetch_add(1, Ordering::SeqCst) < 2 {
                                    500
                                } else {
                                    200
                                };
                                Ok::<_, std::convert::Infallible>(
                                    http::Response::builder()
                                        .status(status)
                                        .body(Full::new(Bytes::new()))
                                        .unwrap(),
                                )
                            }
                        },
                    );
                    tokio::spawn(
                        hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(sock), svc),
                    );
                }
            });
        }
        let delivery = Delivery {
            client: crate::outbound::client(None),
            uri: format!("http://{addr}/hook").parse().unwrap(),
            secret: b"k".to_vec(),
            timeout: Duration::from_secs(2),
            batch_size: 10,
            retry_backoff: Duration::from_millis(5),
            retry_backoff_max: Duration::from_millis(20),
            max_attempts: 0,
            lease_retry: Duration::from_millis(10),
        };
        let queue = MemoryQueue::new(10, fanfare_core::EventMask::default());
        let batch = Batch { events: vec![Bytes::from_static(b"{\"n\":1}")], ids: Vec::new() };
        assert!(delivery.deliver(&batch, &queue).await);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        let bodies = bodies.lock().unwrap();
        assert!(bodies.iter().all(|b| &b[..] == b"{\"events\":[{\"n\":1}]}"));
    }
}
