"""A node's real RpcEndpoint fed from memory: one call is the bytes of one stream, the reply is what it wrote.

For fuzzing and the handler state machine, which need thousands of calls per second; the same
endpoint over real p2pd streams is tested in tests/test_rpc_and_hostile_input.py and
tests/test_access_control.py.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from types import SimpleNamespace

from hivemind.p2p import PeerID

from node.rpc import REPLY_KIND, RpcEndpoint
from protocol.envelope import Limits, open_envelope
from protocol.errors import ProtocolError


def peer_id(seed: int) -> PeerID:
    """A well-formed libp2p peer id (identity multihash of an Ed25519 key) for ``seed``."""
    return PeerID(b"\x00\x24\x08\x01\x12\x20" + seed.to_bytes(32, "big"))


class MemoryWriter:
    """What the endpoint writes to a stream, kept."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False

    def write(self, data) -> None:
        self.data += bytes(data)

    async def drain(self) -> None:
        return None

    def close(self) -> None:
        self.closed = True


@dataclass(frozen=True)
class Reply:
    ok: bool
    kind: str  # the error kind of a refusal ("" when ok); "" and not ok: the stream was closed without a reply
    result: dict
    raw: bytes


async def serve_bytes(endpoint: RpcEndpoint, caller: PeerID, data: bytes, *, eof: bool = True) -> Reply:
    """Run one incoming stream carrying ``data`` through the endpoint and decode what it answered."""
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    writer = MemoryWriter()
    await endpoint._serve(SimpleNamespace(peer_id=caller), reader, writer)
    assert writer.closed, "the endpoint left a stream open"
    return decode_reply(bytes(writer.data), endpoint.run_id)


def decode_reply(raw: bytes, run_id: bytes) -> Reply:
    """The reply frame the endpoint wrote; an endpoint that wrote something else is a bug."""
    if not raw:
        return Reply(False, "", {}, raw)
    length = int.from_bytes(raw[:4], "big")
    try:
        envelope = open_envelope(raw[4 : 4 + length], REPLY_KIND, Limits(max_bytes=1 << 20), run_id=run_id)
    except ProtocolError as error:
        raise AssertionError(f"the endpoint wrote a reply that does not open: {error}") from None
    body = envelope.body
    kind = "" if body["ok"] else body["error"].split(":", 1)[0]
    return Reply(bool(body["ok"]), kind, body["result"], raw)


def memory_endpoint(key, run_id: bytes, access, timeouts, **kwargs) -> RpcEndpoint:
    """An endpoint whose transport is never used (streams come from serve_bytes)."""
    p2p = SimpleNamespace(peer_id=peer_id(0))
    return RpcEndpoint(p2p, key, run_id, access, timeouts, clock=kwargs.pop("clock", time.time), **kwargs)


def frame(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data
