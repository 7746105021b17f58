"""Typed messages: round trips through envelopes, and every kind of invalid body is MalformedMessage."""
from __future__ import annotations

import math

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol.envelope import Limits, open_envelope, seal
from protocol.errors import MalformedMessage, MessageTooLarge
from protocol.messages import (
    MESSAGE_TYPES,
    Event,
    Heartbeat,
    NodeAnnouncement,
    NodeState,
    Role,
    RpcReply,
    RpcRequest,
    TensorFrame,
    decode_body,
)
from protocol.tensors import TensorLimits

RUN = bytes(range(16))
KEY = Ed25519PrivateKey.from_private_bytes(b"\x03" * 32)

ANNOUNCE = NodeAnnouncement(
    peer_id="12D3KooWExample",
    public_name="alice-4090",
    role=Role.STAGE,
    stage=2,
    expert=None,
    device="cuda:0",
    throughput=1234.5,
    version="0.1.0",
    state=NodeState.ONLINE,
    maddrs=["/ip4/127.0.0.1/tcp/4000"],
)
SAMPLES = [
    ANNOUNCE,
    Heartbeat(state=NodeState.JOINING, step=12, metrics={"loss": 2.5, "tok_s": 100}, uptime_s=3.0),
    Event(event="stage_lost", subject=b"\x01" * 32, detail="stage 2 has no replica", at=1.5),
    Event(event="x-custom", subject=b"", detail="", at=0.0),
    RpcRequest(method="forward", to="12D3KooWCallee", args={"mb": 3, "path": [0, 2, 1]}, token=b"t" * 100,
               tensors=[{"name": "x", "dtype": "float32", "shape": [2], "nbytes": 8, "digest": bytes(32)}]),
    RpcReply(ok=False, result={}, error="stage busy"),
    RpcReply(ok=True, result={"n": 1}, error="", tensors=[{"name": "y"}]),
]


def through_wire(message):
    data = seal(KEY, kind=message.KIND, run_id=RUN, body=message.to_body(), seq=1)
    envelope = open_envelope(data, message.KIND, Limits(), run_id=RUN)
    return decode_body(envelope.kind, envelope.body)


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip_through_envelope(message):
    assert through_wire(message) == message


def test_enums_are_strings_on_the_wire():
    body = ANNOUNCE.to_body()
    assert body["role"] == "stage" and body["state"] == "ONLINE"
    assert NodeAnnouncement.from_body(body).role is Role.STAGE


def test_tensor_frame_round_trip_bit_exact():
    tensor = torch.randn(4, 5, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    decoded = through_wire(TensorFrame(name="activations", tensor=tensor))
    assert decoded.name == "activations" and decoded.tensor.dtype == torch.bfloat16
    assert torch.equal(decoded.tensor.view(torch.int16), tensor.view(torch.int16))


def test_tensor_frame_limits_apply():
    body = TensorFrame(name="w", tensor=torch.zeros(1000)).to_body()
    with pytest.raises(MessageTooLarge):
        TensorFrame.from_body(body, TensorLimits(max_bytes=100))


def with_(body: dict, **changes) -> dict:
    return {**body, **changes}


ANN = ANNOUNCE.to_body()
HB = SAMPLES[1].to_body()
REQ = SAMPLES[4].to_body()
BAD_BODIES = [
    (NodeAnnouncement, with_(ANN, role="leader"), "unknown value"),
    (NodeAnnouncement, with_(ANN, state="dead"), "unknown value"),  # DEAD is never sent
    (NodeAnnouncement, with_(ANN, stage=-1), "stage"),
    (NodeAnnouncement, with_(ANN, stage=True), "stage"),
    (NodeAnnouncement, with_(ANN, public_name="x" * 65), "public_name"),
    (NodeAnnouncement, with_(ANN, throughput=math.inf), "finite"),
    (NodeAnnouncement, with_(ANN, maddrs=["/ip4/1.2.3.4/tcp/1"] * 17), "maddrs"),
    (NodeAnnouncement, with_(ANN, maddrs="/ip4/1.2.3.4/tcp/1"), "maddrs"),
    (NodeAnnouncement, {k: v for k, v in ANN.items() if k != "device"}, "missing"),
    (NodeAnnouncement, with_(ANN, extra=1), "unknown"),
    (Heartbeat, with_(HB, metrics={f"m{i}": 1.0 for i in range(65)}), "metrics"),
    (Heartbeat, with_(HB, metrics={"loss": math.nan}), "finite"),
    (Heartbeat, with_(HB, metrics={"loss": "low"}), "metrics"),
    (Heartbeat, with_(HB, step=2.0), "step"),
    (Heartbeat, with_(HB, uptime_s=-1.0), "uptime_s"),
    (Event, {"event": "explode", "subject": b"", "detail": "", "at": 0.0}, "unknown event"),
    (Event, {"event": "join", "subject": "not bytes", "detail": "", "at": 0.0}, "subject"),
    (Event, {"event": "join", "subject": b"", "detail": "d" * 2000, "at": 0.0}, "detail"),
    (RpcRequest, with_(REQ, method=""), "method"),
    (RpcRequest, with_(REQ, args={str(i): i for i in range(65)}), "args"),
    (RpcRequest, with_(REQ, to=""), "to"),
    (RpcRequest, with_(REQ, to="peer\nINFO forged log line"), "to: must be printable"),
    (RpcRequest, with_(REQ, tensors=[{}] * 65), "tensors"),
    (RpcRequest, with_(REQ, tensors=[1]), r"tensors\[0\]"),
    (RpcRequest, with_(REQ, token=bytes(257)), "token"),
    (RpcRequest, {"method": "m", "args": {}}, "missing"),  # the old body, without tensors, token and to
    (RpcReply, {"ok": 1, "result": {}, "error": "", "tensors": []}, "ok"),
    (RpcReply, {"ok": True, "result": {}, "error": ""}, "missing"),
    (TensorFrame, {"name": "t", "tensor": {"dtype": "complex64", "shape": [1], "data": b"12345678"}}, "dtype"),
]


@pytest.mark.parametrize("cls,body,reason", BAD_BODIES)
def test_invalid_bodies_are_malformed_with_reason(cls, body, reason):
    with pytest.raises(MalformedMessage, match=reason):
        cls.from_body(body)


EV = SAMPLES[2].to_body()
# a newline forges a log line, an ANSI escape repaints the terminal, U+202E reverses the text after it
UNPRINTABLE = ["two\nlines", "\x1b[2J\x1b[31mred", "abc\u202eflipped", "tab\there", "nul\x00"]
PRINTED_FIELDS = {  # field: how a string goes into it
    (NodeAnnouncement, "peer_id"): lambda text: text,
    (NodeAnnouncement, "public_name"): lambda text: text,
    (NodeAnnouncement, "device"): lambda text: text,
    (NodeAnnouncement, "version"): lambda text: text,
    (NodeAnnouncement, "expert"): lambda text: text,
    (NodeAnnouncement, "maddrs"): lambda text: ["/ip4/1.2.3.4/tcp/1", text],
    (Heartbeat, "metrics"): lambda text: {text: 1.0},
    (Event, "detail"): lambda text: text,
    (Event, "event"): lambda text: "x-" + text,
}
BODIES = {NodeAnnouncement: ANN, Heartbeat: HB, Event: EV}


@pytest.mark.parametrize("cls,name", PRINTED_FIELDS, ids=lambda x: x if isinstance(x, str) else x.__name__)
def test_strings_that_reach_logs_must_be_printable(cls, name):
    place = PRINTED_FIELDS[cls, name]
    for text in UNPRINTABLE:
        with pytest.raises(MalformedMessage, match="must be printable|unknown event"):
            cls.from_body(with_(BODIES[cls], **{name: place(text)}))
    if name != "event":
        assert cls.from_body(with_(BODIES[cls], **{name: place("Zoë's GPU №2 — 東京")}))  # any printable text is fine


@pytest.mark.parametrize("cls", list(MESSAGE_TYPES.values()))
def test_non_map_body_is_malformed(cls):
    with pytest.raises(MalformedMessage):
        cls.from_body([1, 2])


def test_constructor_validates_too():
    with pytest.raises(MalformedMessage):
        Heartbeat(state=NodeState.ONLINE, step=1, metrics={"x": math.inf}, uptime_s=0.0)


def test_unknown_kind():
    with pytest.raises(MalformedMessage, match="unknown message kind"):
        decode_body("nope", {})
