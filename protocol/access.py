"""Join tokens for private runs: the owner signs (run id, node key, expiry); nodes present them."""
from __future__ import annotations

import base64
import binascii
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol import wire
from protocol.errors import BadSignature, MalformedMessage, Unauthorized
from protocol.keys import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, sign, verify

TOKEN_DOMAIN = b"swarmtrain/join-token/v1\x00"
TOKEN_VERSION = 1
RUN_ID_BYTES = 16
MAX_TOKEN_BYTES = 256
MAX_TOKEN_TEXT = 512


@dataclass(frozen=True)
class JoinToken:
    run_id: bytes
    node: bytes
    expires_at: float


def issue_token(owner_priv: Ed25519PrivateKey, run_id: bytes, node_public: bytes, expires_at: float) -> bytes:
    """Token bytes: msgpack [payload, signature], payload = msgpack [1, run_id, node_public, expires_at]."""
    wire.require_bytes(run_id, "run_id", length=RUN_ID_BYTES)
    wire.require_bytes(node_public, "node_public", length=PUBLIC_KEY_BYTES)
    payload = wire.pack([TOKEN_VERSION, run_id, node_public, wire.require_float(expires_at, "expires_at")])
    return wire.pack([payload, sign(owner_priv, TOKEN_DOMAIN, payload)])


def token_to_text(token: bytes) -> str:
    return base64.urlsafe_b64encode(token).rstrip(b"=").decode("ascii")


def token_from_text(text: str) -> bytes:
    if not isinstance(text, str) or len(text) > MAX_TOKEN_TEXT:
        raise MalformedMessage(f"join token text must be a string of at most {MAX_TOKEN_TEXT} characters")
    text = text.strip()
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise MalformedMessage("join token is not base64url text (copy it whole from `swarmtrain token`)") from None


def parse_token(token: bytes) -> tuple[JoinToken, bytes, bytes]:
    """Structure only (no signature check): the token, its signed payload and its signature."""
    if not isinstance(token, (bytes, bytearray)) or len(token) > MAX_TOKEN_BYTES:
        raise MalformedMessage(f"join token must be at most {MAX_TOKEN_BYTES} bytes")
    outer = wire.unpack(token, MAX_TOKEN_BYTES)
    if type(outer) is not list or len(outer) != 2:
        raise MalformedMessage("join token must be a msgpack array [payload, signature]")
    payload = wire.require_bytes(outer[0], "join token payload")
    signature = wire.require_bytes(outer[1], "join token signature", length=SIGNATURE_BYTES)
    fields = wire.unpack(payload, MAX_TOKEN_BYTES)
    if type(fields) is not list or len(fields) != 4:
        raise MalformedMessage("join token payload must be [version, run_id, node, expires_at]")
    version, run_id, node, expires_at = fields
    if wire.require_int(version, "join token version") != TOKEN_VERSION:
        raise MalformedMessage(f"unsupported join token version {version}")
    parsed = JoinToken(
        run_id=wire.require_bytes(run_id, "join token run_id", length=RUN_ID_BYTES),
        node=wire.require_bytes(node, "join token node", length=PUBLIC_KEY_BYTES),
        expires_at=wire.require_type(expires_at, float, "join token expires_at"),
    )
    if not math.isfinite(parsed.expires_at):
        raise MalformedMessage("join token expires_at must be finite")
    return parsed, payload, signature


def verify_token(token: bytes, *, owner_public: bytes, run_id: bytes, node_public: bytes, now: float) -> JoinToken:
    """The token if the owner signed it for this run and node and it has not expired; else Unauthorized."""
    parsed, payload, signature = parse_token(token)
    try:
        verify(owner_public, TOKEN_DOMAIN, payload, signature)
    except BadSignature:
        raise Unauthorized("join token is not signed by this run's owner") from None
    if parsed.run_id != run_id:
        raise Unauthorized(f"join token is for run {parsed.run_id.hex()}, not {bytes(run_id).hex()}")
    if parsed.node != node_public:
        raise Unauthorized(f"join token was issued to node {parsed.node.hex()[:16]}..., not this sender")
    if parsed.expires_at <= now:
        raise Unauthorized(f"join token expired {now - parsed.expires_at:.0f}s ago; ask the run owner for a new one")
    return parsed


class AccessPolicy:
    """Who may take part in a run. Public runs admit everyone; private runs need a valid token per message.

    The owner never needs a token. Verified (sender, token) pairs are cached until the token
    expires, at most ``max_cached`` of them, so a flood of records costs one signature check each.
    """

    def __init__(self, private: bool, owner_public: bytes, run_id: bytes, *, max_cached: int = 4096) -> None:
        self.private = bool(private)
        self.owner_public = bytes(owner_public)
        self.run_id = bytes(run_id)
        self.max_cached = max(1, int(max_cached))
        self._cache: OrderedDict[tuple[bytes, bytes], float] = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # hivemind may hand validators to its DHT process; locks do not pickle
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def check(self, sender: bytes, token: bytes | None, now: float) -> None:
        if not self.private or sender == self.owner_public:
            return
        if token is None:
            raise Unauthorized("this run is private: a join token signed by the owner is required")
        if not isinstance(token, (bytes, bytearray)):
            raise MalformedMessage(f"join token must be bytes, got {type(token).__name__}")
        key = (bytes(sender), bytes(token))
        with self._lock:
            expires_at = self._cache.get(key)
            if expires_at is not None and now < expires_at:
                self._cache.move_to_end(key)
                return
        parsed = verify_token(
            key[1], owner_public=self.owner_public, run_id=self.run_id, node_public=key[0], now=now
        )
        with self._lock:
            self._cache[key] = parsed.expires_at
            self._cache.move_to_end(key)
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
