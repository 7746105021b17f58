"""Baseline schedules to compare the scheduler against, in the same simulator."""
from __future__ import annotations

import random

from trainer.pipeline.scenario import Scenario
from trainer.pipeline.schedule import MAX_SWAPS, MicrobatchPath, Schedule
from trainer.pipeline.simulator import SimulationError, simulate


def _by_stage(scenario: Scenario, stage_of_node: dict[int, int]) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in range(scenario.num_stages)]
    for node, stage in sorted(stage_of_node.items()):
        out[stage].append(node)
    return out


def full_pipeline_schedule(scenario: Scenario, stage_of_node: dict[int, int] | None = None) -> Schedule:
    """SkipPipe's DT-FM* baseline, generalised: P = the smallest stage size full pipelines; pipeline
    k is the k-th node (by id) of every stage. The global batch (data nodes x
    microbatches_per_data_node) is spread over the P data nodes in use, as evenly as possible
    (gcp20: 3 pipelines, 30 microbatches, 10 each). Every microbatch visits stages 1..S-1 in order.
    Default stage assignment: nodes in id order (Scenario.default_stage_of_node)."""
    son = stage_of_node or scenario.default_stage_of_node()
    stages = _by_stage(scenario, son)
    pipelines = min(len(s) for s in stages)
    total = len(stages[0]) * scenario.microbatches_per_data_node
    paths = []
    for mb in range(total):
        k = mb % pipelines
        visits = tuple((s, stages[s][k]) for s in range(1, scenario.num_stages))
        paths.append(MicrobatchPath(mb, stages[0][k], visits))
    return Schedule(dict(son), tuple(sorted(paths, key=lambda p: (p.data_node, p.microbatch))))


def _random_order(stages: list[int], rng: random.Random) -> list[int]:
    """Up to MAX_SWAPS disjoint swaps of neighbouring stages in the sorted list."""
    order = sorted(stages)
    free = list(range(len(order) - 1))
    rng.shuffle(free)
    used: set[int] = set()
    for i in free[: rng.randint(0, MAX_SWAPS)]:
        if i in used or i + 1 in used:
            continue
        order[i], order[i + 1] = order[i + 1], order[i]
        used.update((i, i + 1))
    return order


def _random_skip_once(scenario: Scenario, rng: random.Random, stage_of_node: dict[int, int] | None) -> Schedule:
    if stage_of_node is None:
        ids = sorted(n.id for n in scenario.nodes)
        rng.shuffle(ids)
        son: dict[int, int] = {}
        i = 0
        for stage, size in enumerate(scenario.stage_sizes):
            son.update({n: stage for n in ids[i : i + size]})
            i += size
    else:
        son = dict(stage_of_node)
    stages = _by_stage(scenario, son)
    stage_visits = {s: 0 for s in range(1, scenario.num_stages)}
    node_visits = {n: 0 for n in son}
    paths = []
    mb = 0
    for data_node in stages[0]:
        for _ in range(scenario.microbatches_per_data_node):
            # Least-visited stages (random tie-break) keep the visits balanced to +-1.
            keys = {s: (c, rng.random()) for s, c in stage_visits.items()}
            chosen = sorted(stage_visits, key=keys.__getitem__)[: scenario.path_length - 1]
            visits = []
            for s in _random_order(chosen, rng):
                node = min(stages[s], key=lambda n: (node_visits[n], rng.random()))
                node_visits[node] += 1
                stage_visits[s] += 1
                visits.append((s, node))
            paths.append(MicrobatchPath(mb, data_node, tuple(visits)))
            mb += 1
    return Schedule(son, tuple(paths))


def random_skip_schedule(
    scenario: Scenario, seed: int = 0, stage_of_node: dict[int, int] | None = None, attempts: int = 100
) -> Schedule:
    """Network-blind random skip paths (SkipPipe's DT-FM-skip): a random stage assignment (unless
    given), for each microbatch the path_length-1 least-visited non-zero stages with random
    ties, up to MAX_SWAPS random adjacent swaps, replicas chosen least-visited-first at random.
    Draws again (same rng) if the memory limit would deadlock."""
    rng = random.Random(seed)
    for _ in range(attempts):
        schedule = _random_skip_once(scenario, rng, stage_of_node)
        try:
            simulate(scenario, schedule)
        except SimulationError:
            continue
        return schedule
    raise SimulationError(f"no deadlock-free random skip schedule in {attempts} draws (seed {seed})")
