"""SPSA probes and the settings of a zo run; also a single-process trainer (the baseline).

Probe j of node n at step t: z = Rademacher(seed = hash(run, t, n, j)),
g = (L(w + eps z) - L(w - eps z)) / (2 eps) on one batch, sent as one byte.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from protocol.runspec import RunSpec
from trainer.zo.aggregate import Aggregation, update_of
from trainer.zo.bans import BanRule, newly_banned
from trainer.zo.quantize import Quantizer
from trainer.zo.replica import Replica
from trainer.zo.seeds import probe_seed, rounding_uniform

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class ZOSettings:
    steps: int = 100
    lr: float = 3e-3
    eps: float = 1e-3
    probes: int = 1
    batch_size: int = 8
    seq_len: int = 128
    params: tuple[str, ...] = ()
    quantizer: Quantizer = field(default_factory=Quantizer)
    aggregation: Aggregation = field(default_factory=Aggregation)
    bans: BanRule = field(default_factory=BanRule)
    min_nodes: int = 1
    step_timeout_s: float = 10.0
    hash_every: int = 10
    snapshot_every: int = 100

    @classmethod
    def from_spec(cls, spec: RunSpec) -> "ZOSettings":
        zo = spec.zo
        return cls(
            steps=spec.train.steps, lr=spec.train.lr, eps=zo.eps, probes=zo.probes, batch_size=spec.train.batch_size,
            seq_len=spec.model.seq_len, params=tuple(zo.params),
            quantizer=Quantizer(zo.quantizer, zo.g_max, zo.g_min),
            aggregation=Aggregation(zo.aggregation, zo.trim_fraction, zo.clip_factor),
            bans=BanRule(zo.ban_window, zo.ban_after),
            min_nodes=zo.min_nodes, step_timeout_s=zo.step_timeout_s, hash_every=zo.hash_every,
            snapshot_every=zo.snapshot_every,
        )


def batch_loss(model: torch.nn.Module, batch: Batch) -> float:
    with torch.no_grad():
        return float(model(*batch)[1])


def projected_gradient(replica: Replica, batch: Batch, seed: int, eps: float) -> float:
    """(L(w + eps z) - L(w - eps z)) / (2 eps); the working copy is left at the committed weights."""
    try:
        replica.perturb(seed, eps)
        plus = batch_loss(replica.model, batch)
        replica.perturb(seed, -eps)
        minus = batch_loss(replica.model, batch)
    finally:
        replica.restore()
    return (plus - minus) / (2 * eps)


def quantized_probe(replica: Replica, batch: Batch, seed: int, settings: ZOSettings) -> int:
    """The one byte for probe ``seed``. A non-finite loss difference sends 0 (no pull either way)."""
    g = projected_gradient(replica, batch, seed, settings.eps)
    if not math.isfinite(g):
        g = 0.0
    return settings.quantizer.encode(g, rounding_uniform(seed))


def evaluate(model: torch.nn.Module, batches: Sequence[Batch]) -> float:
    return sum(batch_loss(model, b) for b in batches) / len(batches)


@dataclass
class LocalResult:
    losses: list[tuple[int, float, float]]  # (step, seconds since start, validation loss)
    steps_per_s: float
    weights_hash: bytes
    banned: dict[bytes, int] = field(default_factory=dict)  # node -> the first step without it


@dataclass(frozen=True)
class _Scalar:  # what trainer.zo.bans reads of a contribution
    sender: bytes
    q: int


@dataclass(frozen=True)
class _Step:  # ... and of a commit
    contributions: tuple[_Scalar, ...]


def train_local(
    replica: Replica,
    settings: ZOSettings,
    run_id: bytes,
    node_ids: Sequence[bytes],
    data: Sequence[Iterator[Batch]],
    val: Sequence[Batch],
    eval_every: int = 10,
    tamper: Callable[[int, bytes, int], int] | None = None,
) -> LocalResult:
    """SPSA in one process with the swarm's arithmetic: ``node_ids`` play the nodes (node n draws
    from ``data[n]``); each step commits every node's probes in (node, sample) order, and bans
    nodes as a committer would (trainer/zo/bans.py). ``tamper(step, node, q)`` lets a test play a
    malicious node."""
    losses = [(0, 0.0, evaluate(replica.model, val))]
    start = time.perf_counter()
    steps: list[_Step] = []
    banned: dict[bytes, int] = {}
    for step in range(settings.steps):
        for node in newly_banned(steps[-settings.bans.window:], tuple(banned), settings.aggregation,
                                 settings.quantizer, settings.bans):
            banned[node] = step
        entries = []
        for node, batches in sorted(zip(node_ids, data), key=lambda item: item[0]):
            if node in banned:
                continue
            for sample in range(settings.probes):
                q = quantized_probe(replica, next(batches), probe_seed(run_id, step, node, sample), settings)
                if tamper is not None:
                    q = tamper(step, node, q)
                entries.append((node, sample, q))
        steps.append(_Step(tuple(_Scalar(node, q) for node, _, q in entries)))
        seeds, coeffs = update_of(entries, run_id, step, settings.lr, settings.quantizer, settings.aggregation)
        replica.apply(seeds, coeffs)
        if (step + 1) % eval_every == 0 or step + 1 == settings.steps:
            losses.append((step + 1, time.perf_counter() - start, evaluate(replica.model, val)))
    elapsed = time.perf_counter() - start
    return LocalResult(losses, settings.steps / elapsed if elapsed > 0 else 0.0, replica.weights_hash(), banned)
