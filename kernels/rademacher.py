"""Rademacher perturbations z in {-1, +1} from Philox4x32-10 bits, addressed by global index.

Mapping (also in docs/kernels.md); ``i`` is the global element index (0 <= i < 2^63):

- key:     k0 = seed & 0xFFFFFFFF, k1 = seed >> 32          (seed is an unsigned 64-bit int)
- counter: q = i // 4;  c0 = q & 0xFFFFFFFF, c1 = q >> 32, c2 = 0, c3 = 0
- word:    r = philox4x32_10(counter, key)[i % 4]
- sign:    z = +1 if (r & 1) == 1 else -1

Global indices come from ``flat_layout``: parameters sorted by name, laid end to end.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from kernels.philox import philox4x32

SEED_MAX = 2**64 - 1


class SeedError(ValueError):
    """A seed outside the unsigned 64-bit range."""


def seed_to_key(seed: int) -> tuple[int, int]:
    """Philox key (k0, k1): the low and high 32-bit halves of a 64-bit seed."""
    if not 0 <= int(seed) <= SEED_MAX:
        raise SeedError(f"seed must be an unsigned 64-bit integer, got {seed}")
    seed = int(seed)
    return seed & 0xFFFFFFFF, seed >> 32


def sign_bits(seed: int, offset: int, n: int) -> np.ndarray:
    """Bool array b with z[i] = +1 where b is True, for global indices [offset, offset + n)."""
    if offset < 0 or n < 0:
        raise ValueError(f"offset and n must be non-negative, got {offset}, {n}")
    k0, k1 = seed_to_key(seed)
    if n == 0:
        return np.zeros(0, dtype=bool)
    idx = np.arange(offset, offset + n, dtype=np.uint64)
    q = idx >> np.uint64(2)
    # One Philox call per distinct counter; the last group of 4 may be partial.
    q_first = int(q[0])
    q_uniq = np.arange(q_first, int(q[-1]) + 1, dtype=np.uint64)
    words = philox4x32(q_uniq & np.uint64(0xFFFFFFFF), q_uniq >> np.uint64(32), 0, 0, k0, k1)
    table = np.stack(words, axis=1)  # [n_counters, 4]
    picked = table[(q - np.uint64(q_first)).astype(np.int64), (idx & np.uint64(3)).astype(np.int64)]
    return (picked & np.uint32(1)).astype(bool)


def rademacher(seed: int, offset: int, n: int) -> torch.Tensor:
    """z in {-1, +1} (fp32) for global indices [offset, offset + n). Materialises n values."""
    bits = sign_bits(seed, offset, n)
    return torch.from_numpy(np.where(bits, np.float32(1.0), np.float32(-1.0)))


@dataclass(frozen=True)
class ParamSlice:
    name: str
    offset: int
    numel: int


def flat_layout(named_params: Iterable[tuple[str, torch.Tensor]]) -> list[ParamSlice]:
    """Global offsets of parameters: sorted by name, laid end to end from 0.

    Sorting by name (not registration order) keeps the layout identical for models whose
    modules were built in a different order but carry the same names.
    """
    items = sorted(((name, p.numel()) for name, p in named_params), key=lambda t: t[0])
    names = [name for name, _ in items]
    if len(set(names)) != len(names):
        raise ValueError("duplicate parameter names")
    layout, offset = [], 0
    for name, numel in items:
        layout.append(ParamSlice(name, offset, numel))
        offset += numel
    return layout
