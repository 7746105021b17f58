"""Signed envelopes: the one wire format for every message and DHT record."""
from __future__ import annotations

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


def _parse(data: Any, limits: Limits) -> tuple[Envelope, bytes, bytes]:
    outer = wire.unpack(data, limits.max_bytes)
    if type(outer) is not list or len(outer) != 2:
        raise MalformedMessage("envelope must be a msgpack array [payload, signature]")
    payload = wire.require_bytes(outer[0], "envelope payload")
    signature = wire.require_bytes(outer[1], "envelope signature", length=SIGNATURE_BYTES)
    fields = wire.unpack(payload, limits.max_bytes)
    if type(fields) is not list or len(fields) != _FIELDS:
        raise MalformedMessage(f"envelope payload must be an array of {_FIELDS} fields")
    version, kind, run_id, sender, seq, timestamp, nonce, body = fields
    envelope = Envelope(
        version=wire.require_int(version, "version"),
        kind=wire.require_str(kind, "kind", MAX_KIND_LEN, allow_empty=False),
        run_id=wire.require_bytes(run_id, "run_id", length=RUN_ID_BYTES),
        sender=wire.require_bytes(sender, "sender", length=PUBLIC_KEY_BYTES),
        seq=wire.require_int(seq, "seq", 0),
        timestamp=wire.require_type(timestamp, float, "timestamp"),
        nonce=wire.require_bytes(nonce, "nonce", length=NONCE_BYTES),
        body=wire.require_type(body, dict, "body"),
    )
    if not math.isfinite(envelope.timestamp):
        raise MalformedMessage("timestamp must be finite")
    return envelope, payload, signature


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
    """Check in order: size, structure, version, signature, kind, run, time, replay; return the envelope."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MalformedMessage(f"envelope must be bytes, got {type(data).__name__}")
    if len(data) > limits.max_bytes:
        raise MessageTooLarge(f"envelope is {len(data)} bytes, limit {limits.max_bytes}")
    envelope, payload, signature = _parse(data, limits)
    if envelope.version != VERSION:
        raise MalformedMessage(f"unsupported envelope version {envelope.version} (this node speaks {VERSION})")
    verify(envelope.sender, ENVELOPE_DOMAIN, payload, signature)
    check_kind(envelope, expected_kind)
    if run_id is not None and envelope.run_id != run_id:
        raise WrongRun(f"message is for run {envelope.run_id.hex()}, this node is in run {bytes(run_id).hex()}")
    now = time.time() if now is None else now
    check_time(envelope.timestamp, now, limits.max_age_s, limits.max_future_s)
    if replay_guard is not None:
        replay_guard.check_and_remember(envelope, now)
    return envelope
