"""The checkpoint-and-restart baseline: stage states saved every K iterations to storage the nodes
share, and loaded back when a failure rolls the whole run back (docs/recovery.md)."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from trainer.files import save_safetensors

logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing or unreadable."""


def checkpoint_path(root: Path, stage: int, iteration: int) -> Path:
    return Path(root) / f"stage{stage}" / f"it{iteration:08d}.safetensors"


def save_checkpoint(root: Path, stage: int, iteration: int, state: dict[str, torch.Tensor], lr: float) -> Path | None:
    """The stage's state before ``iteration`` (weights and optimizer), written atomically; replicas
    of a stage write the same bytes, so the last one to land is as good as the first. A checkpoint
    that cannot be written (a full disk) is skipped with an error in the log and None: training
    goes on, and a rollback takes the newest iteration that every stage has a checkpoint of."""
    path = checkpoint_path(root, stage, iteration)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors(path, state, metadata={"lr": repr(float(lr))})
    except OSError as error:
        logger.error("checkpoint of stage %d at iteration %d not written: %s: %s", stage, iteration,
                     error.strerror, error.filename)
        return None
    return path


def load_checkpoint(root: Path, stage: int, iteration: int) -> tuple[dict[str, torch.Tensor], float]:
    path = checkpoint_path(root, stage, iteration)
    try:
        with safe_open(str(path), framework="pt") as handle:
            lr = float((handle.metadata() or {}).get("lr", "nan"))
        state = load_file(str(path))
    except (OSError, SafetensorError, ValueError) as error:
        raise CheckpointError(f"{path}: cannot load the checkpoint ({error})") from None
    if not lr > 0:
        raise CheckpointError(f"{path}: the checkpoint has no learning rate")
    return state, lr


def latest_complete(root: Path, num_stages: int) -> int | None:
    """The newest iteration every stage has a checkpoint of."""
    common: set[int] | None = None
    for stage in range(num_stages):
        folder = Path(root) / f"stage{stage}"
        have = {int(p.stem[2:]) for p in folder.glob("it*.safetensors") if p.stem[2:].isdigit()} \
            if folder.is_dir() else set()
        common = have if common is None else common & have
    return max(common) if common else None
