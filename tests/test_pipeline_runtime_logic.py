"""The pipeline worker's pure logic in one process: the state in parts, activation dtypes, leader policies."""
from __future__ import annotations

import asyncio

import pytest
import torch

from node.pipeline_node import stage_module
from protocol.keys import generate_private_key
from protocol.runspec import make_spec
from trainer.pipeline.leader import Leader, LeaderSettings
from trainer.pipeline.runtime import STATE_PART_TENSORS, PipelineError, PipelineSettings, PipelineWorker, fetch_state
from trainer.pipeline.simulator import simulate


class FakeSwarm:
    """Only what the constructors need: an id and a place to register handlers."""

    def __init__(self, my_id: bytes):
        self.my_id = my_id
        self.handlers = {}

    def serve(self, method, handler):
        self.handlers[method] = handler


SPEC = make_spec("pipeline", "tiny", generate_private_key(), stages=2, blocks_per_stage=[3, 1], path_length=2,
                 swap="none", seq_len=16)


def worker(stage: int, dtype=torch.float32, me: bytes = b"\x01" * 32) -> PipelineWorker:
    settings = PipelineSettings(num_stages=2, path_length=2, swap="none", microbatches=2, memory=2, iterations=3,
                                lr=1e-2, activation_dtype=dtype, slot_wait_s=0.1)
    return PipelineWorker(FakeSwarm(me), stage, stage_module(SPEC, stage), settings)


def train_once(w: PipelineWorker) -> None:
    tokens = torch.randint(0, 256, (2, 16))
    _, loss = w.module.finish(w.module.start(tokens), tokens)
    loss.backward()
    w._step({name: p.grad for name, p in w.module.named_parameters()})


def test_state_travels_in_parts_and_loads_identically():
    a, b = worker(0), worker(0, me=b"\x02" * 32)
    train_once(a)
    train_once(a)
    assert len(a.full_state()) > STATE_PART_TENSORS  # so that it takes more than one part

    async def call(args):
        return await a._on_state(b"\x02" * 32, args, {})

    iteration, state = asyncio.run(fetch_state(call))
    assert iteration == 0 and set(state) == set(a.full_state())
    b.load_full_state(state)
    mine, theirs = a.full_state(), b.full_state()
    assert all(torch.equal(mine[n], theirs[n]) for n in mine)
    # and the next step of both is the same (the optimizer state came along)
    torch.manual_seed(0)
    train_once(a)
    torch.manual_seed(0)
    train_once(b)
    assert all(torch.equal(p, q) for p, q in zip(a.module.parameters(), b.module.parameters()))
    # weights only: one part, no optimizer state
    _, weights = asyncio.run(fetch_state(call, weights_only=True))
    assert weights and all(name.startswith("w/") for name in weights)


def test_a_step_between_parts_fetches_again():
    a = worker(0)
    train_once(a)
    calls = []

    async def call(args):
        calls.append(args["part"])
        result = await a._on_state(b"\x02" * 32, args, {})
        if len(calls) == 1:
            train_once(a)  # the node steps after answering part 0
        return result

    _, state = asyncio.run(fetch_state(call))
    assert calls[0] == 0 and calls.count(0) == 2  # the first round was thrown away
    now = a.full_state()
    assert all(torch.equal(state[n], now[n]) for n in now)


def test_state_part_out_of_range_is_refused():
    a = worker(1)
    with pytest.raises(PipelineError, match="part must be"):
        asyncio.run(a._on_state(b"\x02" * 32, {"part": 99}, {}))
    with pytest.raises(PipelineError):
        asyncio.run(a._on_state(b"\x02" * 32, {"part": "0"}, {}))


def test_activations_travel_in_the_run_dtype():
    stage = worker(1, torch.bfloat16)
    x = torch.randn(2, 16, 64)
    with pytest.raises(PipelineError, match="bfloat16"):
        asyncio.run(stage._on_forward(b"\x02" * 32, {"iteration": 0, "mb": 0}, {"x": x}))
    _, out = asyncio.run(stage._on_forward(b"\x02" * 32, {"iteration": 0, "mb": 1}, {"x": x.bfloat16()}))
    assert out["x"].dtype == torch.bfloat16 and out["x"].shape == x.shape
    # the stage computes in float32: its output is the float32 forward of the bf16 input, rounded once
    expected = stage.module(x.bfloat16().float()).detach().bfloat16()
    assert torch.equal(out["x"], expected)
    with pytest.raises(PipelineError, match="dtype"):
        asyncio.run(stage._on_backward(b"\x02" * 32, {"iteration": 0, "mb": 1}, {"grad": torch.ones_like(x)}))
    _, out = asyncio.run(stage._on_forward(b"\x02" * 32, {"iteration": 0, "mb": 2}, {"x": x.bfloat16()}))
    _, back = asyncio.run(stage._on_backward(b"\x02" * 32, {"iteration": 0, "mb": 2},
                                             {"grad": torch.ones_like(x).bfloat16()}))
    assert back["grad"].dtype == torch.bfloat16 and back["grad"].shape == x.shape


@pytest.mark.parametrize("policy", ["skip", "full", "random_skip"])
def test_leader_policies_plan_valid_schedules(policy):
    settings = LeaderSettings(microbatches=3, microbatch_size=4, memory=2, path_length=3, num_stages=4,
                              layers_per_stage=1, activation_bytes_per_sample=4096, policy=policy, plan_seconds=1.0)
    leader = Leader(FakeSwarm(bytes(32)), settings, stage=0)
    ids = tuple(bytes([i]) * 32 for i in range(8))
    stage_of = {node: i % 4 for i, node in enumerate(ids)}
    scenario, order = leader._scenario(ids, stage_of, {n: 5.0 + i for i, n in enumerate(ids)})
    son = {i: stage_of[node] for i, node in enumerate(order)}
    schedule, predicted = leader._plan(scenario, son)
    assert predicted == pytest.approx(simulate(scenario, schedule).iteration_time)
    data_nodes = [i for i, s in son.items() if s == 0]
    assert sorted(p.data_node for p in schedule.paths) == sorted(data_nodes * 3)
    for path in schedule.paths:
        stages = [s for s, _ in path.visits]
        assert all(son[n] == s for s, n in path.visits)
        if policy == "full":
            assert stages == [1, 2, 3]
        else:
            assert len(stages) == 2 and len(set(stages)) == 2
