"""The pipeline leader: measures the live swarm, plans paths with the scheduler, publishes them signed.

The leader is the live pipeline node with the smallest id (deterministic; when it dies the next
smallest takes over as soon as its heartbeat expires). Every ``period_s`` it checks the swarm;
when the live set changed, or measurements are older than ``remeasure_s``, it measures:
- compute: each node's ``compute_ms_per_microbatch`` from its heartbeats;
- links: it asks every node to probe every other (``pp.probe``: a ping for latency, an echo of
  ``probe_bytes`` for bandwidth).
It builds a scenario (one location per node), runs ``plan_schedule`` with the stage assignment the
nodes already have, and publishes record ``pp.schedule``: {version, nodes: [ids], paths: {data
node index: [[node index, ...] per microbatch]}}. Data nodes use the leader's paths while every
node in them is live, and plan locally otherwise. Banned nodes (trainer/pipeline/guard.py) are
neither planned nor leaders.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.pipeline.baselines import full_pipeline_schedule, random_skip_schedule
from trainer.pipeline.scenario import Link, Node, Scenario
from trainer.pipeline.schedule import Schedule
from trainer.pipeline.scheduler import SchedulerConfig, plan_schedule
from trainer.pipeline.simulator import simulate
from trainer.recovery.checkpoint import latest_complete
from trainer.recovery.jobs import (CLAIM_RECORD, RECOVERY_RECORD, StageWatch, choose_mover, claim_winner,
                                   rollback_from_record)
from trainer.swarm import Swarm, SwarmCallError

logger = logging.getLogger(__name__)

SCHEDULE_RECORD = "pp.schedule"
MAX_PROBE_TARGETS = 256
PROBE_PINGS = 3  # pings per probe: the shortest round trip is the link's, the others queued behind work


@dataclass(frozen=True)
class LeaderSettings:
    microbatches: int
    microbatch_size: int
    memory: int
    path_length: int
    num_stages: int
    layers_per_stage: int
    activation_bytes_per_sample: int
    period_s: float = 2.0
    remeasure_s: float = 60.0
    probe_bytes: int = 64 << 10
    plan_seconds: float = 5.0
    plan_evaluations: int = 300
    record_ttl_s: float = 120.0
    policy: str = "skip"  # skip: the scheduler; full or random_skip: the baselines, for comparisons
    move_after_s: float = 30.0  # a lost stage without a live claimant this long takes a node from the most replicated stage
    checkpoint_root: Path | None = None  # the checkpoint baseline: a lost stage rolls everyone back


async def probe(swarm: Swarm, target: bytes, nbytes: int, pings: int = PROBE_PINGS) -> tuple[float, float]:
    """(latency ms, bandwidth GiB/s) to ``target``: half the shortest round trip of ``pings`` pings
    (a busy node answers one ping late: a single ping read 200-300 ms over a 45 ms link), and an
    echo's extra time over it."""
    rtt = math.inf
    for _ in range(max(1, pings)):
        began = time.perf_counter()
        await swarm.call(target, "ping", {})
        rtt = min(rtt, time.perf_counter() - began)
    payload = torch.zeros(nbytes // 4, dtype=torch.float32)
    began = time.perf_counter()
    await swarm.call(target, "echo", {}, {"probe": payload})
    echo = time.perf_counter() - began
    transfer = max(echo - rtt, 1e-6)
    return 1000 * rtt / 2, 2 * payload.numel() * 4 / transfer / 2**30


class Leader:
    def __init__(self, swarm: Swarm, settings: LeaderSettings, stage: int):
        self.swarm = swarm
        self.stage = stage
        self.me = swarm.my_id
        self.settings = settings
        self.version = 0
        self.leading = False
        self._live: tuple[bytes, ...] = ()
        self._measured_at = 0.0
        self._links: dict[tuple[bytes, bytes], tuple[float, float]] = {}
        self.published: list[dict] = []  # what this node published, for reports
        self.watch = StageWatch(settings.num_stages)
        self.moves: dict[bytes, int] = {}  # node -> the lost stage it was asked to move to
        self._claim_seen: dict[int, float] = {}  # lost stage -> when a live claimant of it was last seen
        self.recovery_log: list[dict] = []  # lost and recovered stages this node saw while leading
        self.rollback: tuple[int, int] | None = None  # checkpoint baseline: (epoch, iteration) ordered last
        self.excluded: Mapping[bytes, str] = {}  # banned nodes (the worker's guard): never planned, never leader
        swarm.serve("pp.probe", self._on_probe)

    async def _on_probe(self, sender: bytes, args: dict, tensors: dict) -> tuple[dict, dict]:
        targets = args.get("targets")
        if not isinstance(targets, list) or len(targets) > MAX_PROBE_TARGETS or not all(
                isinstance(t, bytes) and len(t) == 32 for t in targets):
            from protocol.errors import MalformedMessage

            raise MalformedMessage(f"targets must be a list of at most {MAX_PROBE_TARGETS} node ids")
        results = []
        for target in targets:
            try:
                latency, bandwidth = await probe(self.swarm, target, self.settings.probe_bytes)
                results.append([target, latency, bandwidth])
            except SwarmCallError:
                results.append([target, -1.0, -1.0])
        return {"results": results}, {}

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.tick()
            except Exception:  # a failed round must not end the node's leadership loop
                logger.exception("leader round failed; trying again")
            try:
                await asyncio.wait_for(stop.wait(), self.settings.period_s)
            except TimeoutError:
                pass

    async def tick(self) -> None:
        peers = [p for p in await self.swarm.peers(fresh=True)
                 if p.stage is not None and p.role in ("data", "stage") and p.id not in self.excluded]
        live = tuple(sorted({p.id for p in peers} | {self.me}))
        leading = min(live) == self.me
        if leading != self.leading:
            logger.info("pipeline leader: %s", "this node" if leading else min(live).hex()[:16])
            self.leading = leading
            if leading:
                # what this node saw while it led before is stale (a stage lost for a moment at
                # start-up, then back, kept its old loss time and was moved into at once when it was
                # really lost 90 s later): start from the records that are alive now
                self.watch, self.moves, self._claim_seen = StageWatch(self.settings.num_stages), {}, {}
                try:  # the predecessor's job board: what it saw lost is lost here until seen served
                    for body in (await self.swarm.read(RECOVERY_RECORD)).values():
                        self.watch.take_over(body)
                        earlier = rollback_from_record(body)
                        if earlier is not None and (self.rollback is None or earlier[0] > self.rollback[0]):
                            self.rollback = earlier
                except (SwarmCallError, ValueError):
                    pass
        if not leading:
            return
        stage_of = {p.id: p.stage for p in peers}
        stage_of[self.me] = self.stage
        await self._watch_stages(stage_of, {p.id for p in await self.swarm.peers() if p.id not in self.excluded}
                                 | {self.me})
        if self.watch.lost:
            return  # a stage without a replica: data nodes plan around it themselves
        stale = time.monotonic() - self._measured_at > self.settings.remeasure_s
        if live == self._live and not stale:
            return
        await self._measure(live)
        compute_ms = {p.id: float(p.metrics.get("compute_ms_per_microbatch", 0.0)) for p in peers}
        scenario, ids = self._scenario(live, stage_of, compute_ms)
        son = {i: stage_of[node] for i, node in enumerate(ids)}
        schedule, predicted = await asyncio.to_thread(self._plan, scenario, son)
        paths: dict[int, list[list[int]]] = {}
        for path in sorted(schedule.paths, key=lambda p: (p.data_node, p.microbatch)):
            paths.setdefault(path.data_node, []).append([n for _, n in path.visits])
        self.version += 1
        body = {"version": self.version, "nodes": list(ids), "paths": [[d, ps] for d, ps in sorted(paths.items())],
                "predicted_s": predicted, "policy": self.settings.policy}
        if await self.swarm.publish(SCHEDULE_RECORD, body, self.settings.record_ttl_s):
            self._live = live
            self.published.append({"version": self.version, "nodes": [n.hex() for n in ids],
                                   "paths": body["paths"], "predicted_s": predicted, "at": time.time(),
                                   "links": [[a.hex(), b.hex(), lat, bw] for (a, b), (lat, bw) in self._links.items()
                                             if a in live and b in live]})
            logger.info("published schedule v%d for %d nodes (%s; simulated iteration %.2f s)", self.version,
                        len(ids), self.settings.policy, predicted)

    async def _watch_stages(self, stage_of: dict[bytes, int], live: set[bytes]) -> None:
        """Lost stages: events, the job board (``pp.recovery``) and, when nobody claims a job in time,
        a node moved from the most replicated stage (see trainer/recovery/jobs.py)."""
        now = time.time()
        had_lost = bool(self.watch.lost)
        newly, back = self.watch.update(stage_of, now)
        if newly and not had_lost:
            try:  # a previous leader may have seen these stages go earlier (and ordered rollbacks)
                for body in (await self.swarm.read(RECOVERY_RECORD)).values():
                    self.watch.adopt(body)
                    earlier = rollback_from_record(body)
                    if earlier is not None and (self.rollback is None or earlier[0] > self.rollback[0]):
                        self.rollback = earlier
            except (SwarmCallError, ValueError):
                pass
        if newly and self.settings.checkpoint_root is not None:
            to = await asyncio.to_thread(latest_complete, self.settings.checkpoint_root, self.settings.num_stages)
            if to is not None:
                self.rollback = ((self.rollback[0] if self.rollback else 0) + 1, to)
                logger.warning("rollback %d: every node goes back to the checkpoint of iteration %d", *self.rollback)
        for stage in newly:
            self.recovery_log.append({"stage": stage, "lost_at": self.watch.lost[stage]})
            logger.warning("stage %d is lost: no live replica", stage)
            await self._event("stage_lost", f"stage {stage} has no live replica")
        for stage, lost_s in back:
            self.recovery_log.append({"stage": stage, "back_at": now, "lost_s": lost_s})
            logger.info("stage %d is served again after %.1f s", stage, lost_s)
            await self._event("recovery", f"stage {stage} is served again after {lost_s:.1f} s")
        self.moves = {node: stage for node, stage in self.moves.items()
                      if stage in self.watch.lost and node in stage_of}
        self._claim_seen = {s: t for s, t in self._claim_seen.items() if s in self.watch.lost}
        if self.watch.lost:
            # a lost stage takes a node from elsewhere once it has gone move_after_s without a live
            # claimant: since it was lost, or since its claimant was last seen alive (under load a
            # restoring spare's heartbeats lapsed for 7 s, and the leader moved a data node into the
            # stage the spare was rebuilding: the rebuild was done twice)
            claims, read_again = await self._claims(), False
            for stage, lost_at in sorted(self.watch.lost.items()):
                if stage == 0 or stage in self.moves.values():
                    continue
                if claim_winner(claims, stage, now, live) is not None:
                    self._claim_seen[stage] = now
                    continue
                if now - max(lost_at, self._claim_seen.get(stage, lost_at)) < self.settings.move_after_s:
                    continue
                if not read_again:  # before moving a node, a second look: one DHT read can miss a claim
                    claims, read_again = {**await self._claims(), **claims}, True
                    if claim_winner(claims, stage, now, live) is not None:
                        self._claim_seen[stage] = now
                        continue
                movable = {n: s for n, s in stage_of.items() if n not in self.moves}
                choice = choose_mover(movable, self.settings.num_stages)
                if choice is None:
                    logger.warning("stage %d: nobody claimed it in %.0f s and no stage has a replica to spare",
                                   stage, self.settings.move_after_s)
                    continue
                node, origin, why = choice
                self.moves[node] = stage
                logger.warning("stage %d: nobody claimed it in %.0f s; %s moves there from stage %d (%s)", stage,
                               self.settings.move_after_s, node.hex()[:12], origin, why)
        if self.watch.lost or had_lost or self.rollback is not None:
            body = {"lost": [[s, t] for s, t in sorted(self.watch.lost.items())],
                    "moves": [[n, s] for n, s in sorted(self.moves.items())]}
            if self.rollback is not None:
                body["rollback"] = list(self.rollback)
            await self.swarm.publish(RECOVERY_RECORD, body, max(4 * self.settings.period_s, 10.0))

    async def _claims(self) -> dict:
        try:
            return await self.swarm.read(CLAIM_RECORD)
        except (SwarmCallError, ValueError):
            return {}

    async def _event(self, event: str, detail: str) -> None:
        try:
            await self.swarm.report_event(event, detail)
        except (SwarmCallError, ValueError, OSError) as error:
            logger.info("could not record event %s: %s", event, error)

    def _plan(self, scenario: Scenario, son: dict[int, int]) -> tuple[Schedule, float]:
        """The schedule of the run's policy over the live nodes, and its simulated iteration time."""
        if self.settings.policy == "full":
            schedule = full_pipeline_schedule(scenario, son)
        elif self.settings.policy == "random_skip":
            schedule = random_skip_schedule(scenario, seed=self.version, stage_of_node=son)
        else:
            result = plan_schedule(scenario, son, SchedulerConfig(
                seed=self.version, time_budget_s=self.settings.plan_seconds,
                max_evaluations=self.settings.plan_evaluations))
            return result.schedule, result.iteration_time
        return schedule, simulate(scenario, schedule).iteration_time

    async def _measure(self, live: tuple[bytes, ...]) -> None:
        async def ask(node: bytes) -> None:
            targets = [t for t in live if t != node]
            try:
                if node == self.me:
                    result, _ = await self._on_probe(self.me, {"targets": targets}, {})
                else:
                    result, _ = await self.swarm.call(node, "pp.probe", {"targets": targets})
            except SwarmCallError as error:
                logger.info("probe round from %s failed: %s", node.hex()[:12], error)
                return
            for item in result.get("results", [])[:MAX_PROBE_TARGETS]:
                if isinstance(item, list) and len(item) == 3 and isinstance(item[0], bytes):
                    target, latency, bandwidth = item
                    if isinstance(latency, float) and isinstance(bandwidth, float) and latency >= 0 and bandwidth > 0:
                        self._links[(node, target)] = (latency, bandwidth)

        await asyncio.gather(*(ask(n) for n in live))
        self._measured_at = time.monotonic()

    def _scenario(self, live: tuple[bytes, ...], stage_of: dict[bytes, int],
                  compute_ms: dict[bytes, float]) -> tuple[Scenario, list[bytes]]:
        ids = sorted(live)
        s = self.settings
        known = [v for v in compute_ms.values() if v > 0]
        default_ms = sum(known) / len(known) if known else 10.0
        nodes = []
        for i, node in enumerate(ids):
            ms = compute_ms.get(node) or default_ms
            per_layer_sample = ms / 1000 / max(1, s.layers_per_stage) / s.microbatch_size
            nodes.append(Node(i, f"n{i}", per_layer_sample))
        links = {}
        for a in range(len(ids)):
            for b in range(a + 1, len(ids)):
                found = [self._links[k] for k in ((ids[a], ids[b]), (ids[b], ids[a])) if k in self._links]
                latency = min((f[0] for f in found), default=1.0)
                bandwidth = max((f[1] for f in found), default=0.1)
                links[(f"n{a}", f"n{b}")] = Link(latency, bandwidth)
        sizes = tuple(sum(1 for n in ids if stage_of[n] == st) for st in range(s.num_stages))
        scenario = Scenario(
            name="live", nodes=tuple(nodes), links=links, same_location_link=Link(0.05, 10.0), link_overhead_s=0.0,
            stage_sizes=sizes, layers_per_stage=s.layers_per_stage, microbatches_per_data_node=s.microbatches,
            samples_per_microbatch=s.microbatch_size, activation_bytes_per_sample=s.activation_bytes_per_sample,
            memory_microbatches_per_node=s.memory, path_length=s.path_length, backward_factor=2.0, loss_factor=0.5)
        return scenario, ids


def paths_from_schedule(body: object, me: bytes, replicas: dict[int, list[bytes]],
                        microbatches: int) -> list[list[tuple[int, bytes]]] | None:
    """This data node's paths from a published schedule, or None when the schedule is malformed,
    has no paths for us, or names a node that is no longer a live replica of its stage."""
    if not isinstance(body, dict):
        return None
    nodes, table = body.get("nodes"), body.get("paths")
    if not isinstance(nodes, list) or not isinstance(table, list) or not all(
            isinstance(n, bytes) and len(n) == 32 for n in nodes):
        return None
    stage_of = {node: stage for stage, ids in replicas.items() for node in ids}
    mine = None
    for item in table:
        if (isinstance(item, list) and len(item) == 2 and type(item[0]) is int and 0 <= item[0] < len(nodes)
                and nodes[item[0]] == me):
            mine = item[1]
    if not isinstance(mine, list) or len(mine) != microbatches:
        return None
    paths = []
    for path in mine:
        if not isinstance(path, list):
            return None
        hops = []
        for index in path:
            if type(index) is not int or not 0 <= index < len(nodes) or nodes[index] not in stage_of:
                return None
            node = nodes[index]
            if stage_of[node] == 0:
                return None
            hops.append((stage_of[node], node))
        paths.append(hops)
    return paths
