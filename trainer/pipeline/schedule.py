"""Schedules (stage assignment + one path per microbatch) and the constraints they must meet."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from trainer.pipeline.scenario import Scenario

MAX_SWAPS = 2


class ScheduleError(ValueError):
    """A schedule breaks a constraint; the message says which and where."""


@dataclass(frozen=True)
class MicrobatchPath:
    """One microbatch: its stage-0 data node and the (stage, node) hops between leaving it and
    coming back. The data node itself (stage 0) is implicit at both ends."""

    microbatch: int
    data_node: int
    visits: tuple[tuple[int, int], ...]

    def nodes(self) -> list[int]:
        """Node ids in forward order, data node at both ends."""
        return [self.data_node, *(n for _, n in self.visits), self.data_node]


@dataclass(frozen=True)
class Schedule:
    stage_of_node: dict[int, int]
    paths: tuple[MicrobatchPath, ...]


def count_swaps(stages: list[int]) -> int | None:
    """Number of disjoint neighbour swaps turning the sorted stage list into `stages`;
    None when `stages` is not reachable that way (a stage moved more than one place)."""
    ordered = sorted(stages)
    swaps, i = 0, 0
    while i < len(stages):
        if stages[i] == ordered[i]:
            i += 1
        elif i + 1 < len(stages) and stages[i] == ordered[i + 1] and stages[i + 1] == ordered[i]:
            swaps += 1
            i += 2
        else:
            return None
    return swaps


def validate_schedule(
    scenario: Scenario,
    schedule: Schedule,
    *,
    path_length: int | None = None,
    per_data_node: bool = True,
    check_memory: bool = True,
) -> None:
    """Raise ScheduleError unless `schedule` meets every constraint of the skip pipeline.

    path_length defaults to the scenario's. per_data_node=False only requires the global batch
    (the full-pipeline baseline sends more microbatches from fewer data nodes). check_memory runs
    the simulator, which refuses schedules that deadlock on the memory limit."""
    length = scenario.path_length if path_length is None else path_length
    ids = {n.id for n in scenario.nodes}
    son = schedule.stage_of_node
    if set(son) != ids:
        raise ScheduleError(f"stage_of_node must cover exactly the nodes {sorted(ids)}, got {sorted(son)}")
    sizes = Counter(son.values())
    for stage, size in enumerate(scenario.stage_sizes):
        if sizes.get(stage, 0) != size:
            raise ScheduleError(f"stage {stage} has {sizes.get(stage, 0)} nodes, stage_sizes says {size}")
    if set(sizes) - set(range(scenario.num_stages)):
        raise ScheduleError(f"stage_of_node uses unknown stages {sorted(set(sizes) - set(range(scenario.num_stages)))}")

    mb_ids = [p.microbatch for p in schedule.paths]
    if len(set(mb_ids)) != len(mb_ids):
        raise ScheduleError("microbatch ids are not unique")
    data_nodes = sorted(n for n, s in son.items() if s == 0)
    total = len(data_nodes) * scenario.microbatches_per_data_node
    if len(schedule.paths) != total:
        raise ScheduleError(f"{len(schedule.paths)} microbatches, the global batch needs {total}")
    per_node = Counter(p.data_node for p in schedule.paths)
    visits: Counter[int] = Counter()
    for p in schedule.paths:
        where = f"microbatch {p.microbatch}"
        if son.get(p.data_node) != 0:
            raise ScheduleError(f"{where}: data node {p.data_node} is not a stage-0 node")
        if len(p.visits) != length - 1:
            raise ScheduleError(f"{where}: visits {len(p.visits) + 1} stages with stage 0, path_length is {length}")
        stages = [s for s, _ in p.visits]
        for stage, node in p.visits:
            if stage == 0:
                raise ScheduleError(f"{where}: only its own data node may serve stage 0")
            if son.get(node) != stage:
                raise ScheduleError(f"{where}: node {node} does not serve stage {stage}")
        if len(set(stages)) != len(stages):
            raise ScheduleError(f"{where}: repeats a stage {stages}")
        swaps = count_swaps(stages)
        if swaps is None or swaps > MAX_SWAPS:
            raise ScheduleError(f"{where}: stage order {stages} needs more than {MAX_SWAPS} adjacent swaps")
        visits.update(stages)
    if per_data_node:
        for n in data_nodes:
            if per_node.get(n, 0) != scenario.microbatches_per_data_node:
                raise ScheduleError(
                    f"data node {n} sends {per_node.get(n, 0)} microbatches, "
                    f"microbatches_per_data_node is {scenario.microbatches_per_data_node}"
                )
    counts = [visits.get(s, 0) for s in range(1, scenario.num_stages)]
    if counts and max(counts) - min(counts) > 1:
        raise ScheduleError(f"stages 1..{scenario.num_stages - 1} get unbalanced visits {counts} (allowed +-1)")
    if check_memory:
        from trainer.pipeline.simulator import SimulationError, simulate

        try:
            result = simulate(scenario, schedule)
        except SimulationError as e:
            raise ScheduleError(str(e)) from e
        for node, peak in result.peak_memory.items():
            if peak > scenario.memory_microbatches_per_node:
                raise ScheduleError(f"node {node} holds {peak} microbatches, memory allows {scenario.memory_microbatches_per_node}")
