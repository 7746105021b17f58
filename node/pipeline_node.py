"""Wiring of a pipeline worker into a node process: the stage's module, data for data nodes, the report."""
from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import os
import signal
import time
from collections import deque
from pathlib import Path

import torch

from node.config import format_size, parse_size
from node.memory_budget import fit_slots, stage_memory
from node.roles import RoleChoice
from node.runner import Node
from node.swarm_adapter import HivemindSwarm
from protocol.messages import NodeState, Role
from protocol.runspec import RunSpec
from trainer import warmup
from trainer.data import batches, load_domain, split_domain
from trainer.files import write_json
from trainer.model import ModelConfig, build_stage, stage_block_ranges
from trainer.pipeline.leader import SCHEDULE_RECORD, Leader, LeaderSettings
from trainer.pipeline.guard import GuardSettings
from trainer.pipeline.runtime import BANS_RECORD, PipelineReport, PipelineSettings, PipelineWorker, Tamper
from trainer.recovery.jobs import (CLAIM_RECORD, RECOVERY_RECORD, claim_winner, jobs_from_record, moves_from_record,
                                   rollback_from_record)
from trainer.recovery.rebuild import RecoveryError
from trainer.recovery.restore import JobTaken, RunOver, restore
from trainer.swarm import SwarmCallError

RECORD_NAMES = (SCHEDULE_RECORD, RECOVERY_RECORD, CLAIM_RECORD, BANS_RECORD)
RATE_SAMPLES = 6  # heartbeats the published iterations_per_s is measured over
BYZANTINE_FAULTS = ("nan-activations", "scale-activations", "garbage-gradients")
SCALE_FAULT = 20.0  # scale-activations: outputs times this
GARBAGE_FAULT = 100.0  # garbage-gradients: noise with this many times the true gradient's RMS

logger = logging.getLogger(__name__)


def _blockless_stages(spec: RunSpec) -> set[int]:
    cfg = ModelConfig.from_preset(spec.model.preset)
    ranges = stage_block_ranges(cfg.n_layers, spec.pipeline.stages, spec.pipeline.blocks_per_stage)
    return {stage for stage, blocks in enumerate(ranges) if len(blocks) == 0}


def stage_module(spec: RunSpec, stage: int) -> torch.nn.Module:
    """The stage's module at the run's initial weights (the same on every replica)."""
    cfg = ModelConfig.from_preset(spec.model.preset)
    ranges = stage_block_ranges(cfg.n_layers, spec.pipeline.stages, spec.pipeline.blocks_per_stage)
    return build_stage(cfg, stage, ranges[stage], seed=spec.train.seed)


def data_stream(spec: RunSpec, node_id: bytes):
    train = [split_domain(load_domain(d), spec.data.val_fraction, seed=spec.train.seed).train for d in spec.data.domains]
    seed = int.from_bytes(hashlib.blake2b(node_id, digest_size=8).digest(), "little") >> 1
    return batches(torch.cat(train), spec.pipeline.microbatch_size, spec.model.seq_len, seed=seed)


def parse_fault(fault: str | None) -> dict:
    """Testing only: ``kill-after-forwards-N`` makes a stage node SIGKILL itself on its (N+1)-th
    forward; ``kill-during-restore`` makes a node SIGKILL itself once it fetched the first state it
    restores its stage from. A Byzantine replica, from iteration K on (``-from-K``, default 0):
    ``nan-activations`` (one NaN in every output), ``scale-activations`` (outputs x 20),
    ``garbage-gradients`` (the gradients it passes back and its parameter gradients at the reduce
    replaced by noise of 100 x their RMS)."""
    if not fault:
        return {}
    prefix = "kill-after-forwards-"
    if fault.startswith(prefix) and fault[len(prefix):].isdigit():
        return {"die_after_forwards": int(fault[len(prefix):])}
    if fault == "kill-during-restore":
        return {"die_during_restore": True}
    kind, _, start = fault.partition("-from-")
    if kind in BYZANTINE_FAULTS and (start == "" or start.isdigit()) and not fault.endswith("-from-"):
        return {"tamper": byzantine_tamper(kind, int(start or 0))}
    raise ValueError(f"unknown fault {fault!r}; known: {prefix}N, kill-during-restore, "
                     f"{', '.join(BYZANTINE_FAULTS)} (each optionally -from-K)")


def byzantine_tamper(kind: str, start: int) -> Tamper:
    """What a Byzantine replica sends instead of the truth (see parse_fault)."""
    generator = torch.Generator().manual_seed(start)

    def tamper(what: str, iteration: int, t: torch.Tensor) -> torch.Tensor:
        if iteration < start:
            return t
        if kind == "nan-activations" and what == "x":
            t = t.clone()
            t.view(-1)[0] = float("nan")
            return t
        if kind == "scale-activations" and what == "x":
            return t * SCALE_FAULT
        if kind == "garbage-gradients" and what in ("grad", "param"):
            rms = float(torch.sqrt(torch.mean(t.double() * t.double()))) if t.numel() else 0.0
            noise = torch.randn(t.shape, generator=generator, dtype=torch.float32)
            return (noise * (GARBAGE_FAULT * rms + 1e-3)).to(t.dtype)
        return t

    return tamper


def _die() -> None:
    logger.warning("fault injection: SIGKILL in the middle of a restore")
    os.kill(os.getpid(), signal.SIGKILL)


async def take_lost_stage(node: Node, swarm: HivemindSwarm, stop: asyncio.Event,
                          lease_s: float = 120.0) -> tuple[int, float, float] | None:
    """A spare: wait for a lost stage on the leader's job board and take it with a lease (smallest
    claiming id wins); (stage, when it was lost, when we won it), or None when the run ends first."""
    spec, interval = node.spec, node.timeouts.heartbeat_interval_s
    logger.info("spare: waiting for a lost stage")
    while not stop.is_set():
        known = [p for p in await swarm.peers(fresh=True, live_only=False)
                 if p.role in ("data", "stage") and p.stage is not None]
        peers = [p for p in known if p.state in ("JOINING", "ONLINE")]
        finished = any(p.metrics.get("iteration", 0) >= spec.train.steps for p in known if p.stage == 0)
        if finished or (not peers and any(p.state == "LEAVING" for p in known)):
            logger.info("spare: the run is over")
            return None
        if peers:
            try:
                jobs = jobs_from_record((await swarm.read(RECOVERY_RECORD)).get(min(p.id for p in peers)))
                served = {p.stage for p in peers}
                live = {p.id for p in await swarm.peers()} | {swarm.my_id}
                jobs = {s: t for s, t in jobs.items() if 0 < s < spec.pipeline.stages and s not in served}
                for stage in sorted(jobs):
                    winner = claim_winner(await swarm.read(CLAIM_RECORD), stage, time.time(), live)
                    if winner is not None and winner < swarm.my_id:
                        continue
                    await swarm.publish(CLAIM_RECORD, {"stage": stage, "until": time.time() + lease_s}, lease_s)
                    await asyncio.sleep(interval)  # let rival claims land
                    if claim_winner(await swarm.read(CLAIM_RECORD), stage, time.time(), live) == swarm.my_id:
                        logger.info("spare: took lost stage %d (lost %.1f s ago)", stage, time.time() - jobs[stage])
                        return stage, jobs[stage], time.time()
            except (SwarmCallError, ValueError) as error:
                logger.info("spare: could not read the job board: %s", error)
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except TimeoutError:
            pass
    return None


def activation_slots(node: Node, stage: int) -> int:
    """pipeline.memory, or fewer when --max-memory leaves room for fewer (node/memory_budget.py)."""
    wanted = node.spec.pipeline.memory
    if not node.config.max_memory:
        return wanted
    budget = parse_size(node.config.max_memory)
    need = stage_memory(node.spec, stage)
    slots = fit_slots(need, budget, wanted)
    logger.info("--max-memory %s: stage %d takes %s for its state and %s per activation slot; %d of "
                "pipeline.memory=%d slots fit", format_size(budget), stage, format_size(need.state_bytes),
                format_size(need.slot_bytes), slots, wanted)
    return slots


async def _served(swarm: HivemindSwarm, stage: int) -> bool:
    return any(p.stage == stage and p.role in ("data", "stage") for p in await swarm.peers(fresh=True))


async def _wait_for_start(node: Node, worker: PipelineWorker, stop: asyncio.Event) -> None:
    """Before the first iteration: min_nodes live and a replica of every stage, so that the replicas
    of a stage reduce together from the start. A run already under way is joined at once."""
    pipe = node.spec.pipeline
    waiting_since = time.monotonic()
    while not stop.is_set():
        peers = await worker.swarm.peers(fresh=True)
        if any(p.metrics.get("iteration", 0) > 0 for p in peers if p.role in ("data", "stage")):
            return
        replicas = await worker._replicas()
        live = sum(map(len, replicas.values()))
        missing = [s for s in range(pipe.stages) if not replicas.get(s)]
        if not missing and live >= pipe.min_nodes:
            await worker._replicas(fresh=True)  # one more look: others may be a heartbeat behind us
            return
        if time.monotonic() - waiting_since > 30:
            waiting_since = time.monotonic()
            logger.info("waiting to start: %d of pipeline.min_nodes=%d nodes live%s", live, pipe.min_nodes,
                        f", no replica of stage(s) {missing}" if missing else "")
        await asyncio.sleep(worker.settings.retry_s * 2)


async def run_pipeline_worker(node: Node, stop: asyncio.Event, report_path: Path | None = None,
                              fault: str | None = None, keep_recovery_inputs: Path | None = None,
                              checkpoint_dir: Path | None = None, snapshots: tuple[Path, int] | None = None) -> None:
    """Run the node's stage until the run's iterations are done (or ``stop``); then set ``stop``.
    A spare first waits for a lost stage; a node the leader moves serves its new stage from then on.
    ``snapshots``: (folder, every N iterations) for the stage's weights (trainer/pipeline/snapshots.py)."""
    torch.set_num_threads(1)
    if node.spec.pipeline.recovery == "checkpoint" and checkpoint_dir is None:
        raise ValueError("pipeline.recovery = \"checkpoint\" needs --checkpoint-dir: a folder every node of the "
                         "run shares (the baseline's durable storage)")
    await node.online.wait()
    await warmup.ready()  # the optimizer's first import, off the event loop
    assert node.role is not None
    swarm = HivemindSwarm(node)
    lost_at: float | None = None
    claimed_at: float | None = None

    async def next_job() -> tuple[int, float, float] | None:
        while True:
            taken = await take_lost_stage(node, swarm, stop)
            if taken is None or not await _served(swarm, taken[0]):
                return taken
            # the views lag: another spare (or a joiner) got there first; stay a spare for the next job
            logger.info("spare: stage %d is served again; waiting for another lost stage", taken[0])

    async def spare_job() -> tuple[int, float, float] | None:
        """The next lost stage for this spare; None (reported, stop set) when the run ends first."""
        taken = await next_job()
        if taken is None:
            _spare_report(node, report_path)
            stop.set()
        return taken

    spare = node.role.role == Role.SPARE
    if spare:
        if (taken := await spare_job()) is None:
            return
        stage, lost_at, claimed_at = taken
    else:
        assert node.role.stage is not None
        stage = node.role.stage
    started = time.time()
    first = True
    recoveries: list[dict] = []  # how this node took the state of each stage it served mid-run
    moves: list[list[int]] = []  # [from stage, to stage] each time the leader moved this node
    serving: list = []  # the stage's worker and leader while it serves: a cancelled node reports them
    try:
        while True:
            served = await _serve_stage(node, swarm, stage, stop, fault, keep_recovery_inputs,
                                        (lost_at, claimed_at), first, started, recoveries, checkpoint_dir, spare,
                                        snapshots, serving)
            if served is None:  # a spare found its stage served by the time it restored: back to waiting
                if (taken := await spare_job()) is None:
                    return
                stage, lost_at, claimed_at = taken
                continue
            worker, leader, report = served
            spare = False
            first = False
            node.serving = False
            if report.moved_to is None or stop.is_set():
                break
            moves.append([stage, report.moved_to])
            stage, lost_at, claimed_at = report.moved_to, report.moved_lost_at, time.time()
            # no longer counted as a replica of the old stage (data nodes: no pp.done to wait for) while it restores
            node.role = RoleChoice(Role.SPARE, None, f"moving to lost stage {stage}")
            await node.announce(NodeState.ONLINE)
    except asyncio.CancelledError:
        # stopped (SIGTERM) in the middle of an iteration: what it did so far is still reported
        if report_path is not None and serving:
            _write_report(report_path, node, stage, *serving, recoveries, moves)
        elif report_path is not None:
            _spare_report(node, report_path)
        raise
    if report_path is not None:
        _write_report(report_path, node, stage, worker, leader, recoveries, moves)
    stop.set()


def _write_report(report_path: Path, node: Node, stage: int, worker: PipelineWorker, leader: Leader,
                  recoveries: list[dict], moves: list[list[int]]) -> None:
    """What the node did, for the harness and benchmarks (also from a node stopped mid-iteration)."""
    report = worker.report
    out = {"node": node.id, "stage": stage, "iterations": report.iterations, "losses": report.losses,
           "hashes": report.hashes, "planned": report.planned, "executed": report.executed,
           "served": report.served, "rerouted": report.rerouted, "skipped": report.skipped,
           "resyncs": report.resyncs, "seconds": report.seconds, "compute_s": report.compute_s,
           "plans": report.plans, "published": leader.published, "phases": report.phases,
           "tokens": report.tokens, "bytes_sent": node.rpc.stats.sent if node.rpc else 0,
           "grad_norms": report.grad_norms, "first_iteration": report.first_iteration,
           "recoveries": recoveries, "moves": moves, "stage_log": leader.recovery_log,
           "rollbacks": report.rollbacks, "bans": report.bans, "excluded": report.excluded,
           "refused": report.refused, "banned": report.banned,
           "weights_finite": all(bool(torch.isfinite(t).all()) for t in worker.module.state_dict().values())}
    write_json(report_path, out)


def _spare_report(node: Node, report_path: Path | None) -> None:
    """A spare that never served: it says so."""
    if report_path is not None:
        write_json(report_path, {"node": node.id, "stage": None, "iterations": 0, "recoveries": []})


async def _serve_stage(node: Node, swarm: HivemindSwarm, stage: int, stop: asyncio.Event, fault: str | None,
                       keep_recovery_inputs: Path | None, job: tuple[float | None, float | None], first: bool,
                       started: float, recoveries: list[dict], checkpoint_dir: Path | None,
                       as_spare: bool, snapshots: tuple[Path, int] | None, serving: list
                       ) -> tuple[PipelineWorker, Leader, PipelineReport] | None:
    """Serve ``stage`` until the run ends or the leader moves us; None when a spare found the stage
    served already by the time it would restore it (it stays a spare)."""
    spec, pipe = node.spec, node.spec.pipeline
    module = (await asyncio.to_thread(stage_module, spec, stage)).to(node.device)
    data = await asyncio.to_thread(data_stream, spec, node.public_key) if stage == 0 else None
    settings = PipelineSettings(num_stages=pipe.stages, path_length=pipe.path_length, swap=pipe.swap,
                                microbatches=pipe.microbatches, memory=activation_slots(node, stage),
                                iterations=spec.train.steps,
                                lr=spec.train.lr, retry_s=min(0.5, node.timeouts.heartbeat_interval_s / 4),
                                use_leader=pipe.planner == "leader",
                                activation_dtype=getattr(torch, pipe.activation_dtype),
                                microbatch_size=pipe.microbatch_size,
                                heartbeat_s=node.timeouts.heartbeat_interval_s)
    faults = parse_fault(fault) if first else {}
    die_during_restore = faults.pop("die_during_restore", False)
    guard = GuardSettings(enabled=pipe.guard == "ban", factor=pipe.outlier_factor)
    worker = PipelineWorker(swarm, stage, module, settings, data, guard=guard, **faults)
    cfg = ModelConfig.from_preset(spec.model.preset)
    leader = Leader(swarm, LeaderSettings(
        microbatches=pipe.microbatches, microbatch_size=pipe.microbatch_size, memory=pipe.memory,
        path_length=pipe.path_length, num_stages=pipe.stages, layers_per_stage=max(1, cfg.n_layers // pipe.stages),
        activation_bytes_per_sample=spec.model.seq_len * cfg.d_model * getattr(torch, pipe.activation_dtype).itemsize,
        period_s=node.timeouts.heartbeat_interval_s * 2, policy=pipe.schedule, move_after_s=pipe.move_after_s,
        checkpoint_root=checkpoint_dir if pipe.recovery == "checkpoint" else None), stage)
    leader.excluded = worker.guard.bans
    serving[:] = [worker, leader]
    if snapshots is not None:
        worker.snapshot_root, worker.snapshot_every = snapshots
    if pipe.recovery == "checkpoint":
        worker.checkpoint_root, worker.checkpoint_every = checkpoint_dir, pipe.checkpoint_every
        worker.restart_delay_s = pipe.restart_delay_s
        try:  # rollbacks ordered before this worker began are not its to follow
            board = (await swarm.read(RECOVERY_RECORD)).values()
            worker.rolled_back_epoch = max([rb[0] for rb in map(rollback_from_record, board) if rb] + [0])
        except (SwarmCallError, ValueError):
            pass
    announced = node.role is not None and node.role.stage == stage
    if first and announced:
        await _wait_for_start(node, worker, stop)
    record = None
    for attempt in itertools.count():
        try:
            record = await restore(worker, pipe.recovery, pipe.swap, keep_recovery_inputs,
                                   _die if die_during_restore else None, allow_replica=not as_spare,
                                   blockless_stages=_blockless_stages(spec))
            break
        except JobTaken as error:
            logger.info("spare: %s", error)
            return None
        except RunOver as error:
            logger.warning("stage %d not restored: %s", stage, error)
            stop.set()
            return None if as_spare else (worker, leader, worker.report)
        except RecoveryError as error:
            # never start a stage of a run under way from its initial weights: the view may have
            # missed the live replicas or neighbours for a moment (a slow DHT); look again
            if attempt % 10 == 0:
                logger.warning("could not restore stage %d yet (attempt %d): %s; trying again", stage, attempt + 1,
                               error)
            try:
                await asyncio.wait_for(stop.wait(), node.timeouts.heartbeat_interval_s * 2)
                return None if as_spare else (worker, leader, worker.report)
            except TimeoutError:
                pass
    if record is not None:
        record["lost_at"], record["claimed_at"] = job
        recoveries.append(record)
    if not announced:
        node.role = RoleChoice(Role.DATA if stage == 0 else Role.STAGE, stage,
                               f"took lost stage {stage}" + (f" by {record['method']}" if record else ""))
        logger.info("role: %s stage %d — %s", node.role.role.value, stage, node.role.reason)
        await node.announce(NodeState.ONLINE)
        if record is not None:
            record["serving_at"] = time.time()
            if record.get("lost_at"):  # the status page shows how a lost stage came back (node/swarm_report.py)
                await node.report_event("recovery", f"stage {stage} restored by {record['method']} in "
                                        f"{record['seconds']:.1f} s, serving "
                                        f"{record['serving_at'] - record['lost_at']:.1f} s after it was lost")
    elif record is not None:
        record["serving_at"] = time.time()

    async def publish_metrics() -> None:
        """What observers see in this node's heartbeats; and whether the leader asks us to move."""
        samples: deque[tuple[float, int]] = deque(maxlen=RATE_SAMPLES)  # (time, iteration)
        while not stop.is_set():
            r = worker.report
            node.step = worker.iteration
            samples.append((time.monotonic(), worker.iteration))
            (t0, k0), (t1, k1) = samples[0], samples[-1]
            node.metrics.update(iteration=float(worker.iteration), compute_s=r.compute_s,
                                iterations_per_s=(k1 - k0) / (t1 - t0) if t1 > t0 else 0.0,
                                compute_ms_per_microbatch=1000 * r.compute_s / max(1, r.microbatches),
                                bytes_sent=float(node.rpc.stats.sent if node.rpc else 0),
                                grad_norm=worker.grad_norm)
            if r.losses:
                node.metrics["loss"] = r.losses[-1][2]
            if stage == 0:
                node.metrics["tokens_per_s"] = r.tokens / max(1e-9, time.time() - started)
            await _check_moves(swarm, worker)
            try:
                await asyncio.wait_for(stop.wait(), node.timeouts.heartbeat_interval_s)
            except TimeoutError:
                pass

    node.serving = True
    metrics = asyncio.create_task(publish_metrics())
    leading = asyncio.create_task(leader.run(stop)) if pipe.planner == "leader" else None
    try:
        report = await worker.run(stop)
    finally:
        metrics.cancel()
        if leading is not None:
            leading.cancel()
    return worker, leader, report


async def _check_moves(swarm: HivemindSwarm, worker: PipelineWorker) -> None:
    """The leader may name this node to move into a lost stage (trainer/recovery/jobs.py)."""
    try:
        peers = [p for p in await swarm.peers() if p.role in ("data", "stage") and p.id not in worker.guard.bans]
        leader = min([p.id for p in peers] + [swarm.my_id])
        board = (await swarm.read(RECOVERY_RECORD)).get(leader)
    except (SwarmCallError, ValueError):
        return
    rollback = rollback_from_record(board)
    if rollback is not None and worker.checkpoint_root is not None and rollback[0] > worker.rolled_back_epoch:
        worker.rollback = rollback
    target = moves_from_record(board).get(swarm.my_id)
    if target is not None and target != worker.stage and worker.move_to is None:
        logger.warning("the leader moves this node from stage %d to lost stage %d", worker.stage, target)
        worker.report.moved_lost_at = jobs_from_record(board).get(target)
        worker.move_to = target
