"""Rebuilding a lost stage (trainer/recovery/rebuild.py): which rule applies, and the weights it gives."""
from __future__ import annotations

import pytest
import torch

from node.pipeline_node import stage_module
from protocol.keys import generate_private_key
from protocol.runspec import make_spec
from trainer.recovery.rebuild import (RECOVERY_LR_FACTOR, RecoveryError, RecoveryPlan, checkfree_weights,
                                      copy_blocks, grad_norm, plan_recovery, rebuild_weights, swaps_on)

KEY = generate_private_key()


def spec(blocks_per_stage: list[int]):
    return make_spec("pipeline", "tiny", KEY, stages=len(blocks_per_stage), blocks_per_stage=blocks_per_stage,
                     path_length=2, swap="none", seq_len=16)


def weights(blocks_per_stage: list[int], stage: int) -> dict[str, torch.Tensor]:
    return stage_module(spec(blocks_per_stage), stage).state_dict()


def test_the_settings():
    assert RECOVERY_LR_FACTOR == 1.1
    assert swaps_on("checkfree_plus") and not swaps_on("none")


# --- plans -------------------------------------------------------------------------------------

@pytest.mark.parametrize("stages", [2, 3, 4, 6, 8])
def test_every_lost_stage_with_its_neighbours_alive(stages):
    for stage in range(1, stages):
        others = set(range(stages)) - {stage}
        after, before = (stage + 1) % stages, stage - 1
        plain = plan_recovery(stage, stages, "none", others)
        assert (plain.stage, plain.method, plain.sources) == (stage, "checkfree", (after, before))
        swapped = plan_recovery(stage, stages, "checkfree_plus", others)
        if stages >= 3 and stage == 1:
            assert (swapped.method, swapped.sources) == ("swap-copy", (2,))
        elif stages >= 3 and stage == stages - 1:
            assert (swapped.method, swapped.sources) == ("swap-copy", (stages - 2,))
        else:  # middle stages, and S = 2 where stage 1 has no partner
            assert swapped == plain
        assert "\n" not in plain.reason and f"stage {stage}" in plain.reason


def test_the_wrap_around_and_the_swap_partners_spelled_out():
    live = lambda s, n: set(range(n)) - {s}  # noqa: E731
    assert plan_recovery(1, 2, "none", {0}).sources == (0, 0)  # stage 0 on both sides
    assert plan_recovery(1, 2, "checkfree_plus", {0}).sources == (0, 0)
    assert plan_recovery(1, 4, "none", live(1, 4)).sources == (2, 0)
    assert plan_recovery(3, 4, "none", live(3, 4)).sources == (0, 2)
    assert plan_recovery(2, 4, "none", live(2, 4)).reason == \
        "stage 2 has no live replica; rebuilt from stages 3 and 1 (CheckFree)"
    # S = 3: the two rules point at each other
    assert plan_recovery(1, 3, "checkfree_plus", live(1, 3)).sources == (2,)
    assert plan_recovery(2, 3, "checkfree_plus", live(2, 3)).sources == (1,)
    assert [plan_recovery(s, 6, "checkfree_plus", live(s, 6)).method for s in range(1, 6)] == \
        ["swap-copy", "checkfree", "checkfree", "checkfree", "swap-copy"]
    assert plan_recovery(5, 6, "checkfree_plus", live(5, 6)).sources == (4,)


@pytest.mark.parametrize("stages", [2, 3, 4, 6, 8])
def test_a_live_replica_always_wins(stages):
    everyone = set(range(stages))
    for stage in range(stages):
        for swap in ("none", "checkfree_plus"):
            for method in ("checkfree", "random"):
                plan = plan_recovery(stage, stages, swap, everyone, method)
                assert (plan.method, plan.sources) == ("replica", (stage,))
        if stage:
            assert plan_recovery(stage, stages, "checkfree_plus", everyone - {stage}, "random") == \
                RecoveryPlan(stage, "random", (), f"stage {stage} has no live replica; re-initialised (baseline)")


def test_stage_0_is_copied_or_the_run_cannot_go_on():
    assert plan_recovery(0, 4, "none", {0, 3}).method == "replica"
    for method in ("checkfree", "random"):
        with pytest.raises(RecoveryError, match="no data node is left"):
            plan_recovery(0, 4, "checkfree_plus", {1, 2, 3}, method)


def test_lost_neighbours_fall_back_to_the_other_side_then_to_random():
    plan = plan_recovery(2, 5, "none", {0, 1, 4})  # 3 is lost too
    assert (plan.method, plan.sources) == ("checkfree", (1, 1))
    assert "neighbour 3 has no live replica either" in plan.reason and "stage 1 alone" in plan.reason
    assert plan_recovery(2, 5, "none", {0, 3, 4}).sources == (3, 3)
    assert plan_recovery(4, 5, "none", {1, 2, 3}).sources == (3, 3)  # no data node: stage 0 is lost too
    both = plan_recovery(2, 5, "none", {0, 4})
    assert (both.method, both.sources) == ("random", ()) and "stages 3 and 1" in both.reason
    assert plan_recovery(1, 2, "none", set()).method == "random"
    # CheckFree+ with the swap partner lost: the partner is a neighbour, so the other side alone
    assert plan_recovery(1, 4, "checkfree_plus", {0, 3}).sources == (0, 0)
    assert plan_recovery(3, 4, "checkfree_plus", {0, 1}).sources == (0, 0)
    assert plan_recovery(1, 3, "checkfree_plus", {0}).sources == (0, 0)
    assert plan_recovery(2, 4, "checkfree_plus", {0, 1}).sources == (1, 1)  # middle: the formula's fallback


def test_a_stage_0_without_blocks_cannot_stand_in():
    assert plan_recovery(1, 5, "none", {0, 2, 3, 4}, blockless_stages={0}).sources == (2, 2)
    assert "holds no blocks" in plan_recovery(4, 5, "none", {0, 1, 2, 3}, blockless_stages={0}).reason
    assert plan_recovery(1, 2, "none", {0}, blockless_stages={0}).method == "random"
    assert plan_recovery(0, 5, "none", {0}, blockless_stages={0}).method == "replica"


def test_bad_plan_arguments():
    for stage, stages in ((-1, 4), (4, 4), (0, 1), (1, 1)):
        with pytest.raises(RecoveryError, match="does not exist"):
            plan_recovery(stage, stages, "none", {0})
    with pytest.raises(RecoveryError, match="unknown recovery method 'magic'"):
        plan_recovery(1, 4, "none", {0, 2}, "magic")
    with pytest.raises(RecoveryError, match="unknown swap setting 'always'"):
        plan_recovery(1, 4, "always", {0, 2})


# --- weights -----------------------------------------------------------------------------------

# tiny has 4 blocks. Stage 2 holds 2; its neighbours stage 0 (next, wrapped) and stage 1 hold 1 each.
UNEVEN = [1, 1, 2]


def test_checkfree_is_the_weighted_mean_block_by_block_with_the_nearest_block():
    target, after, before = (weights(UNEVEN, s) for s in (2, 0, 1))
    out = checkfree_weights(target, after, before, 0.5, 2.0)
    a, b = 0.5 + 1e-4, 2.0 + 1e-4
    assert set(out) == set(target)
    for name in target:
        rest = name.split(".", 2)[2]
        expected = (a * after[f"blocks.0.{rest}"] + b * before[f"blocks.0.{rest}"]) / (a + b)
        assert torch.equal(out[name], expected), name  # blocks 0 and 1 both take block 0 (min(j, n - 1))
    module = stage_module(spec(UNEVEN), 2)
    module.load_state_dict(out)  # strict
    assert all(torch.equal(p, out[n]) for n, p in module.state_dict().items())
    assert torch.equal(out["blocks.0.attn.qkv.weight"], out["blocks.1.attn.qkv.weight"])


def test_a_target_with_fewer_blocks_takes_the_neighbours_first_ones():
    # [1, 1, 2]: stage 1 (1 block) between stage 2 (2 blocks) and stage 0 (1 block)
    target, after, before = (weights(UNEVEN, s) for s in (1, 2, 0))
    out = checkfree_weights(target, after, before, 3.0, 0.0)
    a, b = 3.0 + 1e-4, 0.0 + 1e-4
    for name in target:
        assert name.startswith("blocks.0.")
        assert torch.equal(out[name], (a * after[name] + b * before[name]) / (a + b)), name
    stage_module(spec(UNEVEN), 1).load_state_dict(out)


def test_checkfree_computes_in_float32_and_keeps_the_targets_dtype_and_other_tensors():
    target = stage_module(spec([1, 1, 2]), 0).to(torch.bfloat16).state_dict()  # stage 0 as a stand-in target
    after, before = weights([1, 1, 2], 1), stage_module(spec([1, 1, 2]), 2).double().state_dict()
    out = checkfree_weights(target, after, before, 1.25, 0.75)
    a, b = 1.25 + 1e-4, 0.75 + 1e-4
    for name, t in target.items():
        assert out[name].dtype == torch.bfloat16
        if name.startswith("blocks."):
            rest = name.split(".", 2)[2]
            expected = (a * after[f"blocks.0.{rest}"] + b * before[f"blocks.0.{rest}"].float()) / (a + b)
            assert torch.equal(out[name], expected.to(torch.bfloat16)), name
        else:  # tok_emb, norm: not ours to change
            assert torch.equal(out[name], t) and out[name].data_ptr() != t.data_ptr(), name


def test_the_inputs_are_left_alone_and_not_shared():
    target, after, before = (weights(UNEVEN, s) for s in (2, 0, 1))
    copies = [{n: t.clone() for n, t in d.items()} for d in (target, after, before)]
    out = checkfree_weights(target, after, before, 1.0, 1.0)
    copied = copy_blocks(target, after)
    for original, kept in zip((target, after, before), copies):
        assert all(torch.equal(original[n], kept[n]) for n in kept)
    inputs = {t.data_ptr() for d in (target, after, before) for t in d.values()}
    assert not inputs & {t.data_ptr() for d in (out, copied) for t in d.values()}


def test_swap_copy_copies_exactly():
    swapped = [1, 1, 1, 1]
    plan = plan_recovery(1, 4, "checkfree_plus", {0, 2, 3})
    target, partner = weights(swapped, 1), weights(swapped, 2)
    out = rebuild_weights(plan, target, {2: partner}, {})
    assert set(out) == set(partner) and all(torch.equal(out[n], partner[n]) for n in partner)
    stage_module(spec(swapped), 1).load_state_dict(out)
    # copied into a stage with more blocks: each takes the nearest block the partner has
    small = weights(UNEVEN, 1)
    bigger = copy_blocks(weights(UNEVEN, 2), small)
    assert all(torch.equal(t, small["blocks.0." + n.split(".", 2)[2]]) for n, t in bigger.items())


def test_one_side_alone_is_copied_exactly_and_random_keeps_the_fresh_weights():
    blocks = [1, 1, 1, 1]
    target, stage1 = weights(blocks, 2), weights(blocks, 1)
    plan = plan_recovery(2, 4, "none", {0, 1})  # stage 3 lost as well
    out = rebuild_weights(plan, target, {1: stage1}, {})  # no norm needed to copy
    assert all(torch.equal(out[n], stage1[n]) for n in stage1)
    plan = plan_recovery(1, 2, "none", {0})  # S = 2: stage 0 on both sides
    target, stage0 = weights([3, 1], 1), weights([3, 1], 0)
    out = rebuild_weights(plan, target, {0: stage0}, {0: 4.0})
    assert all(torch.equal(out[n], stage0[n]) for n in target)
    stage_module(spec([3, 1]), 1).load_state_dict(out)

    plan = plan_recovery(2, 4, "none", {0, 1, 3}, "random")
    fresh = weights(blocks, 2)
    out = rebuild_weights(plan, fresh, {}, {})
    assert set(out) == set(fresh) and all(torch.equal(out[n], fresh[n]) for n in fresh)


def test_rebuild_weights_follows_the_plan():
    target, after, before = (weights(UNEVEN, s) for s in (2, 0, 1))
    plan = plan_recovery(2, 3, "none", {0, 1})
    assert plan.sources == (0, 1)
    out = rebuild_weights(plan, target, {0: after, 1: before}, {0: 0.3, 1: 0.9})
    expected = checkfree_weights(target, after, before, 0.3, 0.9)
    assert all(torch.equal(out[n], expected[n]) for n in target)


def test_shapes_and_missing_tensors_are_named():
    target, source = weights(UNEVEN, 2), dict(weights(UNEVEN, 1))
    source["blocks.0.mlp.up.weight"] = torch.zeros(3, 3)
    with pytest.raises(RecoveryError, match=r"blocks\.0\.mlp\.up\.weight: shape \(192, 64\) here, \(3, 3\)"):
        checkfree_weights(target, source, source, 1.0, 1.0)
    with pytest.raises(RecoveryError, match="blocks.0.mlp.up.weight"):
        copy_blocks(target, source)
    del source["blocks.0.mlp.up.weight"]
    with pytest.raises(RecoveryError, match="has no blocks.0.mlp.up.weight"):
        copy_blocks(target, source)
    empty = weights([0, 1, 3], 0)  # stage 0 may hold no blocks at all
    with pytest.raises(RecoveryError, match="previous stage holds no blocks"):
        checkfree_weights(weights([0, 1, 3], 1), weights([0, 1, 3], 2), empty, 1.0, 1.0)


def test_bad_norms_and_missing_inputs():
    target = weights(UNEVEN, 2)
    for bad in (-1.0, float("nan"), float("inf"), -float("inf"), True, "1.0", None):
        with pytest.raises(RecoveryError, match="finite and >= 0"):
            checkfree_weights(target, target, target, bad, 1.0)
        with pytest.raises(RecoveryError, match="finite and >= 0"):
            checkfree_weights(target, target, target, 1.0, bad)
    assert checkfree_weights(target, target, target, 0, 1)  # ints are fine
    plan = plan_recovery(2, 3, "none", {0, 1})
    with pytest.raises(RecoveryError, match=r"weights of stage\(s\) \[1\] are needed"):
        rebuild_weights(plan, target, {0: target}, {0: 1.0, 1: 1.0})
    with pytest.raises(RecoveryError, match="gradient norms of stages 0 and 1 are needed"):
        rebuild_weights(plan, target, {0: target, 1: target}, {0: 1.0})
    with pytest.raises(RecoveryError, match="does not rebuild weights"):
        rebuild_weights(plan_recovery(2, 3, "none", {0, 1, 2}), target, {2: target}, {})


def test_grad_norm_is_the_norm_over_all_gradients():
    # accumulated in float64: a float32 norm of the concatenation is off in the 5th digit already
    module = stage_module(spec(UNEVEN), 2)
    assert grad_norm(module) == 0.0
    torch.manual_seed(0)
    params = list(module.parameters())
    for p in params[::2]:  # parameters without a gradient count for nothing
        p.grad = torch.randn_like(p)
    flat = torch.cat([p.grad.flatten() for p in params if p.grad is not None])
    assert grad_norm(module) == pytest.approx(float(torch.linalg.vector_norm(flat.double())), rel=1e-12)
    tokens = torch.randint(0, 256, (2, 16))
    stage0 = stage_module(spec(UNEVEN), 0)
    _, loss = stage0(tokens, tokens)
    loss.backward()
    flat = torch.cat([p.grad.flatten() for p in stage0.parameters()])
    assert grad_norm(stage0) > 0
    assert grad_norm(stage0) == pytest.approx(float(torch.linalg.vector_norm(flat.double())), rel=1e-12)
