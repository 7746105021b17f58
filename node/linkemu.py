"""Link emulation for one-machine runs: the RPC transport delays each message as a scenario's link would.

A local swarm on loopback has no latency and ~200 MB/s between any two nodes. With
``swarmtrain node --emulate-links FILE`` a node delays every RPC message it sends (requests as the
caller, replies as the server) by the link between its location and the receiver's:

    delay = (latency_ms / 1000 + link_overhead_s) * time_scale
            + bytes / (bandwidth_GiBps * 2**30 * bytes_scale / time_scale)

Messages to one peer queue behind each other on the link (serialisation: a message starts when the
previous one to that peer has left), then arrive ``latency`` later; a round trip costs two latencies.
Only the RPC streams are delayed (activations, gradients, reductions, probes), not the DHT.

Scaling: with ``time_scale`` t and ``bytes_scale`` b, a local message of b x N bytes takes t times
as long as a scenario message of N bytes. Choose b = (local activation bytes per microbatch) /
(the scenario's) and t = (local compute time per layer-sample) / (the scenario's): then every
transfer and every compute step of the local run takes t times as long as in the scenario, and so
does the iteration (docs/pipeline.md, "Link emulation").

File (JSON):
    {"scenario": "skippipe_gcp20" or a scenario file path,
     "time_scale": 0.01, "bytes_scale": 0.001,
     "locations": {"<public name>": "<scenario location>", ...}}
A peer whose public name is not listed, or a node that is not listed itself, is not delayed.

Link faults (``swarmtrain node --link-faults FILE``, for chaos tests): the node re-reads FILE
whenever it changes, so a harness injects and heals faults at run time by rewriting it (atomically):
    {"seed": 0,
     "drop": 0.1, "delay_s": 0.05, "jitter_s": 0.02,      # every message this node sends
     "nodes": {"<public name>": {"drop": ..., "delay_s": ..., "jitter_s": ...}},  # per sender, instead
     "partition": [["<public name>", ...], ...]}
A dropped message breaks its call off (the caller sees a reset connection, as when a lossy link
kills a stream). ``partition``: a listed node reaches only the nodes of its own group; the nodes
listed nowhere form one more group. Only RPC streams are cut or delayed, not the DHT: a node cut
off this way still heartbeats, and peers judge it dead by its failed calls. A missing file means no
faults; a malformed rewrite is logged and the previous rules stay.
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from node.config import ConfigError
from trainer.pipeline.scenario import Scenario, ScenarioError, load_scenario, read_json_file, shipped_scenario


logger = logging.getLogger(__name__)


class LinkEmulationError(ConfigError):
    """The link emulation file is missing or malformed; the message names the field."""


@dataclass(frozen=True)
class EmulatedLink:
    latency_s: float
    bytes_per_s: float

    def seconds(self, nbytes: int) -> float:
        return self.latency_s + nbytes / self.bytes_per_s


@dataclass(frozen=True)
class LinkEmulation:
    scenario: Scenario
    time_scale: float
    bytes_scale: float
    locations: dict[str, str]  # public name -> scenario location

    def link(self, a: str, b: str) -> EmulatedLink:
        """The emulated link between two locations."""
        link = self.scenario.link(a, b)
        return EmulatedLink(latency_s=(link.latency_ms / 1000 + self.scenario.link_overhead_s) * self.time_scale,
                            bytes_per_s=link.bandwidth_GiBps * 2**30 * self.bytes_scale / self.time_scale)


def _positive(raw: dict, key: str, where: str) -> float:
    value = raw.get(key, 1.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise LinkEmulationError(f"{where}: {key} must be a positive number, got {value!r}")
    return float(value)


def emulation_from_dict(raw: object, where: str = "link emulation") -> LinkEmulation:
    if not isinstance(raw, dict):
        raise LinkEmulationError(f"{where}: must be a JSON object")
    unknown = set(raw) - {"scenario", "time_scale", "bytes_scale", "locations"}
    if unknown:
        raise LinkEmulationError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    name = raw.get("scenario")
    if not isinstance(name, str) or not name:
        raise LinkEmulationError(f"{where}: scenario must name a shipped scenario or a scenario file")
    try:
        scenario = load_scenario(name) if name.endswith(".json") else shipped_scenario(name)
    except ScenarioError as error:
        raise LinkEmulationError(f"{where}: scenario {name!r}: {error}") from None
    locations = raw.get("locations")
    if not isinstance(locations, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                  for k, v in locations.items()):
        raise LinkEmulationError(f"{where}: locations must map public names to location names")
    known = {loc for pair in scenario.links for loc in pair} | {n.location for n in scenario.nodes}
    for node, location in locations.items():
        if location not in known:
            raise LinkEmulationError(f"{where}: locations[{node!r}]: {location!r} is not a location of "
                                     f"{scenario.name} ({', '.join(sorted(known))})")
    emulation = LinkEmulation(scenario, _positive(raw, "time_scale", where), _positive(raw, "bytes_scale", where),
                              dict(locations))
    used = sorted(set(locations.values()))
    for i, a in enumerate(used):
        for b in used[i + 1:]:
            try:
                emulation.link(a, b)
            except (KeyError, ScenarioError):
                raise LinkEmulationError(f"{where}: {scenario.name} has no link {a}-{b}") from None
    return emulation


def load_emulation(path: str | Path) -> LinkEmulation:
    return emulation_from_dict(read_json_file(path, "link emulation file", LinkEmulationError), str(path))


class LinkShaper:
    """One node's side of the emulation: how long to hold each outgoing message to a peer.

    ``name_of(peer_id)`` gives a peer's public name (from the membership view), or None."""

    def __init__(self, emulation: LinkEmulation, my_name: str, name_of: Callable[[str], str | None]):
        self.emulation = emulation
        self.my_location = emulation.locations.get(my_name)
        self._name_of = name_of
        self._free_at: dict[str, float] = {}  # peer -> when its link has sent what is queued

    def link_to(self, peer_id: str) -> EmulatedLink | None:
        if self.my_location is None:
            return None
        name = self._name_of(peer_id)
        location = self.emulation.locations.get(name) if name is not None else None
        return None if location is None else self.emulation.link(self.my_location, location)

    def hold_s(self, peer_id: str, nbytes: int, now: float) -> float:
        """Seconds from ``now`` until a message of ``nbytes`` sent now would arrive at ``peer_id``."""
        link = self.link_to(peer_id)
        if link is None:
            return 0.0
        start = max(now, self._free_at.get(peer_id, now))
        sent = start + nbytes / link.bytes_per_s
        self._free_at[peer_id] = sent
        return sent + link.latency_s - now

    async def hold(self, peer_id: str, nbytes: int) -> None:
        """Wait as long as the emulated link would take to deliver ``nbytes`` to ``peer_id``."""
        loop = asyncio.get_running_loop()
        delay = self.hold_s(peer_id, nbytes, loop.time())
        if delay > 0:
            await asyncio.sleep(delay)


# ---- link faults -----------------------------------------------------------------------------


class LinkRefused(ConnectionRefusedError):
    """The link faults file partitions this node from the peer."""


class LinkDropped(ConnectionResetError):
    """The link faults file dropped this message."""


@dataclass(frozen=True)
class LinkLoss:
    drop: float = 0.0  # probability that a message is lost
    delay_s: float = 0.0  # extra delay of every message
    jitter_s: float = 0.0  # plus a uniform delay in [0, jitter_s)


@dataclass(frozen=True)
class FaultRules:
    seed: int = 0
    loss: LinkLoss = LinkLoss()
    nodes: dict[str, LinkLoss] = field(default_factory=dict)  # by the sender's public name
    partition: tuple[frozenset[str], ...] = ()

    def loss_of(self, sender: str) -> LinkLoss:
        return self.nodes.get(sender, self.loss)

    def group_of(self, name: str | None) -> int:
        """The partition group of a node: its index in ``partition``, or -1 for the unlisted."""
        for i, group in enumerate(self.partition):
            if name in group:
                return i
        return -1

    def cut(self, a: str | None, b: str | None) -> bool:
        return bool(self.partition) and self.group_of(a) != self.group_of(b)


def _loss_from(raw: object, where: str) -> LinkLoss:
    if not isinstance(raw, dict):
        raise LinkEmulationError(f"{where}: must be a JSON object")
    unknown = set(raw) - {"drop", "delay_s", "jitter_s"}
    if unknown:
        raise LinkEmulationError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    values = {}
    for key, top in (("drop", 1.0), ("delay_s", 600.0), ("jitter_s", 600.0)):
        value = raw.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= top:
            raise LinkEmulationError(f"{where}: {key} must be a number in [0, {top:g}], got {value!r}")
        values[key] = float(value)
    return LinkLoss(**values)


def fault_rules_from_dict(raw: object, where: str = "link faults") -> FaultRules:
    if not isinstance(raw, dict):
        raise LinkEmulationError(f"{where}: must be a JSON object")
    unknown = set(raw) - {"seed", "drop", "delay_s", "jitter_s", "nodes", "partition"}
    if unknown:
        raise LinkEmulationError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise LinkEmulationError(f"{where}: seed must be an integer")
    loss = _loss_from({k: raw[k] for k in ("drop", "delay_s", "jitter_s") if k in raw}, where)
    nodes = raw.get("nodes", {})
    if not isinstance(nodes, dict):
        raise LinkEmulationError(f"{where}: nodes must map public names to {{drop, delay_s, jitter_s}}")
    partition = raw.get("partition", [])
    if not isinstance(partition, list) or not all(
            isinstance(g, list) and all(isinstance(n, str) for n in g) for g in partition):
        raise LinkEmulationError(f"{where}: partition must be a list of lists of public names")
    groups = tuple(frozenset(g) for g in partition)
    if sum(map(len, groups)) != len(frozenset().union(*groups)):
        raise LinkEmulationError(f"{where}: a node is in more than one partition group")
    return FaultRules(seed, loss, {str(k): _loss_from(v, f"{where}: nodes[{k!r}]") for k, v in nodes.items()}, groups)


class LinkFaults:
    """One node's side of injected link faults, read from a file that may change at run time.

    ``name_of(peer_id)`` gives a peer's public name (from the membership view), or None."""

    def __init__(self, path: str | Path, my_name: str, name_of: Callable[[str], str | None]):
        self.path = Path(path)
        self.my_name = my_name
        self._name_of = name_of
        self._stamp: tuple[int, int, int] | None = None
        self.rules = FaultRules()
        self._rng = random.Random()
        self.dropped = 0
        self.refused = 0
        self._reload(strict=True)

    def _reload(self, strict: bool = False) -> None:
        """Re-read the file if it changed; a bad rewrite keeps the rules in force (``strict``: raise)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            stamp = None
        except OSError as error:
            if strict:
                raise LinkEmulationError(f"{self.path}: cannot read the link faults file ({error.strerror})") from None
            return
        else:
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)  # a rename over it changes the inode
        if stamp == self._stamp and not strict:
            return
        try:
            rules = FaultRules() if stamp is None else fault_rules_from_dict(
                read_json_file(self.path, "link faults file", LinkEmulationError), str(self.path))
        except LinkEmulationError as error:
            if strict:
                raise
            logger.warning("link faults: keeping the previous rules: %s", error)
            self._stamp = stamp
            return
        if rules != self.rules or strict:
            logger.info("link faults now: drop %g, delay %g s (+%g s jitter), partition %s", rules.loss_of(
                self.my_name).drop, rules.loss_of(self.my_name).delay_s, rules.loss_of(self.my_name).jitter_s,
                [sorted(g) for g in rules.partition] or "none")
            if rules.seed != self.rules.seed or strict:
                self._rng = random.Random(f"{rules.seed}/{self.my_name}")
        self.rules, self._stamp = rules, stamp

    def refuses(self, peer_id: str) -> bool:
        """Whether the partition cuts the link to ``peer_id``."""
        self._reload()
        if self.rules.cut(self.my_name, self._name_of(peer_id)):
            self.refused += 1
            return True
        return False

    async def before_send(self, peer_id: str) -> None:
        """Called before each message to ``peer_id``: raises LinkRefused or LinkDropped, or waits
        the injected delay."""
        if self.refuses(peer_id):
            raise LinkRefused(f"link to {self._name_of(peer_id)} cut by the link faults file")
        loss = self.rules.loss_of(self.my_name)
        if loss.drop and self._rng.random() < loss.drop:
            self.dropped += 1
            raise LinkDropped(f"message to {self._name_of(peer_id) or peer_id} dropped by the link faults file")
        delay = loss.delay_s + (self._rng.uniform(0.0, loss.jitter_s) if loss.jitter_s else 0.0)
        if delay > 0:
            await asyncio.sleep(delay)
