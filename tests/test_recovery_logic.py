"""Rebuild rules (trainer/recovery/rebuild.py) and failure injection (trainer/recovery/failures.py)."""
from __future__ import annotations

import json
import random

import pytest
import torch

from node.pipeline_node import stage_module
from protocol.keys import generate_private_key
from protocol.runspec import make_spec
from trainer.recovery.failures import (Failure, FailureSpecError, due, failure_probability, load_failure_schedule,
                                       parse_fail_spec, sample_failures, scaled_iteration_s)
from trainer.recovery.rebuild import (RecoveryError, checkfree_weights, copy_blocks, grad_norm, plan_recovery,
                                      rebuild_weights)


@pytest.mark.parametrize("stages", [2, 3, 4, 6, 8])
def test_plans_for_every_stage_with_and_without_swaps(stages):
    everyone = set(range(stages))
    for stage in range(1, stages):
        others = everyone - {stage}
        plain = plan_recovery(stage, stages, "none", others)
        assert plain.method == "checkfree" and plain.sources == ((stage + 1) % stages, stage - 1)
        swapped = plan_recovery(stage, stages, "checkfree_plus", others)
        if stages >= 3 and stage == 1:
            assert (swapped.method, swapped.sources) == ("swap-copy", (2,))
        elif stages >= 3 and stage == stages - 1:
            assert (swapped.method, swapped.sources) == ("swap-copy", (stages - 2,))
        else:
            assert swapped == plain
        assert plan_recovery(stage, stages, "none", everyone).method == "replica"
        assert plan_recovery(stage, stages, "none", others, "random").method == "random"
    assert plan_recovery(0, stages, "none", everyone).method == "replica"
    with pytest.raises(RecoveryError, match="no data node"):
        plan_recovery(0, stages, "none", everyone - {0})


def test_lost_neighbours_fall_back_to_the_other_side_then_to_random():
    plan = plan_recovery(2, 5, "none", {0, 1, 4})  # 3 is lost too
    assert plan.method == "checkfree" and plan.sources == (1, 1) and "alone" in plan.reason
    assert plan_recovery(2, 5, "none", {0, 4}).method == "random"
    # CheckFree+ with the swap partner lost: the formula over what is left
    assert plan_recovery(1, 4, "checkfree_plus", {0, 3}).sources == (0, 0)
    with pytest.raises(RecoveryError):
        plan_recovery(4, 4, "none", {0})
    with pytest.raises(RecoveryError, match="unknown recovery method"):
        plan_recovery(1, 4, "none", {0, 2}, "magic")


SPEC = make_spec("pipeline", "tiny", generate_private_key(), stages=3, blocks_per_stage=[1, 2, 1], path_length=2,
                 swap="none", seq_len=16)


def test_checkfree_is_the_weighted_mean_of_the_neighbours_block_by_block():
    target = stage_module(SPEC, 1).state_dict()  # 2 blocks
    after, before = stage_module(SPEC, 2).state_dict(), stage_module(SPEC, 0).state_dict()  # 1 block each
    out = checkfree_weights(target, after, before, 0.5, 2.0)
    a, b = 0.5 + 1e-4, 2.0 + 1e-4
    for name in target:
        source = "blocks.0." + name.split(".", 2)[2]  # both blocks of the target take block 0 (min(j, n - 1))
        assert torch.equal(out[name], (a * after[source] + b * before[source]) / (a + b)), name
    module = stage_module(SPEC, 1)
    module.load_state_dict(out)  # strict
    copied = copy_blocks(target, after)
    assert all(torch.equal(copied[n], after["blocks.0." + n.split(".", 2)[2]]) for n in target)


def test_rebuild_inputs_are_checked():
    target = stage_module(SPEC, 2).state_dict()
    small = {n: t[..., :1] for n, t in stage_module(SPEC, 0).state_dict().items()}
    with pytest.raises(RecoveryError, match="shape"):
        checkfree_weights(target, small, small, 1.0, 1.0)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(RecoveryError, match="finite"):
            checkfree_weights(target, target, target, bad, 1.0)
    plan = plan_recovery(2, 3, "none", {0, 1})
    with pytest.raises(RecoveryError, match="needed"):
        rebuild_weights(plan, target, {0: target}, {0: 1.0, 1: 1.0})
    with pytest.raises(RecoveryError, match="norms"):
        rebuild_weights(plan, target, {0: target, 1: target}, {})


def test_grad_norm_is_the_norm_over_all_gradients():
    module = stage_module(SPEC, 2)
    assert grad_norm(module) == 0.0
    for p in module.parameters():
        p.grad = torch.randn_like(p)
    flat = torch.cat([p.grad.flatten() for p in module.parameters()])
    assert grad_norm(module) == pytest.approx(float(torch.linalg.vector_norm(flat)), rel=1e-5)


def test_fail_specs():
    assert parse_fail_spec("stage=2@iter=5") == [Failure(5, 2)]
    assert parse_fail_spec(" stage=3@iteration=1@replica=1 ; iter=0@stage=1,stage=1@iter=9") == [
        Failure(0, 1), Failure(1, 3, 1), Failure(9, 1)]
    for text, message in (("", "empty"), ("stage=2", "no iter="), ("iter=2", "no stage="),
                          ("stage=1@stage=2@iter=1", "given twice"), ("stage=1@iter=2@when=3", "unknown key"),
                          ("stage=-1@iter=2", "non-negative integer"), ("stage=1.5@iter=2", "non-negative integer"),
                          ("stage=1@iter=2,stage=1@iter=2", "twice"), ("stage=1@iter=2,,stage=2@iter=1", "empty item")):
        with pytest.raises(FailureSpecError, match=message):
            parse_fail_spec(text)
    with pytest.raises(FailureSpecError, match="does not exist"):
        parse_fail_spec("stage=4@iter=1", num_stages=4)


def test_failure_schedule_files(tmp_path):
    path = tmp_path / "f.json"
    path.write_text(json.dumps([{"stage": 1, "iteration": 4}, {"stage": 2, "iteration": 2, "replica": 1}]))
    assert load_failure_schedule(path) == [Failure(2, 2, 1), Failure(4, 1)]
    path.write_text(json.dumps({"failures": [{"stage": 1, "iteration": 4}]}))
    assert load_failure_schedule(path) == [Failure(4, 1)]
    for body, message in (([{"stage": True, "iteration": 1}], "non-negative integers"),
                          ([{"stage": 1, "iteration": 1, "x": 1}], "failure 0"), ({"x": []}, "expected a list"),
                          ([{"stage": 9, "iteration": 1}], "does not exist")):
        path.write_text(json.dumps(body))
        with pytest.raises(FailureSpecError, match=message):
            load_failure_schedule(path, num_stages=4)
    path.write_text("{not json")
    with pytest.raises(FailureSpecError, match="not valid JSON"):
        load_failure_schedule(path)
    with pytest.raises(FailureSpecError, match="cannot read"):
        load_failure_schedule(tmp_path / "missing.json")


def test_hourly_rates_become_per_iteration_probabilities():
    assert failure_probability(0.1, 3600) == pytest.approx(0.1)
    assert failure_probability(0.1, 36) == pytest.approx(1 - 0.9 ** 0.01)
    assert failure_probability(0.0, 10) == 0.0
    assert scaled_iteration_s(2.0, 0.05) == pytest.approx(40.0)
    for bad in ((1.0, 10), (-0.1, 10), (0.1, 0)):
        with pytest.raises(FailureSpecError):
            failure_probability(*bad)


def test_sampled_failures_are_reproducible_at_the_right_rate():
    a = sample_failures(0.5, 3600 * 0.3, 4, 200, seed=7)
    assert a == sample_failures(0.5, 3600 * 0.3, 4, 200, seed=7) != sample_failures(0.5, 3600 * 0.3, 4, 200, seed=8)
    assert all(f.stage in (1, 2, 3) and 1 <= f.iteration < 200 for f in a)
    p = failure_probability(0.5, 3600 * 0.3)
    many = sample_failures(0.5, 3600 * 0.3, 2, 5001, seed=1)
    assert abs(len(many) / 5000 - p) < 0.03
    gapped = sample_failures(0.9, 3600, 3, 300, seed=3, min_gap=5)
    for stage in (1, 2):
        its = [f.iteration for f in gapped if f.stage == stage]
        assert all(b - a > 5 for a, b in zip(its, its[1:]))
    assert due([Failure(5, 1), Failure(2, 2), Failure(9, 1)], 5, {Failure(2, 2)}) == [Failure(5, 1)]
    random.seed(0)  # (sample_failures must not use the global generator)
    assert sample_failures(0.5, 3600, 3, 50, seed=4) == sample_failures(0.5, 3600, 3, 50, seed=4)


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
