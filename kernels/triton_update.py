"""Triton kernel for the fused update: one load and one store of w, Philox in registers.

Each program owns BLOCK Philox counters q = offset // 4 + pid * BLOCK + row, i.e. the
4 * BLOCK global indices 4 * q + j (j = 0..3); indices outside [offset, offset + n) are
masked. Per contribution k it computes Philox4x32-10(q, key_k) once and interleaves the four
words so that element 4q + j takes word j.
The adds are `w + where(bit, c, -c)`: no multiply, so FMA contraction cannot change rounding.
Importing this module imports triton; use ``kernels.apply_update`` to dispatch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from kernels import philox
from kernels.rademacher import seed_to_key
from kernels.reference import check_update_args

DEFAULT_BLOCK = 256  # counters per program, i.e. 4 * BLOCK elements

# Compiled Triton only reads globals that are constexpr.
_M0 = tl.constexpr(philox.PHILOX_M0)
_M1 = tl.constexpr(philox.PHILOX_M1)
_W0 = tl.constexpr(philox.PHILOX_W0)
_W1 = tl.constexpr(philox.PHILOX_W1)


@triton.jit
def _sign_bits(q_lo, q_hi, k0, k1):
    """Lowest bit of Philox word (4q + j) % 4 for every element of the tile, in element order."""
    x0 = q_lo
    x1 = q_hi
    x2 = tl.zeros_like(q_lo)
    x3 = tl.zeros_like(q_lo)
    m0 = tl.full(q_lo.shape, _M0, tl.uint32)
    m1 = tl.full(q_lo.shape, _M1, tl.uint32)
    w0 = tl.full(q_lo.shape, _W0, tl.uint32)
    w1 = tl.full(q_lo.shape, _W1, tl.uint32)
    k0 = tl.full(q_lo.shape, 0, tl.uint32) + k0
    k1 = tl.full(q_lo.shape, 0, tl.uint32) + k1
    for r in tl.static_range(10):
        if r > 0:
            k0 = k0 + w0
            k1 = k1 + w1
        hi0 = tl.umulhi(m0, x0)
        lo0 = m0 * x0
        hi1 = tl.umulhi(m1, x2)
        lo1 = m1 * x2
        x0, x1, x2, x3 = hi1 ^ x1 ^ k0, lo1, hi0 ^ x3 ^ k1, lo0
    # interleave(interleave(x0, x2), interleave(x1, x3)) = x0[0], x1[0], x2[0], x3[0], x0[1], ...
    return tl.interleave(tl.interleave(x0 & 1, x2 & 1), tl.interleave(x1 & 1, x3 & 1))


@triton.jit(do_not_specialize=["n", "offset", "K"])
def _fused_update_kernel(
    w_ptr,
    n,
    offset,
    keys_ptr,  # int32 [K, 2]: (k0, k1) bit patterns, in application order
    coeffs_ptr,  # float32 [K]
    K,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offset = offset.to(tl.int64)
    q = offset // 4 + pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)  # Philox counters of this tile
    q_lo = (q & 0xFFFFFFFF).to(tl.uint32)
    q_hi = (q >> 32).to(tl.uint32)
    local = 4 * (offset // 4 + pid * BLOCK) + tl.arange(0, 4 * BLOCK).to(tl.int64) - offset
    mask = (local >= 0) & (local < n)
    w = tl.load(w_ptr + local, mask=mask, other=0.0)
    for k in range(K):
        k0 = tl.load(keys_ptr + 2 * k).to(tl.uint32, bitcast=True)
        k1 = tl.load(keys_ptr + 2 * k + 1).to(tl.uint32, bitcast=True)
        c = tl.load(coeffs_ptr + k)
        w = w + tl.where(_sign_bits(q_lo, q_hi, k0, k1) == 1, c, -c)
    tl.store(w_ptr + local, w, mask=mask)


def _as_int32(u32: int) -> int:
    return u32 - (1 << 32) if u32 >= 1 << 31 else u32


def apply_update_triton(
    w: torch.Tensor,
    offset: int,
    seeds: Sequence[int],
    coeffs: Sequence[float],
    next_seed: int | None = None,
    eps: float = 0.0,
    block: int = DEFAULT_BLOCK,
) -> torch.Tensor:
    """Triton version of ``apply_update_reference`` (same arguments, same bits), in place.

    The next perturbation is simply the last contribution (seed next_seed, coefficient eps).
    """
    check_update_args(w, offset, seeds, coeffs)
    n = w.numel()
    plan = list(zip(seeds, coeffs))
    if next_seed is not None:
        plan.append((next_seed, eps))
    if n == 0 or not plan:
        return w
    keys = torch.tensor(
        [[_as_int32(k) for k in seed_to_key(s)] for s, _ in plan], dtype=torch.int32, device=w.device
    )
    cs = torch.tensor([float(c) for _, c in plan], dtype=torch.float32, device=w.device)
    # Counters touched: offset // 4 .. (offset + n - 1) // 4.
    n_counters = (offset + n - 1) // 4 - offset // 4 + 1
    grid = (triton.cdiv(n_counters, block),)
    _fused_update_kernel[grid](
        w, n, offset, keys, cs, len(plan), BLOCK=block
    )
    return w
