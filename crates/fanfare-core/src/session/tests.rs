//! The session state machine driven as a transport drives it: JSON frames in
//! through `handle_frame`, what the client would receive read from the
//! outbox, on a real node with the memory broker.

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;
use fanfare_protocol::ClientInfo;
use futures_util::FutureExt;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use super::*;
use crate::auth::{AuthConfig, Authenticator};
use crate::broker::{Broker, BrokerError, BrokerHandler, HistoryPage, NodeInfo, PublishOptions};
use crate::channel::ChannelRules;
use crate::memory::MemoryBroker;
use crate::node::NodeConfig;

fn node_with(max_queue_bytes: usize, broker: Arc<dyn Broker>) -> Node {
    let ns = Namespace {
        allow_publish: true,
        history_size: 1000,
        history_ttl: Duration::from_secs(60),
        // A publisher may read back what it published without subscribing.
        allow_history_for_client: true,
        ..Default::default()
    };
    let config = NodeConfig {
        max_queue_bytes,
        data_rules: crate::DataRules { max_size: max_queue_bytes / 4, max_depth: 64 },
        ..Default::default()
    };
    let auth = Authenticator::new(&AuthConfig::default()).expect("anonymous auth");
    Node::new(config, broker, auth, ChannelRules::new(vec![ns]).unwrap())
}

fn node(max_queue_bytes: usize) -> Node {
    node_with(max_queue_bytes, Arc::new(MemoryBroker::new()))
}

async fn connected(node: &Node) -> Session {
    let mut s = Session::new(node.clone(), Codec::Json).expect("node accepts sessions");
    s.handle_frame(br#"{"id":1,"connect":{}}"#).await.expect("connect");
    drain(s.outbox());
    s
}

/// Everything queued for the client, as JSON values.
fn drain(outbox: &Outbox) -> Vec<Value> {
    let mut items = Vec::new();
    assert_eq!(outbox.drain(&mut items), None, "the connection was closed");
    items.iter().map(|b| serde_json::from_slice(b).expect("one JSON message")).collect()
}

/// The command ids of `replies`, in the order the client gets them.
fn ids(replies: &[Value]) -> Vec<u64> {
    replies.iter().map(|r| r["id"].as_u64().expect("a reply, not a push")).collect()
}

fn publish_frame(id: u32, channel: &str, data: Value) -> String {
    json!({"id": id, "publish": {"channel": channel, "data": data}}).to_string()
}

#[tokio::test]
async fn a_command_before_connect_closes_the_connection_with_3501_and_is_not_carried_out() {
    let node = node(1 << 20);
    let mut s = Session::new(node.clone(), Codec::Json).unwrap();
    // The connect behind it in the same frame is never reached.
    let frame = b"{\"id\":1,\"subscribe\":{\"channel\":\"c\"}}\n{\"id\":2,\"connect\":{}}";
    let r = s.handle_frame(frame).await;
    assert_eq!(r, Err(DisconnectCode::BAD_REQUEST));
    assert_eq!(DisconnectCode::BAD_REQUEST.0, 3501);
    assert!(!DisconnectCode::BAD_REQUEST.reconnect(), "SDKs must not retry a bad request");
    assert_eq!(drain(s.outbox()), Vec::<Value>::new(), "no reply before the close");
    assert_eq!(s.client_id(), None, "not connected");
    assert_eq!(node.hub().num_subscribers("c"), 0, "the subscribe was not carried out");
}

#[tokio::test]
async fn a_subscriber_receives_each_publication_as_a_push_until_it_unsubscribes() {
    let node = node(1 << 20);
    let mut sub = connected(&node).await;
    sub.handle_frame(br#"{"id":2,"subscribe":{"channel":"news"}}"#).await.unwrap();
    assert_eq!(drain(sub.outbox()), vec![json!({"id": 2, "subscribe": {}})]);
    let mut publisher = connected(&node).await;

    publisher.handle_frame(publish_frame(2, "news", json!({"n": 1})).as_bytes()).await.unwrap();
    assert_eq!(drain(publisher.outbox()), vec![json!({"id": 2, "publish": {}})]);
    let pushes = drain(sub.outbox());
    assert_eq!(pushes.len(), 1, "{pushes:?}");
    assert_eq!(pushes[0]["push"]["channel"], "news");
    assert_eq!(pushes[0]["push"]["pub"]["data"], json!({"n": 1}));
    assert_eq!(pushes[0]["push"]["pub"]["offset"], 1);
    assert_eq!(
        pushes[0]["push"]["pub"]["info"]["client"].as_str(),
        publisher.client_id(),
        "the push says who published"
    );

    sub.handle_frame(br#"{"id":3,"unsubscribe":{"channel":"news"}}"#).await.unwrap();
    assert_eq!(drain(sub.outbox()), vec![json!({"id": 3, "unsubscribe": {}})]);
    publisher.handle_frame(publish_frame(3, "news", json!({"n": 2})).as_bytes()).await.unwrap();
    assert_eq!(drain(publisher.outbox()), vec![json!({"id": 3, "publish": {}})]);
    assert_eq!(drain(sub.outbox()), Vec::<Value>::new(), "nothing after the unsubscribe");
    assert_eq!(node.hub().num_subscribers("news"), 0);
}

#[tokio::test]
async fn subscribing_twice_to_one_channel_is_answered_with_105_and_the_connection_goes_on() {
    let node = node(1 << 20);
    let mut s = connected(&node).await;
    s.handle_frame(br#"{"id":2,"subscribe":{"channel":"c"}}"#).await.unwrap();
    drain(s.outbox());
    s.handle_frame(b"{\"id\":3,\"subscribe\":{\"channel\":\"c\"}}\n{\"id\":4,\"ping\":{}}")
        .await
        .expect("an error reply does not close the connection");
    let replies = drain(s.outbox());
    assert_eq!(
        replies[0],
        json!({"id": 3, "error": {"code": 105, "message": "already subscribed"}})
    );
    assert_eq!(replies[1], json!({"id": 4, "ping": {}}), "the next command is still answered");
    assert_eq!(node.hub().num_subscribers("c"), 1, "still subscribed once");
}

#[tokio::test]
async fn a_channel_of_an_unknown_namespace_is_answered_with_102_and_the_connection_goes_on() {
    let node = node(1 << 20);
    let mut s = connected(&node).await;
    let frame = [
        r#"{"id":2,"subscribe":{"channel":"nope:x"}}"#.to_string(),
        publish_frame(3, "nope:x", json!(1)),
        r#"{"id":4,"ping":{}}"#.to_string(),
    ]
    .join("\n");
    s.handle_frame(frame.as_bytes()).await.expect("an error reply does not close");
    let unknown = json!({"code": 102, "message": "unknown channel"});
    assert_eq!(
        drain(s.outbox()),
        vec![
            json!({"id": 2, "error": unknown}),
            json!({"id": 3, "error": unknown}),
            json!({"id": 4, "ping": {}}),
        ]
    );
    assert_eq!(node.hub().num_subscribers("nope:x"), 0);
}

/// The memory broker, except that each batch of publishes (`publish_many`,
/// which is how a session publishes) waits at a gate until the test lets it
/// through. Only for these tests: it makes "the broker has not answered yet"
/// a state the test holds instead of a race.
struct GatedBroker {
    inner: MemoryBroker,
    gate: Semaphore,
    /// How many publishes each batch that reached the broker had.
    batches: Mutex<Vec<usize>>,
}

impl GatedBroker {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            inner: MemoryBroker::new(),
            gate: Semaphore::new(0),
            batches: Mutex::new(Vec::new()),
        })
    }

    /// Lets `n` more batches through the gate.
    fn release(&self, n: usize) {
        self.gate.add_permits(n);
    }

    fn batches(&self) -> Vec<usize> {
        self.batches.lock().unwrap().clone()
    }
}

#[async_trait]
impl Broker for GatedBroker {
    fn set_handler(&self, handler: Arc<dyn BrokerHandler>) {
        self.inner.set_handler(handler)
    }

    async fn publish(
        &self,
        channel: &str,
        publication: Publication,
        opts: PublishOptions,
    ) -> Result<StreamPosition, BrokerError> {
        self.inner.publish(channel, publication, opts).await
    }

    async fn publish_many(
        &self,
        items: Vec<PublishItem>,
    ) -> Vec<Result<StreamPosition, BrokerError>> {
        self.batches.lock().unwrap().push(items.len());
        self.gate.acquire().await.expect("the gate is never closed").forget();
        self.inner.publish_many(items).await
    }

    async fn publish_join(&self, channel: &str, info: ClientInfo) -> Result<(), BrokerError> {
        self.inner.publish_join(channel, info).await
    }

    async fn publish_leave(&self, channel: &str, info: ClientInfo) -> Result<(), BrokerError> {
        self.inner.publish_leave(channel, info).await
    }

    async fn subscribe(&self, channel: &str) -> Result<(), BrokerError> {
        self.inner.subscribe(channel).await
    }

    async fn unsubscribe(&self, channel: &str) -> Result<(), BrokerError> {
        self.inner.unsubscribe(channel).await
    }

    async fn history(
        &self,
        channel: &str,
        query: HistoryQuery,
    ) -> Result<HistoryPage, BrokerError> {
        self.inner.history(channel, query).await
    }

    async fn remove_history(&self, channel: &str) -> Result<(), BrokerError> {
        self.inner.remove_history(channel).await
    }

    async fn add_presence(
        &self,
        channel: &str,
        info: ClientInfo,
        ttl: Duration,
    ) -> Result<(), BrokerError> {
        self.inner.add_presence(channel, info, ttl).await
    }

    async fn remove_presence(&self, channel: &str, client: &str) -> Result<(), BrokerError> {
        self.inner.remove_presence(channel, client).await
    }

    async fn presence(&self, channel: &str) -> Result<BTreeMap<String, ClientInfo>, BrokerError> {
        self.inner.presence(channel).await
    }

    async fn presence_stats(&self, channel: &str) -> Result<(u32, u32), BrokerError> {
        self.inner.presence_stats(channel).await
    }

    async fn publish_control(&self, message: Bytes) -> Result<(), BrokerError> {
        self.inner.publish_control(message).await
    }

    async fn announce(&self, info: &NodeInfo, ttl: Duration) -> Result<(), BrokerError> {
        self.inner.announce(info, ttl).await
    }

    async fn nodes(&self) -> Result<Vec<NodeInfo>, BrokerError> {
        self.inner.nodes().await
    }
}

/// Answers the batch the broker let through (as the transport does when
/// `next_event` fires).
/// Bounded, so that a batch that never completes fails the test instead of
/// hanging it.
async fn answer_batch(s: &mut Session) {
    let event = tokio::time::timeout(Duration::from_secs(10), s.next_event())
        .await
        .expect("the released batch was answered");
    s.handle_event(event).await.expect("publish replies never disconnect");
}

#[tokio::test]
async fn publishes_sent_while_a_batch_waits_go_to_the_broker_as_one_batch_and_are_answered_in_order()
 {
    let broker = GatedBroker::new();
    let node = node_with(1 << 20, broker.clone());
    let mut sub = connected(&node).await;
    sub.handle_frame(br#"{"id":2,"subscribe":{"channel":"c"}}"#).await.unwrap();
    drain(sub.outbox());
    let mut s = connected(&node).await;

    s.handle_frame(publish_frame(2, "c", json!(2)).as_bytes()).await.unwrap();
    assert_eq!(broker.batches(), vec![1], "the first publish goes out alone");
    assert_eq!(s.publishes_in_flight(), 1);
    // Arriving in two frames while the first waits: queued, not sent.
    s.handle_frame(
        format!("{}\n{}", publish_frame(3, "c", json!(3)), publish_frame(4, "c", json!(4)))
            .as_bytes(),
    )
    .await
    .unwrap();
    s.handle_frame(publish_frame(5, "c", json!(5)).as_bytes()).await.unwrap();
    assert_eq!(broker.batches(), vec![1], "nothing more reaches the broker yet");
    assert_eq!(s.publishes_in_flight(), 4);
    assert!(s.accepts_input(), "4 is far below MAX_PUBLISHES_IN_FLIGHT");
    assert_eq!(drain(s.outbox()), Vec::<Value>::new(), "no reply before the broker answers");

    broker.release(1);
    answer_batch(&mut s).await;
    assert_eq!(ids(&drain(s.outbox())), vec![2]);
    assert_eq!(broker.batches(), vec![1, 3], "the three queued ones went as the next batch");
    assert_eq!(s.publishes_in_flight(), 3);

    broker.release(1);
    answer_batch(&mut s).await;
    let replies = drain(s.outbox());
    assert_eq!(ids(&replies), vec![3, 4, 5]);
    assert!(replies.iter().all(|r| r["publish"] == json!({})), "{replies:?}");
    assert_eq!(s.publishes_in_flight(), 0);

    let data: Vec<Value> =
        drain(sub.outbox()).iter().map(|p| p["push"]["pub"]["data"].clone()).collect();
    assert_eq!(
        data,
        vec![json!(2), json!(3), json!(4), json!(5)],
        "published in the client's order"
    );
}

#[tokio::test]
async fn the_session_stops_accepting_input_at_max_publishes_in_flight_until_they_are_answered() {
    let broker = GatedBroker::new();
    let node = node_with(1 << 20, broker.clone());
    let mut s = connected(&node).await;
    let frame = |ids: std::ops::RangeInclusive<u32>| {
        ids.map(|id| publish_frame(id, "c", json!(id))).collect::<Vec<_>>().join("\n")
    };
    let last = MAX_PUBLISHES_IN_FLIGHT as u32 + 1; // ids start at 2
    s.handle_frame(frame(2..=last - 1).as_bytes()).await.unwrap();
    assert_eq!(s.publishes_in_flight(), MAX_PUBLISHES_IN_FLIGHT - 1);
    assert!(s.accepts_input(), "one below the bound");
    s.handle_frame(frame(last..=last).as_bytes()).await.unwrap();
    assert_eq!(s.publishes_in_flight(), MAX_PUBLISHES_IN_FLIGHT);
    assert!(!s.accepts_input(), "at the bound the transport stops reading");

    broker.release(1);
    answer_batch(&mut s).await;
    assert_eq!(s.publishes_in_flight(), MAX_PUBLISHES_IN_FLIGHT - 1, "the rest went out");
    assert!(s.accepts_input(), "the first answered batch frees room");
    broker.release(1);
    answer_batch(&mut s).await;
    assert_eq!(broker.batches(), vec![1, MAX_PUBLISHES_IN_FLIGHT - 1]);
    assert_eq!(s.publishes_in_flight(), 0);
    assert_eq!(
        ids(&drain(s.outbox())),
        (2..=last as u64).collect::<Vec<_>>(),
        "every one, in order"
    );
}

#[tokio::test]
async fn a_command_behind_waiting_publishes_is_answered_after_them_and_sees_them() {
    let broker = GatedBroker::new();
    let node = node_with(1 << 20, broker.clone());
    let mut s = connected(&node).await;
    let outbox = s.outbox().clone();
    s.handle_frame(publish_frame(2, "c", json!("first")).as_bytes()).await.unwrap();
    let frame = [
        publish_frame(3, "c", json!("second")),
        r#"{"id":4,"history":{"channel":"c","limit":-1}}"#.to_string(),
    ]
    .join("\n");

    {
        let mut handled = std::pin::pin!(s.handle_frame(frame.as_bytes()));
        assert!(handled.as_mut().now_or_never().is_none(), "the history waits for the publishes");
        assert_eq!(drain(&outbox), Vec::<Value>::new());
        broker.release(2);
        handled.await.unwrap();
    }

    let replies = drain(&outbox);
    assert_eq!(ids(&replies), vec![2, 3, 4]);
    let history: Vec<Value> = replies[2]["history"]["publications"]
        .as_array()
        .unwrap_or_else(|| panic!("a history reply: {replies:?}"))
        .iter()
        .map(|p| p["data"].clone())
        .collect();
    assert_eq!(history, vec![json!("first"), json!("second")]);
    assert_eq!(broker.batches(), vec![1, 1]);
    assert_eq!(s.publishes_in_flight(), 0);
}

#[tokio::test]
async fn a_pretty_printed_publish_reaches_subscribers_compact() {
    let node = node(1 << 20);
    let mut sub = connected(&node).await;
    sub.handle_frame(br#"{"id":2,"subscribe":{"channel":"c"}}"#).await.unwrap();
    drain(sub.outbox());
    let mut publisher = connected(&node).await;
    publisher
        .handle_frame(b"{\"id\":2,\"publish\":{\"channel\":\"c\",\"data\":{\n  \"a\": [1, 2]\n}}}")
        .await
        .unwrap();
    assert_eq!(drain(publisher.outbox()), vec![json!({"id": 2, "publish": {}})]);
    let mut raw = Vec::new();
    sub.outbox().drain(&mut raw);
    let push = String::from_utf8(raw[0].to_vec()).unwrap();
    assert!(push.contains(r#""pub":{"data":{"a":[1,2]},"info":"#), "{push}");
    assert!(!push.contains('\n'), "{push}");
}

#[tokio::test]
async fn history_is_cut_to_what_fits_half_the_queue_and_never_closes_the_asker() {
    let node = node(8192); // replies up to 4 096 bytes; data up to 2 048
    let mut s = connected(&node).await;
    s.handle_frame(br#"{"id":2,"subscribe":{"channel":"c"}}"#).await.unwrap();
    let pad = "x".repeat(1500);
    for id in 3..8 {
        let frame = format!(r#"{{"id":{id},"publish":{{"channel":"c","data":"{pad}"}}}}"#);
        s.handle_frame(frame.as_bytes()).await.unwrap();
        drain(s.outbox());
    }
    s.handle_frame(br#"{"id":9,"history":{"channel":"c","limit":-1}}"#).await.unwrap();
    let replies = drain(s.outbox());
    let h = &replies.last().unwrap()["history"];
    let offsets: Vec<u64> = h["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, vec![1, 2], "a prefix that fits, in order");
    assert_eq!(h["offset"], 5, "the client sees there is more");
}
