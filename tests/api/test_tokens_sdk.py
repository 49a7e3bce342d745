"""Token refusals as centrifuge-python sees them (issue 16, tokens): an
expired token (109) makes the SDK fetch a new one and connect, which here has
a fractional `exp` (RFC 7519 allows it); a subscription token offered as the
connection token is refused with 3500 and the SDK stays disconnected. Rust
tests (crates/fanfare-server/tests/tokens.rs) cover every refusal on every
path; this checks an SDK's reaction to the codes."""

import asyncio
import base64
import hashlib
import hmac
import json
import time

import pytest
from centrifuge import Client, ClientEventHandler, ClientState, DisconnectedContext

from conftest import SECRET, Node, node_toml, token

WAIT = 10.0


def sign(claims: dict) -> str:
    b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()  # noqa: E731
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    sig = hmac.new(SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    n = Node(tmp_path_factory.mktemp("tokens"), node_toml(None), "tokens")
    try:
        yield n
    finally:
        n.kill()


class Disconnects(ClientEventHandler):
    def __init__(self):
        self.codes = asyncio.Queue()

    async def on_disconnected(self, ctx: DisconnectedContext) -> None:
        await self.codes.put(ctx.code)


def joined_bystander(node):
    """A raw client subscribed before the refusal; it must still receive after."""
    b = node.ws("bystander")
    b.subscribe("plain:tokens-bystander")
    return b


def assert_receives(node, bystander, n):
    assert node.api("publish", {"channel": "plain:tokens-bystander", "data": {"n": n}})[0] == 200
    assert bystander.push()["push"]["pub"]["data"] == {"n": n}
    bystander.close()


def test_an_expired_token_makes_the_sdk_fetch_a_new_one_with_a_fractional_exp(node):
    handed = []

    async def get_token() -> str:
        # A fresh token with a fractional expiry.
        handed.append("fresh")
        return sign({"sub": "sdk-user", "exp": time.time() + 300.5})

    async def run():
        expired = sign({"sub": "sdk-user", "exp": time.time() - 10})
        url = f"ws://127.0.0.1:{node.port}/connection/websocket"
        c = Client(url, token=expired, get_token=get_token)
        try:
            await c.connect()
            await asyncio.wait_for(c.ready(), WAIT)
            assert c.state == ClientState.CONNECTED
            assert handed == ["fresh"], "the SDK asked once for a new token after 109"
        finally:
            await c.disconnect()

    bystander = joined_bystander(node)
    asyncio.run(run())
    assert_receives(node, bystander, 1)


def test_a_subscription_token_as_connection_token_is_refused_for_good(node):
    async def run():
        events = Disconnects()
        sub_token = sign({"sub": "sdk-user", "channel": "plain:x", "exp": int(time.time()) + 300})
        url = f"ws://127.0.0.1:{node.port}/connection/websocket"
        c = Client(url, token=sub_token, events=events)
        try:
            await c.connect()
            assert await asyncio.wait_for(events.codes.get(), WAIT) == 3500
            # 3500 is terminal: the SDK does not try again.
            await asyncio.sleep(1.5)
            assert c.state == ClientState.DISCONNECTED
        finally:
            await c.disconnect()
        # A connection token works on the same node.
        good = Client(url, token=token("sdk-user"))
        try:
            await good.connect()
            await asyncio.wait_for(good.ready(), WAIT)
        finally:
            await good.disconnect()

    bystander = joined_bystander(node)
    asyncio.run(run())
    assert_receives(node, bystander, 2)
