"""Planning an experts run: judge each domain's difficulty, derive both allocations, sign the spec.

Difficulty is the loss of a shared seed model (one base-shaped model trained ``seed_steps`` on all
domains, before any expert) on each domain's prior split, or, without a seed model, zlib's bits per
byte on its training split. Both allocations and the difficulties that produced them go into the
spec, so anyone can re-derive the plan from it (``allocation.allocate``).

The experts start from scratch, not from the seed: heterogeneous experts differ in width, so most
of them could not take the seed's weights anyway, and the comparison stays fair.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ensemble.allocation import Allocation, allocate, zlib_difficulty
from ensemble.data import DomainSplits, job_batches, stream_seed, three_way_split, windows
from ensemble.jobs import DENSE, ExpertJob, expert_model
from ensemble.train import ExpertTrainer
from protocol.runspec import DENSE_DOMAIN, ExpertSpec, ExpertsSection

logger = logging.getLogger(__name__)

SEED_EVAL_TOKENS = 8192


@dataclass(frozen=True)
class PlanSettings:
    domains: tuple[str, ...]
    preset: str = "tiny"
    base_steps: int = 200  # steps of each homogeneous expert; they set the budget
    lr: float = 3e-3
    heterogeneity: str = "both"
    sharpness: float = 1.0
    seed_steps: int = 0  # 0: judge difficulty by zlib
    dense: bool = True
    checkpoint_every: int = 20
    lease_s: float = 30.0
    replicas: int = 2
    prior_fraction: float = 0.05
    val_fraction: float = 0.1
    batch_size: int = 8
    seq_len: int = 128
    seed: int = 0


def seed_difficulty(settings: PlanSettings, splits: Sequence[DomainSplits],
                    progress: Callable[[str], None] | None = None) -> list[float]:
    """Train the shared seed model on all domains; its mean loss on each domain's prior split."""
    spec = ExpertSpec(domain=DENSE_DOMAIN, preset=settings.preset, steps=settings.seed_steps, lr=settings.lr)
    job = ExpertJob(-1, "seed", DENSE, settings.domains, expert_model(spec), settings.seed_steps, settings.lr)
    trainer = ExpertTrainer(job, seed=settings.seed)
    batches = job_batches([s.train for s in splits], settings.batch_size, settings.seq_len,
                          stream_seed(settings.seed, "seed"))
    while not trainer.done:
        loss = trainer.train_steps(50, batches)
        if progress is not None:
            progress(f"seed model step {trainer.step}/{job.steps}: training loss {loss:.3f}")
    losses = []
    trainer.model.eval()
    with torch.no_grad():
        for split in splits:
            inputs, targets = windows(split.prior, settings.seq_len, SEED_EVAL_TOKENS)
            total = sum(float(trainer.model(inputs[i : i + 16], targets[i : i + 16])[1]) * len(inputs[i : i + 16])
                        for i in range(0, len(inputs), 16))
            losses.append(total / len(inputs))
    return losses


def plan(settings: PlanSettings, progress: Callable[[str], None] | None = None) -> tuple[ExpertsSection, Allocation]:
    """The experts section of the run spec (both allocations, the difficulties behind them)."""
    splits = [three_way_split(d, settings.val_fraction, settings.prior_fraction, settings.seed)
              for d in settings.domains]
    if settings.seed_steps > 0:
        difficulty, source = seed_difficulty(settings, splits, progress), "seed"
    else:
        difficulty = [zlib_difficulty(bytes(s.train.numpy().tobytes())) for s in splits]
        source = "zlib"
    difficulty = [round(d, 6) for d in difficulty]  # what the spec records is what the plan came from
    allocation = allocate(list(settings.domains), difficulty, preset=settings.preset, base_steps=settings.base_steps,
                          lr=settings.lr, heterogeneity=settings.heterogeneity, sharpness=settings.sharpness,
                          dense=settings.dense)
    section = ExpertsSection(
        heterogeneous=allocation.heterogeneous, homogeneous=allocation.homogeneous, dense=allocation.dense,
        budget=allocation.budget, heterogeneity=settings.heterogeneity, difficulty=difficulty,
        difficulty_source=source, seed_steps=settings.seed_steps, checkpoint_every=settings.checkpoint_every,
        lease_s=settings.lease_s, replicas=settings.replicas, prior_fraction=settings.prior_fraction)
    return section, allocation


def section_overrides(section: ExpertsSection) -> dict:
    """The section as the nested dicts ``protocol.runspec.make_spec(experts=...)`` takes."""
    return dataclasses.asdict(section)
