"""Property tests: envelopes round-trip any body; decoders fed garbage raise only ProtocolError."""
from __future__ import annotations

import msgpack
import pytest
import tomli_w
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hivemind.dht.validation import DHTRecord

from protocol.access import AccessPolicy, issue_token, token_from_text, verify_token
from protocol.envelope import Limits, ReplayGuard, open_envelope, seal
from protocol.errors import ProtocolError
from protocol.keys import public_key_bytes
from protocol.messages import MESSAGE_TYPES, Heartbeat, NodeState
from protocol.records import RECORD_NAMES, SwarmRecordValidator, dht_key, key_id, open_record, seal_record
from protocol.runspec import dumps_spec, loads_spec, make_spec, spec_to_dict
from protocol.tensors import DTYPES, TensorLimits, decode_tensor, decode_tensor_parts

KEY = Ed25519PrivateKey.from_private_bytes(b"\x21" * 32)
PUB = public_key_bytes(KEY)
RUN = bytes(range(16))
NOW = 1_700_000_000.0
FUZZ = settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=20) | st.binary(max_size=20)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8) | st.binary(max_size=8), inner, max_size=5),
    max_leaves=30,
)
bodies = st.dictionaries(st.text(max_size=10), values, max_size=6)
# msgpack-native garbage of any shape: what a hostile peer can put in a well-formed envelope
native = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=10) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)

VALID_ENVELOPE = seal(KEY, kind="heartbeat", run_id=RUN, body={"x": 1}, seq=3, timestamp=NOW)
VALID_TOKEN = issue_token(KEY, RUN, PUB, NOW + 100)
VALID_SPEC = dumps_spec(make_spec("pipeline", "tiny", KEY, created="2025-01-01T00:00:00+00:00"))
VALID_RECORD = seal_record(KEY, run_id=RUN, key=dht_key(RUN, "nodes"), kind="heartbeat", body={}, seq=1, timestamp=NOW)


def only_protocol_errors(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except ProtocolError:
        return None


def mutate(data: bytes, positions: list[int], flips: list[int], cut: int | None) -> bytes:
    buf = bytearray(data)
    for pos, flip in zip(positions, flips):
        buf[pos % len(buf)] ^= flip or 1
    return bytes(buf[:cut] if cut is not None else buf)


mutations = st.tuples(st.lists(st.integers(0, 10_000), max_size=4), st.lists(st.integers(0, 255), max_size=4), st.none() | st.integers(0, 400))


@FUZZ
@given(body=bodies, seq=st.integers(0, 2**64 - 1), ts=st.floats(NOW - 100, NOW + 10))
def test_envelope_round_trip_any_body(body, seq, ts):
    env = open_envelope(seal(KEY, kind="k", run_id=RUN, body=body, seq=seq, timestamp=ts), "k", Limits(), run_id=RUN, now=NOW)
    assert (env.body, env.seq, env.timestamp, env.sender) == (body, seq, ts, PUB)


@FUZZ
@given(data=st.binary(max_size=300))
def test_random_bytes_into_every_byte_decoder(data):
    only_protocol_errors(open_envelope, data, None, Limits(), run_id=None, replay_guard=ReplayGuard(), now=NOW)
    only_protocol_errors(open_record, data, run_id=RUN, limits=Limits(), now=NOW)
    only_protocol_errors(verify_token, data, owner_public=PUB, run_id=RUN, node_public=PUB, now=NOW)
    only_protocol_errors(AccessPolicy(True, bytes(32), RUN).check, PUB, data, NOW)
    only_protocol_errors(decode_tensor_parts, {"dtype": "int8", "shape": [len(data)]}, data)
    only_protocol_errors(loads_spec, data.decode("utf-8", "replace"))
    only_protocol_errors(token_from_text, data.decode("latin-1"))


@FUZZ
@given(m=mutations)
def test_mutated_valid_inputs(m):
    only_protocol_errors(open_envelope, mutate(VALID_ENVELOPE, *m), None, Limits(), run_id=RUN, now=NOW)
    only_protocol_errors(verify_token, mutate(VALID_TOKEN, *m), owner_public=PUB, run_id=RUN, node_public=PUB, now=NOW)
    only_protocol_errors(open_record, mutate(VALID_RECORD, *m), run_id=RUN, limits=Limits(), now=NOW)
    spec_bytes = VALID_SPEC.encode()
    only_protocol_errors(loads_spec, mutate(spec_bytes, *m).decode("utf-8", "replace"))


@FUZZ
@given(body=native)
def test_every_message_from_body_and_decode_tensor(body):
    for cls in MESSAGE_TYPES.values():
        only_protocol_errors(cls.from_body, body)
    only_protocol_errors(decode_tensor, body, TensorLimits(max_bytes=1 << 16))


@FUZZ
@given(data=st.fixed_dictionaries({}, optional={
    "state": st.sampled_from(["ONLINE", "dead", 1]), "step": native, "metrics": native, "uptime_s": native,
    "dtype": st.sampled_from(["float32", "bool", "bfloat16", "x"]), "shape": st.lists(st.just(0) | st.integers(-2, 2**64 - 1), max_size=9),
    "data": st.binary(max_size=64), "nbytes": native,
}))
def test_structured_garbage_near_valid(data):
    only_protocol_errors(Heartbeat.from_body, data)
    only_protocol_errors(decode_tensor, data, TensorLimits(max_bytes=1 << 16))


@FUZZ
@given(key=st.binary(max_size=24), subkey=st.binary(max_size=40), value=st.binary(max_size=200),
       expiration=st.floats() | st.integers(), use_valid=st.booleans(), managed=st.booleans(), m=mutations)
@example(key=b"", subkey=b"", value=b"", expiration=10**400, use_valid=True, managed=False, m=([], [], None))
@example(key=b"", subkey=b"", value=b"", expiration=10**400, use_valid=False, managed=True, m=([], [], None))
def test_validator_raises_only_protocol_errors(key, subkey, value, expiration, use_valid, managed, m):
    validator = SwarmRecordValidator(
        RUN, AccessPolicy(True, bytes(32), RUN), clock=lambda: NOW, managed_names=RECORD_NAMES if managed else None
    )
    if use_valid:  # a real record, mutated, under its own key: reaches the deeper checks
        key, subkey = key_id(dht_key(RUN, "nodes")), msgpack.packb(PUB, use_bin_type=True)
        value = msgpack.packb(mutate(VALID_RECORD, *m), use_bin_type=True)
    record = DHTRecord(key, subkey, value, expiration)
    only_protocol_errors(validator.check, record)
    assert type(validator.validate(record)) is bool


@FUZZ
@given(body=st.dictionaries(st.text(max_size=8), native, max_size=4), state=st.sampled_from(list(NodeState)))
def test_sealed_garbage_bodies_are_refused_cleanly(body, state):
    data = seal(KEY, kind=Heartbeat.KIND, run_id=RUN, body=body, seq=1, timestamp=NOW)
    env = open_envelope(data, Heartbeat.KIND, Limits(), run_id=RUN, now=NOW)
    only_protocol_errors(Heartbeat.from_body, env.body)
    only_protocol_errors(Heartbeat.from_body, {**env.body, "state": state.value})


@FUZZ
@given(
    dtype=st.sampled_from(sorted(DTYPES)),
    shape=st.lists(st.sampled_from([0, 1, 2, 3, 2**31, 2**63, 2**64 - 1]) | st.integers(0, 2**64 - 1), max_size=9),
    data=st.binary(max_size=16),
)
def test_tensor_headers_with_extreme_shapes(dtype, shape, data):
    tensor = only_protocol_errors(decode_tensor_parts, {"dtype": dtype, "shape": shape}, data, TensorLimits(max_bytes=1 << 16))
    if tensor is not None:
        assert list(tensor.shape) == shape and tensor.numel() * tensor.element_size() == len(data)


SPEC_DICT = spec_to_dict(loads_spec(VALID_SPEC))
SPEC_FIELDS = [(section, key) for section, table in SPEC_DICT.items() for key in table] + [("pipeline", "blocks_per_stage")]
toml_values = st.recursive(
    st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(min_size=1, max_size=6), inner, max_size=3),
    max_leaves=10,
)


@pytest.mark.parametrize("field", SPEC_FIELDS, ids="{0[0]}.{0[1]}".format)
@settings(FUZZ, max_examples=30)
@given(value=toml_values)
def test_spec_with_any_value_in_any_field(field, value):
    load_with(field, value)


EXTREMES = [2**63, 2**64, 10**400, -(10**400), -1, 0, float("inf"), float("nan"), -0.0, "", "\x00", [], [[]], {}, True]


@pytest.mark.parametrize("field", SPEC_FIELDS, ids="{0[0]}.{0[1]}".format)
def test_spec_with_extreme_values_in_any_field(field):
    for value in EXTREMES:
        load_with(field, value)


def load_with(field: tuple[str, str], value) -> None:
    raw = {section: dict(table) for section, table in SPEC_DICT.items()}
    raw[field[0]][field[1]] = value
    try:
        text = tomli_w.dumps(raw)
    except (TypeError, ValueError, OverflowError):  # not expressible in TOML
        return
    only_protocol_errors(loads_spec, text)


WIRE_EXTREMES = [2**64 - 1, -(2**63), float("inf"), float("nan"), -0.0, "", b"", "x" * 5000, b"x" * 5000, [], [0] * 100, {}, {"k": {"k": [None]}}, None, True]
SAMPLE_BODIES = {
    "announce": {"peer_id": "p", "public_name": "n", "role": "data", "stage": 0, "expert": None, "device": "cpu",
                 "throughput": 1.0, "version": "1", "state": "ONLINE", "maddrs": []},
    "heartbeat": {"state": "ONLINE", "step": 1, "metrics": {"loss": 1.0}, "uptime_s": 1.0},
    "event": {"event": "join", "subject": b"", "detail": "", "at": 1.0},
    "tensor": {"name": "t", "tensor": {"dtype": "float32", "shape": [1], "data": bytes(4)}},
    "rpc.request": {"method": "m", "args": {}, "tensors": [], "token": None, "to": "12D3KooWPeer"},
    "rpc.reply": {"ok": True, "result": {}, "error": "", "tensors": []},
}


@pytest.mark.parametrize("kind", sorted(SAMPLE_BODIES))
def test_messages_with_extreme_values_in_any_field(kind):
    cls = MESSAGE_TYPES[kind]
    assert cls.from_body(SAMPLE_BODIES[kind]).to_body() is not None  # the sample itself is valid
    for name in SAMPLE_BODIES[kind]:
        for value in WIRE_EXTREMES:
            only_protocol_errors(cls.from_body, {**SAMPLE_BODIES[kind], name: value})


def test_signed_envelopes_with_extreme_fields():
    from protocol.envelope import ENVELOPE_DOMAIN
    from protocol.keys import sign

    fields = msgpack.unpackb(msgpack.unpackb(VALID_ENVELOPE)[0])
    for index in range(len(fields)):
        for value in WIRE_EXTREMES:
            payload = msgpack.packb([*fields[:index], value, *fields[index + 1:]], use_bin_type=True)
            data = msgpack.packb([payload, sign(KEY, ENVELOPE_DOMAIN, payload)], use_bin_type=True)
            only_protocol_errors(open_envelope, data, "heartbeat", Limits(), run_id=RUN, replay_guard=ReplayGuard(), now=NOW)
