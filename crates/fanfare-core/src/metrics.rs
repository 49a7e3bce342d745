//! Metric names and the hot-path counters, registered once and cached.

use std::sync::OnceLock;

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};

pub const CONNECTIONS: &str = "fanfare_connections";
pub const CONNECTS: &str = "fanfare_connects_total";
pub const TRANSPORT_CONNECTS: &str = "fanfare_transport_connects_total";
pub const TRANSPORT_CONNECTIONS: &str = "fanfare_transport_connections";
pub const DISCONNECTS: &str = "fanfare_disconnects_total";
pub const SUBSCRIPTIONS: &str = "fanfare_subscriptions";
pub const CHANNELS: &str = "fanfare_channels";
pub const MESSAGES_SENT: &str = "fanfare_messages_sent_total";
pub const WRITES: &str = "fanfare_client_writes_total";
pub const MESSAGES_RECEIVED: &str = "fanfare_messages_received_total";
pub const BYTES_SENT: &str = "fanfare_bytes_sent_total";
pub const BYTES_RECEIVED: &str = "fanfare_bytes_received_total";
pub const SLOW_CONSUMERS: &str = "fanfare_slow_consumer_disconnects_total";
pub const PUBLICATIONS: &str = "fanfare_publications_total";
pub const BROKER_PUBLISH: &str = "fanfare_broker_publish_duration_seconds";
pub const DELIVERY_LAG: &str = "fanfare_broker_delivery_lag_seconds";
pub const COMMANDS: &str = "fanfare_commands_total";
pub const CLUSTER_NODES: &str = "fanfare_cluster_nodes";
pub const STREAM_GAPS: &str = "fanfare_stream_gaps_total";
pub const BROKER_RECONNECTS: &str = "fanfare_broker_reconnects_total";
pub const BROKER_CHANNELS: &str = "fanfare_broker_channels";
pub const BROKER_CHANNELS_SWEPT: &str = "fanfare_broker_channels_swept_total";
pub const WEBHOOK_EVENTS: &str = "fanfare_webhook_events_total";
pub const WEBHOOK_DROPPED: &str = "fanfare_webhook_dropped_total";
pub const WEBHOOK_DELIVERIES: &str = "fanfare_webhook_deliveries_total";
pub const WEBHOOK_DELIVERED: &str = "fanfare_webhook_delivered_events_total";
pub const WEBHOOK_QUEUE_DEPTH: &str = "fanfare_webhook_queue_depth";
pub const LIMIT_REFUSALS: &str = "fanfare_limit_refusals_total";
pub const WEBHOOK_DELIVERY: &str = "fanfare_webhook_delivery_duration_seconds";

/// Cached handles for counters touched on every message.
pub struct Hot {
    pub connections: Gauge,
    pub subscriptions: Gauge,
    pub channels: Gauge,
    pub messages_sent: Counter,
    pub writes: Counter,
    pub messages_received: Counter,
    pub bytes_sent: Counter,
    pub bytes_received: Counter,
    pub slow_consumers: Counter,
    pub connects: Counter,
    pub publications: Counter,
    pub broker_publish: Histogram,
}

/// The cached handles. The recorder must be installed before the first call.
pub fn hot() -> &'static Hot {
    static HOT: OnceLock<Hot> = OnceLock::new();
    HOT.get_or_init(|| Hot {
        connections: gauge!(CONNECTIONS),
        subscriptions: gauge!(SUBSCRIPTIONS),
        channels: gauge!(CHANNELS),
        messages_sent: counter!(MESSAGES_SENT),
        writes: counter!(WRITES),
        messages_received: counter!(MESSAGES_RECEIVED),
        bytes_sent: counter!(BYTES_SENT),
        bytes_received: counter!(BYTES_RECEIVED),
        slow_consumers: counter!(SLOW_CONSUMERS),
        connects: counter!(CONNECTS),
        publications: counter!(PUBLICATIONS),
        broker_publish: histogram!(BROKER_PUBLISH),
    })
}

pub fn slow_consumer() {
    hot().slow_consumers.increment(1);
}

/// Describes every metric (HELP lines) once at start-up.
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(CONNECTIONS, "Client connections currently open on this node.");
    describe_counter!(
        TRANSPORT_CONNECTS,
        "Successful connects by transport (websocket, http_stream, sse, uni_websocket, uni_sse, uni_http_stream) and encoding (json, protobuf)."
    );
    describe_gauge!(
        TRANSPORT_CONNECTIONS,
        "Connected clients (connect succeeded) currently open on this node, by transport."
    );
    describe_counter!(CONNECTS, "Client connects accepted.");
    describe_counter!(DISCONNECTS, "Client disconnects by reason.");
    describe_gauge!(SUBSCRIPTIONS, "Client subscriptions on this node.");
    describe_gauge!(CHANNELS, "Channels with at least one local subscriber.");
    describe_counter!(MESSAGES_SENT, "Replies and pushes written to clients.");
    describe_counter!(
        WRITES,
        "Socket writes of replies and pushes started (messages_sent / writes = messages per write; client.write_delay raises it)."
    );
    describe_counter!(MESSAGES_RECEIVED, "Commands received from clients.");
    describe_counter!(BYTES_SENT, Unit::Bytes, "WebSocket payload bytes written to clients.");
    describe_counter!(BYTES_RECEIVED, Unit::Bytes, "WebSocket payload bytes read from clients.");
    describe_counter!(SLOW_CONSUMERS, "Clients closed with 3008 because their queue overflowed.");
    describe_counter!(PUBLICATIONS, "Publications accepted by this node.");
    describe_histogram!(
        BROKER_PUBLISH,
        Unit::Seconds,
        "Time the broker took to accept a publication."
    );
    describe_counter!(COMMANDS, "Client commands by method.");
    describe_histogram!(
        DELIVERY_LAG,
        Unit::Seconds,
        "Time from publish on any node until the broker delivered the publication to this node (Redis broker; clocks of nodes must agree)."
    );
    describe_counter!(
        STREAM_GAPS,
        "Channels whose subscribers were told to resubscribe because deliveries may have been lost."
    );
    describe_counter!(BROKER_RECONNECTS, "Broker connections re-established after a failure.");
    describe_gauge!(
        BROKER_CHANNELS,
        "Channels whose history, presence or idempotency state the memory broker keeps in this process."
    );
    describe_counter!(
        BROKER_CHANNELS_SWEPT,
        "Channels whose state the memory broker freed (expired, nobody subscribed)."
    );
    describe_counter!(
        WEBHOOK_EVENTS,
        "Lifecycle events queued for webhooks by this node, by event (channel_occupied/vacated counted where the cluster-wide transition was decided)."
    );
    describe_counter!(
        WEBHOOK_DROPPED,
        "Webhook events dropped: queue_full (webhooks.queue_size reached) or attempts (webhooks.max_attempts failed deliveries)."
    );
    describe_counter!(
        WEBHOOK_DELIVERIES,
        "Webhook POSTs by result: ok (2xx), status (another answer), error (connection failure or webhooks.timeout)."
    );
    describe_counter!(WEBHOOK_DELIVERED, "Webhook events delivered (answered 2xx).");
    describe_gauge!(
        WEBHOOK_QUEUE_DEPTH,
        "Webhook events waiting for delivery (memory queue, or the Redis outbox as the delivering node sees it)."
    );
    describe_histogram!(
        WEBHOOK_DELIVERY,
        Unit::Seconds,
        "Time of one webhook POST until its answer."
    );
    describe_counter!(
        LIMIT_REFUSALS,
        "Requests refused by a [limits] setting, by limit: node_connections, user_connections, connect_rate, ip_connect_rate, client_commands, user_commands, channels."
    );
    for limit in crate::limits::LIMIT_NAMES {
        metrics::counter!(LIMIT_REFUSALS, "limit" => *limit).absolute(0);
    }
    describe_gauge!(CLUSTER_NODES, "Nodes that announced themselves recently, this one included.");
    // Counters alerts use exist from the start, so a first increment is a change.
    for c in [BROKER_RECONNECTS, STREAM_GAPS, SLOW_CONSUMERS, PUBLICATIONS] {
        metrics::counter!(c).absolute(0);
    }
}
