"""centrifuge-python against the real binary: the Protobuf protocol
(`use_protobuf=True`: payloads are bytes) and JSON, on one channel."""

import asyncio

import pytest
from centrifuge import (
    Client,
    ClientEventHandler,
    ConnectingContext,
    DisconnectedContext,
    PublicationContext,
    SubscribedContext,
    SubscriptionEventHandler,
)

from conftest import Node, node_toml, token

WAIT = 10.0


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """One node on the memory broker, with short pings so that the SDK's
    pongs are exercised. The pong timeout is just under the interval (the
    node wants it shorter): every client of every test must pong within it,
    and a test process stalled on a loaded machine must not turn into a 3012
    close and a reconnect."""
    pings = '\n[client]\nping_interval = "2s"\npong_timeout = "1900ms"\n'
    n = Node(tmp_path_factory.mktemp("sdk"), node_toml(None) + pings, "sdk")
    try:
        yield n
    finally:
        n.kill()


class Events:
    """What a client (disconnects) and its one subscription (subscribed,
    publications) report. Server-side subscriptions (the personal channel)
    are left out."""

    def __init__(self):
        self.pubs = []
        self.subscribed = asyncio.Queue()
        self.disconnected = asyncio.Queue()
        self.connecting = []
        self.changed = asyncio.Event()

        class ClientEvents(ClientEventHandler):
            async def on_connecting(_, ctx: ConnectingContext) -> None:
                self.connecting.append(ctx)

            async def on_disconnected(_, ctx: DisconnectedContext) -> None:
                await self.disconnected.put(ctx)

        class SubEvents(SubscriptionEventHandler):
            async def on_subscribed(_, ctx: SubscribedContext) -> None:
                await self.subscribed.put(ctx)

            async def on_publication(_, ctx: PublicationContext) -> None:
                self.pubs.append(ctx.pub)
                self.changed.set()

        self.client_events = ClientEvents()
        self.sub_events = SubEvents()

    async def wait_pubs(self, n: int):
        async def enough():
            while len(self.pubs) < n:
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(enough(), WAIT)
        return self.pubs


async def client(node: Node, user: str, protobuf: bool):
    events = Events()
    c = Client(
        f"ws://127.0.0.1:{node.port}/connection/websocket",
        events=events.client_events,
        token=token(user),
        use_protobuf=protobuf,
        min_reconnect_delay=0.05,
        max_reconnect_delay=0.3,
    )
    await c.connect()
    await c.ready(WAIT)
    return c, events


async def subscribe(c: Client, events: Events, channel: str):
    sub = c.new_subscription(
        channel, events=events.sub_events, recoverable=True, positioned=True
    )
    await sub.subscribe()
    await sub.ready(WAIT)
    await asyncio.wait_for(events.subscribed.get(), WAIT)
    return sub


def test_protobuf_client_bytes_presence_history_and_recovery(node):
    async def run():
        pub, _ = await client(node, "pub", protobuf=True)
        sub_client, events = await client(node, "sub", protobuf=True)
        sub = await subscribe(sub_client, events, "py-pb")
        binary = bytes([0, 0xFF, 10, 0xC3, 0x28])
        await pub.publish("py-pb", binary)
        await pub.publish("py-pb", b'{"n":2}')
        pubs = await events.wait_pubs(2)
        assert [p.data for p in pubs] == [binary, b'{"n":2}']
        assert [p.offset for p in pubs] == [1, 2]

        presence = await sub.presence()
        assert len(presence.clients) == 1
        stats = await sub.presence_stats()
        assert (stats.num_clients, stats.num_users) == (1, 1)
        history = await sub.history(limit=-1)
        assert [p.data for p in history.publications] == [binary, b'{"n":2}']
        assert history.offset == 2 and history.epoch

        # Missed while disconnected, recovered on reconnect.
        await sub_client.disconnect()
        await asyncio.wait_for(events.disconnected.get(), WAIT)
        await pub.publish("py-pb", b"\x03\xfe")
        await sub_client.connect()
        ctx = await asyncio.wait_for(events.subscribed.get(), WAIT)
        assert ctx.was_recovering and ctx.recovered, ctx
        pubs = await events.wait_pubs(3)
        assert (pubs[2].data, pubs[2].offset) == (b"\x03\xfe", 3)
        await pub.disconnect()
        await sub_client.disconnect()

    asyncio.run(run())


def test_json_and_protobuf_subscribers_share_a_channel(node):
    async def run():
        pb_sub, pb_events = await client(node, "pb-sub", protobuf=True)
        json_sub, json_events = await client(node, "json-sub", protobuf=False)
        await subscribe(pb_sub, pb_events, "py-mixed")
        await subscribe(json_sub, json_events, "py-mixed")
        pb_pub, _ = await client(node, "pb-pub", protobuf=True)
        json_pub, _ = await client(node, "json-pub", protobuf=False)

        await json_pub.publish("py-mixed", {"from": "json"})
        await pb_pub.publish("py-mixed", b'{"from":"protobuf"}')
        assert [p.data for p in await json_events.wait_pubs(2)] == [
            {"from": "json"},
            {"from": "protobuf"},
        ]
        assert [p.data for p in await pb_events.wait_pubs(2)] == [
            b'{"from":"json"}',
            b'{"from":"protobuf"}',
        ]

        # Binary data: the Protobuf subscriber gets the bytes; the JSON client
        # is disconnected with 3506 (inappropriate protocol), as by Centrifugo.
        await pb_pub.publish("py-mixed", b"\xde\xad\xbe\xef\x00")
        assert (await pb_events.wait_pubs(3))[2].data == b"\xde\xad\xbe\xef\x00"
        gone = await asyncio.wait_for(json_events.disconnected.get(), WAIT)
        assert gone.code == 3506, gone
        assert len(json_events.pubs) == 2
        for c in (pb_sub, json_sub, pb_pub, json_pub):
            await c.disconnect()

    asyncio.run(run())


def test_pings_are_answered_over_both_protocols(node):
    async def run():
        clients = [await client(node, f"ping-{p}", protobuf=p) for p in (True, False)]
        # Pings 1-2 s after connecting and every 2 s after that: at least two
        # in 6.5 s. An unanswered one closes the connection with 3012 1.9 s
        # after it (the first by 4.4 s at the latest: each deadline fires up
        # to one timer tick, 1/8 of the pong timeout, late), and the SDK
        # reconnects. The SDK shows no pings, so this is slept for.
        await asyncio.sleep(6.5)
        for c, events in clients:
            assert events.disconnected.empty(), events.disconnected.get_nowait()
            # One connecting: the connect call; a second would be a reconnect.
            assert len(events.connecting) == 1, events.connecting
            await c.disconnect()

    asyncio.run(run())
