"""MQTT telemetry without the network: broker URLs, topics, signed payloads, and how pushed updates
merge into what the status server read from the DHT.

Topics (docs/status.md):
- ``swarmtrain/<run id hex>/<node id hex>/status``, retained: kind ``mqtt.status``, body
  ``{"state", "reason", "session", "announcement"}``; the broker's last-will for the node is one with
  state ``OFFLINE``, signed when the node connected; ``session`` is that moment, so a will counts
  only for the connection it belongs to (or a later one), never for an older one replayed.
- ``swarmtrain/<run id hex>/<node id hex>/metrics``: kind ``mqtt.metrics``, body = the node's
  heartbeat (protocol.messages.Heartbeat).

Every payload is a signed envelope (protocol/envelope.py) by the node's key, so a subscriber checks
it against the node id in the topic. The DHT stays the source of truth: a pushed heartbeat only
counts when it is newer than the DHT's, and only for nodes the DHT announced.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Mapping
from urllib.parse import unquote, urlsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from node.membership import DEAD, Member
from protocol import wire
from protocol.envelope import Limits, open_envelope, seal
from protocol.errors import MalformedMessage, WrongKey
from protocol.messages import MAX_DETAIL, Heartbeat, NodeAnnouncement, NodeState
from protocol.records import MAX_RECORD_TTL_S

TOPIC_PREFIX = "swarmtrain"
STATUS_KIND = "mqtt.status"
METRICS_KIND = "mqtt.metrics"
OFFLINE = "OFFLINE"
STATES = (*(s.value for s in NodeState), OFFLINE)
DEFAULT_PORT = 1883
# A last-will is signed when its node connects and delivered whenever the connection drops: it may
# be as old as the connection, so nodes reconnect (re-signing it) well within this age.
PAYLOAD_LIMITS = Limits(max_bytes=64 * 1024, max_age_s=MAX_RECORD_TTL_S)
WILL_REFRESH_S = MAX_RECORD_TTL_S / 2
_TOPIC = re.compile(rf"{TOPIC_PREFIX}/([0-9a-f]{{32}})/([0-9a-f]{{64}})/(status|metrics)")


class MqttUrlError(ValueError):
    """An --mqtt value that is not mqtt://[user[:password]@]host[:port]."""


@dataclass(frozen=True)
class MqttUrl:
    host: str
    port: int = DEFAULT_PORT
    username: str | None = None
    password: str | None = None

    def __str__(self) -> str:  # never the password: it ends up in logs
        return f"mqtt://{self.username + '@' if self.username else ''}{self.host}:{self.port}"


def parse_mqtt_url(url: str) -> MqttUrl:
    hint = "use mqtt://host:port, e.g. mqtt://127.0.0.1:1883"
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as error:
        raise MqttUrlError(f"--mqtt {url!r}: {error}; {hint}") from None
    if parts.scheme != "mqtt":
        raise MqttUrlError(f"--mqtt {url!r}: the scheme must be mqtt:// (TLS and websockets are not supported); {hint}")
    if not parts.hostname:
        raise MqttUrlError(f"--mqtt {url!r} names no host; {hint}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise MqttUrlError(f"--mqtt {url!r}: a broker URL has no path or query; {hint}")
    if port == 0:
        raise MqttUrlError(f"--mqtt {url!r}: port 0 is not a broker's port; {hint}")
    return MqttUrl(parts.hostname, port or DEFAULT_PORT, unquote(parts.username) if parts.username else None,
                   unquote(parts.password) if parts.password else None)


def status_topic(run_id: bytes, node_id: str) -> str:
    return f"{TOPIC_PREFIX}/{run_id.hex()}/{node_id}/status"


def metrics_topic(run_id: bytes, node_id: str) -> str:
    return f"{TOPIC_PREFIX}/{run_id.hex()}/{node_id}/metrics"


SUBSCRIPTIONS = (f"{TOPIC_PREFIX}/+/+/status", f"{TOPIC_PREFIX}/+/+/metrics")


def seal_status(key: Ed25519PrivateKey, run_id: bytes, announcement: NodeAnnouncement, state: str, seq: int,
                session: float, reason: str = "", timestamp: float | None = None) -> bytes:
    if state not in STATES:
        raise MalformedMessage(f"status state {state!r} is not one of {STATES}")
    body = {"state": state, "reason": reason[:MAX_DETAIL], "session": float(session),
            "announcement": announcement.to_body()}
    return seal(key, kind=STATUS_KIND, run_id=run_id, body=body, seq=seq, timestamp=timestamp, limits=PAYLOAD_LIMITS)


def seal_metrics(key: Ed25519PrivateKey, run_id: bytes, heartbeat: Heartbeat, seq: int,
                 timestamp: float | None = None) -> bytes:
    return seal(key, kind=METRICS_KIND, run_id=run_id, body=heartbeat.to_body(), seq=seq, timestamp=timestamp,
                limits=PAYLOAD_LIMITS)


@dataclass(frozen=True)
class Pushed:
    """One verified payload."""

    run_id: bytes
    sender: bytes
    timestamp: float  # signed by the node
    state: str | None = None  # status payloads
    reason: str = ""
    session: float = 0.0  # when the node's connection (and its last-will) began
    announcement: NodeAnnouncement | None = None
    heartbeat: Heartbeat | None = None  # metrics payloads


def open_payload(topic: str, payload: bytes, now: float) -> Pushed:
    """Verify a payload against its topic; raises ProtocolError (bad signature, wrong node, malformed)."""
    found = _TOPIC.fullmatch(topic)
    if found is None:
        raise WrongKey(f"topic {topic[:120]!r} is not {TOPIC_PREFIX}/<run>/<node>/status|metrics")
    run_id, node, what = bytes.fromhex(found.group(1)), bytes.fromhex(found.group(2)), found.group(3)
    kind = STATUS_KIND if what == "status" else METRICS_KIND
    envelope = open_envelope(payload, kind, PAYLOAD_LIMITS, run_id=run_id, now=now)
    if envelope.sender != node:
        raise WrongKey("payload is signed by another node than its topic names")
    body = envelope.body
    if kind == METRICS_KIND:
        return Pushed(run_id, node, envelope.timestamp, heartbeat=Heartbeat.from_body(body))
    if body.keys() != {"state", "reason", "session", "announcement"}:
        raise MalformedMessage("status body must have exactly the keys announcement, reason, session, state")
    state = wire.require_str(body["state"], "state", 16)
    if state not in STATES:
        raise MalformedMessage(f"status state {state!r} is not one of {STATES}")
    reason = wire.require_str(body["reason"], "reason", MAX_DETAIL, printable=True)
    session = wire.require_float(body["session"], "session")
    return Pushed(run_id, node, envelope.timestamp, state, reason, session,
                  NodeAnnouncement.from_body(body["announcement"]))


@dataclass
class NodePush:
    heartbeat: tuple[float, Heartbeat] | None = None  # (signed at, heartbeat)
    status: tuple[float, float, str] | None = None  # (session, signed at, state)
    offline_at: float | None = None  # when this server received the last-will
    reason: str = ""


@dataclass
class PushedUpdates:
    """What the subscriber received, by (run id, node); merged into each DHT reading."""

    max_nodes: int = 4096
    nodes: dict[tuple[bytes, bytes], NodePush] = field(default_factory=dict)
    received: int = 0
    rejected: int = 0

    def take(self, item: Pushed, received_at: float) -> bool:
        """Keep ``item`` if it is newer than what we hold; True when it may change the report."""
        key = (item.run_id, item.sender)
        push = self.nodes.get(key)
        if push is None:
            if len(self.nodes) >= self.max_nodes:
                return False
            push = self.nodes[key] = NodePush()
        self.received += 1
        if item.heartbeat is not None:
            if push.heartbeat is None or item.timestamp > push.heartbeat[0]:
                push.heartbeat = (item.timestamp, item.heartbeat)
                return True
            return False
        if push.status is not None and (item.session, item.timestamp) < push.status[:2] and not (
                item.state == OFFLINE and item.session == push.status[0]):
            return False  # an older status (a replay, or the broker's retained copy of a past life)
        push.status = (item.session, item.timestamp, item.state)
        if item.state == OFFLINE:
            push.offline_at, push.reason = received_at, item.reason
        else:
            push.offline_at = None
        return True

    def merge_heartbeats(self, run_id: bytes, heartbeats: Mapping[bytes, tuple[float, Heartbeat]]
                         ) -> dict[bytes, tuple[float, Heartbeat]]:
        """The DHT's heartbeats with newer pushed ones in their place."""
        merged = dict(heartbeats)
        for (run, sender), push in self.nodes.items():
            if run == run_id and push.heartbeat is not None:
                current = merged.get(sender)
                if current is None or push.heartbeat[0] > current[0]:
                    merged[sender] = push.heartbeat
        return merged

    def apply_offline(self, run_id: bytes, members: Mapping[bytes, Member]) -> dict[bytes, Member]:
        """Members whose last-will arrived after their newest signed record are DEAD right away."""
        out = dict(members)
        for key, member in members.items():
            push = self.nodes.get((run_id, key))
            if push is None or push.offline_at is None or member.state in (DEAD, NodeState.LEAVING.value):
                continue
            if push.offline_at > member.last_seen:
                reason = "its MQTT connection dropped (last will)" + (f": {push.reason}" if push.reason else "")
                out[key] = dataclasses.replace(member, state=DEAD, dead_reason=reason)
        return out
