"""Heterogeneous and homogeneous allocations of one compute budget (sum of parameters x steps).

The homogeneous ensemble gives every domain the base shape and the same number of steps; its total
is the budget. The heterogeneous ensemble (HDEE) spends the same budget unevenly: domains are ranked
by difficulty (the seed model's loss on them, or how badly zlib compresses them), and

- ``steps``: every expert keeps the base shape, and a domain's share of the budget grows with its
  difficulty (share proportional to difficulty ** sharpness),
- ``sizes``: the easiest domains get a narrower expert, the hardest a wider one, all with the same steps,
- ``both``: the wider experts for the harder domains, and the budget shared by difficulty.

Steps are whole numbers, so the heterogeneous total can differ from the budget by at most half a
step of its largest expert; ``equalize`` puts the remainder on the expert with the most compute.
The dense baseline is one base-shaped model on all domains with the same budget.
"""
from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from protocol.runspec import DENSE_DOMAIN, HETEROGENEITY, ExpertSpec
from trainer.model import PRESETS

from ensemble.jobs import expert_model

SIZE_FACTORS = (0.75, 1.0, 1.25)  # widths of the easy, middle and hard experts, relative to the base


@dataclass(frozen=True)
class Allocation:
    heterogeneous: list[ExpertSpec]
    homogeneous: list[ExpertSpec]
    dense: list[ExpertSpec]
    budget: int


def params(expert: ExpertSpec) -> int:
    return expert_model(expert).param_count()


def compute(experts: Sequence[ExpertSpec]) -> int:
    return sum(params(e) * e.steps for e in experts)


def scaled_width(preset: str, factor: float) -> int:
    """The preset's d_model times ``factor``, rounded to whole heads (at least one)."""
    base = PRESETS[preset]
    heads = max(1, round(base.d_model * factor / base.head_dim))
    return heads * base.head_dim


def difficulty_ranks(difficulty: Sequence[float]) -> list[int]:
    """Rank of each domain, 0 = easiest; ties keep the domains' order."""
    order = sorted(range(len(difficulty)), key=lambda i: (difficulty[i], i))
    ranks = [0] * len(difficulty)
    for rank, i in enumerate(order):
        ranks[i] = rank
    return ranks


def size_groups(difficulty: Sequence[float]) -> list[int]:
    """0 (narrow), 1 (base) or 2 (wide) per domain: the easiest get 0, the hardest 2."""
    count = len(difficulty)
    if count == 1:
        return [1]
    return [round(rank * 2 / (count - 1)) for rank in difficulty_ranks(difficulty)]


def shares(difficulty: Sequence[float], sharpness: float) -> list[float]:
    """Each domain's fraction of the budget: proportional to difficulty ** sharpness."""
    if any(d <= 0 for d in difficulty):
        raise ValueError("difficulties must be positive")
    weights = [d ** sharpness for d in difficulty]
    return [w / sum(weights) for w in weights]


def equalize(experts: list[ExpertSpec], budget: int) -> list[ExpertSpec]:
    """Move the rounding remainder onto the expert with the most compute (whole steps, at least 1)."""
    biggest = max(range(len(experts)), key=lambda i: (params(experts[i]) * experts[i].steps, -i))
    rest = budget - compute(experts)
    steps = max(1, experts[biggest].steps + round(rest / params(experts[biggest])))
    out = list(experts)
    out[biggest] = dataclasses.replace(experts[biggest], steps=steps)
    return out


def allocate(domains: Sequence[str], difficulty: Sequence[float], *, preset: str, base_steps: int, lr: float,
             heterogeneity: str = "both", sharpness: float = 1.0, dense: bool = True) -> Allocation:
    """The homogeneous plan (base shape, ``base_steps`` each), the heterogeneous plan of the same total
    compute, and the dense model of that compute."""
    if heterogeneity not in HETEROGENEITY:
        raise ValueError(f"heterogeneity must be one of {', '.join(HETEROGENEITY)}, not {heterogeneity!r}")
    if len(difficulty) != len(domains) or not domains:
        raise ValueError("one difficulty per domain, and at least one domain")
    if base_steps < 1:
        raise ValueError("base_steps must be at least 1")
    base = ExpertSpec(domain="", preset=preset, steps=base_steps, lr=lr)
    homogeneous = [dataclasses.replace(base, domain=d) for d in domains]
    budget = compute(homogeneous)
    groups = size_groups(difficulty) if heterogeneity != "steps" else [1] * len(domains)
    widths = [scaled_width(preset, SIZE_FACTORS[g]) for g in groups]
    shaped = [dataclasses.replace(base, domain=d, d_model=w if w != PRESETS[preset].d_model else 0)
              for d, w in zip(domains, widths)]
    if heterogeneity == "sizes":
        steps = budget / sum(params(e) for e in shaped)
        heterogeneous = [dataclasses.replace(e, steps=max(1, round(steps))) for e in shaped]
    else:
        fractions = shares(difficulty, sharpness)
        heterogeneous = [dataclasses.replace(e, steps=max(1, round(budget * f / params(e))))
                         for e, f in zip(shaped, fractions)]
    heterogeneous = equalize(heterogeneous, budget)
    dense_plan = []
    if dense:
        one = dataclasses.replace(base, domain=DENSE_DOMAIN)
        dense_plan = [dataclasses.replace(one, steps=max(1, round(budget / params(one))))]
    return Allocation(heterogeneous, homogeneous, dense_plan, budget)


def zlib_difficulty(data: bytes, max_bytes: int = 1 << 18) -> float:
    """Bits per byte that zlib (level 9) needs for the first ``max_bytes`` of a domain: a difficulty
    judged without training anything."""
    sample = data[:max_bytes]
    if not sample:
        raise ValueError("an empty domain has no difficulty")
    return 8.0 * len(zlib.compress(sample, 9)) / len(sample)
