"""The node process: join the run, announce, heartbeat, watch membership, serve RPCs, leave cleanly."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from node import __version__
from node.averaging import Credentials, GroupAveraging
from node.config import NodeConfig, Timeouts
from node.dht import RUNS_DIRECTORY, DHTReadError, SwarmDHT, peers_of_maddrs
from node.health import Health, write_health
from node.linkemu import LinkFaults, LinkShaper, load_emulation
from node.membership import Member, derive_members, diff_events
from node.roles import RoleChoice, choose_role, reconsider_stage
from node.rpc import CallContext, Handler, RpcEndpoint
from protocol.access import AccessPolicy
from protocol.errors import ProtocolError
from protocol.keys import node_id_hex, public_key_bytes
from protocol.messages import Event, Heartbeat, NodeAnnouncement, NodeState
from protocol.records import MAX_RECORD_TTL_S
from protocol.runspec import HEARTBEAT_RETENTION, RunSpec, dumps_spec, run_id as compute_run_id

logger = logging.getLogger(__name__)

NODES = "nodes"
HEARTBEATS = "heartbeats"
EVENTS = "events"
MAX_PUBLISHED_EVENTS = 32


class DeviceError(RuntimeError):
    """The requested device does not exist on this machine."""


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cpu":
        return "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {requested} was requested but no CUDA GPU is visible; use --device cpu")
        index = requested.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise DeviceError(f"--device {requested}: this machine has {torch.cuda.device_count()} GPU(s)")
        return requested
    raise DeviceError(f"--device must be auto, cpu or cuda[:i], not {requested!r}")


def access_for_run(spec: RunSpec) -> AccessPolicy:
    return AccessPolicy(
        private=spec.run.access == "private", owner_public=bytes.fromhex(spec.owner.public_key), run_id=compute_run_id(spec)
    )


def timeouts_for_run(config: NodeConfig, spec: RunSpec) -> Timeouts:
    """Heartbeat timing is a property of the run: every node must judge liveness the same way, so the
    run spec's values replace any local setting (with a warning when a local one was given)."""
    swarm = spec.swarm
    defaults = Timeouts()
    for name in ("heartbeat_interval_s", "heartbeat_ttl_s"):
        local = getattr(config.timeouts, name)
        if local != getattr(defaults, name) and local != getattr(swarm, name):
            logger.warning("ignoring the local %s=%s: the run spec sets it to %s", name, local, getattr(swarm, name))
    return dataclasses.replace(
        config.timeouts, heartbeat_interval_s=swarm.heartbeat_interval_s, heartbeat_ttl_s=swarm.heartbeat_ttl_s
    )


@dataclass
class MembershipView:
    members: dict[bytes, Member] = field(default_factory=dict)
    events: deque = field(default_factory=lambda: deque(maxlen=256))
    failed_rpcs: dict[bytes, int] = field(default_factory=dict)  # consecutive failed calls per peer
    last_failure: dict[bytes, float] = field(default_factory=dict)
    failed_life: dict[bytes, tuple] = field(default_factory=dict)  # what the peer announced when calls began to fail

    def rpc_failed(self, peer: bytes, now: float) -> None:
        self.failed_rpcs[peer] = self.failed_rpcs.get(peer, 0) + 1
        self.last_failure[peer] = now
        member = self.members.get(peer)
        if member is not None:
            self.failed_life.setdefault(peer, life_of(member.announcement))

    def rpc_succeeded(self, peer: bytes) -> None:
        self.failed_rpcs.pop(peer, None)
        self.last_failure.pop(peer, None)
        self.failed_life.pop(peer, None)

    def restarted_since_failing(self, peer: bytes, announced: tuple[float, NodeAnnouncement] | None) -> bool:
        """The peer announced itself after its calls failed, as another life: a node restarted under its
        old key (killed, then back from its data dir) is reachable again at once, not after a cool-down."""
        if announced is None or peer not in self.last_failure or announced[0] <= self.last_failure[peer]:
            return False
        announcement = announced[1]
        return announcement.state == NodeState.JOINING or life_of(announcement) != self.failed_life.get(peer)


def life_of(announcement: NodeAnnouncement) -> tuple:
    """What changes when a node process starts again: its libp2p addresses, its role and stage."""
    return announcement.peer_id, tuple(announcement.maddrs), announcement.role, announcement.stage


class Node:
    """One coordinating object per process (cf. torchft's Manager)."""

    def __init__(
        self,
        config: NodeConfig,
        spec: RunSpec,
        key: Ed25519PrivateKey,
        token: bytes | None = None,
        app_record_names: tuple[str, ...] = (),
    ):
        """``app_record_names``: the record families the trainer publishes; every node of the run
        validates them on store, so only their signers can write them."""
        self.config = config
        self.spec = spec
        self.key = key
        self.public_key = public_key_bytes(key)
        self.id = node_id_hex(self.public_key)
        self.token = token
        self.app_record_names = tuple(app_record_names)
        self.run_id = compute_run_id(spec)
        self.timeouts = timeouts_for_run(config, spec)
        self.device = resolve_device(config.device)
        self.access = access_for_run(spec)
        if self.access.private:
            # Fail fast with a clear message instead of having every peer refuse us.
            self.access.check(self.public_key, token, time.time())
        self.view = MembershipView()
        self.role: RoleChoice | None = None
        self.expert: str | None = None  # mode experts: the job this node trains now
        self.state = NodeState.JOINING
        self.step = 0
        self.metrics: dict[str, float] = {}
        self.started_at = time.time()
        self.swarm: SwarmDHT | None = None
        self.maddrs: list[str] = []
        self.peer_id = ""  # libp2p peer id, known after start()
        self.rpc: RpcEndpoint | None = None
        self._averaging: GroupAveraging | None = None
        self.handlers: dict[str, Handler] = {"ping": self._handle_ping, "echo": self._handle_echo}
        self.online = asyncio.Event()  # set once the node has announced itself ONLINE
        # The worker sets it once it does its role's work (serves its stage, runs zo steps); a node
        # without a worker serves once ONLINE. `swarmtrain health` reports it (node/health.py).
        self.serving = False
        self.has_worker = False
        self._health_warned = False
        self.emulation = load_emulation(config.emulate_links) if config.emulate_links else None
        self.link_faults = LinkFaults(config.link_faults, config.public_name, self._public_name_of) \
            if config.link_faults else None

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> list[str]:
        """Start the DHT (blocking, before the event loop runs); returns the multiaddrs to share."""
        self.swarm = SwarmDHT(
            self.key,
            self.run_id,
            self.access,
            self.timeouts,
            initial_peers=self.config.initial_peers,
            host_maddrs=self.config.resolved_host_maddrs(),
            announce_maddrs=self.config.announce_maddrs,
            client_mode=self.config.client_mode,
            token=self.token,
            app_record_names=self.app_record_names,
        )
        # asked once: the DHT process answers without a timeout, so never from the event loop
        self.maddrs = self.swarm.visible_maddrs()
        self.peer_id = str(self.swarm.peer_id)
        return self.maddrs

    async def run(self, stop: asyncio.Event) -> None:
        """Join, then keep heartbeats, announcements and the membership view fresh until ``stop``.

        Each runs on its own clock so a slow DHT read never delays a heartbeat (peers would call us
        DEAD); always leaves and closes, also when joining failed."""
        assert self.swarm is not None, "start() first"
        try:
            await self._join()
            announce_every = self.timeouts.announce_ttl_s / 3
            await asyncio.gather(
                _every(self.timeouts.heartbeat_interval_s, self.heartbeat, stop),
                _every(announce_every, self._refresh_announcement, stop, first_delay=announce_every),
                _every(self.timeouts.heartbeat_interval_s, self.refresh_membership, stop),
                _every(self.timeouts.heartbeat_ttl_s, self._keep_in_touch, stop,
                       first_delay=self.timeouts.heartbeat_ttl_s),
            )
        finally:
            if self.role is not None:
                await self.leave()
            await self.swarm.close_p2p()

    async def _keep_in_touch(self) -> None:
        """Put the peers we know of (initial peers, members' announced addresses) back in the DHT's
        routing table when they fell out of it (node/dht.py ``SwarmDHT.rejoin``: a node back from
        a freeze is otherwise cut off from the swarm's records for good)."""
        assert self.swarm is not None
        known = dict(peers_of_maddrs(self.config.initial_peers))
        for member in self.view.members.values():
            peer = member.announcement.peer_id
            if peer and peer != self.peer_id:
                addresses = known.setdefault(peer, [])
                addresses += [a for a in (m.split("/p2p/")[0] for m in member.announcement.maddrs) if a not in addresses]
        before, back = await self.swarm.rejoin(list(known.items()))
        if back:
            logger.warning("DHT: %d peer(s) back in its routing table, which held %d (after a freeze or a "
                           "partition)", back, before)

    async def _refresh_announcement(self) -> None:
        await self.announce(self.state)
        await self.publish_run_directory()

    def _log_role(self) -> None:
        assert self.role is not None
        logger.info("role: %s%s — %s", self.role.role.value,
                    f" stage {self.role.stage}" if self.role.stage is not None else "", self.role.reason)

    async def _settle_stage(self, rounds: int = 3) -> None:
        """Nodes started together all see the same counts and pick the same stage: look again once
        our JOINING announcement is out, and spread out (see roles.reconsider_stage)."""
        assert self.role is not None
        for _ in range(rounds):
            await asyncio.sleep(self.timeouts.heartbeat_interval_s)  # let concurrent joiners announce
            members = await self.refresh_membership()
            moved = reconsider_stage(self.public_key, self.role, self.spec.run.mode, self.spec.pipeline.stages,
                                     members, self.config.role)
            if moved is None:
                return
            self.role = moved
            self._log_role()
            await self.announce(NodeState.JOINING)

    async def _join(self) -> None:
        assert self.swarm is not None
        p2p = await self.swarm.p2p()
        self.rpc = RpcEndpoint(p2p, self.key, self.run_id, self.access, self.timeouts, token=self.token,
                               rate_limits=self.config.rate_limits, clock=time.time)
        if self.emulation is not None:
            self.rpc.shaper = LinkShaper(self.emulation, self.config.public_name, self._public_name_of)
            logger.info("link emulation: %s at %s, time x%g, bytes x%g", self.emulation.scenario.name,
                        self.rpc.shaper.my_location or "no location (not delayed)", self.emulation.time_scale,
                        self.emulation.bytes_scale)
        if self.link_faults is not None:
            self.rpc.faults = self.link_faults
            logger.info("link faults from %s", self.link_faults.path)
        for method, handler in self.handlers.items():
            self.rpc.register(method, handler)
        await self.rpc.start()
        await self.refresh_membership(first=True)
        self.role = choose_role(
            self.spec.run.mode, self.spec.pipeline.stages, self.view.members, self.config.role, self.config.stage
        )
        self._log_role()
        await self.announce(NodeState.JOINING)
        if self.config.role == "auto" and self.config.stage is None and self.spec.run.mode == "pipeline":
            await self._settle_stage()
        self.state = NodeState.ONLINE
        await self.announce(NodeState.ONLINE)
        await self.publish_run_directory()
        logger.info("node %s is ONLINE in run %s", self.id[:16], self.run_id.hex())
        if not self.has_worker:
            self.serving = True
        self.online.set()

    async def leave(self) -> None:
        """Say LEAVING where observers look for it, then stop; bounded by leave_grace_s."""
        self.state = NodeState.LEAVING
        logger.info("leaving the swarm")
        try:
            async with asyncio.timeout(self.timeouts.leave_grace_s):
                await asyncio.gather(self.announce(NodeState.LEAVING), self.heartbeat())
        except TimeoutError:
            logger.warning("could not publish LEAVING within %.0f s", self.timeouts.leave_grace_s)

    async def report_event(self, event: str, detail: str) -> None:
        """Record an event about this node (e.g. a resync) where observers read events."""
        assert self.swarm is not None
        self.view.events.append(Event(event=event, subject=self.public_key, detail=detail[:1024], at=time.time()))
        logger.info("event: %s %s", event, detail)
        recent = list(self.view.events)[-MAX_PUBLISHED_EVENTS:]
        await self.swarm.store(EVENTS, Event.KIND, {"events": [e.to_body() for e in recent]},
                               self.timeouts.announce_ttl_s)

    def averaging(self) -> GroupAveraging:
        """The node's group averagers, created on first use (each averager is a forked process)."""
        assert self.swarm is not None, "start() first"
        if self._averaging is None:
            credentials = Credentials(self.key, self.run_id, self.access, self.token, self.peer_id)
            self._averaging = GroupAveraging(self.swarm.dht, f"swarmtrain/{self.run_id.hex()}/avg", self.timeouts,
                                             credentials, client_mode=self.config.client_mode)
        return self._averaging

    def shutdown(self) -> None:
        if self._averaging is not None:
            self._averaging.shutdown()
        if self.swarm is not None:
            self.swarm.shutdown()

    # ---- records -----------------------------------------------------------------------------

    def announcement(self, state: NodeState) -> NodeAnnouncement:
        assert self.swarm is not None and self.role is not None
        return NodeAnnouncement(
            peer_id=self.peer_id,
            public_name=self.config.public_name,
            role=self.role.role,
            stage=self.role.stage,
            expert=self.expert,
            device=self.device,
            throughput=float(self.metrics.get("tokens_per_s", 0.0)),
            version=__version__,
            state=state,
            maddrs=self.maddrs[:8],
        )

    async def announce(self, state: NodeState) -> None:
        assert self.swarm is not None
        ok = await self.swarm.store(NODES, NodeAnnouncement.KIND, self.announcement(state).to_body(),
                                    self.timeouts.announce_ttl_s)
        if not ok:
            logger.warning("announcement (%s) was not stored by any peer", state.value)

    async def heartbeat(self) -> None:
        assert self.swarm is not None
        beat = Heartbeat(state=self.state, step=self.step, metrics=dict(self.metrics),
                         uptime_s=time.time() - self.started_at)
        ttl = min(self.timeouts.heartbeat_ttl_s * HEARTBEAT_RETENTION, MAX_RECORD_TTL_S)
        deadline = self.timeouts.heartbeat_ttl_s - self.timeouts.heartbeat_interval_s
        stored = await self.swarm.store(HEARTBEATS, Heartbeat.KIND, beat.to_body(), ttl, timeout=deadline)
        if not stored:
            logger.warning("heartbeat was not stored by any peer")
        await self._write_health(stored)

    async def _write_health(self, heartbeat_stored: bool) -> None:
        """DATA_DIR/health.json for `swarmtrain health` (a container's HEALTHCHECK)."""
        assert self.swarm is not None
        peers = 0
        try:
            p2p = await self.swarm.p2p()
            peers = len(await asyncio.wait_for(p2p.list_peers(), self.timeouts.dht_request_s))
        except Exception as error:  # noqa: BLE001 - p2pd's errors are bare (or a timeout); 0 peers says it
            logger.debug("could not list libp2p peers: %s", error)
        live = sum(1 for key, m in self.view.members.items()
                   if key != self.public_key and m.state in ("ONLINE", "JOINING"))
        health = Health(state=self.state.value.upper(), role=self.role.role.value if self.role else "",
                        stage=self.role.stage if self.role else None, serving=self.serving, peers=peers,
                        live_members=live, heartbeat_stored=bool(heartbeat_stored), step=int(self.step),
                        updated_at=time.time(), heartbeat_ttl_s=self.timeouts.heartbeat_ttl_s, pid=os.getpid(),
                        node_id=self.id, run_id=self.run_id.hex())
        try:
            write_health(Path(self.config.data_dir), health)
        except OSError as error:
            if not self._health_warned:  # a full or read-only disk: say it once, keep training
                logger.warning("cannot write the health file in %s: %s", self.config.data_dir, error.strerror)
                self._health_warned = True

    async def publish_run_directory(self) -> None:
        assert self.swarm is not None
        # The signed spec lets any observer verify the run id and learn its access policy and timing.
        body = {"run_id": self.run_id, "name": self.spec.run.name, "mode": self.spec.run.mode,
                "spec": dumps_spec(self.spec)}
        await self.swarm.store(RUNS_DIRECTORY, "run.index", body, self.timeouts.announce_ttl_s)

    async def refresh_membership(self, first: bool = False) -> dict[bytes, Member]:
        """Re-read the run's members; changes since the last view become events (not on the first view:
        nodes that were already there when we joined did not just join)."""
        assert self.swarm is not None
        try:
            announcements, heartbeats = await fetch_member_records(self.swarm, self.run_id)
        except DHTReadError as error:
            logger.warning("membership not refreshed, keeping the last view: %s", error)
            return self.view.members
        now = time.time()
        for peer, failed_at in list(self.view.last_failure.items()):
            # Heartbeats alone do not clear failed calls (a node can heartbeat yet refuse every stream);
            # after a cool-down the peer gets another chance.
            if now - failed_at > self.timeouts.announce_ttl_s or \
                    self.view.restarted_since_failing(peer, announcements.get(peer)):
                self.view.rpc_succeeded(peer)
        members = derive_members(announcements, heartbeats, now, self.timeouts.heartbeat_ttl_s,
                                 self.view.failed_rpcs, self.timeouts.rpc_failures_for_dead)
        events = [] if first else diff_events(self.view.members, members, now)
        for event in events:
            logger.info("event: %s %s", event.event, event.detail)
            self.view.events.append(event)
        live = sum(1 for m in members.values() if m.state in ("ONLINE", "JOINING"))
        if live != sum(1 for m in self.view.members.values() if m.state in ("ONLINE", "JOINING")) or events:
            logger.info("membership: %d live of %d known", live, len(members))
        self.view.members = members
        if events:
            recent = list(self.view.events)[-MAX_PUBLISHED_EVENTS:]
            await self.swarm.store(EVENTS, Event.KIND, {"events": [e.to_body() for e in recent]},
                                   self.timeouts.announce_ttl_s)
        return members

    def _public_name_of(self, peer_id: str) -> str | None:
        for member in self.view.members.values():
            if member.announcement.peer_id == peer_id:
                return member.announcement.public_name
        return None

    # ---- RPC handlers ------------------------------------------------------------------------

    def register(self, method: str, handler: Handler) -> None:
        """Serve ``method``; works before and after the node started."""
        self.handlers[method] = handler
        if self.rpc is not None:
            self.rpc.register(method, handler)

    async def _handle_ping(self, context: CallContext, args: dict, tensors: dict) -> tuple[dict, dict]:
        return {"id": self.id, "state": self.state.value, "version": __version__, "time": time.time()}, {}

    async def _handle_echo(self, context: CallContext, args: dict, tensors: dict) -> tuple[dict, dict]:
        """Sends the caller's tensors back: link probes and transfer tests use it."""
        return {"received": {name: t.numel() for name, t in tensors.items()}}, tensors


async def _every(period: float, action, stop: asyncio.Event, first_delay: float = 0.0) -> None:
    """Run ``action`` on a fixed clock until ``stop``; a slow run skips ticks instead of drifting."""
    loop = asyncio.get_running_loop()
    next_at = loop.time() + first_delay
    while not stop.is_set():
        delay = next_at - loop.time()
        if delay > 0:
            try:
                await asyncio.wait_for(stop.wait(), delay)
                return
            except TimeoutError:
                pass  # time for the next tick
        try:
            await action()
        except Exception:  # one failed tick must not stop the node's heartbeats for good
            logger.exception("periodic %s failed; trying again next tick", getattr(action, "__name__", action))
        next_at += period
        if next_at < loop.time():
            next_at = loop.time() + period


async def fetch_member_records(
    swarm: SwarmDHT, run_id: bytes, access: AccessPolicy | None = None
) -> tuple[dict[bytes, tuple[float, NodeAnnouncement]], dict[bytes, tuple[float, Heartbeat]]]:
    """Announcements and heartbeats of a run, by signer, each with its signed timestamp."""
    nodes, beats = await asyncio.gather(
        swarm.read(NODES, run_id=run_id, access=access), swarm.read(HEARTBEATS, run_id=run_id, access=access)
    )
    announcements: dict[bytes, tuple[float, NodeAnnouncement]] = {}
    heartbeats: dict[bytes, tuple[float, Heartbeat]] = {}
    for sender, record in nodes.items():
        try:
            announcements[sender] = (record.envelope.timestamp, NodeAnnouncement.from_body(record.msg))
        except ProtocolError as error:
            logger.debug("ignored an announcement from %s: %s", node_id_hex(sender)[:12], error)
    for sender, record in beats.items():
        try:
            heartbeats[sender] = (record.envelope.timestamp, Heartbeat.from_body(record.msg))
        except ProtocolError as error:
            logger.debug("ignored a heartbeat from %s: %s", node_id_hex(sender)[:12], error)
    return announcements, heartbeats


async def read_members(
    swarm: SwarmDHT, run_id: bytes, timeouts: Timeouts, access: AccessPolicy | None = None
) -> dict[bytes, Member]:
    """The run's membership as an observer sees it now."""
    announcements, heartbeats = await fetch_member_records(swarm, run_id, access)
    return derive_members(announcements, heartbeats, time.time(), timeouts.heartbeat_ttl_s)


async def read_events(swarm: SwarmDHT, run_id: bytes, access: AccessPolicy | None = None) -> list[Event]:
    """Events published by every member, deduplicated and in time order."""
    records = await swarm.read(EVENTS, run_id=run_id, access=access)
    seen: dict[tuple, Event] = {}
    for record in records.values():
        raw = record.msg.get("events", [])
        if not isinstance(raw, list):
            continue
        for item in raw[:MAX_PUBLISHED_EVENTS]:
            try:
                event = Event.from_body(item)
            except ProtocolError:
                continue
            seen.setdefault(event_identity(event), event)
    return sorted(seen.values(), key=lambda e: e.at)


def event_identity(event: Event) -> tuple:
    """Several observers report the same death a few seconds apart: one identity, counted once."""
    return event.event, event.subject, round(event.at / 30)
