"""Bounded unpacking: container floods are refused fast, every legitimate message still fits."""
from __future__ import annotations

import time

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol import wire
from protocol.envelope import ENVELOPE_DOMAIN, VERSION, Limits, open_envelope, seal
from protocol.errors import BadSignature, MalformedMessage
from protocol.keys import public_key_bytes, sign
from protocol.messages import Event, Heartbeat, NodeState, RpcRequest, decode_body
from protocol.records import RECORD_LIMITS, dht_key, open_record, seal_record
from protocol.runspec import canonical_bytes, make_spec

KEY = Ed25519PrivateKey.from_private_bytes(b"\x31" * 32)
RUN = bytes(range(16))
NOW = 1_700_000_000.0
MIB = 1 << 20


def empty_lists(total_bytes: int, per_array: int) -> bytes:
    """An array of arrays of empty arrays: one byte (0x90) per Python list the receiver would build."""
    inner = b"\xdc" + per_array.to_bytes(2, "big") + b"\x90" * per_array
    count = (total_bytes - 5) // len(inner)
    return b"\xdd" + count.to_bytes(4, "big") + inner * count


def refused_within(seconds: float, fn, *args, error=MalformedMessage, **kwargs) -> str:
    """The error ``fn`` raises; the fastest of three tries must take under ``seconds`` (unbounded,
    these took 0.2 s and more; the best of three keeps a garbage-collector pause out of it)."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        with pytest.raises(error) as info:
            fn(*args, **kwargs)
        times.append(time.perf_counter() - start)
    assert min(times) < seconds
    return str(info.value)


def test_one_mebibyte_of_empty_lists_is_refused_fast():
    flat = b"\xdd" + (MIB - 5).to_bytes(4, "big") + b"\x90" * (MIB - 5)
    assert "max_array_len" in refused_within(0.1, wire.unpack, flat, MIB)
    assert "max_array_len" in refused_within(0.1, open_envelope, flat, None, Limits(), run_id=None)


def test_many_small_arrays_are_refused_by_the_container_budget():
    nested = empty_lists(MIB, 16384)  # each array within max_len, a million of them in all
    assert "arrays and maps" in refused_within(0.1, wire.unpack, nested, MIB)


def payload_with_body(packed_body: bytes) -> bytes:
    head = msgpack.packb([VERSION, "k", RUN, public_key_bytes(KEY), 1, NOW, bytes(16)], use_bin_type=True)
    return bytes([0x98]) + head[1:] + packed_body  # the 7 header fields, then the body as the 8th item


def test_signature_is_checked_before_the_body_is_unpacked():
    payload = payload_with_body(empty_lists(MIB - 200, 16384))
    limits = Limits(max_bytes=2 * MIB)
    forged = msgpack.packb([payload, bytes(64)], use_bin_type=True)
    refused_within(0.1, open_envelope, forged, None, limits, run_id=None, now=NOW, error=BadSignature)
    signed = msgpack.packb([payload, sign(KEY, ENVELOPE_DOMAIN, payload)], use_bin_type=True)
    assert "arrays and maps" in refused_within(0.1, open_envelope, signed, None, limits, run_id=None, now=NOW)


def test_header_fields_must_be_scalars():
    payload = msgpack.packb([1, ["heartbeat"], RUN, bytes(32), 1, NOW, bytes(16), {}], use_bin_type=True)
    data = msgpack.packb([payload, bytes(64)], use_bin_type=True)
    with pytest.raises(MalformedMessage, match="envelope payload"):
        open_envelope(data, None, Limits(), run_id=None, now=NOW)


def test_largest_legitimate_messages_still_fit():
    metrics = Heartbeat(state=NodeState.ONLINE, step=1, metrics={f"metric_{i}": float(i) for i in range(64)})
    headers = [{"name": f"t{i}", "dtype": "float32", "shape": [8] * 8, "nbytes": 4 * 8**8, "digest": bytes(32)} for i in range(64)]
    request = RpcRequest(method="forward", to="12D3KooWPeer", args={f"a{i}": list(range(100)) for i in range(64)},
                         tensors=headers, token=bytes(200))
    for message in (metrics, request):
        data = seal(KEY, kind=message.KIND, run_id=RUN, body=message.to_body(), seq=1, timestamp=NOW)
        env = open_envelope(data, message.KIND, Limits(), run_id=RUN, now=NOW)
        assert decode_body(env.kind, env.body) == message
    events = [Event("x-" + "e" * 60, bytes(32), "d" * 1024, NOW).to_body() for _ in range(32)]
    record = seal_record(KEY, run_id=RUN, key=dht_key(RUN, "events"), kind="event", body={"events": events}, seq=1, timestamp=NOW)
    assert len(open_record(record, run_id=RUN, limits=RECORD_LIMITS, now=NOW)[2]["events"]) == 32
    spec = make_spec("pipeline", "tiny", KEY, domains=[f"d{i}" for i in range(64)], stages=1024, path_length=3,
                     blocks_per_stage=[1] * 1024)
    assert wire.unpack(canonical_bytes(spec), MIB)["pipeline"]["blocks_per_stage"] == [1] * 1024
    assert wire.unpack(msgpack.packb([0] * 16384), MIB) == [0] * 16384
    with pytest.raises(MalformedMessage, match="max_array_len"):
        wire.unpack(msgpack.packb([0] * 16385), MIB)


def test_seal_refuses_what_receivers_would_refuse():
    with pytest.raises(MalformedMessage, match="more than 16384 entries"):
        seal(KEY, kind="k", run_id=RUN, body={"ids": [0] * 16385}, seq=1)
    with pytest.raises(MalformedMessage, match="arrays and maps"):
        seal(KEY, kind="k", run_id=RUN, body={"rows": [[] for _ in range(wire.MAX_CONTAINERS - 1)]}, seq=1)
    body = {"rows": [[] for _ in range(wire.MAX_CONTAINERS - 2)]}  # with the rows list and the body map: the budget
    data = seal(KEY, kind="k", run_id=RUN, body=body, seq=1, timestamp=NOW)
    assert open_envelope(data, "k", Limits(), run_id=RUN, now=NOW).body == body


def test_largest_envelope_header_fits_the_header_bound():
    kind = "\U0001f600" * 64  # 64 characters of 4 UTF-8 bytes each
    data = seal(KEY, kind=kind, run_id=RUN, body={"x": 1}, seq=2**64 - 1, timestamp=NOW)
    assert open_envelope(data, kind, Limits(), run_id=RUN, now=NOW).kind == kind
