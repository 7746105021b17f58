"""CPU reference of the fused update; defines the result the Triton kernel must match bit for bit.

For each element w[i] (global index offset + i), in this order:

    for k in 0..K-1:  w = fp32(w + (c_k if z_k[i] > 0 else -c_k))
    if next_seed:     w = fp32(w + (eps if z_next[i] > 0 else -eps))

Every step is one correctly rounded fp32 add of +-c (negation is exact), so there is no
multiply and no fused multiply-add that could round differently on another device.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from kernels.rademacher import seed_to_key, sign_bits

DEFAULT_CHUNK = 1 << 16


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
    plan = [(int(s), np.float32(c)) for s, c in zip(seeds, coeffs)]
    if next_seed is not None:
        plan.append((int(next_seed), np.float32(eps)))
    buf = w.numpy()  # shares memory with w
    n = buf.shape[0]
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        block = buf[start:stop]  # loaded once, updated by every contribution, stored once
        acc = block.copy()
        for seed, c in plan:
            bits = sign_bits(seed, offset + start, stop - start)
            acc = acc + np.where(bits, c, -c)  # float32 + float32: one rounding
        block[:] = acc
    return w
