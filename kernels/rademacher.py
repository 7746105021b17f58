"""Rademacher perturbations z in {-1, +1} from Philox4x32-10 bits, addressed by global index.

Every Philox output (128 bits) signs 128 elements. Elements come in groups of
``GROUP = 16384`` consecutive global indices, seen as a 32 x 512 row-major tile; each of the
tile's 128 column quads (4 adjacent columns) takes the 128 bits of one counter. So a GPU
thread that owns one quad of every row loads 16-byte vectors that are coalesced across a
warp, and computes one Philox per 128 elements. For global index ``i`` (0 <= i < 2^63):

- key:     k0 = seed & 0xFFFFFFFF, k1 = seed >> 32          (seed is an unsigned 64-bit int)
- place:   g = i >> 14 (group), r = (i >> 9) & 31 (row), t = (i >> 2) & 127 (quad), e = i & 3
- counter: q = 128 * g + t;  c0 = q & 0xFFFFFFFF, c1 = q >> 32, c2 = 0, c3 = 0
- word:    x = philox4x32_10(counter, key)[r >> 3]
- bit:     b = 4 * (r & 7) + e
- sign:    z = +1 if (x >> b) & 1 == 1 else -1

Global indices come from ``flat_layout``: parameters sorted by name, laid end to end.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from kernels.philox import philox4x32

SEED_MAX = 2**64 - 1

GROUP_SHIFT = 14
GROUP = 1 << GROUP_SHIFT  # elements per group (32 rows x 512 columns)
COLS = 512
QUADS = COLS // 4  # Philox counters per group
WORD_ROWS = 8  # rows signed by each 32-bit word

# Bit of the counter's word for (row within the word's 8 rows, element within the quad),
# shaped to broadcast against [group, word, 1, quad, 1].
_BIT_SHIFTS = (4 * np.arange(WORD_ROWS, dtype=np.uint32)[:, None] + np.arange(4, dtype=np.uint32)).reshape(
    1, 1, WORD_ROWS, 1, 4
)


class SeedError(ValueError):
    """A seed outside the unsigned 64-bit range."""


def seed_to_key(seed: int) -> tuple[int, int]:
    """Philox key (k0, k1): the low and high 32-bit halves of a 64-bit seed."""
    if not 0 <= int(seed) <= SEED_MAX:
        raise SeedError(f"seed must be an unsigned 64-bit integer, got {seed}")
    seed = int(seed)
    return seed & 0xFFFFFFFF, seed >> 32


def group_bits(seed: int, first_group: int, n_groups: int) -> np.ndarray:
    """uint32 array of 0/1 sign bits of groups [first_group, first_group + n_groups), in index order."""
    k0, k1 = seed_to_key(seed)
    q = np.arange(first_group * QUADS, (first_group + n_groups) * QUADS, dtype=np.uint64)
    words = philox4x32(q & np.uint64(0xFFFFFFFF), q >> np.uint64(32), 0, 0, k0, k1)
    # [group, word, 1, quad, 1] >> [1, 1, row in word, 1, element in quad]
    table = np.stack(words, axis=0).reshape(4, n_groups, 1, QUADS, 1).swapaxes(0, 1)
    return ((table >> _BIT_SHIFTS) & np.uint32(1)).reshape(n_groups * GROUP)


def sign_bits_u32(seed: int, offset: int, n: int) -> np.ndarray:
    """uint32 0/1 array with z[i] = +1 where it is 1, for global indices [offset, offset + n)."""
    if offset < 0 or n < 0:
        raise ValueError(f"offset and n must be non-negative, got {offset}, {n}")
    if n == 0:
        seed_to_key(seed)
        return np.zeros(0, dtype=np.uint32)
    first = offset >> GROUP_SHIFT
    last = (offset + n - 1) >> GROUP_SHIFT
    start = offset - (first << GROUP_SHIFT)
    return group_bits(seed, first, last - first + 1)[start : start + n]


def sign_bits(seed: int, offset: int, n: int) -> np.ndarray:
    """Bool array b with z[i] = +1 where b is True, for global indices [offset, offset + n)."""
    return sign_bits_u32(seed, offset, n).astype(bool)


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
