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
- A needed neighbour that is itself lost (or holds no blocks: stage 0 may have none) leaves the
  other alone, and with both gone the stage is re-initialised; the plan's reason says so.
- Stage 0 is never rebuilt: every data node holds it, and a new one copies any.

The formula with the same stage on both sides (one side lost, or S = 2) is that stage's weights,
so they are copied exactly instead of being rounded through it.

Stages may hold different numbers of blocks: block j of the target takes block min(j, n - 1) of
a neighbour with n blocks (the nearest one it has). Only ``blocks.*`` tensors move between stages;
the rest of the target keeps its own values.
"""
from __future__ import annotations

import math
import numbers
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import torch

from protocol.runspec import RECOVERIES, SWAPS

RECOVERY_LR_FACTOR = 1.1
NORM_EPSILON = 1e-4
_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")

Weights = Mapping[str, torch.Tensor]


class RecoveryError(RuntimeError):
    """A stage that cannot be restored from what the swarm holds, or inputs that do not fit it."""


@dataclass(frozen=True)
class RecoveryPlan:
    stage: int
    method: str  # replica, checkfree, swap-copy, random or checkpoint
    sources: tuple[int, ...]  # stages whose weights it needs: (next, previous) for checkfree
    reason: str  # one line for the log


def swaps_on(swap: str) -> bool:
    """Whether the run's ``pipeline.swap`` setting is CheckFree+ (edge stages swap places)."""
    return swap == "checkfree_plus"


def _swap_partner(stage: int, num_stages: int, swap: str) -> int | None:
    if not swaps_on(swap) or num_stages < 3:
        return None
    return {1: 2, num_stages - 1: num_stages - 2}.get(stage)  # S = 3: 1 <-> 2


def plan_recovery(stage: int, num_stages: int, swap: str, live_stages: Collection[int],
                  method: str = "checkfree", blockless_stages: Collection[int] = ()) -> RecoveryPlan:
    """How to restore ``stage`` given the stages that still have a live replica (not counting us).

    ``method`` is the run's policy (``pipeline.recovery``). ``blockless_stages``: stages that hold
    no blocks (stage 0 with ``blocks_per_stage[0] == 0``), which cannot stand in as a neighbour."""
    if num_stages < 2 or not 0 <= stage < num_stages:
        raise RecoveryError(f"stage {stage} does not exist in a run of {num_stages} stages")
    if method not in RECOVERIES:
        raise RecoveryError(f"unknown recovery method {method!r}; known: {', '.join(RECOVERIES)}")
    if swap not in SWAPS:
        raise RecoveryError(f"unknown swap setting {swap!r}; known: {', '.join(SWAPS)}")
    if stage in live_stages:
        return RecoveryPlan(stage, "replica", (stage,), f"stage {stage} has a live replica: copying it")
    if stage == 0:
        raise RecoveryError("no data node is left: stage 0 (embedding, head and data) cannot be rebuilt, "
                            "and the run cannot continue")
    lost = f"stage {stage} has no live replica"
    if method == "random":
        return RecoveryPlan(stage, "random", (), f"{lost}; re-initialised (baseline)")
    if method == "checkpoint":
        return RecoveryPlan(stage, "checkpoint", (), f"{lost}; loaded from the last complete checkpoint, "
                                                     "the run rolls back to it (baseline)")
    partner = _swap_partner(stage, num_stages, swap)
    if partner is not None and partner in live_stages:
        return RecoveryPlan(stage, "swap-copy", (partner,),
                            f"{lost}; copied from its swap partner {partner} (CheckFree+)")
    # a lost partner is also a lost neighbour (stage 1's next, stage S-1's previous): the formula
    # below then falls back to the other side
    after, before = (stage + 1) % num_stages, stage - 1
    usable = {s for s in (after, before) if s in live_stages and s not in blockless_stages}
    if after == before and usable:  # S = 2: stage 0 on both sides
        return RecoveryPlan(stage, "checkfree", (after, after),
                            f"{lost}; copied from stage {after}, its neighbour on both sides (CheckFree)")
    if len(usable) == 2:
        return RecoveryPlan(stage, "checkfree", (after, before),
                            f"{lost}; rebuilt from stages {after} and {before} (CheckFree)")
    if usable:
        [side] = usable
        other = before if side == after else after
        why = "holds no blocks" if other in blockless_stages else "has no live replica either"
        return RecoveryPlan(stage, "checkfree", (side, side),  # the formula with one side: a copy of it
                            f"{lost} and neighbour {other} {why}; copied from stage {side} alone (CheckFree)")
    neighbours = f"stage {after}" if after == before else f"stages {after} and {before}"
    return RecoveryPlan(stage, "random", (), f"{lost} and no neighbour can stand in ({neighbours}: lost or "
                                             "without blocks); re-initialised")


def _block_count(source: Weights, role: str) -> int:
    blocks = {int(m.group(1)) for m in map(_BLOCK.fullmatch, source) if m}
    if not blocks:
        raise RecoveryError(f"the {role} stage holds no blocks")
    return max(blocks) + 1


def _take(name: str, target: torch.Tensor, source: Weights, count: int) -> torch.Tensor:
    """The tensor of ``source`` (with ``count`` blocks) that block tensor ``name`` of the target takes."""
    match = _BLOCK.fullmatch(name)
    assert match is not None
    key = f"blocks.{min(int(match.group(1)), count - 1)}.{match.group(2)}"
    if key not in source:
        raise RecoveryError(f"{name}: the source stage has no {key}")
    if source[key].shape != target.shape:
        raise RecoveryError(f"{name}: shape {tuple(target.shape)} here, {tuple(source[key].shape)} in {key} "
                            "of the source")
    return source[key].detach()


def _check_norm(norm: float) -> float:
    if isinstance(norm, bool) or not isinstance(norm, numbers.Real) or not math.isfinite(norm) or norm < 0:
        raise RecoveryError(f"a gradient norm must be finite and >= 0, not {norm!r}")
    return float(norm)


def checkfree_weights(target: Weights, next_w: Weights, prev_w: Weights, next_norm: float,
                      prev_norm: float) -> dict[str, torch.Tensor]:
    """Every block tensor of ``target`` as ``(a * next + b * prev) / (a + b)``.

    Exactly: a = next_norm + 1e-4 and b = prev_norm + 1e-4 are Python floats; the neighbours'
    tensors are taken to float32 on the CPU, ``(a * n + b * p) / (a + b)`` is evaluated as written
    (torch turns each Python float into the tensor's float32), and the result is cast to the
    target tensor's dtype and device. Other tensors of ``target`` are kept (cloned)."""
    a, b = _check_norm(next_norm) + NORM_EPSILON, _check_norm(prev_norm) + NORM_EPSILON
    n_next, n_prev = _block_count(next_w, "next"), _block_count(prev_w, "previous")
    out = {}
    for name, t in target.items():
        if _BLOCK.fullmatch(name):
            after = _take(name, t, next_w, n_next).to("cpu", torch.float32)
            before = _take(name, t, prev_w, n_prev).to("cpu", torch.float32)
            out[name] = ((a * after + b * before) / (a + b)).to(t.device, t.dtype)
        else:
            out[name] = t.detach().clone()
    return out


def copy_blocks(target: Weights, source: Weights) -> dict[str, torch.Tensor]:
    """``target`` with every block tensor copied from ``source`` (block min(j, n - 1)), exactly
    where the dtypes agree; the result shares no memory with either."""
    count = _block_count(source, "source")
    return {name: (_take(name, t, source, count).to(t.device, t.dtype, copy=True) if _BLOCK.fullmatch(name)
                   else t.detach().clone())
            for name, t in target.items()}


def rebuild_weights(plan: RecoveryPlan, target: Weights, sources: Mapping[int, Weights],
                    norms: Mapping[int, float]) -> dict[str, torch.Tensor]:
    """The target stage's full state dict for ``plan``: ``target`` is the fresh module's state dict,
    ``sources`` the needed stages' weights and ``norms`` their last gradient norms (checkfree only).
    Not for "replica" or "checkpoint": those load the whole state, optimizer included."""
    missing = [s for s in plan.sources if s not in sources]
    if missing:
        raise RecoveryError(f"stage {plan.stage}: the weights of stage(s) {missing} are needed")
    if plan.method == "random":
        return {name: t.detach().clone() for name, t in target.items()}
    if plan.method == "swap-copy":
        return copy_blocks(target, sources[plan.sources[0]])
    if plan.method == "checkfree":
        after, before = plan.sources
        if after == before:
            return copy_blocks(target, sources[after])
        if after not in norms or before not in norms:
            raise RecoveryError(f"stage {plan.stage}: the gradient norms of stages {after} and {before} are needed")
        return checkfree_weights(target, sources[after], sources[before], norms[after], norms[before])
    raise RecoveryError(f"stage {plan.stage}: method {plan.method!r} does not rebuild weights")


def grad_norm(module: torch.nn.Module) -> float:
    """The L2 norm over all parameters' gradients (0.0 when there are none): what a stage
    publishes each iteration, taken on the averaged gradient before the step."""
    norms = [torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float64)
             for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
