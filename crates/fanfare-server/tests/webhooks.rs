//! Lifecycle webhooks against a receiver that never acknowledges:
//! `webhooks.max_attempts` drops a batch after that many failed POSTs, counts
//! it, and delivery moves on; the webhook metrics README lists show what
//! happened. (Ordering, signatures, Redis hand-over: tests/api/test_webhooks.py.)

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Server, http_get, metric};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A webhook receiver on a loopback port that keeps every POST body it gets
/// and answers each with 500. HTTP/1.1 keep-alive, as the node's client pools
/// connections.
struct FailingReceiver {
    port: u16,
    bodies: Arc<Mutex<Vec<Value>>>,
}

impl FailingReceiver {
    async fn start() -> FailingReceiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("local addr").port();
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let kept = bodies.clone();
        tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else { return };
                tokio::spawn(answer_500s(sock, kept.clone()));
            }
        });
        FailingReceiver { port, bodies }
    }

    fn posts(&self) -> Vec<Value> {
        self.bodies.lock().unwrap().clone()
    }

    /// Waits (at most `within`) until `n` POSTs arrived.
    async fn wait_posts(&self, n: usize, within: Duration) -> Vec<Value> {
        let started = Instant::now();
        loop {
            let posts = self.posts();
            if posts.len() >= n {
                return posts;
            }
            assert!(started.elapsed() < within, "{} of {n} POSTs within {within:?}", posts.len());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn answer_500s(mut sock: tokio::net::TcpStream, bodies: Arc<Mutex<Vec<Value>>>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        // One request: the head, then Content-Length bytes of body.
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + len {
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Value =
            serde_json::from_slice(&buf[head_end..head_end + len]).expect("a JSON webhook body");
        bodies.lock().unwrap().push(body);
        buf.drain(..head_end + len);
        let answer = "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\nnope";
        if sock.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// The ids of a batch's events.
fn ids(body: &Value) -> Vec<String> {
    body["events"]
        .as_array()
        .unwrap_or_else(|| panic!("no events: {body}"))
        .iter()
        .map(|e| e["id"].as_str().expect("event id").to_string())
        .collect()
}

/// Waits (at most 10 s) until the metric `name` reads `want`.
async fn metric_reaches(port: u16, name: &str, want: f64) {
    let started = Instant::now();
    loop {
        let got = metric(port, name);
        if got == want {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{name} is {got}, not {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_dropped_and_counted_after_max_attempts_failed_posts_and_delivery_moves_on() {
    let receiver = FailingReceiver::start().await;
    // Only `connect` events: one client, one event, one batch. The retry
    // wait (1 s) leaves time to read the queue depth while a batch is tried.
    let server = Server::start(&format!(
        "[webhooks]\nurl = \"http://127.0.0.1:{}/hooks\"\nsecret = \"hook-secret\"\n\
         events = [\"connect\"]\ntimeout = \"2s\"\nretry_backoff = \"1s\"\n\
         retry_backoff_max = \"1s\"\nmax_attempts = 3\n",
        receiver.port
    ));
    const DROPPED: &str = r#"fanfare_webhook_dropped_total{reason="attempts"}"#;

    let first = server.connected("ann").await;
    let posts = receiver.wait_posts(1, Duration::from_secs(10)).await;
    // While the batch is being tried, it is what the queue holds.
    assert_eq!(metric(server.port, "fanfare_webhook_queue_depth"), 1.0);
    assert_eq!(metric(server.port, DROPPED), 0.0, "dropped before its attempts ran out");
    let batch = ids(&posts[0]);
    assert_eq!(batch.len(), 1, "{}", posts[0]);
    assert_eq!(posts[0]["events"][0]["type"], "connect", "{}", posts[0]);

    // Three POSTs of that batch, then it is given up.
    metric_reaches(server.port, DROPPED, 1.0).await;
    let posts = receiver.posts();
    assert_eq!(posts.len(), 3, "POSTs of a batch with max_attempts = 3: {posts:?}");
    assert!(posts.iter().all(|p| ids(p) == batch), "{posts:?}");
    // Nothing is left waiting (the gauge is refreshed at least once a second).
    metric_reaches(server.port, "fanfare_webhook_queue_depth", 0.0).await;
    // Past two more retry waits, the dropped batch was not sent again.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(receiver.posts().len(), 3, "the dropped batch was POSTed again");

    // The next event is a new batch, tried and dropped the same way.
    let second = server.connected("bob").await;
    let posts = receiver.wait_posts(6, Duration::from_secs(15)).await;
    let next = ids(&posts[3]);
    assert_ne!(next, batch);
    assert!(posts[3..].iter().all(|p| ids(p) == next), "{posts:?}");
    metric_reaches(server.port, DROPPED, 2.0).await;

    // The metrics README lists, with what happened: two events queued,
    // six POSTs answered with a status, none delivered.
    assert_eq!(metric(server.port, r#"fanfare_webhook_events_total{event="connect"}"#), 2.0);
    assert_eq!(metric(server.port, r#"fanfare_webhook_deliveries_total{result="status"}"#), 6.0);
    assert_eq!(metric(server.port, r#"fanfare_webhook_deliveries_total{result="ok"}"#), 0.0);
    assert_eq!(metric(server.port, "fanfare_webhook_delivered_events_total"), 0.0);
    assert_eq!(metric(server.port, "fanfare_webhook_delivery_duration_seconds_count"), 6.0);
    // Each POST was answered at once by the loopback receiver: well under
    // the 2 s webhooks.timeout each.
    let took = metric(server.port, "fanfare_webhook_delivery_duration_seconds_sum");
    assert!(took > 0.0 && took < 6.0, "6 POSTs took {took} s");
    let (status, body) = http_get(server.port, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200);
    assert!(body.contains("fanfare_webhook_delivery_duration_seconds_bucket"), "no histogram");
    drop((first, second));
}
