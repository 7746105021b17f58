"""Wiring of a zo worker into a node process: base weights, data, the worker loop, the report file."""
from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from node.runner import Node
from node.swarm_adapter import HivemindSwarm
from protocol.runspec import RunSpec
from trainer.data import batches, load_domain, split_domain
from trainer.files import write_json
from trainer.model import LM, ModelConfig
from trainer.zo.attacks import parse_attack
from trainer.zo.quantize import Quantizer
from trainer.zo.replica import Replica
from trainer.zo.spsa import Batch, ZOSettings
from trainer.zo.worker import RECORD_NAMES, STEP_METRIC, ZOReport, ZOWorker

logger = logging.getLogger(__name__)

VAL_BATCHES_PER_DOMAIN = 2
FAULTS = ("max-scalar", "sign-flip", "alie", "alie-Z", "corrupt-at-STEP")


class BaseWeightsError(ValueError):
    """Base weights that cannot be read or do not fit the run's model."""


def build_replica(spec: RunSpec, base_weights: str = "", device: str = "cpu") -> tuple[Replica, bytes]:
    """The run's model at its base weights (a file, or the init from train.seed) and their hash; the
    weights and the master copy live on ``device`` (the init is drawn on the CPU, so every device
    starts from the same bits)."""
    model = LM(ModelConfig.from_preset(spec.model.preset), seed=spec.train.seed).to(device)
    replica = Replica(model, spec.zo.params)
    if base_weights:
        path = Path(base_weights)
        try:
            # mmap: replicas on one machine share the file's pages instead of each holding a copy
            state = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
        except FileNotFoundError:
            raise BaseWeightsError(f"base weights file {path} does not exist") from None
        except IsADirectoryError:
            raise BaseWeightsError(f"base weights {path} is a directory; pass the file written by torch.save") from None
        except Exception as error:  # noqa: BLE001 - any unreadable file gets the same one-line answer
            raise BaseWeightsError(f"cannot read base weights {path}: not a torch.save file of tensors only "
                                   f"({type(error).__name__}); write it with torch.save(model.state_dict(), path)") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise BaseWeightsError(f"{path} is not a state dict of tensors")
        try:
            replica.load_state(state)
        except Exception as error:  # noqa: BLE001
            raise BaseWeightsError(f"{path} does not fit preset {spec.model.preset}: {error}") from None
    base_hash = replica.weights_hash()
    if spec.zo.base_hash and base_hash.hex() != spec.zo.base_hash:
        logger.warning("these base weights hash to %s, the run's are %s: this node will join by snapshot",
                       base_hash.hex()[:16], spec.zo.base_hash[:16])
    return replica, base_hash


def node_data(spec: RunSpec, node_id: bytes, device: str = "cpu") -> tuple[Iterator[Batch], list[Batch]]:
    """This node's endless training batches (its own random windows) and the run's fixed validation
    batches, on ``device``."""
    train, val = [], []
    for source in spec.data.domains:
        split = split_domain(load_domain(source), spec.data.val_fraction, seed=spec.train.seed)
        train.append(split.train)
        val_iter = batches(split.val, spec.train.batch_size, spec.model.seq_len, seed=spec.train.seed)
        val.extend(next(val_iter) for _ in range(VAL_BATCHES_PER_DOMAIN))
    data_seed = int.from_bytes(hashlib.blake2b(node_id, digest_size=8).digest(), "little") >> 1
    stream = batches(torch.cat(train), spec.train.batch_size, spec.model.seq_len, seed=data_seed)
    if device == "cpu":
        return stream, val
    return ((x.to(device), y.to(device)) for x, y in stream), [(x.to(device), y.to(device)) for x, y in val]


def parse_fault(name: str | None, seed: int, quantizer: Quantizer | None = None) -> dict:
    """Testing only. Byzantine scalars (trainer/zo/attacks.py): ``max-scalar`` (the largest
    magnitude, random sign), ``sign-flip`` (-g), ``alie`` or ``alie-Z`` (a little is enough: Z
    standard deviations of the previous commit's scalars against descent, Z = 1.5 by default).
    ``corrupt-at-STEP``: one committed weight changes silently at STEP."""
    if not name:
        return {}
    attack = parse_attack(name, quantizer or Quantizer(), seed)
    if attack is not None:
        return {"tamper": attack}
    if name.startswith("corrupt-at-") and name[len("corrupt-at-"):].isdigit():
        return {"corrupt_at": int(name[len("corrupt-at-"):])}
    raise ValueError(f"unknown fault {name!r}; known: {', '.join(FAULTS)}")


async def run_zo_worker(node: Node, stop: asyncio.Event, base_weights: str = "", join: str = "auto",
                        report_path: Path | None = None, fault: str | None = None) -> ZOReport:
    """Run the zo worker on a started node until the run's steps are done (or ``stop``); then set ``stop``."""
    spec = node.spec
    torch.set_num_threads(1)
    settings = ZOSettings.from_spec(spec)
    replica, base_hash = await asyncio.to_thread(build_replica, spec, base_weights, node.device)
    data, val = await asyncio.to_thread(node_data, spec, node.public_key, node.device)
    await node.online.wait()
    loop = asyncio.get_running_loop()

    def publish_event(event: str, detail: str) -> None:
        loop.create_task(node.report_event(event, detail))

    worker = ZOWorker(HivemindSwarm(node), node.key, node.run_id, settings, replica, data, val,
                      base_hash=base_hash, state_dir=Path(node.config.data_dir) / "zo" / node.run_id.hex(),
                      join=join, retry_s=min(0.5, node.timeouts.heartbeat_interval_s / 4),
                      publish_event=publish_event,
                      **parse_fault(fault, int.from_bytes(node.public_key[:8], "little"), settings.quantizer))

    async def track_step() -> None:
        while not stop.is_set():
            node.step = worker.log.head_step
            node.metrics[STEP_METRIC] = float(worker.log.head_step)
            if worker.report.losses:
                node.metrics["val_loss"] = worker.report.losses[-1][2]
            done = worker.log.head_step - worker.report.start_step
            if node.rpc is not None and done > 0:  # what the status page shows as bytes per step
                node.metrics["bytes_per_step"] = node.rpc.stats.sent / done
            try:
                await asyncio.wait_for(stop.wait(), node.timeouts.heartbeat_interval_s)
            except TimeoutError:
                pass

    tracker = asyncio.create_task(track_step())
    node.serving = True
    try:
        report = await worker.run(stop)
    finally:
        node.serving = False
        tracker.cancel()
    if report_path is not None:
        rpc = node.rpc.stats if node.rpc is not None else None
        out = {
            "node": node.id, "steps": worker.log.head_step, "start_step": report.start_step,
            "joined_by": report.joined_by, "weights_hash": replica.weights_hash().hex(),
            "head": worker.log.head_hash.hex(), "losses": report.losses, "hashes": report.hashes,
            "resyncs": report.resyncs, "committed": report.committed, "late": report.late,
            "seconds": report.seconds, "steps_applied": report.steps_applied,
            "rpc_sent": rpc.sent if rpc else 0, "rpc_received": rpc.received if rpc else 0,
            "banned": report.banned, "banned_at": report.banned_at,
            "num_trained": replica.num_trained, "num_params": sum(p.numel() for p in replica.params.values()),
        }
        write_json(report_path, out)
    stop.set()
    return report


__all__ = ["RECORD_NAMES", "build_replica", "node_data", "run_zo_worker", "BaseWeightsError"]
