"""From a commit's bytes to the update every replica applies: w <- w - lr * sum_k a_k z_k.

Pure and deterministic: the same commit gives the same seeds and fp32 coefficients on every
machine. Everything here is Python doubles with +, -, *, / and sqrt only (all correctly rounded
by IEEE 754), in commit order, so replicas compute the same bits; the one rounding to fp32
happens in the kernel's input.

Contribution k of a commit is the vector u_k = g_k z_k (its scalar times its Rademacher
direction). The robust options decide the a_k:
- mean:    a_k = g_k / K.
- trimmed: drop the floor(f * K) smallest and largest g_k (ties broken by commit position),
           a_k = g_k / (K - 2 floor(f * K)) for the rest.
- clip:    CenteredClip (Karimireddy, He & Jaggi 2021; the aggregator of BTARD, Gorbunov et al.
           2022) on the vectors u_k: v <- v + (1/K) sum_k (u_k - v) min(1, tau / ||u_k - v||),
           iterated to its fixed point v = sum_k (w_k / W) u_k, W = sum_k w_k. Directions of d
           Rademacher signs are orthogonal to within 1/sqrt(d) (d = trained elements, 16,384 in
           the tiny preset), so with v = sum_j a_j z_j the distance is
           ||u_k - v||^2 / d = (g_k - a_k)^2 + sum_{j != k} a_j^2: the iteration runs on the K
           coefficients, exactly, without touching the weights. tau = clip_factor x median_k |g_k|
           (honest scalars are centred on 0: E[z . grad] = 0), so a minority cannot move it far.
           A clipped peer pulls at most tau / W; one that sends tau every time is bounded the same.
One-byte scalars are already bounded by g_max; these bound a minority's pull further.

A scalar is an *outlier* when |g_k| > tau (the clip radius, for either robust option); nodes
whose scalars are outliers again and again are banned (trainer/zo/bans.py).
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from trainer.zo.quantize import Quantizer
from trainer.zo.seeds import probe_seed

AGGREGATIONS = ("mean", "trimmed", "clip")
CLIP_ITERATIONS = 20  # each shrinks the distance to the fixed point by 1 - W/K (about 0.2 with a few clipped)


@dataclass(frozen=True)
class Aggregation:
    method: str = "mean"
    trim_fraction: float = 0.25
    clip_factor: float = 3.0

    def __post_init__(self) -> None:
        if self.method not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.method!r}")

    @property
    def robust(self) -> bool:
        return self.method != "mean"

    def radius(self, g: Sequence[float]) -> float:
        """tau = clip_factor x median |g_k|: the clip radius and the outlier threshold."""
        return self.clip_factor * statistics.median(abs(x) for x in g) if g else 0.0

    def outliers(self, g: Sequence[float]) -> list[bool]:
        """Which scalars lie beyond the clip radius (none with ``mean``, which takes all as sent)."""
        if not self.robust or not g:
            return [False] * len(g)
        tau = self.radius(g)
        return [abs(x) > tau for x in g]

    def combine(self, g: Sequence[float]) -> tuple[list[float], float]:
        """Scalars s_k and a divisor D with a_k = s_k / D, in commit order (a dropped scalar is 0.0)."""
        k = len(g)
        if k == 0:
            return [], 0
        if self.method == "trimmed":
            cut = int(self.trim_fraction * k)
            if cut == 0 or k - 2 * cut < 1:
                return list(g), k
            order = sorted(range(k), key=lambda i: (g[i], i))
            dropped = set(order[:cut]) | set(order[k - cut :])
            return [0.0 if i in dropped else g[i] for i in range(k)], k - 2 * cut
        if self.method == "clip":
            return centered_clip(g, self.radius(g))
        return list(g), k


def centered_clip(g: Sequence[float], tau: float) -> tuple[list[float], float]:
    """CenteredClip's fixed point on u_k = g_k z_k with orthogonal directions: (w_k g_k, W)."""
    k = len(g)
    if tau <= 0.0:  # more than half of the scalars are exactly 0: the robust update is no update
        return [0.0] * k, k
    a = [0.0] * k
    weights = [1.0] * k
    for _ in range(CLIP_ITERATIONS):
        total_sq = 0.0
        for x in a:
            total_sq += x * x
        for i in range(k):
            diff = g[i] - a[i]
            dist = math.sqrt(max(0.0, diff * diff + total_sq - a[i] * a[i]))
            weights[i] = 1.0 if dist <= tau else tau / dist
        w_sum = 0.0
        for w in weights:
            w_sum += w
        a = [a[i] * (1.0 - w_sum / k) + weights[i] * g[i] / k for i in range(k)]
    w_sum = 0.0
    for w in weights:
        w_sum += w
    return [weights[i] * g[i] for i in range(k)], w_sum


def update_of(
    entries: Sequence[tuple[bytes, int, int]],
    run_id: bytes,
    step: int,
    lr: float,
    quantizer: Quantizer,
    aggregation: Aggregation,
) -> tuple[list[int], list[float]]:
    """Seeds and coefficients c_k = -lr * s_k / D for the (sender, sample, q) entries of a commit.

    Entries whose scalar ends up 0 (trimmed away, or quantized to zero) are left out: adding +-0
    changes nothing, and skipping it saves a pass."""
    g = [quantizer.decode(q) for _, _, q in entries]
    scalars, divisor = aggregation.combine(g)
    seeds, coeffs = [], []
    for (sender, sample, _), value in zip(entries, scalars):
        if value == 0.0 or divisor == 0:
            continue
        seeds.append(probe_seed(run_id, step, sender, sample))
        coeffs.append(-lr * value / divisor)
    return seeds, coeffs
