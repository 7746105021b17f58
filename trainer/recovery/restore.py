"""Bring a node that starts, or moves, into a running pipeline up to date before it serves.

A live replica of the stage gives its weights, optimizer state and learning rate. A lost stage is
rebuilt from its neighbours (trainer/recovery/rebuild.py: CheckFree, CheckFree+ swap copies, or
the random re-initialisation baseline). Everything moves by ``pp.state`` (safetensors, hashes
checked; trainer/pipeline/state.py); the gradient norm CheckFree weighs by comes in the same
answer as the weights, so the two belong to the same moment.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Collection
from pathlib import Path

import torch

from trainer.files import save_safetensors, write_json
from trainer.pipeline.runtime import PipelineWorker, weights_hash
from trainer.recovery.checkpoint import latest_complete, load_checkpoint
from trainer.pipeline.state import RemoteState, fetch_state
from trainer.recovery.rebuild import RECOVERY_LR_FACTOR, RecoveryError, plan_recovery, rebuild_weights
from trainer.swarm import Peer, SwarmCallError

logger = logging.getLogger(__name__)

BEHIND_ITERATIONS = 3  # a replica further behind the data nodes than this is not a source (it is restoring)
STALE_HEARTBEATS = 3  # a peer's iteration in our view may be this many heartbeat intervals old
MAX_RATE = 50.0  # iterations a second taken from a data node's heartbeat at most


def behind_limit(data_nodes: Collection[Peer], heartbeat_s: float, current: int) -> int:
    """How far behind the data nodes' iteration a replica may look and still be a source: the
    iterations read are up to a few heartbeats old each, which on a fast pipeline is many (stage 1
    at 5 iterations a second looked 4 behind the data node it kept pace with, and the spare rebuilt
    stage 2 by CheckFree instead of copying its swap partner). Past the first iterations a node
    at iteration 0 has not restored yet, however fast the run."""
    rates = [float(p.metrics.get("iterations_per_s", 0.0)) for p in data_nodes]
    rate = min(MAX_RATE, max((r for r in rates if math.isfinite(r) and r > 0), default=0.0))  # a peer's word
    slack = BEHIND_ITERATIONS + math.ceil(rate * STALE_HEARTBEATS * heartbeat_s)
    return min(slack, max(BEHIND_ITERATIONS, current - 1))


class SourcesUnreachable(RecoveryError):
    """None of the nodes asked gave their state: the view that named them is behind."""

    def __init__(self, message: str, nodes: Collection[bytes]):
        super().__init__(message)
        self.nodes = set(nodes)


RESTORE_PLANS = 4  # plans tried when the nodes a plan names turn out to be gone
BROKEN_STREAM_RETRIES = 2  # a source whose stream broke off mid-call is asked again this often
BROKEN_STREAM_PAUSE_S = 1.0


def _broken_stream(error: Exception) -> bool:
    """The call reached the source and its stream ended before the reply (node/rpc.py words it so):
    seen once in CI right as the restoring spare's connection to its live source was set up; a
    source that is gone fails to dial instead, and is not asked again."""
    return isinstance(error, SwarmCallError) and str(error).endswith("failed: IncompleteReadError")


async def _fetch_from_any(worker: PipelineWorker, nodes: list[bytes], weights_only: bool,
                          even_if_dead: bool = False) -> tuple[bytes, RemoteState]:
    reasons = []
    for node in nodes:
        async def call(args: dict, node=node) -> tuple[dict, dict]:
            return await worker.swarm.call(node, "pp.state", args, even_if_dead=even_if_dead)

        for retry in range(BROKEN_STREAM_RETRIES + 1):
            try:
                return node, await fetch_state(call, weights_only=weights_only)
            except (SwarmCallError, ValueError) as error:
                if retry < BROKEN_STREAM_RETRIES and _broken_stream(error):
                    logger.info("restoring stage %d: the state stream from %s broke off (%s); asking again",
                                worker.stage, node.hex()[:12], error)
                    await asyncio.sleep(BROKEN_STREAM_PAUSE_S)
                    continue
                reasons.append(f"{node.hex()[:12]}: {error}")
                break
    raise SourcesUnreachable(f"none of {len(nodes)} node(s) gave their state ({'; '.join(reasons)[:400]})", nodes)


class JobTaken(RecoveryError):
    """A spare came to rebuild a lost stage that has a live replica again."""


class RunOver(RecoveryError):
    """The run ended (every node that trained it left) before this node could restore its stage."""


async def restore(worker: PipelineWorker, method: str, swap: str, keep_inputs: Path | None = None,
                  fetched: Callable[[], None] | None = None, allow_replica: bool = True,
                  blockless_stages: Collection[int] = ()) -> dict | None:
    """Fill ``worker`` with its stage's state if the run is under way; returns what was done (also in
    ``worker.report.recoveries``), or None when the run has not started (every node begins from
    the same initial weights then). ``keep_inputs``: a folder where a rebuild leaves the neighbour
    weights and norms it used, so that it can be checked afterwards. A plan whose sources turn out
    to be gone (failures in quick succession) is made again without them."""
    began = time.time()
    unreachable: set[bytes] = set()
    for attempt in range(RESTORE_PLANS):
        planned = await _plan(worker, method, swap, allow_replica, blockless_stages, unreachable, began)
        if planned is None or isinstance(planned[0], dict):
            return None if planned is None else planned[0]
        plan, by_stage, current = planned
        logger.info("restoring stage %d: %s", worker.stage, plan.reason)
        record: dict = {"stage": worker.stage, "method": plan.method, "sources": list(plan.sources),
                        "reason": plan.reason}
        try:
            iteration = await _apply(worker, plan, by_stage, current, record, fetched, keep_inputs)
            break
        except SourcesUnreachable as error:
            if attempt + 1 == RESTORE_PLANS:
                raise
            # a source died after the view was read: plan again without it
            unreachable |= error.nodes
            logger.warning("restoring stage %d: %s; planning again without them", worker.stage, error)
    record.update(iteration=iteration, seconds=time.time() - began, at=time.time(),
                  weights=weights_hash(worker.module).hex())
    worker.report.recoveries.append(record)
    if keep_inputs is not None:
        keep_inputs.mkdir(parents=True, exist_ok=True)
        write_json(keep_inputs / f"stage{worker.stage}-recovery.json", record)
    _log_restored(record)
    return record


async def _plan(worker: PipelineWorker, method: str, swap: str, allow_replica: bool, blockless_stages: Collection[int],
                unreachable: set[bytes], began: float):
    """None when the run has not started; (record,) when a replica the view held dead answered and
    was copied; otherwise (plan, the source nodes by stage, the data nodes' iteration)."""
    # the last view and a fresh one together: a replica whose heartbeat is a moment late (a slow
    # DHT) still counts, so that its stage is copied rather than rebuilt (a fetch from a node that
    # really died fails, and the next plan leaves it out)
    last = {p.id: p for p in await worker.swarm.peers()}
    last.update({p.id: p for p in await worker.swarm.peers(fresh=True)})
    peers = [p for p in last.values() if p.role in ("data", "stage") and p.stage is not None and p.id != worker.me]
    iterations = [int(p.metrics.get("iteration", 0)) for p in peers]
    if not peers or max(iterations) == 0:
        # not under way, or the view is empty for a moment: the heartbeats of known nodes tell which
        known = [p for p in await worker.swarm.peers(live_only=False) if p.id != worker.me and p.stage is not None]
        if any(int(p.metrics.get("iteration", 0)) > 0 for p in known):
            if all(p.state == "LEAVING" for p in known if int(p.metrics.get("iteration", 0)) > 0):
                raise RunOver("the run is over: every node that trained it has left")
            raise RecoveryError("the run is under way, but no live node of it is in view yet")
        return None
    current = max((int(p.metrics.get("iteration", 0)) for p in peers if p.stage == 0), default=0)
    behind = behind_limit([p for p in peers if p.stage == 0], worker.settings.heartbeat_s, current)
    by_stage: dict[int, list[bytes]] = {}
    for p in peers:
        # a node that announced the stage but has not restored it yet (it restarted with the same
        # key, or restores it right now too) holds no trained state: it is no source
        if p.id not in unreachable and int(p.metrics.get("iteration", 0)) >= current - behind:
            by_stage.setdefault(p.stage, []).append(p.id)
    plan = plan_recovery(worker.stage, worker.settings.num_stages, swap, set(by_stage), method, blockless_stages)
    if plan.method == "replica" and not allow_replica:
        raise JobTaken(f"stage {worker.stage} has a live replica again")
    if plan.method != "replica" and allow_replica and method != "checkpoint":
        # before rebuilding, ask the stage's replicas that the view holds dead: one that answers lived
        silent = sorted(p.id for p in await worker.swarm.peers(live_only=False)
                        if p.stage == worker.stage and p.state == "DEAD" and p.role in ("data", "stage")
                        and p.id not in unreachable)
        if silent:
            try:
                node, remote = await _fetch_from_any(worker, silent, weights_only=False, even_if_dead=True)
            except RecoveryError:
                remote = None  # they are gone: rebuild
            if remote is not None and remote.iteration >= current - behind:
                logger.info("restoring stage %d: its replica %s answered though the view held it dead: copying it",
                            worker.stage, node.hex()[:12])
                worker.load_full_state(remote.state, remote.lr)
                await worker.begin_at(remote.iteration)
                record = {"stage": worker.stage, "method": "replica", "sources": [worker.stage], "from": [node.hex()],
                          "reason": "a replica the view held dead answered", "iteration": remote.iteration,
                          "lr": remote.lr if remote.lr is not None else worker.settings.lr,
                          "seconds": time.time() - began, "at": time.time(), "weights": weights_hash(worker.module).hex()}
                worker.report.recoveries.append(record)
                _log_restored(record)
                return (record,)
    return plan, by_stage, current


async def _apply(worker: PipelineWorker, plan, by_stage: dict[int, list[bytes]], current: int, record: dict,
                 fetched: Callable[[], None] | None, keep_inputs: Path | None) -> int:
    """Carry out ``plan``: fill the worker's stage, note the sources and lr in ``record``; returns
    the iteration the worker goes on from (it has begun it when this returns)."""
    num_stages = worker.settings.num_stages
    lr = worker.settings.lr
    if plan.method == "replica":
        node, remote = await _fetch_from_any(worker, sorted(by_stage[worker.stage]), weights_only=False)
        if fetched is not None:
            fetched()
        worker.load_full_state(remote.state, remote.lr)
        iteration, record["from"] = remote.iteration, [node.hex()]
        lr = remote.lr if remote.lr is not None else lr
    elif plan.method == "checkpoint":
        if worker.checkpoint_root is None:
            raise RecoveryError("the checkpoint baseline needs the checkpoint folder (--checkpoint-dir)")
        found = await asyncio.to_thread(latest_complete, worker.checkpoint_root, num_stages)
        if found is None:
            raise RecoveryError(f"no complete checkpoint in {worker.checkpoint_root}")
        state, lr = await asyncio.to_thread(load_checkpoint, worker.checkpoint_root, worker.stage, found)
        worker.load_full_state(state, lr)
        iteration = worker.skip_rollback_to = found
    elif plan.method == "random":
        iteration = current
        worker.load_rebuilt(worker.module.state_dict(), lr)
    else:
        sources: dict[int, dict[str, torch.Tensor]] = {}
        norms: dict[int, float] = {}
        record["from"], its = [], []
        for stage in plan.sources:
            if stage in sources:  # S = 2: stage 0 on both sides
                continue
            node, remote = await _fetch_from_any(worker, sorted(by_stage[stage]), weights_only=True)
            sources[stage] = {name[2:]: t for name, t in remote.state.items() if name.startswith("w/")}
            norms[stage] = remote.grad_norm if remote.grad_norm is not None else 0.0
            record["from"].append(node.hex())
            its.append(remote.iteration)
            record.setdefault("source_iterations", {})[str(stage)] = remote.iteration
            if fetched is not None:
                fetched()
        weights = rebuild_weights(plan, worker.module.state_dict(), sources, norms)
        lr = worker.settings.lr * (RECOVERY_LR_FACTOR if plan.method == "checkfree" else 1.0)
        worker.load_rebuilt(weights, lr)
        # no replica waits for us to reduce with it: start where the run is, not where a neighbour lags
        iteration = max(its + [current])
        record["norms"] = {str(s): n for s, n in norms.items()}
        if keep_inputs is not None:
            keep_inputs.mkdir(parents=True, exist_ok=True)
            for stage, tensors in sources.items():
                save_safetensors(keep_inputs / f"stage{worker.stage}-from{stage}.safetensors", tensors)
            save_safetensors(keep_inputs / f"stage{worker.stage}-rebuilt.safetensors", worker.module.state_dict())
    record["lr"] = lr
    await worker.begin_at(iteration)
    return iteration


def _log_restored(record: dict) -> None:
    logger.info("stage %d restored by %s at iteration %d in %.2f s (weights %s, from %s)", record["stage"],
                record["method"], record["iteration"], record["seconds"], record["weights"][:16],
                ",".join(node[:16] for node in record.get("from", [])) or "nobody")
