"""CPU reference of the fused update; defines the result the Triton kernel must match bit for bit.

For each element w[i] (global index offset + i), in this order:

    for k in 0..K-1:  w = fp32(w + (c_k if z_k[i] > 0 else -c_k))
    if next_seed:     w = fp32(w + (eps if z_next[i] > 0 else -eps))

Every step is one correctly rounded fp32 add of +-c (negation is exact), so there is no
multiply and no fused multiply-add that could round differently on another device. Both
backends build +-c by bits: the sign bit of -c flipped where z = +1.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from kernels.rademacher import GROUP, seed_to_key, sign_bits_u32

DEFAULT_CHUNK = 4 * GROUP


def check_update_args(w: torch.Tensor, offset: int, seeds: Sequence[int], coeffs: Sequence[float]) -> None:
    if w.dtype != torch.float32 or w.dim() != 1 or not w.is_contiguous():
        raise ValueError("w must be a contiguous 1-D float32 tensor")
    if offset < 0:
        raise ValueError(f"offset must be non-negative, got {offset}")
    if len(seeds) != len(coeffs):
        raise ValueError(f"{len(seeds)} seeds but {len(coeffs)} coefficients")
    for s in seeds:
        seed_to_key(s)


def apply_update_reference(
    w: torch.Tensor,
    offset: int,
    seeds: Sequence[int],
    coeffs: Sequence[float],
    next_seed: int | None = None,
    eps: float = 0.0,
    chunk: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Apply the update to CPU tensor ``w`` in place and return it; memory O(chunk)."""
    check_update_args(w, offset, seeds, coeffs)
    if w.device.type != "cpu":
        raise ValueError("the reference runs on CPU tensors only")
    # Bit pattern of -c per contribution; z = +1 flips its sign bit (giving c).
    plan = [(int(s), _neg_bits(c)) for s, c in zip(seeds, coeffs)]
    if next_seed is not None:
        plan.append((int(next_seed), _neg_bits(eps)))
    buf = w.numpy()  # shares memory with w
    n = buf.shape[0]
    # Chunk boundaries at global multiples of ``chunk``, so aligned chunks cover whole Philox groups.
    starts = [0, *range(chunk - offset % chunk, n, chunk)]
    for start, stop in zip(starts, [*starts[1:], n]):
        block = buf[start:stop]  # loaded once, updated by every contribution, stored once
        acc = block.copy()
        for seed, neg_c in plan:
            bits = sign_bits_u32(seed, offset + start, stop - start)
            acc += ((bits << np.uint32(31)) ^ neg_c).view(np.float32)  # float32 + float32: one rounding
        block[:] = acc
    return w


def _neg_bits(c: float) -> np.uint32:
    return np.float32(-np.float32(c)).view(np.uint32)
