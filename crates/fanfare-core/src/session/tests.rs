use super::*;
use crate::auth::{AuthConfig, Authenticator};
use crate::channel::ChannelRules;
use crate::memory::MemoryBroker;
use crate::node::NodeConfig;

fn node(max_queue_bytes: usize) -> Node {
    let ns = Namespace {
        allow_publish: true,
        history_size: 100,
        history_ttl: Duration::from_secs(60),
        ..Default::default()
    };
    let config = NodeConfig {
        max_queue_bytes,
        data_rules: crate::DataRules { max_size: max_queue_bytes / 4, max_depth: 64 },
        ..Default::default()
    };
    let auth = Authenticator::new(&AuthConfig::default()).expect("anonymous auth");
    Node::new(config, Arc::new(MemoryBroker::new()), auth, ChannelRules::new(vec![ns]).unwrap())
}

async fn connected(node: &Node) -> Session {
    let mut s = Session::new(node.clone(), Codec::Json).expect("node accepts sessions");
    s.handle_frame(br#"{"id":1,"connect":{}}"#).await.expect("connect");
    drain(&s);
    s
}

/// Everything queued, as JSON values.
fn drain(s: &Session) -> Vec<serde_json::Value> {
    let mut items = Vec::new();
    assert_eq!(s.outbox().drain(&mut items), None, "the connection was closed");
    items.iter().map(|b| serde_json::from_slice(b).expect("one JSON message")).collect()
}

#[tokio::test]
async fn the_first_command_must_be_connect() {
    let node = node(1 << 20);
    let mut s = Session::new(node, Codec::Json).unwrap();
    let r = s.handle_frame(br#"{"id":1,"subscribe":{"channel":"c"}}"#).await;
    assert_eq!(r, Err(DisconnectCode::BAD_REQUEST));
}

#[tokio::test]
async fn a_pretty_printed_publish_reaches_subscribers_compact() {
    let node = node(1 << 20);
    let mut sub = connected(&node).await;
    sub.handle_frame(br#"{"id":2,"subscribe":{"channel":"c"}}"#).await.unwrap();
    drain(&sub);
    let mut publisher = connected(&node).await;
    publisher
        .handle_frame(b"{\"id\":2,\"publish\":{\"channel\":\"c\",\"data\":{\n  \"a\": [1, 2]\n}}}")
        .await
        .unwrap();
    assert_eq!(drain(&publisher), vec![serde_json::json!({"id": 2, "publish": {}})]);
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
        drain(&s);
    }
    s.handle_frame(br#"{"id":9,"history":{"channel":"c","limit":-1}}"#).await.unwrap();
    let replies = drain(&s);
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
