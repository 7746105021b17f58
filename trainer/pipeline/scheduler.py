"""The skip-pipeline scheduler: a stage assignment and a path for every microbatch.

Method (docs/scheduler.md): a network-aware construction followed by local search with the
simulator in the loop.
1. Stage assignment (unless given): nodes are laid on a nearest-neighbour tour and stages are
   dealt along it so that every stretch of nearby nodes holds every stage; then hill climbing
   over swaps of two nodes' stages, each candidate scored by simulating the greedy paths it gets.
2. Greedy paths: microbatches take turns over the data nodes; each takes the cheapest cycle
   (link costs plus a load penalty) over every allowed stage set and order, the replicas chosen
   by dynamic programming, keeping the stage visits completable to within +-1.
3. Local search on the simulated iteration: replica, order, stage-exchange, path-exchange and
   node-swap moves (moves.py), accepted when the data nodes' finish times (sorted, latest first) are not
   worse; restarts from the best schedule with a few random moves when it stalls.
Deterministic for a given seed as long as `max_evaluations`, not the time budget, ends the search.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from itertools import combinations

from trainer.pipeline.moves import Moves, Paths, swap_patterns
from trainer.pipeline.scenario import Scenario
from trainer.pipeline.schedule import MicrobatchPath, Schedule, ScheduleError
from trainer.pipeline.simulator import SimulationError, simulate

logger = logging.getLogger(__name__)

Key = tuple[float, ...]

_EPS = 1e-9
_ASSIGN_SHARE = 0.4  # of the evaluations, at most, spent on the stage assignment
_CANDIDATES = 6
_IDLE_PROPOSALS = 1000  # proposals in a row that found no move: the neighbourhood is empty  # replicas per stage the greedy router considers (nearest to the data node)


@dataclass(frozen=True)
class SchedulerConfig:
    seed: int = 0
    time_budget_s: float | None = None  # None: default_time_budget(node count)
    max_evaluations: int | None = None  # simulations; None: default_max_evaluations(node count)
    stall_evaluations: int = 400  # without improvement before restarting from the best


@dataclass(frozen=True)
class PlanResult:
    schedule: Schedule
    iteration_time: float
    evaluations: int
    elapsed_s: float
    stopped_by: str  # "evaluations" (deterministic) or "time"


def default_time_budget(num_nodes: int) -> float:
    """30 s up to 20 nodes, rising linearly to 300 s at 100 nodes."""
    return min(300.0, 30.0 + max(0, num_nodes - 20) * 270.0 / 80.0)


def default_max_evaluations(num_nodes: int) -> int:
    """Sized so that the search ends well inside default_time_budget on one core."""
    return 4000 if num_nodes <= 30 else 2000 if num_nodes <= 60 else 1500


class _Problem:
    """What the search needs about a scenario, precomputed once."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.ids = sorted(n.id for n in scenario.nodes)
        self.cost = {a: {b: (scenario.link_cost_s(a, b) if a != b else 0.0) for b in self.ids} for a in self.ids}
        self.compute = {n: scenario.forward_s(n) * (1 + scenario.backward_factor) for n in self.ids}
        self.hops = scenario.path_length - 1
        self.nonzero = list(range(1, scenario.num_stages))
        self.patterns = swap_patterns(self.hops)
        self.stage_sets = list(combinations(self.nonzero, self.hops))
        self.memory = scenario.memory_microbatches_per_node
        total = scenario.stage_sizes[0] * scenario.microbatches_per_data_node * self.hops
        self.quota = divmod(total, len(self.nonzero)) if self.nonzero else (0, 0)
        self.evaluations = 0

    def schedule(self, son: dict[int, int], paths: Paths) -> Schedule:
        return Schedule(dict(son), tuple(
            MicrobatchPath(i, d, tuple((son[n], n) for n in nodes)) for i, (d, nodes) in enumerate(paths)
        ))

    def evaluate(self, son: dict[int, int], paths: Paths) -> Key | None:
        """Data nodes' finish times, latest first, then the latest one's id; None when the
        memory limit deadlocks."""
        self.evaluations += 1
        try:
            result = simulate(self.scenario, self.schedule(son, paths))
        except SimulationError:
            return None
        ends = sorted(((result.timelines[d][-1].end, d) for d, s in son.items() if s == 0 and result.timelines[d]),
                      reverse=True)
        return tuple(t for t, _ in ends) + (float(ends[0][1]),)


def _better(a: Key, b: Key) -> bool:
    """Lexicographically smaller finish times (the trailing node id does not count)."""
    for x, y in zip(a[:-1], b[:-1]):
        if x < y - _EPS:
            return True
        if x > y + _EPS:
            return False
    return False


class _Budget:
    def __init__(self, evaluations: int, seconds: float) -> None:
        self.initial = self.left = evaluations
        self.deadline = time.perf_counter() + seconds
        self.timed_out = False

    def spend(self) -> bool:
        """Take one evaluation; False when none is left."""
        if self.left <= 0:
            return False
        if time.perf_counter() > self.deadline:
            self.timed_out = True
            return False
        self.left -= 1
        return True


# --- construction ----------------------------------------------------------------------------


def _tour(problem: _Problem) -> list[int]:
    """Nearest-neighbour tour from the smallest id: nearby nodes end up next to each other."""
    left = set(problem.ids)
    node = problem.ids[0]
    tour = [node]
    left.remove(node)
    while left:
        node = min(left, key=lambda n: (problem.cost[node][n], n))
        tour.append(node)
        left.remove(node)
    return tour


def _dealt_assignment(problem: _Problem) -> dict[int, int]:
    """Stages dealt along the tour, each stage's slots evenly spaced (largest stage first)."""
    sizes = problem.scenario.stage_sizes
    n = len(problem.ids)
    slots = sorted(((j + 0.5) * n / size, -size, stage) for stage, size in enumerate(sizes) for j in range(size))
    return {node: stage for node, (_, _, stage) in zip(_tour(problem), slots)}


def _stage_nodes(son: dict[int, int], stages: int) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in range(stages)]
    for node, stage in sorted(son.items()):
        out[stage].append(node)
    return out


def _completable(counts: dict[int, int], quota: tuple[int, int], left: int, hops: int) -> bool:
    """Can `left` more microbatches of `hops` distinct stages bring every stage to q or q+1?"""
    q, _ = quota
    need = sum(max(0, q - c) for c in counts.values())
    room = sum(min(max(0, q + 1 - c), left) for c in counts.values())
    fits = all(q - left <= c <= q + 1 for c in counts.values())
    return fits and need <= left * hops <= room


def _best_route(problem: _Problem, data: int, order: tuple[int, ...], by_stage: list[list[int]],
                penalty: dict[int, float]) -> tuple[float, tuple[int, ...]]:
    """Cheapest data -> replicas of `order` -> data cycle (links plus node penalties)."""
    cost = problem.cost
    layer = {data: (0.0, ())}
    for stage in order:
        options = sorted(by_stage[stage], key=lambda n: (cost[data][n] + penalty[n], n))[:_CANDIDATES]
        nxt = {}
        for n in options:
            best = min((c + cost[prev][n], route) for prev, (c, route) in layer.items())
            nxt[n] = (best[0] + penalty[n], best[1] + (n,))
        layer = nxt
    return min((c + cost[last][data], route) for last, (c, route) in layer.items())


def _greedy_paths(problem: _Problem, son: dict[int, int], reorder: bool = True) -> Paths:
    """Each microbatch in turn takes its cheapest cycle given the load so far. Without
    reordering every path climbs the stages in order, which cannot deadlock on memory: a
    microbatch only ever waits for slots held by microbatches further up."""
    sc = problem.scenario
    by_stage = _stage_nodes(son, sc.num_stages)
    data_nodes = by_stage[0]
    load = {n: 0 for n in problem.ids}
    counts = {s: 0 for s in problem.nonzero}
    # A node's memory slots each take about one round trip; beyond them, queueing costs that much.
    round_trip = 2 * sum(problem.cost[a][b] for a in problem.ids for b in problem.ids) / max(1, len(problem.ids) ** 2)
    unit = (round_trip * (problem.hops + 1) + max(problem.compute.values()) * problem.hops) / problem.memory
    order = [d for _ in range(sc.microbatches_per_data_node) for d in data_nodes]
    paths: Paths = []
    for index, data in enumerate(order):
        penalty = {n: unit * load[n] / problem.memory + problem.compute[n] for n in problem.ids}
        left = len(order) - index - 1
        best = None
        for stages in problem.stage_sets:
            after = dict(counts)
            for s in stages:
                after[s] += 1
            if not _completable(after, problem.quota, left, problem.hops):
                continue
            for pattern in problem.patterns if reorder else problem.patterns[:1]:
                seq = tuple(stages[i] for i in pattern)
                c, route = _best_route(problem, data, seq, by_stage, penalty)
                if best is None or c < best[0] - _EPS:
                    best = (c, route)
        if best is None:  # cannot happen when _completable holds at the start
            raise ScheduleError("no stage set keeps the visits balanced")
        for n in best[1]:
            load[n] += 1
            counts[son[n]] += 1
        paths.append((data, best[1]))
    return paths


def _assign_stages(problem: _Problem, rng: random.Random, budget: _Budget) -> tuple[dict[int, int], Paths, Key]:
    """Hill climbing over stage swaps of two nodes, each scored with its greedy paths."""
    son = _dealt_assignment(problem)
    paths, key = _greedy(problem, son)
    pairs = [(u, v) for u, v in combinations(problem.ids, 2)]
    improved = True
    while improved:
        improved = False
        rng.shuffle(pairs)
        for u, v in pairs:
            if son[u] == son[v]:
                continue
            if not budget.spend():
                return son, paths, key
            trial = dict(son)
            trial[u], trial[v] = son[v], son[u]
            trial_paths, trial_key = _greedy(problem, trial)
            if _better(trial_key, key):
                son, paths, key, improved = trial, trial_paths, trial_key, True
    return son, paths, key


def _greedy(problem: _Problem, son: dict[int, int]) -> tuple[Paths, Key]:
    """Greedy paths and their score; in stage order if the reordered ones deadlock."""
    paths = _greedy_paths(problem, son)
    key = problem.evaluate(son, paths)
    if key is None:
        paths = _greedy_paths(problem, son, reorder=False)
        key = problem.evaluate(son, paths)
    if key is None:  # pragma: no cover - see _greedy_paths
        raise ScheduleError("paths in stage order deadlocked on the memory limit")
    return paths, key


# --- local search on paths -------------------------------------------------------------------


def _local_search(problem: _Problem, son: dict[int, int], paths: Paths, key: Key, rng: random.Random,
                  budget: _Budget, assignment_fixed: bool, stall: int) -> tuple[dict[int, int], Paths, Key]:
    moves = Moves(problem, rng, assignment_fixed)
    best = cur = (son, paths, key)
    since = idle = 0
    if problem.hops == 0:
        return best
    while idle < _IDLE_PROPOSALS:
        c_son, c_paths, c_key = cur
        proposal = moves.propose(c_son, c_paths, int(c_key[-1]))
        if proposal is None or proposal[1] is None:
            idle += 1  # no move of that kind here; a scenario may have no moves at all
            continue
        idle = 0
        if not budget.spend():
            return best
        t_son, t_paths = proposal
        t_key = problem.evaluate(t_son, t_paths)
        since += 1
        if t_key is None or _better(c_key, t_key):
            if since > stall:  # restart from the best with a few random moves
                cur, since = _kick(moves, best, rng), 0
            continue
        cur = (t_son, t_paths, t_key)
        if _better(t_key, best[2]):
            best, since = cur, 0
    return best


def _kick(moves: Moves, state, rng: random.Random):
    son, paths, _ = state
    for _ in range(3):
        data = [d for d, s in son.items() if s == 0]
        out = moves.propose(son, paths, rng.choice(sorted(data)))
        if out is not None and out[1] is not None:
            son, paths = out
    key = moves.p.evaluate(son, paths)
    return (son, paths, key) if key is not None else state


# --- entry point -----------------------------------------------------------------------------


def _check_assignment(scenario: Scenario, stage_of_node: dict[int, int]) -> None:
    ids = sorted(n.id for n in scenario.nodes)
    if sorted(stage_of_node) != ids:
        raise ScheduleError(f"stage_of_node must cover exactly the nodes {ids}")
    for stage, size in enumerate(scenario.stage_sizes):
        got = sum(1 for s in stage_of_node.values() if s == stage)
        if got != size:
            raise ScheduleError(f"stage {stage} has {got} nodes, stage_sizes says {size}")


def plan_schedule(
    scenario: Scenario, stage_of_node: dict[int, int] | None = None, config: SchedulerConfig = SchedulerConfig()
) -> PlanResult:
    """Stage assignment (unless given) and paths minimising the simulated iteration time."""
    start = time.perf_counter()
    problem = _Problem(scenario)
    n = len(problem.ids)
    seconds = config.time_budget_s if config.time_budget_s is not None else default_time_budget(n)
    evaluations = config.max_evaluations if config.max_evaluations is not None else default_max_evaluations(n)
    rng = random.Random(config.seed)
    if stage_of_node is not None:
        _check_assignment(scenario, stage_of_node)
    # Only the evaluation share is fixed: a time share would make the split depend on machine speed.
    first = _Budget(int(evaluations * _ASSIGN_SHARE), seconds)
    if stage_of_node is None:
        son, paths, key = _assign_stages(problem, rng, first)
    else:
        son = dict(stage_of_node)
        paths, key = _greedy(problem, son)
    spent = time.perf_counter() - start
    # What the assignment phase left (it stops early at a local optimum) goes to the paths.
    used = first.initial - first.left if stage_of_node is None else 0
    budget = _Budget(evaluations - used, max(0.0, seconds - spent))
    son, paths, key = _local_search(problem, son, paths, key, rng, budget, stage_of_node is not None,
                                    config.stall_evaluations)
    elapsed = time.perf_counter() - start
    stopped_by = "time" if budget.timed_out or first.timed_out else "evaluations"
    if stopped_by == "time":
        logger.warning("scheduler stopped by its %.0f s time budget; the result depends on machine speed", seconds)
    return PlanResult(problem.schedule(son, paths), key[0], problem.evaluations, elapsed, stopped_by)
