"""Typed message bodies with validation and size limits; each maps to and from an envelope body."""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any, ClassVar

import torch

from protocol import wire
from protocol.access import MAX_TOKEN_BYTES
from protocol.errors import MalformedMessage
from protocol.tensors import TensorLimits, decode_tensor, encode_tensor

MAX_NAME = 64
MAX_PEER_ID = 128
MAX_MADDRS = 16
MAX_MADDR = 256
MAX_METRICS = 64
MAX_DETAIL = 1024
MAX_SUBJECT = 64
MAX_ERROR = 4096
MAX_STAGE = 1023
MAX_ARGS = 64
MAX_TENSORS = 64
# Peer-supplied strings that reach terminals and logs (names, addresses, event text) must be
# printable: no newlines, control characters or ANSI escapes to forge log lines or repaint a screen.

# Events a node may publish. Deployments extend the set with names starting "x-".
KNOWN_EVENTS = frozenset(
    {"join", "leave", "dead", "revived", "stage_lost", "recovery", "banned", "leader", "resync", "expert_done"}
)
_EXTENSION_EVENT = re.compile(r"x-[a-z0-9_.-]{1,62}")


class NodeState(str, Enum):
    """What a node says about itself; DEAD is derived by observers and never sent."""

    JOINING = "JOINING"
    ONLINE = "ONLINE"
    LEAVING = "LEAVING"


class Role(str, Enum):
    DATA = "data"
    STAGE = "stage"
    SPARE = "spare"  # pipeline: serves nothing until it takes a lost stage
    EXPERT = "expert"
    ZO = "zo"
    OBSERVER = "observer"
    BOOTSTRAP = "bootstrap"


def _enum(enum: type[Enum], value: Any, what: str) -> Any:
    if isinstance(value, enum):
        return value
    if type(value) is not str:
        raise MalformedMessage(f"{what}: expected one of {[e.value for e in enum]}, got {type(value).__name__}")
    try:
        return enum(value)
    except ValueError:
        raise MalformedMessage(f"{what}: unknown value {value!r}; expected one of {[e.value for e in enum]}") from None


def _fields(body: Any, cls: type, names: tuple[str, ...]) -> dict:
    """Check ``body`` is a map with exactly ``names`` as keys."""
    if type(body) is not dict:
        raise MalformedMessage(f"{cls.__name__} body must be a map, got {type(body).__name__}")
    missing, unknown = set(names) - body.keys(), body.keys() - set(names)
    if missing or unknown:
        raise MalformedMessage(f"{cls.__name__} body: missing {sorted(missing)}, unknown {sorted(map(str, unknown))}")
    return body


@dataclass(frozen=True)
class NodeAnnouncement:
    KIND: ClassVar[str] = "announce"

    peer_id: str
    public_name: str
    role: Role
    stage: int | None
    expert: str | None
    device: str
    throughput: float
    version: str
    state: NodeState
    maddrs: list[str]

    def __post_init__(self) -> None:
        wire.require_str(self.peer_id, "peer_id", MAX_PEER_ID, allow_empty=False, printable=True)
        wire.require_str(self.public_name, "public_name", MAX_NAME, printable=True)
        object.__setattr__(self, "role", _enum(Role, self.role, "role"))
        if self.stage is not None:
            wire.require_int(self.stage, "stage", 0, MAX_STAGE)
        if self.expert is not None:
            wire.require_str(self.expert, "expert", MAX_NAME, allow_empty=False, printable=True)
        wire.require_str(self.device, "device", MAX_NAME, printable=True)
        object.__setattr__(self, "throughput", wire.require_float(self.throughput, "throughput", 0.0))
        wire.require_str(self.version, "version", MAX_NAME, printable=True)
        object.__setattr__(self, "state", _enum(NodeState, self.state, "state"))
        wire.require_type(self.maddrs, list, "maddrs")
        if len(self.maddrs) > MAX_MADDRS:
            raise MalformedMessage(f"maddrs: more than {MAX_MADDRS} addresses")
        for index, maddr in enumerate(self.maddrs):
            wire.require_str(maddr, f"maddrs[{index}]", MAX_MADDR, allow_empty=False, printable=True)

    def to_body(self) -> dict:
        return {
            "peer_id": self.peer_id,
            "public_name": self.public_name,
            "role": self.role.value,
            "stage": self.stage,
            "expert": self.expert,
            "device": self.device,
            "throughput": self.throughput,
            "version": self.version,
            "state": self.state.value,
            "maddrs": list(self.maddrs),
        }

    @classmethod
    def from_body(cls, body: dict) -> "NodeAnnouncement":
        body = _fields(body, cls, tuple(f.name for f in fields(cls)))
        wire.require_type(body["role"], str, "role")
        wire.require_type(body["state"], str, "state")
        return cls(**body)


@dataclass(frozen=True)
class Heartbeat:
    KIND: ClassVar[str] = "heartbeat"

    state: NodeState
    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    uptime_s: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", _enum(NodeState, self.state, "state"))
        wire.require_int(self.step, "step", 0, (1 << 63) - 1)
        wire.require_type(self.metrics, dict, "metrics")
        if len(self.metrics) > MAX_METRICS:
            raise MalformedMessage(f"metrics: more than {MAX_METRICS} entries")
        metrics = {}
        for name, value in self.metrics.items():
            wire.require_str(name, "metric name", MAX_NAME, allow_empty=False, printable=True)
            metrics[name] = wire.require_float(value, f"metrics[{name!r}]")
        object.__setattr__(self, "metrics", metrics)
        object.__setattr__(self, "uptime_s", wire.require_float(self.uptime_s, "uptime_s", 0.0))

    def to_body(self) -> dict:
        return {"state": self.state.value, "step": self.step, "metrics": dict(self.metrics), "uptime_s": self.uptime_s}

    @classmethod
    def from_body(cls, body: dict) -> "Heartbeat":
        body = _fields(body, cls, ("state", "step", "metrics", "uptime_s"))
        wire.require_type(body["state"], str, "state")
        return cls(**body)


@dataclass(frozen=True)
class Event:
    KIND: ClassVar[str] = "event"

    event: str
    subject: bytes
    detail: str
    at: float

    def __post_init__(self) -> None:
        wire.require_str(self.event, "event", MAX_NAME, allow_empty=False, printable=True)
        if self.event not in KNOWN_EVENTS and not _EXTENSION_EVENT.fullmatch(self.event):
            raise MalformedMessage(f"event: unknown event {self.event!r}; known: {sorted(KNOWN_EVENTS)} or 'x-...'")
        wire.require_bytes(self.subject, "subject", max_len=MAX_SUBJECT)
        wire.require_str(self.detail, "detail", MAX_DETAIL, printable=True)
        object.__setattr__(self, "at", wire.require_float(self.at, "at"))

    def to_body(self) -> dict:
        return {"event": self.event, "subject": self.subject, "detail": self.detail, "at": self.at}

    @classmethod
    def from_body(cls, body: dict) -> "Event":
        return cls(**_fields(body, cls, ("event", "subject", "detail", "at")))


@dataclass(frozen=True)
class TensorFrame:
    """One named tensor; for tensors larger than an envelope allows, stream tensor_bytes() instead."""

    KIND: ClassVar[str] = "tensor"

    name: str
    tensor: torch.Tensor

    def __post_init__(self) -> None:
        wire.require_str(self.name, "name", MAX_NAME * 4, allow_empty=False)
        if not isinstance(self.tensor, torch.Tensor):
            raise MalformedMessage(f"tensor: expected torch.Tensor, got {type(self.tensor).__name__}")

    def to_body(self) -> dict:
        return {"name": self.name, "tensor": encode_tensor(self.tensor)}

    @classmethod
    def from_body(cls, body: dict, limits: TensorLimits = TensorLimits()) -> "TensorFrame":
        body = _fields(body, cls, ("name", "tensor"))
        wire.require_str(body["name"], "name", MAX_NAME * 4, allow_empty=False)
        return cls(name=body["name"], tensor=decode_tensor(body["tensor"], limits))


def _check_args(args: Any, what: str) -> dict:
    wire.require_type(args, dict, what)
    if len(args) > MAX_ARGS:
        raise MalformedMessage(f"{what}: more than {MAX_ARGS} entries")
    for key in args:
        wire.require_str(key, f"{what} key", MAX_NAME, allow_empty=False)
    wire.check_native(args, path=what)
    return args


def _check_tensor_headers(headers: Any, what: str) -> list:
    """A list of maps; their fields (name, dtype, shape, nbytes, digest) are checked by the RPC layer."""
    wire.require_type(headers, list, what)
    if len(headers) > MAX_TENSORS:
        raise MalformedMessage(f"{what}: more than {MAX_TENSORS} tensors")
    for index, header in enumerate(headers):
        wire.require_type(header, dict, f"{what}[{index}]")
    wire.check_native(headers, path=what)
    return headers


@dataclass(frozen=True)
class RpcRequest:
    """A call's header; ``to`` is the callee's libp2p peer id, so a request cannot be relayed to another node."""

    KIND: ClassVar[str] = "rpc.request"

    method: str
    to: str
    args: dict = field(default_factory=dict)
    tensors: list[dict] = field(default_factory=list)
    token: bytes | None = None

    def __post_init__(self) -> None:
        wire.require_str(self.method, "method", MAX_NAME, allow_empty=False)
        wire.require_str(self.to, "to", MAX_PEER_ID, allow_empty=False, printable=True)
        _check_args(self.args, "args")
        _check_tensor_headers(self.tensors, "tensors")
        if self.token is not None:
            wire.require_bytes(self.token, "token", max_len=MAX_TOKEN_BYTES)

    def to_body(self) -> dict:
        return {"method": self.method, "args": self.args, "tensors": self.tensors, "token": self.token, "to": self.to}

    @classmethod
    def from_body(cls, body: dict) -> "RpcRequest":
        return cls(**_fields(body, cls, ("method", "args", "tensors", "token", "to")))


@dataclass(frozen=True)
class RpcReply:
    KIND: ClassVar[str] = "rpc.reply"

    ok: bool
    result: dict = field(default_factory=dict)
    error: str = ""
    tensors: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        wire.require_type(self.ok, bool, "ok")
        _check_args(self.result, "result")
        wire.require_str(self.error, "error", MAX_ERROR)
        _check_tensor_headers(self.tensors, "tensors")

    def to_body(self) -> dict:
        return {"ok": self.ok, "result": self.result, "error": self.error, "tensors": self.tensors}

    @classmethod
    def from_body(cls, body: dict) -> "RpcReply":
        return cls(**_fields(body, cls, ("ok", "result", "error", "tensors")))


MESSAGE_TYPES: dict[str, type] = {
    cls.KIND: cls for cls in (NodeAnnouncement, Heartbeat, Event, TensorFrame, RpcRequest, RpcReply)
}


def decode_body(kind: str, body: dict) -> Any:
    """The typed message for an envelope's kind and body; unknown kinds raise MalformedMessage."""
    try:
        cls = MESSAGE_TYPES[kind]
    except (KeyError, TypeError):
        raise MalformedMessage(f"unknown message kind {kind!r}") from None
    return cls.from_body(body)
