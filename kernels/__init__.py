"""Counter-based Rademacher noise and the fused shared-randomness update.

``apply_update`` runs the Triton kernel for CUDA tensors when triton imports, and the CPU
reference otherwise; both give bit-identical weights (docs/kernels.md).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Literal

import torch

from kernels.philox import philox4x32
from kernels.rademacher import ParamSlice, flat_layout, rademacher, seed_to_key, sign_bits
from kernels.reference import apply_update_reference

Backend = Literal["triton", "reference"]

__all__ = [
    "Backend",
    "ParamSlice",
    "apply_update",
    "apply_update_reference",
    "backend_for",
    "flat_layout",
    "philox4x32",
    "rademacher",
    "seed_to_key",
    "sign_bits",
]


class NoBackendError(RuntimeError):
    """A tensor on a device that neither the Triton kernel nor the CPU reference handles."""


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def backend_for(tensor: torch.Tensor) -> Backend:
    """Which implementation ``apply_update`` uses for this tensor."""
    if tensor.device.type == "cuda" and _triton_available():
        return "triton"
    if tensor.device.type == "cpu":
        return "reference"
    raise NoBackendError(f"no update backend for device {tensor.device}: install triton or move weights to CPU")


def apply_update(
    w: torch.Tensor,
    offset: int,
    seeds: Sequence[int],
    coeffs: Sequence[float],
    next_seed: int | None = None,
    eps: float = 0.0,
) -> torch.Tensor:
    """In place: w += sum_k c_k z_k (in order k = 0..K-1), then w += eps z_next; returns w.

    ``w`` is a contiguous 1-D fp32 slice whose first element has global index ``offset``.
    """
    if backend_for(w) == "triton":
        from kernels.triton_update import apply_update_triton

        return apply_update_triton(w, offset, seeds, coeffs, next_seed, eps)
    return apply_update_reference(w, offset, seeds, coeffs, next_seed, eps)
