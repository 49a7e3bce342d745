//! The proxy side of a session: starting a call to the application backend
//! and going on with the command (or timer) when it answers. See
//! [`crate::proxy`] for what the calls mean and why a session waits for at
//! most one.

use std::collections::VecDeque;

use fanfare_protocol::{Command, ReplyError};

use super::*;
use crate::proxy::{
    CallContext, Headers, Proxy, ProxyAnswer, ProxyFailure, ProxyFuture, ProxyRequest, ProxyResult,
};

/// How long a connection or subscription whose refresh failed (backend down,
/// error answer) lives on before the node asks again. Centrifugo also keeps
/// such connections instead of closing them on a backend hiccup.
const REFRESH_RETRY: u64 = 10;

/// Proxy state of a connection that uses proxies.
#[derive(Default)]
pub(super) struct ProxyState {
    headers: Option<Arc<Headers>>,
    /// What the connect answer attached to the connection; sent with later calls.
    meta: Bytes,
    /// Boxed: the state stays small for connections that only keep headers.
    waiting: Option<Box<Waiting>>,
}

impl ProxyState {
    pub(super) fn is_empty(&self) -> bool {
        self.headers.is_none() && self.meta.is_empty() && self.waiting.is_none()
    }
}

/// A proxy call the session waits for.
pub(super) struct Waiting {
    /// Only ever touched through `&mut`, so `SyncWrapper` keeps the session `Sync`.
    pub(super) call: SyncWrapper<ProxyFuture>,
    then: Then,
    /// Commands that arrived behind the call, handled once it is answered.
    pub(super) queued: VecDeque<Command>,
    /// The answer, once the call completed (`Session::next_event`).
    pub(super) answer: Option<Result<ProxyAnswer, ProxyFailure>>,
}

/// What to do with the answer.
enum Then {
    Connect { id: u32, req: ConnectRequest, client: Arc<str> },
    Subscribe { id: u32, req: SubscribeRequest },
    Publish { id: u32, channel: String, data: Bytes },
    Rpc { id: u32 },
    Refresh,
    SubRefresh { channel: Arc<str> },
}

impl Then {
    /// The command to answer (none for refreshes the node started).
    fn id(&self) -> Option<u32> {
        match self {
            Then::Connect { id, .. }
            | Then::Subscribe { id, .. }
            | Then::Publish { id, .. }
            | Then::Rpc { id } => Some(*id),
            Then::Refresh | Then::SubRefresh { .. } => None,
        }
    }
}

impl Session {
    /// Keeps the client headers proxies forward, taken from the request that
    /// opened the connection ([`crate::proxy::Proxies::capture`]).
    pub fn set_proxy_headers(&mut self, headers: Option<Arc<Headers>>) {
        if headers.is_some() {
            self.proxy_state_mut().headers = headers;
        }
    }

    /// Waits for the proxy call the last frame started and goes on with what
    /// waited for it: for transports that must know how the connect ended
    /// before they answer the request that carried it (the unidirectional
    /// ones). Bounded by the proxy's timeout.
    pub async fn settle(&mut self) -> Result<(), DisconnectCode> {
        while self.waiting().is_some() {
            let event = self.next_event().await;
            self.handle_event(event).await?;
        }
        Ok(())
    }

    pub(super) fn waiting(&self) -> Option<&Waiting> {
        self.side.as_ref().and_then(|s| s.proxy.waiting.as_deref())
    }

    pub(super) fn waiting_mut(&mut self) -> Option<&mut Waiting> {
        self.side.as_mut().and_then(|s| s.proxy.waiting.as_deref_mut())
    }

    fn proxy_state_mut(&mut self) -> &mut ProxyState {
        &mut self.side.get_or_insert_default().proxy
    }

    /// Who asks. `client` is for connect, before the session has one.
    fn call_context(&self, client: Option<Arc<str>>) -> CallContext {
        let (client, user) = match (&self.conn, client) {
            (Some(c), _) => (c.info.client.clone(), c.info.user.clone()),
            (None, Some(client)) => (client, anonymous_user()),
            (None, None) => unreachable!("calls before connect are connect calls"),
        };
        let state = self.side.as_deref().map(|s| &s.proxy);
        CallContext {
            client,
            transport: self.transport.label(),
            protocol: match self.outbox.codec() {
                Codec::Json => "json",
                Codec::Protobuf => "protobuf",
            },
            user,
            meta: state.map(|s| s.meta.clone()).unwrap_or_default(),
            headers: state.and_then(|s| s.headers.clone()),
            rules: self.node.config().data_rules,
        }
    }

    fn start(&mut self, proxy: &Proxy, ctx: CallContext, request: ProxyRequest, then: Then) {
        let call = proxy.call(&ctx, &request);
        self.proxy_state_mut().waiting = Some(Box::new(Waiting {
            call: SyncWrapper::new(call),
            then,
            queued: VecDeque::new(),
            answer: None,
        }));
    }

    pub(super) fn start_connect_proxy(
        &mut self,
        proxy: &Proxy,
        id: u32,
        req: ConnectRequest,
        client: Arc<str>,
    ) {
        let ctx = self.call_context(Some(client.clone()));
        let request = ProxyRequest::Connect {
            data: req.data.clone(),
            name: req.name.clone(),
            version: req.version.clone(),
        };
        self.start(proxy, ctx, request, Then::Connect { id, req, client });
    }

    pub(super) fn start_subscribe_proxy(&mut self, proxy: &Proxy, id: u32, req: SubscribeRequest) {
        let ctx = self.call_context(None);
        let request =
            ProxyRequest::Subscribe { channel: req.channel.clone(), data: req.data.clone() };
        self.start(proxy, ctx, request, Then::Subscribe { id, req });
    }

    pub(super) fn start_publish_proxy(
        &mut self,
        proxy: &Proxy,
        id: u32,
        channel: String,
        data: Bytes,
    ) {
        let ctx = self.call_context(None);
        let request = ProxyRequest::Publish { channel: channel.clone(), data: data.clone() };
        self.start(proxy, ctx, request, Then::Publish { id, channel, data });
    }

    pub(super) fn start_refresh_proxy(&mut self, proxy: &Proxy) {
        let ctx = self.call_context(None);
        self.start(proxy, ctx, ProxyRequest::Refresh, Then::Refresh);
    }

    pub(super) fn start_sub_refresh_proxy(&mut self, proxy: &Proxy, channel: Arc<str>) {
        let ctx = self.call_context(None);
        let request = ProxyRequest::SubRefresh { channel: channel.to_string() };
        self.start(proxy, ctx, request, Then::SubRefresh { channel });
    }

    /// A client RPC: answered by the rpc proxy; 108 without one, as
    /// Centrifugo answers.
    pub(super) fn rpc(
        &mut self,
        id: u32,
        method: String,
        data: Bytes,
    ) -> Result<Option<ReplyBody>, Fail> {
        let Some(proxy) = self.node.config().proxies.rpc().cloned() else {
            return Err(ErrorCode::NOT_AVAILABLE.into());
        };
        let ctx = self.call_context(None);
        self.start(&proxy, ctx, ProxyRequest::Rpc { method, data }, Then::Rpc { id });
        Ok(None)
    }

    /// Goes on with what waited for the backend, then with the commands
    /// queued behind it, in order, until one starts another call.
    pub(super) async fn proxy_answered(&mut self) -> Result<(), DisconnectCode> {
        let waiting = self.side.as_mut().and_then(|s| s.proxy.waiting.take());
        let Waiting { then, mut queued, answer, .. } = *waiting.expect("a call was waiting");
        let answer = answer.expect("handled after next_event stored the answer");
        self.trim_side();
        self.resume(then, answer).await?;
        while let Some(cmd) = queued.pop_front() {
            self.handle_command(cmd).await?;
            if let Some(w) = self.waiting_mut() {
                w.queued.extend(queued);
                break;
            }
        }
        Ok(())
    }

    async fn resume(
        &mut self,
        then: Then,
        answer: Result<ProxyAnswer, ProxyFailure>,
    ) -> Result<(), DisconnectCode> {
        let result = match answer {
            Ok(ProxyAnswer::Result(r)) => r,
            Ok(ProxyAnswer::Disconnect { code, reason }) => {
                // Validated by `Proxy::call`.
                let code = DisconnectCode(code);
                self.outbox.close_with_reason(code, reason);
                return Err(code);
            }
            Ok(ProxyAnswer::Error { code, message, temporary }) => {
                let Some(id) = then.id() else {
                    tracing::warn!(
                        client = self.client_id(),
                        code,
                        message,
                        "refresh proxy answered an error; asking again later"
                    );
                    self.refresh_later(&then);
                    return Ok(());
                };
                let error = ReplyError { code, message, temporary };
                self.send(Reply::new(id, ReplyBody::Error(error)));
                return Ok(());
            }
            // Logged and counted by `Proxy::call`.
            Err(_) => {
                match then.id() {
                    Some(id) => self.send(Reply::error(id, ErrorCode::INTERNAL)),
                    None => self.refresh_later(&then),
                }
                return Ok(());
            }
        };
        match (then, result) {
            (Then::Connect { id, req, client }, ProxyResult::Connect(a)) => {
                if !a.meta.is_empty() {
                    self.proxy_state_mut().meta = a.meta;
                }
                let identity = Identity {
                    user: a.user,
                    conn_info: a.info,
                    expires_at: unix_expiry(a.expire_at),
                    channels: a.channels,
                    data: a.data,
                    subs: a.subs,
                };
                let r = self.connect_as(id, req, client, identity).await;
                self.finish(id, r)
            }
            (Then::Subscribe { id, req }, ProxyResult::Subscribe(a)) => {
                let r = self.subscribe_answered(id, req, a).await;
                self.finish(id, r)
            }
            (Then::Publish { id, channel, data }, ProxyResult::Publish(a)) => {
                let r = self.publish_answered(id, channel, data, a);
                self.finish(id, r)
            }
            (Then::Rpc { id }, ProxyResult::Rpc(data)) => {
                self.finish(id, Ok(Some(ReplyBody::Rpc { data })))
            }
            (Then::Refresh, ProxyResult::Refresh(a)) => {
                if a.expired || unix_expiry(a.expire_at).is_some_and(|e| e <= unix_now()) {
                    return Err(DisconnectCode::EXPIRED);
                }
                let conn = self.connected_mut();
                // 0: the connection no longer expires.
                conn.expires_at = unix_expiry(a.expire_at);
                if !a.info.is_empty() {
                    conn.info = Arc::new(ClientInfo { conn_info: a.info, ..(*conn.info).clone() });
                }
                Ok(())
            }
            (Then::SubRefresh { channel }, ProxyResult::Refresh(a)) => {
                let expired =
                    a.expired || unix_expiry(a.expire_at).is_some_and(|e| e <= unix_now());
                if expired {
                    // 2501: the SDK subscribes again (asking the subscribe proxy).
                    if self.leave_channel(&channel).await {
                        self.send(Reply::push(
                            channel,
                            fanfare_protocol::PushBody::Unsubscribe {
                                code: 2501,
                                reason: "subscription expired".into(),
                            },
                        ));
                    }
                    return Ok(());
                }
                let Some(sub) = self.connected_mut().subs.get_mut(&channel) else {
                    return Ok(());
                };
                sub.expires_at = unix_expiry(a.expire_at);
                if a.info.is_empty() {
                    return Ok(());
                }
                sub.info = Arc::new(ClientInfo { chan_info: a.info, ..(*sub.info).clone() });
                // Others see the new channel info in presence at once.
                if sub.presence {
                    let info = (*sub.info).clone();
                    let ttl = self.node.config().presence_ttl;
                    if let Err(e) = self.node.broker().add_presence(&channel, info, ttl).await {
                        tracing::warn!(channel = &*channel, error = %e, "presence update failed");
                    }
                }
                Ok(())
            }
            (then, _) => {
                // Each backend parses the answer of the call it made.
                tracing::error!("proxy answer of another kind than the call");
                match then.id() {
                    Some(id) => self.finish(id, Err(ErrorCode::INTERNAL.into())),
                    None => Ok(()),
                }
            }
        }
    }

    /// A refresh that got no usable answer: the connection (or subscription)
    /// lives on a little, then the node asks again.
    fn refresh_later(&mut self, then: &Then) {
        let retry = Some(unix_now() + REFRESH_RETRY);
        match then {
            Then::Refresh => self.connected_mut().expires_at = retry,
            Then::SubRefresh { channel } => {
                if let Some(sub) = self.connected_mut().subs.get_mut(channel) {
                    sub.expires_at = retry;
                }
            }
            _ => {}
        }
    }

    async fn subscribe_answered(
        &mut self,
        id: u32,
        req: SubscribeRequest,
        a: crate::proxy::SubscribeAnswer,
    ) -> Result<Option<ReplyBody>, Fail> {
        let mut ns = self.node.rules().namespace(&req.channel)?.clone();
        // A server-side subscribe (control API) may have joined it meanwhile.
        if self.connected().subs.contains_key(req.channel.as_str()) {
            return Err(ErrorCode::ALREADY_SUBSCRIBED.into());
        }
        if let Some(v) = a.presence {
            ns.presence = v;
        }
        if let Some(v) = a.join_leave {
            ns.join_leave = v;
        }
        if let Some(v) = a.force_recovery {
            ns.force_recovery = v;
        }
        if let Some(v) = a.force_positioning {
            ns.force_positioning = v;
        }
        let expires_at = unix_expiry(a.expire_at);
        self.subscribe_granted(id, &req, &ns, a.info, expires_at, a.data).await
    }

    fn publish_answered(
        &mut self,
        id: u32,
        channel: String,
        data: Bytes,
        a: crate::proxy::PublishAnswer,
    ) -> Result<Option<ReplyBody>, Fail> {
        let ns = self.node.rules().namespace(&channel)?;
        let mut opts = if a.skip_history { Default::default() } else { Node::publish_options(ns) };
        if !a.idempotency_key.is_empty() {
            opts.idempotency_key = Some(a.idempotency_key);
            opts.idempotency_window = crate::api::ApiLimits::default().idempotency_window;
        }
        let publication = Publication {
            // Checked as the client's data by `Proxy::call`.
            data: a.data.unwrap_or(data),
            tags: (!a.tags.is_empty()).then(|| Arc::new(a.tags)),
            ..Default::default()
        };
        self.enqueue_publish(id, PublishItem { channel, publication, opts });
        Ok(None)
    }
}
