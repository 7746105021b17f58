"""Wiring of a pipeline worker into a node process: the stage's module, data for data nodes, the report."""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from pathlib import Path

import torch

from node.runner import Node
from node.swarm_adapter import HivemindSwarm
from protocol.runspec import RunSpec
from trainer.data import batches, load_domain, split_domain
from trainer.model import ModelConfig, build_stage, stage_block_ranges
from trainer.pipeline.leader import SCHEDULE_RECORD, Leader, LeaderSettings
from trainer.pipeline.runtime import PipelineSettings, PipelineWorker

RECORD_NAMES = (SCHEDULE_RECORD,)

logger = logging.getLogger(__name__)


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
    """Testing only: ``kill-after-forwards-N`` makes a stage node SIGKILL itself on its (N+1)-th forward."""
    if not fault:
        return {}
    prefix = "kill-after-forwards-"
    if fault.startswith(prefix) and fault[len(prefix):].isdigit():
        return {"die_after_forwards": int(fault[len(prefix):])}
    raise ValueError(f"unknown fault {fault!r}; known: {prefix}N")


async def run_pipeline_worker(node: Node, stop: asyncio.Event, report_path: Path | None = None,
                              fault: str | None = None) -> None:
    """Run the node's stage until the run's iterations are done (or ``stop``); then set ``stop``."""
    spec = node.spec
    torch.set_num_threads(1)
    await node.online.wait()
    assert node.role is not None and node.role.stage is not None
    stage = node.role.stage
    module = (await asyncio.to_thread(stage_module, spec, stage)).to(node.device)
    data = await asyncio.to_thread(data_stream, spec, node.public_key) if stage == 0 else None
    pipe = spec.pipeline
    settings = PipelineSettings(num_stages=pipe.stages, path_length=pipe.path_length, swap=pipe.swap,
                                microbatches=pipe.microbatches, memory=pipe.memory, iterations=spec.train.steps,
                                lr=spec.train.lr, retry_s=min(0.5, node.timeouts.heartbeat_interval_s / 4),
                                use_leader=pipe.planner == "leader",
                                activation_dtype=getattr(torch, pipe.activation_dtype))
    swarm = HivemindSwarm(node)
    worker = PipelineWorker(swarm, stage, module, settings, data, **parse_fault(fault))
    cfg = ModelConfig.from_preset(spec.model.preset)
    leader = Leader(swarm, LeaderSettings(
        microbatches=pipe.microbatches, microbatch_size=pipe.microbatch_size, memory=pipe.memory,
        path_length=pipe.path_length, num_stages=pipe.stages, layers_per_stage=max(1, cfg.n_layers // pipe.stages),
        activation_bytes_per_sample=spec.model.seq_len * cfg.d_model * getattr(torch, pipe.activation_dtype).itemsize,
        period_s=node.timeouts.heartbeat_interval_s * 2, policy=pipe.schedule), stage)
    # before the first iteration: min_nodes live and a replica of every stage, so that the replicas of
    # a stage reduce together from the start
    waiting_since = time.monotonic()
    while not stop.is_set():
        replicas = await worker._replicas(fresh=True)
        live = sum(map(len, replicas.values()))
        missing = [s for s in range(pipe.stages) if not replicas.get(s)]
        if not missing and live >= pipe.min_nodes:
            await worker._replicas(fresh=True)  # one more look: others may be a heartbeat behind us
            break
        if time.monotonic() - waiting_since > 30:
            waiting_since = time.monotonic()
            logger.info("waiting to start: %d of pipeline.min_nodes=%d nodes live%s", live, pipe.min_nodes,
                        f", no replica of stage(s) {missing}" if missing else "")
        await asyncio.sleep(settings.retry_s * 2)
    started = time.time()

    async def publish_metrics() -> None:
        """What observers see in this node's heartbeats."""
        while not stop.is_set():
            r = worker.report
            node.step = worker.iteration
            node.metrics.update(iteration=float(worker.iteration), compute_s=r.compute_s,
                                compute_ms_per_microbatch=1000 * r.compute_s / max(1, r.microbatches),
                                bytes_sent=float(node.rpc.stats.sent if node.rpc else 0))
            if r.losses:
                node.metrics["loss"] = r.losses[-1][2]
            if stage == 0:
                node.metrics["tokens_per_s"] = r.tokens / max(1e-9, time.time() - started)
            try:
                await asyncio.wait_for(stop.wait(), node.timeouts.heartbeat_interval_s)
            except TimeoutError:
                pass

    metrics = asyncio.create_task(publish_metrics())
    leading = asyncio.create_task(leader.run(stop)) if pipe.planner == "leader" else None
    try:
        report = await worker.run(stop)
    finally:
        metrics.cancel()
        if leading is not None:
            leading.cancel()
    if report_path is not None:
        out = {"node": node.id, "stage": stage, "iterations": report.iterations, "losses": report.losses,
               "hashes": report.hashes, "planned": report.planned, "executed": report.executed,
               "served": report.served, "rerouted": report.rerouted, "skipped": report.skipped,
               "resyncs": report.resyncs, "seconds": report.seconds, "compute_s": report.compute_s,
               "plans": report.plans, "published": leader.published, "phases": report.phases,
               "tokens": report.tokens, "bytes_sent": node.rpc.stats.sent if node.rpc else 0}
        tmp = report_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(out))
        tmp.replace(report_path)
    stop.set()
