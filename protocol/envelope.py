"""Signed envelopes: the one wire format for every message and DHT record."""
from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol import wire
from protocol.errors import Expired, MalformedMessage, MessageTooLarge, WrongKind, WrongRun
from protocol.keys import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, public_key_bytes, sign, verify
from protocol.replay import ReplayGuard, Sequencer

__all__ = ["VERSION", "ENVELOPE_DOMAIN", "Limits", "Envelope", "seal", "open_envelope", "ReplayGuard", "Sequencer"]

VERSION = 1
ENVELOPE_DOMAIN = b"swarmtrain/envelope/v1\x00"
RUN_ID_BYTES = 16
NONCE_BYTES = 16
MAX_KIND_LEN = 64
_FIELDS = 8
# Fields before the body, at their largest: array header, version, kind (64 chars of up to 4 UTF-8
# bytes), run_id, sender, seq, timestamp, nonce.
_MAX_HEAD_BYTES = 1 + 9 + (3 + 4 * MAX_KIND_LEN) + (2 + RUN_ID_BYTES) + (2 + PUBLIC_KEY_BYTES) + 9 + 9 + (2 + NONCE_BYTES)


@dataclass(frozen=True)
class Limits:
    """Receiver-side bounds: total size, and how old or how far in the future a timestamp may be."""

    max_bytes: int = 1 << 20
    max_age_s: float = 300.0
    max_future_s: float = 30.0


@dataclass(frozen=True)
class Envelope:
    version: int
    kind: str
    run_id: bytes
    sender: bytes
    seq: int
    timestamp: float
    nonce: bytes
    body: dict


def seal(
    private_key: Ed25519PrivateKey,
    *,
    kind: str,
    run_id: bytes,
    body: dict,
    seq: int,
    timestamp: float | None = None,
    nonce: bytes | None = None,
    limits: Limits | None = None,
) -> bytes:
    """Sign and pack one message; raises MalformedMessage for bad fields, MessageTooLarge past ``limits``."""
    wire.require_str(kind, "kind", MAX_KIND_LEN, allow_empty=False)
    wire.require_bytes(run_id, "run_id", length=RUN_ID_BYTES)
    wire.require_int(seq, "seq", 0, (1 << 64) - 1)
    wire.require_type(body, dict, "body")
    wire.check_native(body)
    nonce = os.urandom(NONCE_BYTES) if nonce is None else nonce
    wire.require_bytes(nonce, "nonce", length=NONCE_BYTES)
    timestamp = wire.require_float(time.time() if timestamp is None else timestamp, "timestamp")
    payload = wire.pack([VERSION, kind, run_id, public_key_bytes(private_key), seq, timestamp, nonce, body])
    data = wire.pack([payload, sign(private_key, ENVELOPE_DOMAIN, payload)])
    if limits is not None and len(data) > limits.max_bytes:
        raise MessageTooLarge(f"sealed {kind!r} message is {len(data)} bytes, limit {limits.max_bytes}")
    return data


def _parse_head(data: Any, limits: Limits) -> tuple[Envelope, memoryview, bytes, bytes]:
    """The envelope with an empty body, the packed body, payload and signature.

    The body stays packed until the signature checks out, so an unsigned flood never reaches the
    costlier container unpacking.
    """
    outer = wire.unpack(data, limits.max_bytes, max_len=2, max_containers=1)
    if type(outer) is not list or len(outer) != 2:
        raise MalformedMessage("envelope must be a msgpack array [payload, signature]")
    payload = wire.require_bytes(outer[0], "envelope payload")
    signature = wire.require_bytes(outer[1], "envelope signature", length=SIGNATURE_BYTES)
    try:
        head, packed_body = wire.unpack_head(payload, _FIELDS, _MAX_HEAD_BYTES)
    except MalformedMessage as error:
        raise MalformedMessage(f"envelope payload: {error}") from None
    version, kind, run_id, sender, seq, timestamp, nonce = head
    wire.require_int(version, "version")
    wire.require_str(kind, "kind", MAX_KIND_LEN, allow_empty=False)
    wire.require_bytes(run_id, "run_id", length=RUN_ID_BYTES)
    wire.require_bytes(sender, "sender", length=PUBLIC_KEY_BYTES)
    wire.require_int(seq, "seq", 0)
    wire.require_type(timestamp, float, "timestamp")
    if not math.isfinite(timestamp):
        raise MalformedMessage("timestamp must be finite")
    wire.require_bytes(nonce, "nonce", length=NONCE_BYTES)
    return Envelope(*head, body={}), packed_body, payload, signature


def check_kind(envelope: Envelope, expected_kind: str | Collection[str] | None) -> None:
    if expected_kind is None:
        return
    allowed = (expected_kind,) if isinstance(expected_kind, str) else expected_kind
    if envelope.kind not in allowed:
        raise WrongKind(f"expected kind {sorted(allowed)}, got {envelope.kind!r}")


def check_time(timestamp: float, now: float, max_age_s: float, max_future_s: float) -> None:
    if timestamp < now - max_age_s:
        raise Expired(f"message is {now - timestamp:.1f}s old, limit {max_age_s:.1f}s")
    if timestamp > now + max_future_s:
        raise Expired(f"message is {timestamp - now:.1f}s in the future, limit {max_future_s:.1f}s (check the clock)")


def open_envelope(
    data: bytes,
    expected_kind: str | Collection[str] | None,
    limits: Limits,
    *,
    run_id: bytes | None,
    replay_guard: ReplayGuard | None = None,
    now: float | None = None,
) -> Envelope:
    """Check in order: size, structure, version, signature, body structure, kind, run, time, replay.

    With ``replay_guard`` the nonce is remembered here, before any access check the caller makes. A
    caller that must not let refused senders fill the guard passes None and, once it has admitted
    the sender, calls ``guard.check_and_remember(envelope, now)`` with the same ``now``.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MalformedMessage(f"envelope must be bytes, got {type(data).__name__}")
    if len(data) > limits.max_bytes:
        raise MessageTooLarge(f"envelope is {len(data)} bytes, limit {limits.max_bytes}")
    unsigned, packed_body, payload, signature = _parse_head(data, limits)
    if unsigned.version != VERSION:
        raise MalformedMessage(f"unsupported envelope version {unsigned.version} (this node speaks {VERSION})")
    verify(unsigned.sender, ENVELOPE_DOMAIN, payload, signature)
    body = wire.require_type(wire.unpack(packed_body, limits.max_bytes), dict, "body")
    envelope = dataclasses.replace(unsigned, body=body)
    check_kind(envelope, expected_kind)
    if run_id is not None and envelope.run_id != run_id:
        raise WrongRun(f"message is for run {envelope.run_id.hex()}, this node is in run {bytes(run_id).hex()}")
    now = time.time() if now is None else now
    check_time(envelope.timestamp, now, limits.max_age_s, limits.max_future_s)
    if replay_guard is not None:
        replay_guard.check_and_remember(envelope, now)
    return envelope
