"""Wiring of the expert worker into a node process: jobs, data, the checkpoint store, status, the report."""
from __future__ import annotations

import asyncio
import logging
import math
from pathlib import Path

import torch

from ensemble.board import RECORD_NAMES
from ensemble.checkpoint import CheckpointStore
from ensemble.data import three_way_split
from ensemble.jobs import ExpertJob, jobs_from_spec
from ensemble.worker import ExpertWorker, WorkerSettings
from node.runner import Node
from node.swarm_adapter import HivemindSwarm
from protocol.messages import NodeState
from protocol.runspec import RunSpec
from trainer.files import write_json

logger = logging.getLogger(__name__)

FAULTS = ("tamper-checkpoints",)


def parse_fault(fault: str | None) -> dict:
    """Testing only. ``tamper-checkpoints``: serve forged checkpoints (a weight changed, the parts'
    hashes fixed up, the original digest claimed)."""
    if not fault:
        return {}
    if fault == "tamper-checkpoints":
        return {"tamper": True}
    raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FAULTS)}")


def store_dir(data_dir: str, run_id: bytes) -> Path:
    return Path(data_dir) / "experts" / run_id.hex() / "checkpoints"


def _train_data(spec: RunSpec):
    cache: dict[str, torch.Tensor] = {}

    def train(job: ExpertJob) -> list[torch.Tensor]:
        for source in job.domains:
            if source not in cache:
                cache[source] = three_way_split(source, spec.data.val_fraction, spec.experts.prior_fraction,
                                                spec.train.seed).train
        return [cache[source] for source in job.domains]

    return train


async def run_expert_worker(node: Node, stop: asyncio.Event, report_path: Path | None = None,
                            fault: str | None = None) -> None:
    """Claim and train expert jobs until ``stop``; once every job is done, keep serving checkpoints."""
    spec = node.spec
    torch.set_num_threads(1)
    jobs = jobs_from_spec(spec)
    faults = parse_fault(fault)
    await node.online.wait()
    loop = asyncio.get_running_loop()
    settings = WorkerSettings(batch_size=spec.train.batch_size, seq_len=spec.model.seq_len,
                              checkpoint_every=spec.experts.checkpoint_every, lease_s=spec.experts.lease_s,
                              replicas=spec.experts.replicas, interval_s=node.timeouts.heartbeat_interval_s,
                              barrier_s=node.timeouts.averaging_s, run_seed=spec.train.seed, device=node.device,
                              **faults)
    store = CheckpointStore(store_dir(node.config.data_dir, node.run_id))

    def status(job: str | None, step: int, steps: int, loss: float) -> None:
        if job != node.expert:
            node.expert = job
            loop.create_task(node.announce(NodeState.ONLINE if node.state == NodeState.ONLINE else node.state))
        node.step = step
        node.metrics.update(expert_step=float(step), expert_steps=float(steps))
        if math.isfinite(loss):
            node.metrics["loss"] = loss

    def publish_event(event: str, detail: str) -> None:
        loop.create_task(node.report_event(event, detail))

    worker = ExpertWorker(HivemindSwarm(node), jobs, settings, store, _train_data(spec), status, publish_event)

    def save_report(body: dict) -> bool:
        try:
            write_json(report_path, body)
            return True
        except OSError as error:  # a full disk: the next write may fit
            logger.warning("report not written: %s", error)
            return False

    async def write_report() -> None:
        last = None
        while not stop.is_set():
            body = report_body(node, worker)
            if body != last and save_report(body):
                last = body
            try:
                await asyncio.wait_for(stop.wait(), node.timeouts.heartbeat_interval_s)
            except TimeoutError:
                pass

    writer = asyncio.create_task(write_report()) if report_path is not None else None
    try:
        await worker.run(stop)
    finally:
        if writer is not None:
            writer.cancel()
            save_report(report_body(node, worker))


def report_body(node: Node, worker: ExpertWorker) -> dict:
    r = worker.report
    return {"node": node.id, "jobs": r.jobs, "mirrored": r.mirrored, "rejected": r.rejected, "averaged": r.averaged,
            "averaging_failed": r.averaging_failed, "all_done": r.all_done,
            "own": {worker.jobs[j].name: {"step": c.step, "digest": c.digest.hex(), "done": c.done}
                    for j, c in worker.own.items()},
            "keeps": {worker.jobs[j].name: {"step": h.step, "digest": h.digest.hex(), "done": h.done}
                      for j, h in worker.mirror_of.items()}}


__all__ = ["RECORD_NAMES", "run_expert_worker", "parse_fault", "store_dir"]
