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
"""
from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from node.config import ConfigError
from trainer.pipeline.scenario import Scenario, ScenarioError, load_scenario, read_json_file, shipped_scenario


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
