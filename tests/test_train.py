"""Single-process training: the loss falls, and a seed fixes the run."""

import dataclasses

import pytest

from trainer.train import TrainConfig, TrainReport, lr_at, train_single_process

FAST = TrainConfig(preset="tiny", batch_size=8, seq_len=64, eval_batches=2, num_threads=2, seed=0)


def test_tiny_model_learns_the_embedded_domains():
    reports: list[TrainReport] = []
    result = train_single_process(dataclasses.replace(FAST, steps=200, eval_every=100), on_report=reports.append)
    assert result.final_val_loss < 0.7 * result.initial_val_loss, (result.initial_val_loss, result.final_val_loss)
    assert reports == result.history
    evaluated = [r for r in reports if r.val_loss is not None]
    assert [r.step for r in evaluated] == [0, 100, 200]
    assert set(evaluated[-1].val_loss_by_domain) == {"python", "prose", "arithmetic"}
    assert all(r.tokens_per_s > 0 for r in reports[1:])
    assert reports[-1].train_loss < reports[1].train_loss


def test_same_seed_same_losses_other_seed_different():
    cfg = dataclasses.replace(FAST, steps=12, eval_every=6, log_every=3)
    a, b = train_single_process(cfg), train_single_process(cfg)
    losses = lambda r: [(h.step, h.train_loss, h.val_loss) for h in r.history]  # noqa: E731
    assert losses(a) == losses(b)
    assert losses(train_single_process(dataclasses.replace(cfg, seed=1))) != losses(a)


def test_schedule_and_bad_config():
    cfg = TrainConfig(lr=1e-3, warmup=10, steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(110, cfg) == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="max_seq_len"):
        train_single_process(dataclasses.replace(FAST, seq_len=10_000, steps=1))
    with pytest.raises(ValueError, match="unknown model preset"):
        train_single_process(dataclasses.replace(FAST, preset="huge", steps=1))
