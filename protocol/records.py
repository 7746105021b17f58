"""DHT records: key names, signed record envelopes, and the validator every storing peer runs."""
from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase

from protocol import wire
from protocol.access import AccessPolicy
from protocol.envelope import RUN_ID_BYTES, Envelope, Limits, open_envelope, seal
from protocol.errors import Expired, MalformedMessage, MessageTooLarge, ProtocolError, WrongKey, WrongRun, WrongSubkey

logger = logging.getLogger(__name__)

KEY_PREFIX = "swarmtrain"
RECORD_NAMES = ("nodes", "heartbeats", "events")
# Keys shared by all runs (discovery): any run's signed records are accepted there, one per signer.
RUNS_DIRECTORY_KEY = f"{KEY_PREFIX}/runs"
GLOBAL_KEYS = frozenset({RUNS_DIRECTORY_KEY})
RECORD_LIMITS = Limits(max_bytes=64 * 1024)
# Longest a record may live: its expiration is at most this long after it was signed (or, for keys
# the validator does not manage, after the storing peer's now). Readers open records with
# Limits(max_age_s=MAX_RECORD_TTL_S) so that everything a validator accepts also opens.
MAX_RECORD_TTL_S = 3600.0
_NAME = re.compile(r"[a-z0-9][a-z0-9._/-]{0,127}")
_BODY_KEYS = frozenset({"key", "msg", "token", "expires"})
MAX_KEY_LEN = 256


def dht_key(run_id: bytes, name: str) -> str:
    """The DHT key of record family ``name`` in a run: ``swarmtrain/<run id hex>/<name>``."""
    wire.require_bytes(run_id, "run_id", length=RUN_ID_BYTES)
    if type(name) is not str or not _NAME.fullmatch(name):
        raise MalformedMessage(f"record name {name!r} must match {_NAME.pattern}")
    return f"{KEY_PREFIX}/{run_id.hex()}/{name}"


def key_id(key: str) -> bytes:
    """The 20-byte id hivemind stores ``key`` under (DHTID of the msgpack of the string)."""
    return DHTID.generate(source=key).to_bytes()


def seal_record(
    private_key: Ed25519PrivateKey,
    *,
    run_id: bytes,
    key: str,
    kind: str,
    body: dict,
    seq: int,
    token: bytes | None = None,
    timestamp: float | None = None,
    expires_at: float | None = None,
    limits: Limits | None = RECORD_LIMITS,
) -> bytes:
    """An envelope whose body is ``{"key", "msg", "token", "expires"}``; store it under subkey = signer
    with a DHT expiration of at most ``expires_at`` (default: ``timestamp + MAX_RECORD_TTL_S``).

    The expiration is signed because the DHT keeps, per subkey, the value that expires last: were it
    not, anyone could store a node's old record again with a later expiration and pin it there,
    hiding every newer record of that node (its heartbeats, say) until then.
    Raises MessageTooLarge past ``limits`` (default: what SwarmRecordValidator accepts).
    """
    wire.require_str(key, "key", MAX_KEY_LEN, allow_empty=False)
    if token is not None:
        wire.require_bytes(token, "token")
    timestamp = time.time() if timestamp is None else timestamp
    expires_at = timestamp + MAX_RECORD_TTL_S if expires_at is None else expires_at
    record_body = {"key": key, "msg": body, "token": token, "expires": wire.require_float(expires_at, "expires_at")}
    return seal(private_key, kind=kind, run_id=run_id, body=record_body, seq=seq, timestamp=timestamp, limits=limits)


def _record_body(envelope: Envelope, run_id: bytes | None) -> tuple[str, dict, bytes | None]:
    """Check the record body and that its key belongs to ``run_id`` (None: any run) or is global."""
    body = envelope.body
    if body.keys() != _BODY_KEYS:
        raise MalformedMessage(f"record body must have exactly the keys {sorted(_BODY_KEYS)}")
    key = wire.require_str(body["key"], "record key", MAX_KEY_LEN, allow_empty=False)
    msg = wire.require_type(body["msg"], dict, "record msg")
    token = body["token"]
    if token is not None:
        wire.require_bytes(token, "record token")
    wire.require_float(body["expires"], "record expires")
    if key in GLOBAL_KEYS:
        return key, msg, token
    if run_id is not None and envelope.run_id != run_id:
        raise WrongRun(f"record is for run {envelope.run_id.hex()}, this node is in run {bytes(run_id).hex()}")
    if not key.startswith(f"{KEY_PREFIX}/{envelope.run_id.hex()}/"):
        raise WrongKey(f"record names key {key!r:.80}, outside its run's namespace")
    return key, msg, token


def open_record(
    value: bytes, *, run_id: bytes | None, limits: Limits, now: float | None = None, expected_kind: str | None = None
) -> tuple[Envelope, str, dict]:
    """Open a record's envelope bytes (the value the DHT returns): (envelope, key, msg).

    Records under GLOBAL_KEYS are accepted from any run. Records live as long as their DHT expiration, so ``limits.max_age_s`` should be at least the
    longest record lifetime the reader expects.
    """
    envelope = open_envelope(value, expected_kind, limits, run_id=None, now=now)
    key, msg, _ = _record_body(envelope, run_id)
    return envelope, key, msg


def _expiration(record: DHTRecord) -> float:
    expiration = record.expiration_time
    try:
        if type(expiration) in (int, float) and math.isfinite(expiration):
            return float(expiration)
    except OverflowError:  # an int beyond float range
        pass
    raise MalformedMessage("record expiration_time must be a finite number")


class SwarmRecordValidator(RecordValidatorBase):
    """Accepts only records signed by their subkey's owner, for this run, under the key they name.

    Records under GLOBAL_KEYS (the runs directory) may come from any run; the access policy then
    applies only to this run's own records.

    Envelope age is bounded by ``max_ttl_s`` (not ``limits.max_age_s``): a record may legitimately be
    re-served until its expiration, which is at most ``max_ttl_s`` after its timestamp.

    With ``managed_names=None`` every record in the DHT must be a swarm record. Pass the record
    names this run uses (e.g. RECORD_NAMES) to fully check only those keys (and GLOBAL_KEYS, always)
    and let other records through as long as they expire within ``max_ttl_s`` of now: needed when
    the same DHT also carries hivemind's own records (averager matchmaking). Without a run_id
    (observer) every key is managed.
    """

    def __init__(
        self,
        run_id: bytes | None,
        access: AccessPolicy | None,
        limits: Limits = RECORD_LIMITS,
        max_ttl_s: float = MAX_RECORD_TTL_S,
        clock: Callable[[], float] = time.time,
        *,
        managed_names: Iterable[str] | None = None,
    ) -> None:
        # run_id None: an observer or bootstrap peer that belongs to no run and stores every run's
        # (signature-checked) records; it cannot judge private-run tokens, so the run's own nodes do.
        self.run_id = None if run_id is None else bytes(run_id)
        if self.run_id is not None and access is None:
            raise ValueError("a run's validator needs its access policy")
        self.access = access
        self.limits = dataclasses.replace(limits, max_age_s=float(max_ttl_s))
        self.max_ttl_s = float(max_ttl_s)
        self.clock = clock
        self.rejections: Counter[str] = Counter()
        self._managed = (
            None
            if managed_names is None or run_id is None
            else {key_id(dht_key(run_id, n)) for n in managed_names} | {key_id(k) for k in GLOBAL_KEYS}
        )

    def manages(self, key: bytes) -> bool:
        """Whether records under DHT id ``key`` get the full swarm-record checks."""
        return self._managed is None or key in self._managed

    def validate(self, record: DHTRecord) -> bool:
        try:
            self.check(record)
            return True
        except ProtocolError as error:
            reason = type(error).__name__
            logger.warning("rejected DHT record: %s: %s", reason, error)
        except Exception as error:  # never let a hostile record raise inside the DHT
            reason = type(error).__name__
            logger.warning("rejected DHT record: unexpected %s: %s", reason, error)
        self.rejections[reason] += 1
        return False

    def check(self, record: DHTRecord) -> Envelope | None:
        """Raise the ProtocolError that makes ``record`` invalid; return its envelope (None for an unmanaged key)."""
        now = self.clock()
        if not self.manages(record.key):
            self._check_foreign_expiration(record, now)
            return None
        if not isinstance(record.value, bytes):
            raise MalformedMessage(f"record value must be bytes, got {type(record.value).__name__}")
        if len(record.value) > self.limits.max_bytes + 16:  # + room for the msgpack bin header
            raise MessageTooLarge(f"record value is {len(record.value)} bytes, limit {self.limits.max_bytes}")
        value = wire.unpack(record.value, self.limits.max_bytes + 16, max_len=0, max_containers=0)
        if type(value) is not bytes:
            raise MalformedMessage(f"record value must be serialized envelope bytes, got {type(value).__name__}")
        envelope = open_envelope(value, None, self.limits, run_id=None, now=now)
        key, _, token = _record_body(envelope, self.run_id)
        if record.key != key_id(key):
            raise WrongKey(f"record is stored under a DHT id that is not the hash of its key {key!r:.80}")
        try:
            subkey = wire.unpack(record.subkey, 64)
        except MalformedMessage:
            subkey = None
        if subkey != envelope.sender:
            raise WrongSubkey("record subkey is not its signer's public key; only the signer may write it")
        expiration = _expiration(record)
        signed_expiry = envelope.body["expires"]
        if signed_expiry > envelope.timestamp + self.max_ttl_s:
            raise Expired(f"record is signed to live {signed_expiry - envelope.timestamp:.0f}s, limit {self.max_ttl_s:.0f}s")
        if expiration > signed_expiry:
            raise Expired(f"record is stored to expire {expiration - signed_expiry:.1f}s after its signer allowed "
                          "(a replay that would pin an old record over newer ones)")
        if self.access is not None and envelope.run_id == self.run_id:  # other runs follow their own policies
            self.access.check(envelope.sender, token, now)
        return envelope

    def _check_foreign_expiration(self, record: DHTRecord, now: float) -> None:
        """A value under a key we do not manage may stay at most ``max_ttl_s``: it bounds how long a
        stranger can hold the key."""
        expiration = _expiration(record)
        if expiration > now + self.max_ttl_s:
            raise Expired(f"record under an unmanaged key expires {expiration - now:.0f}s from now, limit {self.max_ttl_s:.0f}s")
