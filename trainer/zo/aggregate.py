"""From a commit's bytes to the update every replica applies: w <- w - lr * mean_k(g_k z_k).

Pure and deterministic: the same commit gives the same seeds and fp32 coefficients on every
machine (Python floats are IEEE doubles; the one rounding to fp32 happens in the kernel's input).

Robust options act on the scalars before the mean, in commit order:
- mean:    g_k as sent.
- trimmed: drop the floor(f * K) smallest and largest g_k (ties broken by commit position),
           average the rest.
- clip:    centered clip: g_k is clipped to median +- clip_factor * MAD (median absolute
           deviation), so one peer's extreme scalars move the update at most that far.
One-byte scalars are already bounded by g_max; these bound a minority's pull further.
"""
from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from trainer.zo.quantize import Quantizer
from trainer.zo.seeds import probe_seed

AGGREGATIONS = ("mean", "trimmed", "clip")


@dataclass(frozen=True)
class Aggregation:
    method: str = "mean"
    trim_fraction: float = 0.25
    clip_factor: float = 3.0

    def __post_init__(self) -> None:
        if self.method not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.method!r}")

    def combine(self, g: Sequence[float]) -> tuple[list[float], int]:
        """The scalars to average, in commit order (a dropped one becomes 0.0), and the count to divide by."""
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
            center = statistics.median(g)
            radius = self.clip_factor * statistics.median(abs(x - center) for x in g)
            return [min(max(x, center - radius), center + radius) for x in g], k
        return list(g), k


def update_of(
    entries: Sequence[tuple[bytes, int, int]],
    run_id: bytes,
    step: int,
    lr: float,
    quantizer: Quantizer,
    aggregation: Aggregation,
) -> tuple[list[int], list[float]]:
    """Seeds and coefficients c_k = -lr * g_k / K for the (sender, sample, q) entries of a commit.

    Entries whose scalar ends up 0 (trimmed away, or quantized to zero) are left out: adding +-0
    changes nothing, and skipping it saves a pass."""
    g = [quantizer.decode(q) for _, _, q in entries]
    scalars, kept = aggregation.combine(g)
    seeds, coeffs = [], []
    for (sender, sample, _), value in zip(entries, scalars):
        if value == 0.0 or kept == 0:
            continue
        seeds.append(probe_seed(run_id, step, sender, sample))
        coeffs.append(-lr * value / kept)
    return seeds, coeffs
