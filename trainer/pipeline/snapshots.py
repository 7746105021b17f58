"""Weight snapshots of a live pipeline for evaluation afterwards: each node writes its stage's
weights every few iterations, and ``models_over_time`` puts together the model the swarm held at
each of the data node's snapshots (the stages that stepped that iteration; a lost stage is left out,
as the running pipeline skips it)."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from trainer.files import save_safetensors

logger = logging.getLogger(__name__)

_NAME = re.compile(r"it(\d{8})-(\d+)\.safetensors")


@dataclass(frozen=True)
class Snapshot:
    stage: int
    iteration: int  # the weights after this iteration's step
    at: float  # unix time the step ended
    path: Path


def save_snapshot(root: Path, stage: int, iteration: int, weights: dict[str, torch.Tensor], at: float) -> Path | None:
    """Written atomically; the time is in the name, so an iteration trained twice (after a
    checkpoint rollback) keeps both. A snapshot that cannot be written (a full disk) is skipped
    with a warning and None: snapshots serve evaluation afterwards, training goes on without them."""
    path = Path(root) / f"stage{stage}" / f"it{iteration:08d}-{int(at * 1000)}.safetensors"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors(path, weights)
    except OSError as error:
        logger.warning("weight snapshot of stage %d at iteration %d skipped: %s: %s", stage, iteration,
                       error.strerror, error.filename)
        return None
    return path


def list_snapshots(root: Path) -> list[Snapshot]:
    found = []
    for folder in sorted(Path(root).glob("stage*")):
        if not folder.name[5:].isdigit():
            continue
        for path in folder.iterdir():
            match = _NAME.fullmatch(path.name)
            if match:
                found.append(Snapshot(int(folder.name[5:]), int(match[1]), int(match[2]) / 1000, path))
    return sorted(found, key=lambda s: (s.at, s.stage))


def load_snapshot(snapshot: Snapshot) -> dict[str, torch.Tensor]:
    return load_file(str(snapshot.path))


def models_over_time(snapshots: list[Snapshot], num_stages: int, slack_s: float) -> list[tuple[Snapshot, dict[int, Snapshot]]]:
    """For each stage-0 snapshot, the snapshot of every other stage at the same iteration that is
    nearest in time (within ``slack_s``: stages step at about the same moment); a stage with none
    was not serving then and is left out."""
    by_stage: dict[int, list[Snapshot]] = {}
    for s in snapshots:
        by_stage.setdefault(s.stage, []).append(s)
    out = []
    for head in by_stage.get(0, []):
        parts = {}
        for stage in range(1, num_stages):
            near = [s for s in by_stage.get(stage, []) if s.iteration == head.iteration and abs(s.at - head.at) <= slack_s]
            if near:
                parts[stage] = min(near, key=lambda s: abs(s.at - head.at))
        out.append((head, parts))
    return out
