"""How a stage's weights come back after its nodes are gone (DESIGN.md "Neighbour recovery").

- A live replica wins: copy it ("replica"; weights, optimizer state and learning rate).
- CheckFree: a lost stage i is rebuilt as W_i = (a W_{i+1} + b W_{i-1}) / (a + b), with
  a = ||g_{i+1}|| + 1e-4 and b = ||g_{i-1}|| + 1e-4, the neighbours' last gradient norms, and a
  fresh optimizer at RECOVERY_LR_FACTOR x the learning rate ("checkfree"). Neighbours wrap around
  through stage 0: the forward pass runs stage 0's blocks, then 1 .. S-1, then stage 0's head, so
  stage 1's previous neighbour and stage S-1's next one are stage 0 (only its blocks are used).
- CheckFree+ (swaps on): a lost stage 1 copies stage 2 and a lost stage S-1 copies stage S-2
  ("swap-copy"), the stages it swapped places with on odd microbatches; middle stages use the
  formula. With two stages there is no partner, and stage 1 takes the formula with stage 0 on
  both sides.
- The baselines: "random" keeps the fresh module's initial weights; "checkpoint" loads the stage's
  last complete checkpoint while the whole run rolls back to it (trainer/recovery/checkpoint.py).
- A needed neighbour that is itself lost leaves the other alone (copied), and with both lost
  the stage is re-initialised; the plan's reason says so.
- Stage 0 is never rebuilt: every data node holds it, and a new one copies any.

Stages may hold different numbers of blocks: block j of the target takes block min(j, n - 1) of
a neighbour with n blocks. Only ``blocks.*`` tensors move between stages; the rest of the target
keeps its own values.
"""
from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import torch

RECOVERY_LR_FACTOR = 1.1
NORM_EPSILON = 1e-4
METHODS = ("checkfree", "random", "checkpoint")  # the run's policy (pipeline.recovery)
_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")


class RecoveryError(RuntimeError):
    """A stage that cannot be restored from what the swarm holds, or inputs that do not fit it."""


@dataclass(frozen=True)
class RecoveryPlan:
    stage: int
    method: str  # replica, checkfree, swap-copy or random
    sources: tuple[int, ...]  # stages whose weights it needs: (next, previous) for checkfree
    reason: str


def swaps_on(swap: str) -> bool:
    return swap == "checkfree_plus"


def plan_recovery(stage: int, num_stages: int, swap: str, live_stages: Collection[int],
                  method: str = "checkfree") -> RecoveryPlan:
    """How to restore ``stage`` given the stages that still have a live replica (not counting us)."""
    if num_stages < 2 or not 0 <= stage < num_stages:
        raise RecoveryError(f"stage {stage} does not exist in a run of {num_stages} stages")
    if method not in METHODS:
        raise RecoveryError(f"unknown recovery method {method!r}; known: {', '.join(METHODS)}")
    if stage in live_stages:
        return RecoveryPlan(stage, "replica", (stage,), f"stage {stage} has a live replica: copying it")
    if stage == 0:
        raise RecoveryError("no data node is left: stage 0 (embedding, head and data) cannot be rebuilt")
    if method == "random":
        return RecoveryPlan(stage, "random", (), f"stage {stage} has no live replica; re-initialised (baseline)")
    if method == "checkpoint":
        return RecoveryPlan(stage, "checkpoint", (), f"stage {stage} has no live replica; loaded from the last "
                                                    "complete checkpoint, the run rolls back to it (baseline)")
    if swaps_on(swap) and num_stages >= 3 and stage in (1, num_stages - 1):
        partner = 2 if stage == 1 else num_stages - 2
        if partner in live_stages:
            return RecoveryPlan(stage, "swap-copy", (partner,),
                                f"stage {stage} has no live replica; copied from its swap partner {partner} (CheckFree+)")
    after, before = (stage + 1) % num_stages, stage - 1
    alive = [s for s in (after, before) if s in live_stages]
    if len(alive) == 2:
        return RecoveryPlan(stage, "checkfree", (after, before),
                            f"stage {stage} has no live replica; rebuilt from stages {after} and {before} (CheckFree)")
    if alive:
        return RecoveryPlan(stage, "checkfree", (alive[0], alive[0]),  # the formula, the lost side replaced
                            f"stage {stage} has no live replica and neither has neighbour "
                            f"{before if alive[0] == after else after}; copied from stage {alive[0]} alone")
    return RecoveryPlan(stage, "random", (), f"stage {stage} and both its neighbours have no live replica; "
                                              "re-initialised")


def _source_name(name: str, source: Mapping[str, torch.Tensor]) -> str:
    """The tensor of ``source`` that block tensor ``name`` of the target takes (min(j, n - 1))."""
    match = _BLOCK.fullmatch(name)
    assert match is not None
    blocks = {int(m.group(1)) for m in map(_BLOCK.fullmatch, source) if m}
    if not blocks:
        raise RecoveryError("a source stage holds no blocks")
    j = min(int(match.group(1)), max(blocks))
    return f"blocks.{j}.{match.group(2)}"


def _take(name: str, target: torch.Tensor, source: Mapping[str, torch.Tensor]) -> torch.Tensor:
    key = _source_name(name, source)
    if key not in source:
        raise RecoveryError(f"{name}: the source stage has no {key}")
    if source[key].shape != target.shape:
        raise RecoveryError(f"{name}: shape {tuple(target.shape)} here, {tuple(source[key].shape)} in the source")
    return source[key].detach().to("cpu", torch.float32)


def checkfree_weights(target: Mapping[str, torch.Tensor], next_w: Mapping[str, torch.Tensor],
                      prev_w: Mapping[str, torch.Tensor], next_norm: float, prev_norm: float) -> dict[str, torch.Tensor]:
    """Every block tensor of ``target`` as ``(a * next + b * prev) / (a + b)``, computed in float32
    with a = next_norm + 1e-4 and b = prev_norm + 1e-4 as Python floats, then cast to the target's dtype."""
    for norm in (next_norm, prev_norm):
        if not isinstance(norm, (int, float)) or not math.isfinite(norm) or norm < 0:
            raise RecoveryError(f"a gradient norm must be finite and >= 0, not {norm!r}")
    a, b = next_norm + NORM_EPSILON, prev_norm + NORM_EPSILON
    out = {}
    for name, t in target.items():
        if _BLOCK.fullmatch(name):
            mixed = (a * _take(name, t, next_w) + b * _take(name, t, prev_w)) / (a + b)
            out[name] = mixed.to(t.dtype)
        else:
            out[name] = t.detach().clone()
    return out


def copy_blocks(target: Mapping[str, torch.Tensor], source: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: (_take(name, t, source).to(t.dtype) if _BLOCK.fullmatch(name) else t.detach().clone())
            for name, t in target.items()}


def rebuild_weights(plan: RecoveryPlan, target: Mapping[str, torch.Tensor],
                    sources: Mapping[int, Mapping[str, torch.Tensor]], norms: Mapping[int, float]) -> dict[str, torch.Tensor]:
    """The target stage's state dict for ``plan`` (not for "replica": that copies the whole state)."""
    missing = [s for s in plan.sources if s not in sources]
    if missing:
        raise RecoveryError(f"stage {plan.stage}: the weights of stage(s) {missing} are needed")
    if plan.method == "random":
        return {name: t.detach().clone() for name, t in target.items()}
    if plan.method == "swap-copy":
        return copy_blocks(target, sources[plan.sources[0]])
    if plan.method == "checkfree":
        after, before = plan.sources
        if after not in norms or before not in norms:
            raise RecoveryError(f"stage {plan.stage}: the gradient norms of stages {after} and {before} are needed")
        return checkfree_weights(target, sources[after], sources[before], norms[after], norms[before])
    raise RecoveryError(f"stage {plan.stage}: method {plan.method!r} does not rebuild weights")


def grad_norm(module: torch.nn.Module) -> float:
    """The L2 norm over all parameters' gradients (0.0 when there are none)."""
    norms = [torch.linalg.vector_norm(p.grad.detach().float()) for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
