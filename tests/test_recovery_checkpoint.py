"""The checkpoint-and-restart baseline's storage (trainer/recovery/checkpoint.py)."""
from __future__ import annotations

import pytest
import torch


def test_checkpoints_round_trip_and_the_latest_complete_one(tmp_path):
    from trainer.recovery.checkpoint import CheckpointError, latest_complete, load_checkpoint, save_checkpoint

    state = {"w/a": torch.randn(3), "o/a/step": torch.tensor(4.0)}
    assert latest_complete(tmp_path, 2) is None
    for stage, its in ((0, (0, 5, 10)), (1, (0, 5))):
        for it in its:
            save_checkpoint(tmp_path, stage, it, state, 3e-3)
    assert latest_complete(tmp_path, 2) == 5  # stage 1 has no 10 yet
    loaded, lr = load_checkpoint(tmp_path, 1, 5)
    assert lr == 3e-3 and all(torch.equal(loaded[n], state[n]) for n in state)
    with pytest.raises(CheckpointError, match="cannot load"):
        load_checkpoint(tmp_path, 1, 10)
    (tmp_path / "stage1" / "it00000010.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path, 1, 10)
