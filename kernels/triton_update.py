"""Triton kernel for the fused update: one load and one store of w, Philox in registers.

A program (4 warps) owns one group of 16384 elements (kernels/rademacher.py), a 32 x 512
tile; a thread owns one quad of 4 adjacent columns in all 32 rows, so its loads are 16-byte
vectors coalesced across the warp. Per contribution the thread runs Philox4x32-10 once, on
its quad's counter, and word j signs rows 8j..8j+7. The tile is kept as four [8, 512] bands
(one per word), so no word ever needs selecting.
The add is `w + (bits(-c) ^ sign bit)`: no multiply, so FMA contraction cannot change rounding.
Importing this module imports triton; use ``kernels.apply_update`` to dispatch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from kernels import philox
from kernels.rademacher import GROUP, seed_to_key
from kernels.reference import check_update_args

# Compiled Triton only reads globals that are constexpr.
_M0 = tl.constexpr(philox.PHILOX_M0)
_M1 = tl.constexpr(philox.PHILOX_M1)
_W0 = tl.constexpr(philox.PHILOX_W0)
_W1 = tl.constexpr(philox.PHILOX_W1)
_GROUP = tl.constexpr(GROUP)


@triton.jit
def _philox(q_lo, q_hi, k0, k1):
    """Philox4x32-10 of counters (q_lo, q_hi, 0, 0) under the scalar key (k0, k1)."""
    x0 = q_lo
    x1 = q_hi
    x2 = tl.zeros_like(q_lo)
    x3 = tl.zeros_like(q_lo)
    m0 = tl.full(q_lo.shape, _M0, tl.uint32)
    m1 = tl.full(q_lo.shape, _M1, tl.uint32)
    for r in tl.static_range(10):
        if r > 0:
            k0 = k0 + _W0
            k1 = k1 + _W1
        hi0 = tl.umulhi(m0, x0)
        lo0 = m0 * x0
        hi1 = tl.umulhi(m1, x2)
        lo1 = m1 * x2
        x0, x1, x2, x3 = hi1 ^ x1 ^ k0, lo1, hi0 ^ x3 ^ k1, lo0
    return x0, x1, x2, x3


@triton.jit
def _add_signed(w, word, shift, neg_c):
    """w + (c if bit (31 - shift) of word is 1 else -c), with neg_c the bits of -c."""
    signed = ((word << shift) & 0x80000000) ^ neg_c
    return w + signed.to(tl.float32, bitcast=True)


@triton.jit(do_not_specialize=["n", "offset_div16", "first_group", "group_step", "K"])
def _fused_update_kernel(
    w_ptr,
    n,
    offset_div16,  # offset = 16 * offset_div16 + OFFSET_MOD16, split so the compiler knows the alignment
    first_group,  # program p updates group first_group + p * group_step
    group_step,
    keys_ptr,  # int32 [K + 2, 2]: (k0, k1) bit patterns, in application order, then padding
    neg_coeffs_ptr,  # int32 [K + 1]: bit patterns of -c_k, then padding
    K,
    OFFSET_MOD16: tl.constexpr,  # 0 lets loads and stores be 16-byte vectors
    MASKED: tl.constexpr,  # only groups that stick out of w need masks (they cost registers)
):
    offset = offset_div16.to(tl.int64) * 16 + OFFSET_MOD16
    g = first_group.to(tl.int64) + tl.program_id(0) * group_step.to(tl.int64)
    start = g * _GROUP - offset  # local index of the group's first element
    row = tl.arange(0, 8)[:, None]
    col = tl.arange(0, 512)[None, :]
    band = row * 512 + col  # tile offsets of word 0's rows; word j adds 4096 j
    shift = 31 - (4 * row + (col & 3))  # brings bit 4 * row + col % 4 to the sign position
    # The four columns of a quad share a counter; the compiler sees it and runs Philox once per thread.
    q = g * 128 + (col >> 2)
    q_lo = (q & 0xFFFFFFFF).to(tl.uint32)
    q_hi = (q >> 32).to(tl.uint32)
    ptr = w_ptr + start + band
    if MASKED:
        local = start + band
        m0 = (local >= 0) & (local < n)
        m1 = (local >= -4096) & (local < n - 4096)
        m2 = (local >= -8192) & (local < n - 8192)
        m3 = (local >= -12288) & (local < n - 12288)
        w0 = tl.load(ptr, mask=m0, other=0.0)
        w1 = tl.load(ptr + 4096, mask=m1, other=0.0)
        w2 = tl.load(ptr + 8192, mask=m2, other=0.0)
        w3 = tl.load(ptr + 12288, mask=m3, other=0.0)
    else:
        w0 = tl.load(ptr)
        w1 = tl.load(ptr + 4096)
        w2 = tl.load(ptr + 8192)
        w3 = tl.load(ptr + 12288)
    # Software pipeline, so that neither a key's load nor Philox's serial chain stalls the adds:
    # iteration k adds contribution k, runs Philox for k + 1, loads the coefficient of k + 1
    # and the key of k + 2. Both arrays are padded past the last contribution.
    k0 = tl.load(keys_ptr + 2).to(tl.uint32, bitcast=True)
    k1 = tl.load(keys_ptr + 3).to(tl.uint32, bitcast=True)
    x0, x1, x2, x3 = _philox(q_lo, q_hi, tl.load(keys_ptr).to(tl.uint32, bitcast=True),
                             tl.load(keys_ptr + 1).to(tl.uint32, bitcast=True))
    neg_c = tl.load(neg_coeffs_ptr).to(tl.uint32, bitcast=True)
    for k in range(K):
        y0, y1, y2, y3 = _philox(q_lo, q_hi, k0, k1)
        neg_c_next = tl.load(neg_coeffs_ptr + k + 1).to(tl.uint32, bitcast=True)
        k0 = tl.load(keys_ptr + 2 * k + 4).to(tl.uint32, bitcast=True)
        k1 = tl.load(keys_ptr + 2 * k + 5).to(tl.uint32, bitcast=True)
        w0 = _add_signed(w0, x0, shift, neg_c)
        w1 = _add_signed(w1, x1, shift, neg_c)
        w2 = _add_signed(w2, x2, shift, neg_c)
        w3 = _add_signed(w3, x3, shift, neg_c)
        x0, x1, x2, x3 = y0, y1, y2, y3
        neg_c = neg_c_next
    if MASKED:
        tl.store(ptr, w0, mask=m0)
        tl.store(ptr + 4096, w1, mask=m1)
        tl.store(ptr + 8192, w2, mask=m2)
        tl.store(ptr + 12288, w3, mask=m3)
    else:
        tl.store(ptr, w0)
        tl.store(ptr + 4096, w1)
        tl.store(ptr + 8192, w2)
        tl.store(ptr + 12288, w3)


def _as_int32(u32: int) -> int:
    return u32 - (1 << 32) if u32 >= 1 << 31 else u32


def apply_update_triton(
    w: torch.Tensor,
    offset: int,
    seeds: Sequence[int],
    coeffs: Sequence[float],
    next_seed: int | None = None,
    eps: float = 0.0,
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
        [[_as_int32(k) for k in seed_to_key(s)] for s, _ in plan] + [[0, 0], [0, 0]],
        dtype=torch.int32, device=w.device,
    )
    neg_coeffs = torch.tensor([-float(c) for _, c in plan] + [0.0], dtype=torch.float32)
    neg_coeffs = neg_coeffs.view(torch.int32).to(w.device)
    args = (keys, neg_coeffs, len(plan))
    first, last = offset // GROUP, (offset + n - 1) // GROUP  # groups touched
    inner_first, inner_last = -(-offset // GROUP), (offset + n) // GROUP - 1  # groups inside w
    if inner_first <= inner_last:
        grid = (inner_last - inner_first + 1,)
        _fused_update_kernel[grid](
            w, n, offset // 16, inner_first, 1, *args, OFFSET_MOD16=offset % 16, MASKED=False, num_warps=4
        )
    edges = [g for g in sorted({first, last}) if not inner_first <= g <= inner_last]  # partial groups
    if edges:
        _fused_update_kernel[(len(edges),)](
            w, n, offset // 16, edges[0], edges[-1] - edges[0], *args, OFFSET_MOD16=offset % 16, MASKED=True,
            num_warps=4,
        )
    return w
