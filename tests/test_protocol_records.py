"""DHT records and the validator: built exactly the way hivemind builds DHTRecord objects."""
from __future__ import annotations

import logging

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.utils.serializer import MSGPackSerializer

from protocol.access import AccessPolicy, issue_token
from protocol.envelope import Limits
from protocol.errors import Expired, MessageTooLarge, WrongKey, WrongRun
from protocol.keys import public_key_bytes
from protocol.messages import Heartbeat, NodeState
from protocol.records import (
    GLOBAL_KEYS,
    MAX_RECORD_TTL_S,
    RECORD_NAMES,
    RUNS_DIRECTORY_KEY,
    SwarmRecordValidator,
    dht_key,
    key_id,
    open_record,
    seal_record,
)

OWNER = Ed25519PrivateKey.from_private_bytes(b"\x11" * 32)
NODE = Ed25519PrivateKey.from_private_bytes(b"\x12" * 32)
INTRUDER = Ed25519PrivateKey.from_private_bytes(b"\x13" * 32)
RUN = bytes(range(16))
OTHER_RUN = bytes(16)
NOW = 1_700_000_000.0
BODY = Heartbeat(state=NodeState.ONLINE, step=5, metrics={"loss": 3.0}, uptime_s=9.0).to_body()


def value(signer=NODE, *, run_id=RUN, name="heartbeats", key=None, token=None, timestamp=NOW, expires_at=None) -> bytes:
    key = dht_key(run_id, name) if key is None else key
    return seal_record(signer, run_id=run_id, key=key, kind="heartbeat", body=BODY, seq=1, token=token, timestamp=timestamp,
                       expires_at=expires_at)


def record(envelope: bytes, *, key: str | None = None, subkey=None, expiration=NOW + 10) -> DHTRecord:
    """As hivemind stores it: DHTID of the key, msgpack'd subkey and value."""
    key = dht_key(RUN, "heartbeats") if key is None else key
    subkey = public_key_bytes(NODE) if subkey is None else subkey
    return DHTRecord(
        key=DHTID.generate(source=key).to_bytes(),
        subkey=MSGPackSerializer.dumps(subkey),
        value=MSGPackSerializer.dumps(envelope),
        expiration_time=expiration,
    )


def flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


def validator(private: bool = False, **kwargs) -> SwarmRecordValidator:
    policy = AccessPolicy(private, public_key_bytes(OWNER), RUN)
    return SwarmRecordValidator(RUN, policy, clock=lambda: NOW + 1, **kwargs)


def test_seal_record_refuses_what_validators_would_drop():
    with pytest.raises(MessageTooLarge):
        seal_record(NODE, run_id=RUN, key=dht_key(RUN, "events"), kind="event", body={"blob": bytes(70_000)}, seq=1)


def test_dht_key_names():
    assert dht_key(RUN, "nodes") == f"swarmtrain/{RUN.hex()}/nodes"
    assert set(RECORD_NAMES) >= {"nodes", "heartbeats", "events"}


def test_open_record_returns_key_and_message():
    env, key, msg = open_record(value(), run_id=RUN, limits=Limits(), now=NOW + 1)
    assert key == dht_key(RUN, "heartbeats") and msg == BODY and env.sender == public_key_bytes(NODE)
    with pytest.raises(WrongRun):
        open_record(value(run_id=OTHER_RUN), run_id=RUN, limits=Limits(), now=NOW + 1)


def test_accepts_good_record():
    v = validator()
    assert v.validate(record(value())) is True
    assert not v.rejections


def accepted_by_private(tok) -> bool:
    return validator(private=True).validate(record(value(token=tok)))


def test_private_run_needs_token():
    v = validator(private=True)
    assert v.validate(record(value())) is False
    assert v.rejections == {"Unauthorized": 1}
    good = issue_token(OWNER, RUN, public_key_bytes(NODE), NOW + 3600)
    assert accepted_by_private(good)
    assert not accepted_by_private(issue_token(OWNER, RUN, public_key_bytes(INTRUDER), NOW + 3600))
    assert not accepted_by_private(issue_token(INTRUDER, RUN, public_key_bytes(NODE), NOW + 3600))


def test_owner_needs_no_token_in_private_run():
    owner_record = record(value(OWNER), subkey=public_key_bytes(OWNER))
    assert validator(private=True).validate(owner_record)


@pytest.mark.parametrize(
    "make,reason",
    [
        (lambda: record(value(INTRUDER)), "WrongSubkey"),  # signed by an intruder into NODE's subkey
        (lambda: record(value(), subkey=b"\x00" * 32), "WrongSubkey"),
        (lambda: record(value(run_id=OTHER_RUN, key=dht_key(RUN, "heartbeats"))), "WrongRun"),
        (lambda: record(value(), key=dht_key(RUN, "nodes")), "WrongKey"),  # stored under another key's hash
        (lambda: record(value(key=dht_key(OTHER_RUN, "heartbeats")), key=dht_key(OTHER_RUN, "heartbeats")), "WrongKey"),
        (lambda: record(value(timestamp=NOW - 7200)), "Expired"),  # older than max_ttl_s
        (lambda: record(value(timestamp=NOW + 120)), "Expired"),  # from the future
        (lambda: record(value(), expiration=NOW + 7200), "Expired"),  # asks to live longer than max_ttl_s
        # stored again with a later expiration than its signer gave it: would pin it over newer records
        (lambda: record(value(expires_at=NOW + 10), expiration=NOW + 11), "Expired"),
        (lambda: record(value(expires_at=NOW + 7200), expiration=NOW + 10), "Expired"),  # signed to live too long
        (lambda: record(flip_last_byte(value())), "BadSignature"),
        (lambda: record(b"not an envelope"), "MalformedMessage"),
        (lambda: DHTRecord(record(value()).key, record(value()).subkey, MSGPackSerializer.dumps({"a": 1}), NOW), "MalformedMessage"),
        (lambda: record(value() + bytes(70_000)), "MessageTooLarge"),
        (lambda: record(seal_record(NODE, run_id=RUN, key=dht_key(RUN, "heartbeats"), kind="heartbeat",
                                    body={"blob": bytes(70_000)}, seq=1, timestamp=NOW, limits=None)), "MessageTooLarge"),
    ],
    ids=["other-subkey", "garbage-subkey", "other-run", "wrong-key-hash", "other-run-key", "expired", "future",
         "ttl-too-long", "replay-with-longer-life", "signed-ttl-too-long", "bad-signature", "not-envelope", "value-not-bytes", "oversize", "oversize-envelope"],
)
def test_rejects_with_reason_counted(make, reason, caplog):
    v = validator()
    with caplog.at_level(logging.WARNING, logger="protocol.records"):
        assert v.validate(make()) is False
    assert v.rejections == {reason: 1}
    assert reason in caplog.text


def test_regular_value_subkey_is_refused():
    rec = record(value())
    regular = DHTRecord(rec.key, MSGPackSerializer.dumps(None), rec.value, rec.expiration_time)
    v = validator()
    assert v.validate(regular) is False and v.rejections == {"WrongSubkey": 1}


def test_check_raises_the_specific_error():
    with pytest.raises(WrongKey):
        validator().check(record(value(), key=dht_key(RUN, "events")))
    with pytest.raises(Expired):
        validator().check(record(value(), expiration=NOW + 3601.0))


def test_managed_names_let_foreign_records_through_only_with_bounded_expiration():
    v = validator(managed_names=RECORD_NAMES)
    foreign_key = DHTID.generate(source="averager.all_averagers").to_bytes()
    assert v.validate(DHTRecord(foreign_key, b"\xc0", b"\x01", NOW + 5)) is True
    assert v.validate(DHTRecord(foreign_key, b"\xc0", b"\x01", NOW + 1 + MAX_RECORD_TTL_S)) is True
    # a stranger could otherwise hold a key (ours are hashed, so it could be anyone's) for good
    assert v.validate(DHTRecord(foreign_key, b"\xc0", b"\x01", NOW + 2 + MAX_RECORD_TTL_S)) is False
    assert v.validate(DHTRecord(foreign_key, b"\xc0", b"\x01", float("inf"))) is False
    assert v.rejections == {"Expired": 1, "MalformedMessage": 1}
    assert v.validate(record(value(INTRUDER))) is False  # our keys are still checked
    assert validator().validate(DHTRecord(foreign_key, b"\xc0", b"\x01", NOW + 5)) is False  # strict by default


def test_global_keys_are_always_managed():
    v = validator(managed_names=["nodes"])
    intruder = record(value(INTRUDER, run_id=OTHER_RUN, key=RUNS_DIRECTORY_KEY), key=RUNS_DIRECTORY_KEY)
    assert all(v.manages(key_id(key)) for key in GLOBAL_KEYS)
    assert not v.manages(key_id(dht_key(RUN, "heartbeats")))
    assert v.validate(intruder) is False and v.rejections == {"WrongSubkey": 1}


def test_one_record_lifetime_for_writers_validators_and_readers():
    assert validator().max_ttl_s == MAX_RECORD_TTL_S
    old = value(timestamp=NOW + 1 - MAX_RECORD_TTL_S + 1)
    assert validator().validate(record(old, expiration=NOW + 2)) is True
    open_record(old, run_id=RUN, limits=Limits(max_age_s=MAX_RECORD_TTL_S), now=NOW + 1)


def test_sign_and_strip_are_identity():
    rec = record(value())
    v = validator()
    assert v.sign_value(rec) == rec.value and v.strip_value(rec) == rec.value


def test_validator_survives_pickling_for_the_dht_process():
    import pickle
    import time

    policy = AccessPolicy(True, public_key_bytes(OWNER), RUN)
    original = SwarmRecordValidator(RUN, policy, clock=time.time)
    copy = pickle.loads(pickle.dumps(original))  # our own object, never network data
    tok = issue_token(OWNER, RUN, public_key_bytes(NODE), time.time() + 60)
    good = record(value(token=tok, timestamp=time.time()), expiration=time.time() + 10)
    assert copy.validate(good) and not copy.validate(record(value(timestamp=time.time())))


def test_runs_directory_accepts_every_run_but_stays_signer_bound():
    directory = record(value(run_id=OTHER_RUN, key=RUNS_DIRECTORY_KEY), key=RUNS_DIRECTORY_KEY)
    v = validator(private=True)  # other runs' entries are not judged by our run's token policy
    assert v.validate(directory) is True
    env, key, msg = open_record(value(run_id=OTHER_RUN, key=RUNS_DIRECTORY_KEY), run_id=RUN, limits=Limits(), now=NOW)
    assert key == RUNS_DIRECTORY_KEY and env.run_id == OTHER_RUN
    own_without_token = record(value(key=RUNS_DIRECTORY_KEY), key=RUNS_DIRECTORY_KEY)
    assert v.validate(own_without_token) is False
    intruder = record(value(INTRUDER, run_id=OTHER_RUN, key=RUNS_DIRECTORY_KEY), key=RUNS_DIRECTORY_KEY)
    assert v.validate(intruder) is False
    assert v.rejections == {"Unauthorized": 1, "WrongSubkey": 1}


def test_a_record_is_valid_up_to_the_expiration_its_signer_signed():
    v = validator()
    assert v.validate(record(value(expires_at=NOW + 10), expiration=NOW + 10))
    assert v.validate(record(value(expires_at=NOW + 10), expiration=NOW + 5))  # shorter is harmless: newer wins
    assert not v.validate(record(value(expires_at=NOW + 10), expiration=NOW + 10.5))
    assert "stored to expire" in str(pytest.raises(Expired, v.check, record(value(expires_at=NOW + 10),
                                                                            expiration=NOW + 60)).value)
