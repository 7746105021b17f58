"""Skip-pipeline scenarios: nodes, links and the cost model (format of skippipe_gcp20.json)."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"


class ScenarioError(ValueError):
    """A scenario file or dict is malformed; the message names the field."""


@dataclass(frozen=True)
class Link:
    latency_ms: float
    bandwidth_GiBps: float


@dataclass(frozen=True)
class Node:
    id: int
    location: str
    sec_per_layer_sample: float
    # Relative compute speed (2.0 = twice as fast). Optional in the file, default 1.0.
    speed: float = 1.0


@dataclass(frozen=True)
class Scenario:
    name: str
    nodes: tuple[Node, ...]
    links: dict[tuple[str, str], Link]  # key: the two locations, sorted
    same_location_link: Link
    link_overhead_s: float
    stage_sizes: tuple[int, ...]
    layers_per_stage: int
    microbatches_per_data_node: int
    samples_per_microbatch: int
    activation_bytes_per_sample: int
    memory_microbatches_per_node: int
    path_length: int
    backward_factor: float
    loss_factor: float
    source: str = ""
    units: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    anchor_results_seconds_per_iteration: dict[str, float] = field(default_factory=dict)
    anchor_ratios_to_baseline: dict[str, float] = field(default_factory=dict)

    @property
    def num_stages(self) -> int:
        return len(self.stage_sizes)

    def node(self, node_id: int) -> Node:
        return self._by_id()[node_id]

    def _by_id(self) -> dict[int, Node]:
        return {n.id: n for n in self.nodes}

    def forward_s(self, node_id: int) -> float:
        """Forward time of one microbatch through one stage on this node."""
        n = self.node(node_id)
        return n.sec_per_layer_sample * self.layers_per_stage * self.samples_per_microbatch / n.speed

    def link(self, a: str, b: str) -> Link:
        if a == b:
            return self.same_location_link
        return self.links[(min(a, b), max(a, b))]

    def link_cost_s(self, node_a: int, node_b: int) -> float:
        """Seconds to send one microbatch's activations (or gradients) from node_a to node_b."""
        link = self.link(self.node(node_a).location, self.node(node_b).location)
        size = self.activation_bytes_per_sample * self.samples_per_microbatch
        return link.latency_ms / 1000.0 + size / (link.bandwidth_GiBps * 2**30) + self.link_overhead_s

    def default_stage_of_node(self) -> dict[int, int]:
        """Nodes in id order fill stage 0, then stage 1, ... (the order of `stage_sizes`)."""
        ids = sorted(n.id for n in self.nodes)
        out: dict[int, int] = {}
        i = 0
        for stage, size in enumerate(self.stage_sizes):
            for node_id in ids[i : i + size]:
                out[node_id] = stage
            i += size
        return out


# --- loading -------------------------------------------------------------------------------


def _get(d: dict[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise ScenarioError(f"{where}: missing field '{key}'")
    return d[key]


def _num(d: dict[str, Any], key: str, where: str, *, positive: bool = True, allow_zero: bool = False) -> float:
    v = _get(d, key, where)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ScenarioError(f"{where}: field '{key}' must be a number, got {type(v).__name__}")
    if positive and (v < 0 or (v == 0 and not allow_zero)):
        raise ScenarioError(f"{where}: field '{key}' must be {'>= 0' if allow_zero else '> 0'}, got {v}")
    return float(v)


def _int(d: dict[str, Any], key: str, where: str, *, minimum: int = 1) -> int:
    v = _get(d, key, where)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ScenarioError(f"{where}: field '{key}' must be an integer, got {type(v).__name__}")
    if v < minimum:
        raise ScenarioError(f"{where}: field '{key}' must be >= {minimum}, got {v}")
    return v


def _link(d: Any, where: str) -> Link:
    if not isinstance(d, dict):
        raise ScenarioError(f"{where}: must be an object with latency_ms and bandwidth_GiBps")
    return Link(_num(d, "latency_ms", where, allow_zero=True), _num(d, "bandwidth_GiBps", where))


def scenario_from_dict(d: dict[str, Any]) -> Scenario:
    if not isinstance(d, dict):
        raise ScenarioError("scenario: must be a JSON object")
    name = _get(d, "name", "scenario")
    if not isinstance(name, str):
        raise ScenarioError("scenario: field 'name' must be a string")
    raw_nodes = _get(d, "nodes", "scenario")
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise ScenarioError("scenario: field 'nodes' must be a non-empty list")
    nodes = []
    for i, rn in enumerate(raw_nodes):
        where = f"nodes[{i}]"
        if not isinstance(rn, dict):
            raise ScenarioError(f"{where}: must be an object")
        loc = _get(rn, "location", where)
        if not isinstance(loc, str):
            raise ScenarioError(f"{where}: field 'location' must be a string")
        speed = _num(rn, "speed", where) if "speed" in rn else 1.0
        nodes.append(Node(_int(rn, "id", where, minimum=0), loc, _num(rn, "sec_per_layer_sample", where), speed))
    ids = [n.id for n in nodes]
    if len(set(ids)) != len(ids):
        raise ScenarioError("scenario: field 'nodes' has duplicate ids")

    raw_links = _get(d, "links", "scenario")
    if not isinstance(raw_links, dict):
        raise ScenarioError("scenario: field 'links' must be an object keyed 'LocA-LocB'")
    links: dict[tuple[str, str], Link] = {}
    for key, rl in raw_links.items():
        parts = key.split("-")
        if len(parts) != 2 or not all(parts):
            raise ScenarioError(f"links: key '{key}' must be 'LocA-LocB'")
        links[(min(parts), max(parts))] = _link(rl, f"links['{key}']")
    locations = sorted({n.location for n in nodes})
    for i, a in enumerate(locations):
        for b in locations[i + 1 :]:
            if (a, b) not in links:
                raise ScenarioError(f"links: no link between '{a}' and '{b}' (field 'links' needs '{a}-{b}')")

    raw_sizes = _get(d, "stage_sizes", "scenario")
    if not isinstance(raw_sizes, list) or not raw_sizes or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in raw_sizes
    ):
        raise ScenarioError("scenario: field 'stage_sizes' must be a non-empty list of integers >= 1")
    if sum(raw_sizes) != len(nodes):
        raise ScenarioError(f"scenario: field 'stage_sizes' sums to {sum(raw_sizes)} but there are {len(nodes)} nodes")
    path_length = _int(d, "path_length", "scenario")
    if path_length > len(raw_sizes):
        raise ScenarioError(f"scenario: field 'path_length' ({path_length}) exceeds the {len(raw_sizes)} stages")

    notes = d.get("notes", [])
    if not isinstance(notes, list) or not all(isinstance(x, str) for x in notes):
        raise ScenarioError("scenario: field 'notes' must be a list of strings")
    for key in ("units", "anchor_results_seconds_per_iteration", "anchor_ratios_to_baseline"):
        if not isinstance(d.get(key, {}), dict):
            raise ScenarioError(f"scenario: field '{key}' must be an object")
    return Scenario(
        name=name,
        nodes=tuple(nodes),
        links=links,
        same_location_link=_link(_get(d, "same_location_link", "scenario"), "same_location_link"),
        link_overhead_s=_num(d, "link_overhead_s", "scenario", allow_zero=True),
        stage_sizes=tuple(raw_sizes),
        layers_per_stage=_int(d, "layers_per_stage", "scenario"),
        microbatches_per_data_node=_int(d, "microbatches_per_data_node", "scenario"),
        samples_per_microbatch=_int(d, "samples_per_microbatch", "scenario"),
        activation_bytes_per_sample=_int(d, "activation_bytes_per_sample", "scenario"),
        memory_microbatches_per_node=_int(d, "memory_microbatches_per_node", "scenario"),
        path_length=path_length,
        backward_factor=_num(d, "backward_factor", "scenario"),
        loss_factor=_num(d, "loss_factor", "scenario", allow_zero=True),
        source=str(d.get("source", "")),
        units=dict(d.get("units", {})),
        notes=tuple(notes),
        anchor_results_seconds_per_iteration=dict(d.get("anchor_results_seconds_per_iteration", {})),
        anchor_ratios_to_baseline=dict(d.get("anchor_ratios_to_baseline", {})),
    )


def scenario_to_dict(s: Scenario) -> dict[str, Any]:
    """The inverse of scenario_from_dict (speed is written only when it is not 1.0)."""
    nodes = []
    for n in s.nodes:
        nd: dict[str, Any] = {"id": n.id, "location": n.location, "sec_per_layer_sample": n.sec_per_layer_sample}
        if n.speed != 1.0:
            nd["speed"] = n.speed
        nodes.append(nd)
    link = lambda l: {"latency_ms": l.latency_ms, "bandwidth_GiBps": l.bandwidth_GiBps}  # noqa: E731
    return {
        "name": s.name, "source": s.source, "units": dict(s.units), "nodes": nodes,
        "links": {f"{a}-{b}": link(l) for (a, b), l in s.links.items()},
        "same_location_link": link(s.same_location_link), "link_overhead_s": s.link_overhead_s,
        "stage_sizes": list(s.stage_sizes), "layers_per_stage": s.layers_per_stage,
        "microbatches_per_data_node": s.microbatches_per_data_node,
        "samples_per_microbatch": s.samples_per_microbatch,
        "activation_bytes_per_sample": s.activation_bytes_per_sample,
        "memory_microbatches_per_node": s.memory_microbatches_per_node, "path_length": s.path_length,
        "backward_factor": s.backward_factor, "loss_factor": s.loss_factor, "notes": list(s.notes),
        "anchor_results_seconds_per_iteration": dict(s.anchor_results_seconds_per_iteration),
        "anchor_ratios_to_baseline": dict(s.anchor_ratios_to_baseline),
    }


def read_json_file(path: str | Path, what: str, error: type[Exception]) -> Any:
    """The JSON in ``path``; a missing or unreadable file, or bad JSON, raises ``error`` saying so."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise error(f"{path}: cannot read the {what} ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None


def load_scenario(path: str | Path) -> Scenario:
    return scenario_from_dict(read_json_file(path, "scenario file", ScenarioError))


def shipped_scenario(name: str = "skippipe_gcp20") -> Scenario:
    """A scenario kept beside this module in scenarios/NAME.json."""
    return load_scenario(SCENARIO_DIR / f"{name}.json")


# --- synthetic scenarios -------------------------------------------------------------------


def synthetic_stage_sizes(num_nodes: int, num_stages: int) -> tuple[int, ...]:
    """About a quarter of the nodes hold data; the rest split evenly (20 nodes -> 5,3,3,3,3,3)."""
    if num_stages < 2 or num_nodes < num_stages:
        raise ScenarioError(f"synthetic: need at least {num_stages} nodes for {num_stages} stages")
    per_stage = max(1, (num_nodes - max(1, num_nodes // 4)) // (num_stages - 1))
    return (num_nodes - per_stage * (num_stages - 1),) + (per_stage,) * (num_stages - 1)


def generate_scenario(
    num_nodes: int,
    *,
    speed_spread: float = 1.0,
    seed: int = 0,
    num_stages: int | None = None,
    template: Scenario | None = None,
) -> Scenario:
    """A synthetic scenario: locations drawn from the template's link table, node speeds
    log-uniform in [1, speed_spread], every other parameter copied from the template (gcp20)."""
    if speed_spread < 1.0:
        raise ScenarioError(f"synthetic: speed_spread must be >= 1, got {speed_spread}")
    base = template or shipped_scenario()
    stages = num_stages or base.num_stages
    rng = random.Random(seed)
    locations = sorted({loc for pair in base.links for loc in pair})
    sec = base.nodes[0].sec_per_layer_sample
    nodes = tuple(
        Node(i, rng.choice(locations), sec, round(speed_spread ** rng.random(), 6)) for i in range(num_nodes)
    )
    return Scenario(
        name=f"synthetic-{num_nodes}-x{speed_spread:g}-seed{seed}",
        nodes=nodes,
        links=dict(base.links),
        same_location_link=base.same_location_link,
        link_overhead_s=base.link_overhead_s,
        stage_sizes=synthetic_stage_sizes(num_nodes, stages),
        layers_per_stage=base.layers_per_stage,
        microbatches_per_data_node=base.microbatches_per_data_node,
        samples_per_microbatch=base.samples_per_microbatch,
        activation_bytes_per_sample=base.activation_bytes_per_sample,
        memory_microbatches_per_node=base.memory_microbatches_per_node,
        path_length=min(base.path_length, stages),
        backward_factor=base.backward_factor,
        loss_factor=base.loss_factor,
        source=f"generated from {base.name}",
        units=dict(base.units),
        notes=("speed: relative compute speed; forward time is divided by it.",),
    )
