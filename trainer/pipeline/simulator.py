"""Discrete-event simulation of one training iteration of a schedule.

Cost model (the notes of skippipe_gcp20.json):
- A microbatch's tasks, in order: forward on its data node (stage 0's own blocks), forward on
  each visited node, loss on the data node, backward on the visited nodes in reverse, backward
  on the data node. forward = sec_per_layer_sample * layers_per_stage * samples_per_microbatch
  / speed; backward = backward_factor * forward; loss = loss_factor * forward (of the data node).
- Between two tasks on different nodes the activations (or gradients) cross a link:
  latency + bytes / bandwidth + link_overhead_s. Links have no contention.
- A node runs one task at a time, without preemption. When it is free it starts, among the
  tasks that have arrived and are allowed to start, the one with the earliest arrival; on equal
  arrival loss/backward go before forward; then the smaller microbatch id.
- Memory: a microbatch holds a slot on a node from the start of its forward there until the end
  of its backward there. A forward may start only when the node holds fewer than
  memory_microbatches_per_node; otherwise it waits (it stays queued). If every remaining task
  waits for memory, the schedule deadlocks and SimulationError is raised.
- Events at the same time are all applied before any node picks its next task.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

from trainer.pipeline.scenario import Scenario
from trainer.pipeline.schedule import Schedule

FORWARD, LOSS, BACKWARD = "forward", "loss", "backward"


class SimulationError(RuntimeError):
    """The schedule cannot finish (memory deadlock) or names unknown nodes."""


@dataclass(frozen=True)
class TimelineEntry:
    start: float
    end: float
    kind: str  # forward | loss | backward
    microbatch: int


@dataclass(frozen=True)
class SimulationResult:
    iteration_time: float
    timelines: dict[int, list[TimelineEntry]]  # node id -> entries in start order
    peak_memory: dict[int, int]  # node id -> most microbatches held at once


@dataclass(frozen=True)
class _Task:
    node: int
    kind: str
    duration: float


def _tasks(scenario: Scenario, data_node: int, hops: list[int], fwd: dict[int, float]) -> list[_Task]:
    b = scenario.backward_factor
    out = [_Task(data_node, FORWARD, fwd[data_node])]
    out += [_Task(n, FORWARD, fwd[n]) for n in hops]
    out.append(_Task(data_node, LOSS, scenario.loss_factor * fwd[data_node]))
    out += [_Task(n, BACKWARD, b * fwd[n]) for n in reversed(hops)]
    out.append(_Task(data_node, BACKWARD, b * fwd[data_node]))
    return out


def simulate(scenario: Scenario, schedule: Schedule) -> SimulationResult:
    """Iteration time (last backward finished, starting at 0) and per-node timelines."""
    node_ids = sorted(n.id for n in scenario.nodes)
    fwd = {n: scenario.forward_s(n) for n in node_ids}
    link_cache: dict[tuple[int, int], float] = {}

    def link(a: int, b: int) -> float:
        if a == b:
            return 0.0
        if (a, b) not in link_cache:
            link_cache[(a, b)] = scenario.link_cost_s(a, b)
        return link_cache[(a, b)]

    chains: dict[int, list[_Task]] = {}
    for p in schedule.paths:
        for n in [p.data_node, *(n for _, n in p.visits)]:
            if n not in fwd:
                raise SimulationError(f"microbatch {p.microbatch} visits unknown node {n}")
        chains[p.microbatch] = _tasks(scenario, p.data_node, [n for _, n in p.visits], fwd)

    cap = scenario.memory_microbatches_per_node
    step = {mb: 0 for mb in chains}  # index of the task each microbatch waits for or runs
    queued: dict[int, list[tuple[float, int, int]]] = {n: [] for n in node_ids}  # (arrival, rank, mb)
    busy_until: dict[int, float | None] = {n: None for n in node_ids}
    held = {n: 0 for n in node_ids}
    peak = {n: 0 for n in node_ids}
    timelines: dict[int, list[TimelineEntry]] = {n: [] for n in node_ids}
    events: list[tuple[float, int, int, int]] = []  # (time, seq, kind 0=arrive 1=finish, mb)
    seq = 0
    for mb in sorted(chains):
        events.append((0.0, seq, 0, mb))
        seq += 1
    heapq.heapify(events)
    now = 0.0
    done = 0

    def start_next(node: int) -> None:
        nonlocal seq
        if busy_until[node] is not None:
            return
        best = None
        for item in queued[node]:
            arrival, rank, mb = item
            if chains[mb][step[mb]].kind == FORWARD and held[node] >= cap:
                continue
            if best is None or item < best:
                best = item
        if best is None:
            return
        queued[node].remove(best)
        mb = best[2]
        task = chains[mb][step[mb]]
        if task.kind == FORWARD:
            held[node] += 1
            peak[node] = max(peak[node], held[node])
        end = now + task.duration
        busy_until[node] = end
        timelines[node].append(TimelineEntry(now, end, task.kind, mb))
        heapq.heappush(events, (end, seq, 1, mb))
        seq += 1

    while events:
        now = events[0][0]
        touched: set[int] = set()
        while events and events[0][0] == now:
            _, _, kind, mb = heapq.heappop(events)
            chain = chains[mb]
            if kind == 1:  # the running task finished
                task = chain[step[mb]]
                busy_until[task.node] = None
                touched.add(task.node)
                if task.kind == BACKWARD:
                    held[task.node] -= 1
                step[mb] += 1
                if step[mb] == len(chain):
                    done += 1
                    continue
                nxt = chain[step[mb]]
                heapq.heappush(events, (now + link(task.node, nxt.node), seq, 0, mb))
                seq += 1
            else:  # the microbatch arrived at the node of its next task
                task = chain[step[mb]]
                queued[task.node].append((now, 1 if task.kind == FORWARD else 0, mb))
                touched.add(task.node)
        for node in sorted(touched):
            start_next(node)
        # A freed memory slot only matters to its own node, which is in `touched`.

    if done != len(chains):
        stuck = {n: sorted(mb for _, _, mb in q) for n, q in queued.items() if q}
        raise SimulationError(
            f"memory deadlock: {len(chains) - done} microbatches cannot finish; "
            f"nodes full at {cap} microbatches with forwards waiting: {stuck}"
        )
    return SimulationResult(now, timelines, peak)
