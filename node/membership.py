"""Membership view: who is in the run and in what state, derived from announcements and heartbeats.

Pure logic: ``derive_members`` turns records into a view, ``diff_events`` turns two views into
events (join, dead, leave). The node wires them to the DHT.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from protocol.keys import node_id_hex
from protocol.messages import Event, Heartbeat, NodeAnnouncement, NodeState

DEAD = "DEAD"


@dataclass(frozen=True)
class Member:
    id: str  # hex of the node's Ed25519 public key
    public_key: bytes
    announcement: NodeAnnouncement
    heartbeat: Heartbeat | None
    state: str  # JOINING, ONLINE, LEAVING or DEAD
    last_seen: float  # timestamp of the newest signed record from the node
    dead_reason: str = ""  # why the observer judged the node DEAD; empty unless it is

    def last_seen_s(self, now: float) -> float:
        return max(0.0, now - self.last_seen)

    def to_json(self, now: float) -> dict:
        a = self.announcement
        hb = self.heartbeat
        return {
            "id": self.id,
            "peer_id": a.peer_id,
            "public_name": a.public_name,
            "role": a.role.value,
            "stage": a.stage,
            "expert": a.expert,
            "device": a.device,
            "throughput": a.throughput,
            "version": a.version,
            "state": self.state,
            "last_seen_s": round(self.last_seen_s(now), 3),
            "maddrs": list(a.maddrs),
            "step": hb.step if hb else None,
            "metrics": dict(hb.metrics) if hb else {},
        }


def derive_state(
    announcement: NodeAnnouncement,
    announced_at: float,
    heartbeat: Heartbeat | None,
    heartbeat_at: float | None,
    now: float,
    heartbeat_ttl_s: float,
    failed_rpcs: int = 0,
    rpc_failures_for_dead: int = 3,
) -> str:
    """LEAVING wins (the node said so); a stale heartbeat or repeated RPC failures mean DEAD."""
    newest_said = announcement.state
    if heartbeat is not None and heartbeat_at is not None and heartbeat_at >= announced_at:
        newest_said = heartbeat.state
    if NodeState.LEAVING in (announcement.state, newest_said):
        return NodeState.LEAVING.value
    if failed_rpcs >= rpc_failures_for_dead:
        return DEAD
    # The newest signed record counts: a node restarted with its old key has a fresh announcement
    # but a stale heartbeat from its previous life until its first new heartbeat lands.
    last = max(announced_at, heartbeat_at) if heartbeat_at is not None else announced_at
    if now - last > heartbeat_ttl_s:
        return DEAD
    return newest_said.value


def derive_members(
    announcements: Mapping[bytes, tuple[float, NodeAnnouncement]],
    heartbeats: Mapping[bytes, tuple[float, Heartbeat]],
    now: float,
    heartbeat_ttl_s: float,
    failed_rpcs: Mapping[bytes, int] | None = None,
    rpc_failures_for_dead: int = 3,
) -> dict[bytes, Member]:
    """Members are the announced nodes; a heartbeat without an announcement is not a member."""
    failed_rpcs = failed_rpcs or {}
    members: dict[bytes, Member] = {}
    for key, (announced_at, announcement) in announcements.items():
        heartbeat_at, heartbeat = heartbeats.get(key, (None, None))
        state = derive_state(
            announcement,
            announced_at,
            heartbeat,
            heartbeat_at,
            now,
            heartbeat_ttl_s,
            failed_rpcs.get(key, 0),
            rpc_failures_for_dead,
        )
        last_seen = max(announced_at, heartbeat_at or 0.0)
        reason = ""
        if state == DEAD:
            failed = failed_rpcs.get(key, 0)
            if failed >= rpc_failures_for_dead:
                reason = f"{failed} RPCs in a row failed"
            else:
                reason = f"no heartbeat for {max(0.0, now - last_seen):.1f} s"
        members[key] = Member(node_id_hex(key), key, announcement, heartbeat, state, last_seen, reason)
    return members


def diff_events(previous: Mapping[bytes, Member], current: Mapping[bytes, Member], now: float) -> list[Event]:
    """Events for every liveness change between two views."""
    events: list[Event] = []
    for key, member in current.items():
        before = previous.get(key)
        name = member.announcement.public_name or member.id[:12]
        if member.state == DEAD and (before is None or before.state != DEAD):
            if before is not None:
                reason = member.dead_reason or f"no heartbeat for {member.last_seen_s(now):.1f} s"
                events.append(Event("dead", key, f"{name}: {reason}", now))
        elif member.state == NodeState.LEAVING.value and (before is None or before.state != member.state):
            events.append(Event("leave", key, f"{name} is leaving", now))
        elif member.state in (NodeState.ONLINE.value, NodeState.JOINING.value) and (
            before is None or before.state in (DEAD, NodeState.LEAVING.value)
        ):
            events.append(Event("join", key, f"{name} joined as {member.announcement.role.value}", now))
    for key, before in previous.items():
        if key not in current and before.state not in (DEAD, NodeState.LEAVING.value):
            events.append(Event("dead", key, f"{before.announcement.public_name or before.id[:12]} vanished", now))
    return events


def count_by_stage(members: Mapping[bytes, Member]) -> dict[int, int]:
    """Live replicas per stage (JOINING and ONLINE count; DEAD and LEAVING do not)."""
    counts: dict[int, int] = {}
    for member in members.values():
        if member.state in (NodeState.ONLINE.value, NodeState.JOINING.value) and member.announcement.stage is not None:
            counts[member.announcement.stage] = counts.get(member.announcement.stage, 0) + 1
    return counts
