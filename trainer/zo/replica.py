"""One full replica in fp32: committed (master) weights, seeded perturbations, commits, weight hashes.

The model's parameters are the working copy that forward passes read. The trained parameters
(those matching the name filter) also live in a flat fp32 master buffer holding the committed
weights w_t. A probe writes w_t +- eps z into the working copy; applying a commit changes only the
master, with the fused kernel, in a fixed order. So perturbing never touches the committed
weights: w + eps z - 2 eps z + eps z is not w in floating point, and replicas that restored that
way would drift apart. Memory: the model plus one copy of the trained parameters.
"""
from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kernels import apply_update, flat_layout

HASH_BYTES = 32


class ReplicaError(ValueError):
    """Weights that do not fit this replica (names, shapes, dtype)."""


@dataclass(frozen=True)
class TrainedSlice:
    name: str
    offset: int  # global index of the first element (kernels.flat_layout over ALL parameters)
    numel: int
    start: int  # position in the master buffer


def select_parameters(names: Sequence[str], patterns: Sequence[str]) -> list[str]:
    """Names matching any fnmatch pattern (all names when there are no patterns)."""
    if not patterns:
        return sorted(names)
    chosen = sorted(n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns))
    if not chosen:
        raise ReplicaError(f"no parameter matches {list(patterns)}; names look like {sorted(names)[:4]}")
    return chosen


class Replica:
    def __init__(self, model: torch.nn.Module, patterns: Sequence[str] = ()):
        self.model = model
        self.params = dict(model.named_parameters())
        for name, p in self.params.items():
            if p.dtype != torch.float32:
                raise ReplicaError(f"{name} is {p.dtype}: shared-randomness training needs fp32 weights")
            p.requires_grad_(False)
        layout = {s.name: s for s in flat_layout(self.params.items())}
        self.trained: list[TrainedSlice] = []
        start = 0
        for name in select_parameters(list(self.params), patterns):
            s = layout[name]
            self.trained.append(TrainedSlice(name, s.offset, s.numel, start))
            start += s.numel
        device = next(iter(self.params.values())).device
        self.master = torch.empty(start, dtype=torch.float32, device=device)
        self._load_master_from_model()

    @property
    def num_trained(self) -> int:
        return self.master.numel()

    def _load_master_from_model(self) -> None:
        for s in self.trained:
            self.master[s.start : s.start + s.numel].copy_(self.params[s.name].detach().reshape(-1))

    def _master_slice(self, s: TrainedSlice) -> torch.Tensor:
        return self.master[s.start : s.start + s.numel]

    @torch.no_grad()
    def perturb(self, seed: int, scale: float) -> None:
        """Working copy := committed weights + scale * z(seed) on the trained parameters."""
        for s in self.trained:
            work = self.params[s.name].data.view(-1)
            work.copy_(self._master_slice(s))
            apply_update(work, s.offset, [], [], seed, scale)

    @torch.no_grad()
    def restore(self) -> None:
        """Working copy := committed weights (exactly)."""
        for s in self.trained:
            self.params[s.name].data.view(-1).copy_(self._master_slice(s))

    @torch.no_grad()
    def apply(self, seeds: Sequence[int], coeffs: Sequence[float]) -> None:
        """Committed weights += sum_k coeffs[k] * z(seeds[k]), in order; the working copy follows."""
        for s in self.trained:
            apply_update(self._master_slice(s), s.offset, seeds, coeffs)
        self.restore()

    def weights_hash(self) -> bytes:
        """blake2b-256 of every parameter's committed fp32 bytes, in flat-layout (name) order."""
        h = hashlib.blake2b(digest_size=HASH_BYTES, person=b"swarmtrain/zo-w")
        trained = {s.name: s for s in self.trained}
        for name in sorted(self.params):
            t = self._master_slice(trained[name]) if name in trained else self.params[name].detach().reshape(-1)
            h.update(name.encode())
            h.update(t.to("cpu", copy=False).contiguous().numpy().tobytes())
        return h.digest()

    def state(self) -> dict[str, torch.Tensor]:
        """The committed weights by parameter name (CPU copies): what a snapshot sends."""
        out = {name: p.detach().to("cpu").clone() for name, p in self.params.items()}
        for s in self.trained:
            out[s.name] = self._master_slice(s).to("cpu").clone().view_as(self.params[s.name])
        return out

    @torch.no_grad()
    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Replace every weight; raises ReplicaError (and changes nothing) when names or shapes differ."""
        if set(state) != set(self.params):
            missing, extra = sorted(set(self.params) - set(state)), sorted(set(state) - set(self.params))
            raise ReplicaError(f"weights do not fit the model: missing {missing[:3]}, unexpected {extra[:3]}")
        for name, p in self.params.items():
            t = state[name]
            if t.shape != p.shape or t.dtype != torch.float32:
                raise ReplicaError(f"{name}: got {t.dtype} {tuple(t.shape)}, the model has float32 {tuple(p.shape)}")
        for name, p in self.params.items():
            p.data.copy_(state[name])
        self._load_master_from_model()
