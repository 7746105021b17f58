"""Philox4x32-10 (Salmon et al., Random123) on CPU, vectorised over arrays of counters.

All arithmetic is done in numpy uint64 and masked to 32 bits, so the result is the same on
every platform; the Triton kernel in ``triton_update.py`` computes the same function.
"""

from __future__ import annotations

import numpy as np

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
ROUNDS = 10

_MASK32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)


def _mulhilo(m: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # m < 2^32 and x < 2^32, so the product fits exactly in uint64.
    prod = np.uint64(m) * x
    return prod >> _SHIFT32, prod & _MASK32


def philox4x32(
    c0: np.ndarray | int,
    c1: np.ndarray | int,
    c2: np.ndarray | int,
    c3: np.ndarray | int,
    k0: int,
    k1: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Philox4x32-10 of counters (c0, c1, c2, c3) under key (k0, k1).

    Counters are broadcast-compatible arrays (or ints) of 32-bit values; the four output
    words are uint32 arrays of the broadcast shape.
    """
    x0, x1, x2, x3 = (np.asarray(c, dtype=np.uint64) & _MASK32 for c in (c0, c1, c2, c3))
    x0, x1, x2, x3 = np.broadcast_arrays(x0, x1, x2, x3)
    key0 = np.uint64(k0 & 0xFFFFFFFF)
    key1 = np.uint64(k1 & 0xFFFFFFFF)
    for r in range(ROUNDS):
        if r > 0:
            key0 = (key0 + np.uint64(PHILOX_W0)) & _MASK32
            key1 = (key1 + np.uint64(PHILOX_W1)) & _MASK32
        hi0, lo0 = _mulhilo(PHILOX_M0, x0)
        hi1, lo1 = _mulhilo(PHILOX_M1, x2)
        x0, x1, x2, x3 = hi1 ^ x1 ^ key0, lo1, hi0 ^ x3 ^ key1, lo0
    return tuple(x.astype(np.uint32) for x in (x0, x1, x2, x3))  # type: ignore[return-value]


def philox4x32_scalar(ctr: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, ...]:
    """Plain-Python Philox4x32-10 of one counter; the obviously-correct cross-check."""
    m32 = 0xFFFFFFFF
    x0, x1, x2, x3 = (c & m32 for c in ctr)
    k0, k1 = key[0] & m32, key[1] & m32
    for r in range(ROUNDS):
        if r > 0:
            k0, k1 = (k0 + PHILOX_W0) & m32, (k1 + PHILOX_W1) & m32
        p0 = PHILOX_M0 * x0
        p1 = PHILOX_M1 * x2
        x0, x1, x2, x3 = (p1 >> 32) ^ x1 ^ k0, p1 & m32, (p0 >> 32) ^ x3 ^ k1, p0 & m32
    return x0, x1, x2, x3
