"""Signed envelopes: round trip, each rejection reason, replay guard bounds, sequence numbers."""
from __future__ import annotations

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol.envelope import VERSION, Envelope, Limits, ReplayGuard, Sequencer, open_envelope, seal
from protocol.errors import (
    BadSignature,
    Expired,
    MalformedMessage,
    MessageTooLarge,
    ProtocolError,
    Replayed,
    WrongKind,
    WrongRun,
)
from protocol.keys import public_key_bytes

RUN = bytes(range(16))
OTHER_RUN = bytes(16)
NOW = 1_700_000_000.0
KEY = Ed25519PrivateKey.from_private_bytes(b"\x01" * 32)
LIMITS = Limits()


def make(body: dict | None = None, **kwargs) -> bytes:
    args = {"kind": "heartbeat", "run_id": RUN, "body": {"step": 3} if body is None else body, "seq": 7, "timestamp": NOW}
    args.update(kwargs)
    return seal(KEY, **args)


def open_(data: bytes, **kwargs) -> Envelope:
    args = {"expected_kind": "heartbeat", "limits": LIMITS, "run_id": RUN, "now": NOW + 1}
    args.update(kwargs)
    return open_envelope(data, args.pop("expected_kind"), args.pop("limits"), **args)


def test_round_trip_keeps_every_field():
    body = {"a": [1, -2, 3.5, None, True], "b": b"\x00\xff", "c": {"d": "é"}}
    env = open_(make(body, nonce=b"n" * 16))
    assert env == Envelope(VERSION, "heartbeat", RUN, public_key_bytes(KEY), 7, NOW, b"n" * 16, body)


def test_fresh_nonce_each_seal():
    assert open_(make()).nonce != open_(make()).nonce


def test_expected_kind_accepts_collection_and_none():
    assert open_(make(), expected_kind={"announce", "heartbeat"}).kind == "heartbeat"
    assert open_(make(), expected_kind=None).kind == "heartbeat"


def test_run_id_none_accepts_any_run():
    assert open_(make(run_id=OTHER_RUN), run_id=None).run_id == OTHER_RUN


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x92\x01\x02", msgpack.packb([b"x", b"y" * 64]), b"\x00" * 40])
def test_garbage_is_malformed(data):
    with pytest.raises(MalformedMessage):
        open_(data)


def test_oversize_rejected_before_parsing():
    with pytest.raises(MessageTooLarge, match="limit 100"):
        open_(b"\xc1" * 101, limits=Limits(max_bytes=100))  # invalid msgpack: size must win


def test_seal_refuses_non_native_body():
    with pytest.raises(MalformedMessage, match="tuple"):
        make({"t": (1, 2)})
    with pytest.raises(MalformedMessage, match="map keys"):
        make({1: 2})


def test_tampered_payload_is_bad_signature():
    payload, signature = msgpack.unpackb(make())
    tampered = payload[:-1] + bytes([payload[-1] ^ 1])  # body {"step": 3} -> {"step": 2}, still valid msgpack
    with pytest.raises(BadSignature):
        open_(msgpack.packb([tampered, signature], use_bin_type=True))


def test_signature_from_another_key_is_bad_signature():
    payload, _ = msgpack.unpackb(make())
    _, other_signature = msgpack.unpackb(seal(Ed25519PrivateKey.from_private_bytes(b"\x02" * 32), kind="heartbeat", run_id=RUN, body={}, seq=1))
    with pytest.raises(BadSignature):
        open_(msgpack.packb([payload, other_signature], use_bin_type=True))


def test_unknown_version_is_malformed():
    payload, signature = msgpack.unpackb(make())
    fields = msgpack.unpackb(payload)
    fields[0] = VERSION + 1
    with pytest.raises(MalformedMessage, match="version"):
        open_(msgpack.packb([msgpack.packb(fields, use_bin_type=True), signature], use_bin_type=True))


def test_wrong_kind():
    with pytest.raises(WrongKind, match="announce"):
        open_(make(), expected_kind="announce")


def test_other_run():
    with pytest.raises(WrongRun):
        open_(make(run_id=OTHER_RUN))


def test_expired_and_future():
    with pytest.raises(Expired, match="old"):
        open_(make(), now=NOW + LIMITS.max_age_s + 1)
    with pytest.raises(Expired, match="future"):
        open_(make(), now=NOW - LIMITS.max_future_s - 1)
    assert open_(make(), now=NOW + LIMITS.max_age_s - 1).seq == 7


def test_replayed_nonce():
    guard = ReplayGuard()
    data = make()
    open_(data, replay_guard=guard)
    with pytest.raises(Replayed, match="already seen"):
        open_(data, replay_guard=guard)
    open_(make(), replay_guard=guard)  # same sender, new nonce: fine


def test_checks_run_in_documented_order():
    # wrong kind + wrong run + expired: kind is reported first, then run, then time
    data = make(run_id=OTHER_RUN)
    with pytest.raises(WrongKind):
        open_(data, expected_kind="event", now=NOW + 10_000)
    with pytest.raises(WrongRun):
        open_(data, now=NOW + 10_000)


def test_replay_guard_memory_is_bounded_and_forgotten_nonces_stay_refused():
    guard = ReplayGuard(window_s=300.0, max_entries=50)
    sent = [make(timestamp=NOW + i * 0.01) for i in range(200)]
    for data in sent:
        open_(data, replay_guard=guard, now=NOW + 3)
    assert len(guard) == 50
    for data in sent:  # every one, forgotten or not, is refused the second time
        with pytest.raises(ProtocolError) as info:
            open_(data, replay_guard=guard, now=NOW + 3)
        assert isinstance(info.value, (Replayed, Expired))
    assert len(guard) == 50


def test_replay_guard_evicts_by_age():
    guard = ReplayGuard(window_s=10.0)
    for i in range(20):
        open_(make(), replay_guard=guard, now=NOW)
    assert len(guard) == 20
    open_(make(timestamp=NOW + 20), replay_guard=guard, now=NOW + 20)
    assert len(guard) == 1


def test_sequencer_strictly_increasing_and_clock_based():
    import time

    first = Sequencer().next()
    assert abs(first - time.time_ns() // 1000) < 10_000_000
    seq = Sequencer()
    values = [seq.next() for _ in range(10_000)]
    assert all(b > a for a, b in zip(values, values[1:]))
    assert Sequencer().next() > values[0]  # a "restarted" sequencer does not go back


def test_guard_with_window_equal_to_max_age_covers_future_stamped_envelopes():
    guard = ReplayGuard(window_s=LIMITS.max_age_s)
    data = make(timestamp=NOW + 29)  # from a fast clock, still within max_future_s
    open_(data, replay_guard=guard, now=NOW)
    for later in (NOW + 1, NOW + 200, NOW + 29 + LIMITS.max_age_s - 1):
        with pytest.raises(Replayed):
            open_(data, replay_guard=guard, now=later)
    with pytest.raises(Expired):
        open_(data, replay_guard=guard, now=NOW + 29 + LIMITS.max_age_s + 1)
