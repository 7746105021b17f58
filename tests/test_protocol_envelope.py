"""Signed envelopes: round trip, each rejection reason, replay guard bounds, sequence numbers."""
from __future__ import annotations

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st
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


# ---- per-sender replay floors ------------------------------------------------------------------

HONEST, ATTACKER = b"h" * 32, b"a" * 32


def stamped(sender: bytes, timestamp: float, n: int) -> Envelope:
    """What the guard sees of an envelope (it reads sender, nonce and timestamp only)."""
    return Envelope(VERSION, "heartbeat", RUN, sender, 1, timestamp, n.to_bytes(16, "big"), {})


def test_flood_from_one_key_never_refuses_an_honest_fresh_envelope():
    guard = ReplayGuard(window_s=300.0, max_entries=1000)
    early = stamped(HONEST, NOW - 10, 0)
    guard.check_and_remember(early, NOW)
    for i in range(5000):  # stamped ahead of the honest clock, as far as max_future_s allows
        guard.check_and_remember(stamped(ATTACKER, NOW + 20 + i * 1e-3, i), NOW)
        if i % 500 == 0:
            guard.check_and_remember(stamped(HONEST, NOW + i * 1e-4, 1 + i), NOW)
    guard.check_and_remember(stamped(HONEST, NOW + 1, 10**6), NOW + 1)
    assert len(guard) <= 1000 and guard.entries_of(HONEST) == 1
    with pytest.raises(Replayed):  # forgotten, yet still refused: the honest floor covers it
        guard.check_and_remember(early, NOW + 1)


def test_flood_from_many_keys_spares_honest_senders():
    guard = ReplayGuard(window_s=300.0, max_entries=500, max_per_sender=8)
    for i in range(400):
        for j in range(10):
            guard.check_and_remember(stamped(i.to_bytes(32, "big"), NOW + 25 + i * 1e-3 + j * 1e-4, j), NOW)
        if i % 50 == 0:
            guard.check_and_remember(stamped(HONEST, NOW + i * 1e-3, i), NOW)
    guard.check_and_remember(stamped(HONEST, NOW + 1, 10**6), NOW + 1)
    assert len(guard) <= 500


def test_flood_from_more_keys_than_max_entries_stays_bounded_and_safe():
    guard = ReplayGuard(window_s=300.0, max_entries=500)
    sent = [stamped(i.to_bytes(32, "big"), NOW + 25 + i * 1e-3 + j * 1e-4, j) for i in range(3000) for j in range(3)]
    for env in sent:
        guard.check_and_remember(env, NOW)
    assert len(guard) <= 500 and len(guard._floors) <= 500  # floors are bounded too (the rest share one)
    for env in sent:
        with pytest.raises(Replayed):
            guard.check_and_remember(env, NOW + 1)


def test_one_sender_is_capped_by_forgetting_its_own_oldest():
    guard = ReplayGuard(max_per_sender=100)
    for i in range(50):
        guard.check_and_remember(stamped(HONEST, NOW - 100 + i, i), NOW)
    for i in range(1000):
        guard.check_and_remember(stamped(ATTACKER, NOW + i * 0.01, i), NOW)
    assert guard.entries_of(ATTACKER) == 100 and guard.entries_of(HONEST) == 50
    assert guard.floor_of(HONEST) == float("-inf")
    assert guard.floor_of(ATTACKER) == NOW + 899 * 0.01
    for i in range(1000):
        with pytest.raises(Replayed):
            guard.check_and_remember(stamped(ATTACKER, NOW + i * 0.01, i), NOW)


def test_floors_and_entries_leave_with_the_window():
    guard = ReplayGuard(window_s=10.0, max_entries=10)
    for i in range(15):
        guard.check_and_remember(stamped(i.to_bytes(32, "big"), NOW + i * 0.01, i), NOW)
    assert guard.floor_of((0).to_bytes(32, "big")) == NOW
    guard.check_and_remember(stamped(HONEST, NOW + 20, 0), NOW + 20)
    assert len(guard) == 1 and not guard._floors
    assert guard.floor_of((0).to_bytes(32, "big")) == float("-inf")


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 15), st.integers(-40, 40), st.integers(0, 3)), max_size=300))
def test_guard_never_accepts_an_envelope_twice_within_the_window(ops):
    guard = ReplayGuard(window_s=30.0, max_entries=12, max_per_sender=5)
    accepted: set[tuple[bytes, bytes, float]] = set()
    now = NOW
    for sender_n, nonce_n, offset, advance in ops:
        now += advance
        env = stamped(bytes([sender_n]) * 32, now + offset, nonce_n)
        try:
            guard.check_and_remember(env, now)
        except (Replayed, Expired):
            continue
        # the same signed envelope again (same sender, nonce, timestamp) is a replay
        assert (env.sender, env.nonce, env.timestamp) not in accepted, "an envelope was accepted twice"
        accepted.add((env.sender, env.nonce, env.timestamp))
        assert len(guard) <= 12 and all(guard.entries_of(bytes([s]) * 32) <= 5 for s in range(4))


def test_access_check_can_run_before_the_nonce_is_remembered():
    from protocol.access import AccessPolicy
    from protocol.errors import Unauthorized

    guard = ReplayGuard()
    stranger = Ed25519PrivateKey.from_private_bytes(b"\x09" * 32)
    policy = AccessPolicy(True, public_key_bytes(KEY), RUN)  # private run owned by KEY
    refused = open_(seal(stranger, kind="heartbeat", run_id=RUN, body={}, seq=1, timestamp=NOW), replay_guard=None)
    with pytest.raises(Unauthorized):
        policy.check(refused.sender, None, NOW + 1)
    assert len(guard) == 0  # a refused sender takes no room in the guard
    data = make()
    admitted = open_(data, replay_guard=None)
    policy.check(admitted.sender, None, NOW + 1)
    guard.check_and_remember(admitted, NOW + 1)
    with pytest.raises(Replayed):
        guard.check_and_remember(open_(data, replay_guard=None), NOW + 1)
