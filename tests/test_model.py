"""The model and its stages: every path through the stages is the model it claims to be."""

import pytest
import torch
import torch.nn as nn

from trainer.model import (
    LM,
    PRESETS,
    BlockStage,
    ModelConfig,
    Stage0,
    build_stage,
    forward_path,
    split_model,
    stage_block_ranges,
)

torch.set_num_threads(2)

CFG = ModelConfig.from_preset("tiny", n_layers=6, max_seq_len=64)


@pytest.fixture(scope="module")
def model() -> LM:
    torch.manual_seed(0)
    return LM(CFG).eval()


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, CFG.vocab_size, (3, 32), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def reference_with_blocks(model: LM, block_ids: list[int]) -> LM:
    """An unsplit LM whose block list is exactly `block_ids` of `model`, same weights."""
    ref = LM(ModelConfig.from_preset("tiny", n_layers=len(block_ids), max_seq_len=CFG.max_seq_len), seed=0)
    ref.blocks = nn.ModuleList(model.blocks[i] for i in block_ids)
    ref.tok_emb, ref.norm, ref.head = model.tok_emb, model.norm, model.head
    return ref.eval()


@pytest.mark.parametrize("num_stages, blocks_per_stage", [(2, None), (3, None), (4, [0, 1, 3, 2]), (3, [3, 1, 2])])
@torch.no_grad()
def test_full_path_equals_unsplit_model(model, batch, num_stages, blocks_per_stage):
    x, y = batch
    logits, loss = model(x, y)
    stages = split_model(model, num_stages, blocks_per_stage)
    path_logits, path_loss = forward_path(stages, x, list(range(1, num_stages)), y)
    assert torch.equal(path_logits, logits)
    assert torch.equal(path_loss, loss)


@torch.no_grad()
def test_skip_path_removes_the_skipped_blocks(model, batch):
    x, y = batch
    stages = split_model(model, 4, [1, 2, 1, 2])  # blocks: s0 [0], s1 [1,2], s2 [3], s3 [4,5]
    logits, loss = forward_path(stages, x, [1, 3], y)
    ref_logits, ref_loss = reference_with_blocks(model, [0, 1, 2, 4, 5])(x, y)
    assert torch.equal(logits, ref_logits) and torch.equal(loss, ref_loss)
    full_logits = model(x)
    assert not torch.equal(logits, full_logits)  # skipping really changed something


@torch.no_grad()
def test_swapped_path_runs_blocks_in_swapped_order(model, batch):
    x, y = batch
    stages = split_model(model, 4, [1, 2, 1, 2])
    logits, loss = forward_path(stages, x, [2, 1, 3], y)
    ref_logits, ref_loss = reference_with_blocks(model, [0, 3, 1, 2, 4, 5])(x, y)
    assert torch.equal(logits, ref_logits) and torch.equal(loss, ref_loss)


@torch.no_grad()
def test_stage0_alone_and_empty_order(model, batch):
    x, y = batch
    stages = split_model(model, 3)
    logits, loss = forward_path(stages, x, [], y)
    ref_logits, ref_loss = reference_with_blocks(model, list(stages[0].block_range))(x, y)
    assert torch.equal(logits, ref_logits) and torch.equal(loss, ref_loss)
    assert torch.equal(stages[0](x), ref_logits)


@pytest.mark.parametrize("order, match", [([4], "unknown stage"), ([1, 1], "twice"), ([0, 1], "stage 0"), ([-1], "unknown")])
def test_invalid_orders_raise(model, batch, order, match):
    stages = split_model(model, 4)
    with pytest.raises(ValueError, match=match):
        forward_path(stages, batch[0], order)


def test_block_ranges():
    assert stage_block_ranges(6, 3) == [range(0, 2), range(2, 4), range(4, 6)]
    # Extra blocks go to the later stages: stage 0 also carries embedding, head and loss.
    assert stage_block_ranges(7, 3) == [range(0, 2), range(2, 4), range(4, 7)]
    assert stage_block_ranges(6, 3, [1, 3, 2]) == [range(0, 1), range(1, 4), range(4, 6)]
    for bad in ([1, 2], [2, 2, 3], [4, 2, 0]):
        with pytest.raises(ValueError):
            stage_block_ranges(6, 3, bad)
    with pytest.raises(ValueError):
        stage_block_ranges(2, 4)  # some stage would hold no block


@torch.no_grad()
def test_standalone_stages_load_split_weights(model, batch):
    x, y = batch
    ranges = stage_block_ranges(CFG.n_layers, 3, [2, 1, 3])
    split = split_model(model, 3, [2, 1, 3])
    fresh = [build_stage(CFG, s, r, seed=123) for s, r in enumerate(ranges)]
    assert isinstance(fresh[0], Stage0) and isinstance(fresh[2], BlockStage)
    assert not torch.equal(forward_path(fresh, x, [1, 2]), model(x))
    for stage, source in zip(fresh, split):
        state = {k: v.clone() for k, v in source.state_dict().items()}
        assert all(k.startswith(("blocks.", "tok_emb.", "norm.", "head.")) for k in state)
        stage.load_state_dict(state)  # strict: keys are local to the stage
    logits, loss = forward_path(fresh, x, [1, 2], y)
    ref_logits, ref_loss = model(x, y)
    assert torch.equal(logits, ref_logits) and torch.equal(loss, ref_loss)


def test_stage_built_alone_initialises_like_the_whole_model():
    whole = LM(CFG, seed=7)
    alone = BlockStage(CFG, range(3, 5), seed=7)
    for i, block in zip(range(3, 5), alone.blocks):
        for (name, a), (_, b) in zip(block.state_dict().items(), whole.blocks[i].state_dict().items()):
            assert torch.equal(a, b), name
    torch.manual_seed(5)
    a = LM(CFG)
    torch.manual_seed(5)
    b = LM(CFG)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_training_a_split_model_trains_the_shared_weights(batch):
    x, y = batch
    m = LM(CFG, seed=3)
    stages = split_model(m, 3)
    _, loss = forward_path(stages, x, [1, 2], y)
    loss.backward()
    assert m.blocks[-1].mlp.down.weight.grad is not None
    assert m.tok_emb.weight.grad is not None


def test_presets_and_param_counts():
    expected = {"tiny": 0.23e6, "small": 25e6, "124m": 124e6, "350m": 350e6, "1.3b": 1.3e9}
    assert set(expected) <= set(PRESETS)
    for name, target in expected.items():
        cfg = ModelConfig.from_preset(name)
        assert 0.9 * target < cfg.param_count() < 1.1 * target, name
        with torch.device("meta"):  # shapes only: never allocate 1.3B parameters
            assert LM(cfg, seed=0).num_params() == cfg.param_count()
    assert LM(ModelConfig.from_preset("tiny"), seed=0).num_params() == PRESETS["tiny"].param_count()
    untied = ModelConfig.from_preset("tiny", tie_embeddings=False)
    assert untied.param_count() == PRESETS["tiny"].param_count() + 256 * 64
    assert ModelConfig.from_preset("tiny", d_model=128).d_model == 128
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.from_preset("7b")
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_preset("tiny", widht=3)


def test_untied_head_and_sequence_limit(batch):
    x, y = batch
    cfg = ModelConfig.from_preset("tiny", n_layers=2, tie_embeddings=False, max_seq_len=16)
    m = LM(cfg, seed=0)
    assert "head.weight" in m.state_dict()
    with pytest.raises(ValueError, match="max_seq_len"):
        m(x)
    logits, loss = m(x[:, :16], y[:, :16])
    assert logits.shape == (3, 16, 256) and 5.0 < loss.item() < 6.0  # ~ln(256) at init
