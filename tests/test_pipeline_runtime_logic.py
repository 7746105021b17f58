"""The pipeline worker's pure logic in one process: the state in parts, activation dtypes, leader policies."""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib

import pytest
import torch

from node.pipeline_node import stage_module
from protocol.keys import generate_private_key
from protocol.runspec import make_spec
from trainer.pipeline.leader import Leader, LeaderSettings, probe
from trainer.pipeline.runtime import (STATE_SNAPSHOTS, PipelineError, PipelineSettings, PipelineWorker, fetch_state,
                                      weights_hash)
from trainer.pipeline.simulator import simulate
from trainer.pipeline.state import StateTransferError
from trainer.swarm import Peer, SwarmCallError


class FakeSwarm:
    """An id, a place to register handlers, a fixed view (``live``), and calls that are recorded
    and succeed, except to the peers in ``unreachable``."""

    def __init__(self, my_id: bytes):
        self.my_id = my_id
        self.handlers = {}
        self.calls = []
        self.live: list[Peer] = []
        self.left: list[Peer] = []  # members seen only when the caller asks for those not live too
        self.unreachable: set[bytes] = set()
        self.replies: dict[str, dict] = {}  # method -> the result it answers (default {})

    def serve(self, method, handler):
        self.handlers[method] = handler

    async def peers(self, *, fresh=False, live_only=True, **_):
        return list(self.live) + ([] if live_only else list(self.left))

    async def read(self, name):
        return {}

    async def call(self, peer, method, args=None, tensors=None, *, even_if_dead=False):
        self.calls.append((peer, method, args, tensors, even_if_dead))
        if peer in self.unreachable:
            raise SwarmCallError("cannot reach it")
        return self.replies.get(method, {}), {}


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
    a.state_part_bytes = 64 << 10  # so that it takes several parts

    async def call(args):
        return await a._on_state(b"\x02" * 32, args, {})

    iteration, state, lr, norm = asyncio.run(fetch_state(call))
    assert norm == a.grad_norm > 0
    assert lr == 1e-2
    assert iteration == 1 and set(state) == set(a.full_state())  # stepped in iteration 0: at the start of 1
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
    _, weights, *_ = asyncio.run(fetch_state(call, weights_only=True))
    assert weights and all(name.startswith("w/") for name in weights)


def test_a_node_that_steps_between_every_fetch_s_parts_still_gives_one_moment():
    a = trained_in_parts()
    calls, at_part0 = [], []

    async def call(args):
        calls.append(args["part"])
        result = await a._on_state(b"\x02" * 32, args, {})
        if args["part"] == 0:
            at_part0.append(a.full_state())
            train_once(a)  # the node steps after every part 0 it answers
        return result

    iteration, state, *_ = asyncio.run(fetch_state(call))
    # the first round (the node as it is now) was thrown away at its step; the second read the
    # later parts of the version its part 0 came from
    assert calls.count(0) == 2 and len(calls) > 3
    moment = at_part0[1]
    assert set(state) == set(moment) and all(torch.equal(state[n], moment[n]) for n in moment)
    now = a.full_state()
    assert any(not torch.equal(now[n], moment[n]) for n in now)  # while the node itself moved on


def trained_in_parts():
    """A worker that stepped once and serves its state in parts of 64 KiB (several per state)."""
    a = worker(0)
    a.state_part_bytes = 64 << 10
    train_once(a)
    return a


def test_a_node_that_does_not_step_gives_its_state_in_one_round():
    a = trained_in_parts()
    calls = []

    async def call(args):
        calls.append(args)
        return await a._on_state(b"\x02" * 32, args, {})

    _, state, *_ = asyncio.run(fetch_state(call))
    assert [c["part"] for c in calls].count(0) == 1 and not any("version" in c for c in calls)
    now = a.full_state()
    assert all(torch.equal(state[n], now[n]) for n in now)


def test_a_fetch_whose_version_was_dropped_begins_again():
    a = trained_in_parts()
    calls = []

    async def call(args):
        # as the RPC does: the handler's refusal reaches the caller as a failed call
        calls.append(args["part"])
        try:
            result = await a._on_state(b"\x02" * 32, args, {})
        except PipelineError as error:
            raise SwarmCallError(f"pp.state failed: {error}") from None
        if len(calls) == 1:
            for _ in range(STATE_SNAPSHOTS):  # new snapshots push the first one out
                train_once(a)
                await a._on_state(b"\x03" * 32, {"part": 0}, {})
        return result

    _, state, *_ = asyncio.run(fetch_state(call))
    assert calls.count(0) == 2  # the first round was refused part-way and thrown away
    now = a.full_state()
    assert all(torch.equal(state[n], now[n]) for n in now)
    with pytest.raises(PipelineError, match="is no longer held"):
        asyncio.run(a._on_state(b"\x02" * 32, {"part": 1, "version": 0}, {}))


@pytest.mark.parametrize("damage, message", [
    ("flip", "does not match its sha256"),
    ("garbage", "not valid safetensors"),
    ("digest", "does not match the digest"),
    ("extra", "one uint8 'safetensors' tensor"),
])
def test_damaged_state_is_refused_before_anything_loads(damage, message):
    a = trained_in_parts()

    async def call(args):
        result, tensors = await a._on_state(b"\x02" * 32, args, {})
        blob = tensors["safetensors"].clone()
        if damage == "flip" and args["part"] == 1:
            blob[-1] ^= 1
        if damage == "garbage":
            blob = torch.zeros(16, dtype=torch.uint8)
            result = {**result, "sha256": hashlib.sha256(bytes(16)).digest()}
        if damage == "digest":
            result = {**result, "digest": bytes(32)}
        if damage == "extra":
            return result, {"safetensors": blob, "more": blob}
        return result, {"safetensors": blob}

    with pytest.raises(StateTransferError, match=message):
        asyncio.run(fetch_state(call))


def test_state_part_out_of_range_is_refused():
    a = worker(1)
    with pytest.raises(PipelineError, match="part must be"):
        asyncio.run(a._on_state(b"\x02" * 32, {"part": 99}, {}))
    with pytest.raises(PipelineError):
        asyncio.run(a._on_state(b"\x02" * 32, {"part": "0"}, {}))


DATA = b"\x02" * 32


def hop(mb: int, route=()) -> dict:
    return {"iteration": 0, "mb": mb, "attempt": 0, "origin": DATA, "route": [list(h) for h in route],
            "visited": [], "skipped": 0, "rerouted": 0}


async def settle(stage: PipelineWorker) -> None:
    while stage._tasks:
        await asyncio.sleep(0.01)


def test_activations_travel_in_the_run_dtype_along_the_chain():
    """A stage answers the forward at once, then hands its bf16 output on: to the next hop of the
    route, or past the route's end to the data node; the backward goes the same way back."""
    stage = worker(1, torch.bfloat16)
    x = torch.randn(2, 16, 64)

    async def go():
        with pytest.raises(PipelineError, match="bfloat16"):
            await stage._on_forward(DATA, hop(0), {"x": x})
        assert await stage._on_forward(DATA, hop(1), {"x": x.bfloat16()}) == ({}, {})
        nxt = b"\x07" * 32
        await stage._on_forward(DATA, hop(2, route=[(2, nxt)]), {"x": x.bfloat16()})
        await settle(stage)
        (to1, method1, args1, t1, _), (to2, method2, args2, t2, _) = stage.swarm.calls
        assert (to1, method1, args1["kind"], args1["visited"]) == (DATA, "pp.arrive", "x", [[1, stage.me]])
        assert (to2, method2, args2["route"], args2["visited"]) == (nxt, "pp.forward", [], [[1, stage.me]])
        # the stage computes in float32: its output is the float32 forward of the bf16 input, rounded once
        expected = stage.module(x.bfloat16().float()).detach().bfloat16()
        assert torch.equal(t1["t"], expected) and torch.equal(t2["x"], expected)
        with pytest.raises(PipelineError, match="dtype"):
            await stage._on_backward(DATA, hop(1), {"grad": torch.ones_like(x)})
        stage.swarm.calls.clear()
        await stage._on_backward(DATA, hop(1), {"grad": torch.ones_like(x).bfloat16()})
        await settle(stage)
        [(to, method, args, t, _)] = stage.swarm.calls
        assert (to, method, args["kind"]) == (DATA, "pp.arrive", "grad")
        assert t["t"].dtype == torch.bfloat16 and t["t"].shape == x.shape
        with pytest.raises(PipelineError, match="no forward"):  # its activations are gone with the backward
            await stage._on_backward(DATA, hop(1), {"grad": torch.ones_like(x).bfloat16()})

    asyncio.run(go())


def test_malformed_hops_are_refused():
    stage = worker(1)
    x = torch.randn(2, 16, 64)
    for bad in ({"route": [[1, b"short"]]}, {"origin": b"x"}, {"attempt": -1}, {"visited": "no"},
                {"skipped": "0"}, {"route": [[1, b"\x01" * 32]] * 300}):
        with pytest.raises(PipelineError):
            asyncio.run(stage._on_forward(DATA, {**hop(0), **bad}, {"x": x}))
    data = worker(0)
    with pytest.raises(PipelineError, match="waits"):  # nothing expected: refused, not stored
        asyncio.run(data._on_arrive(DATA, {"iteration": 0, "mb": 0, "attempt": 0, "kind": "x"}, {"t": x}))


def test_a_stage_node_behind_ends_its_iterations_once_the_data_nodes_left_after_the_run():
    """The run's end: the data nodes finished and left while a stage node was behind (it restored
    late); it reduces its remaining iterations at once instead of waiting out done_timeout_s for
    each, and still waits for an iteration no data node finished."""
    stage = worker(1)
    stage.settings = dataclasses.replace(stage.settings, done_timeout_s=60.0)
    stage.swarm.live = [Peer(DATA, "data", 0, None, "ONLINE")]

    async def go():
        await stage._on_done(DATA, {"iteration": 2}, {})
        stage.swarm.live = []  # it left
        for k in (1, 2):
            await asyncio.wait_for(stage._wait_done(k, asyncio.Event()), 5)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(stage._wait_done(3, asyncio.Event()), 3)

    asyncio.run(go())
    # its pp.done missed this node: the last heartbeat of the data node that left says how far it got
    late = worker(1)
    late.settings = dataclasses.replace(late.settings, done_timeout_s=60.0)
    late.swarm.left = [Peer(DATA, "data", 0, None, "LEAVING", metrics={"iteration": 3.0})]
    asyncio.run(asyncio.wait_for(late._wait_done(2, asyncio.Event()), 10))


def test_a_stage_node_far_behind_goes_through_the_iterations_the_data_nodes_finished_at_once():
    """A soak on 16 cores: the one replica of stage 2, back from a 10 s partition 140 iterations
    behind, missed the pp.done of each; it waited a poll (0.5 s) per iteration before reading the
    data nodes' heartbeats, caught up at 2 iterations a second while they did 5, and served no
    microbatch again. A heartbeat in iteration j says every iteration before j is done."""
    stage = worker(1)
    stage.settings = dataclasses.replace(stage.settings, done_timeout_s=60.0)
    stage.swarm.live = [Peer(DATA, "data", 0, None, "ONLINE", metrics={"iteration": 40.0})]

    async def go():
        await asyncio.wait_for(stage._wait_done(3, asyncio.Event()), 10)  # one poll to read the heartbeat
        loop = asyncio.get_running_loop()
        began = loop.time()
        for k in range(4, 40):
            await asyncio.wait_for(stage._wait_done(k, asyncio.Event()), 10)
        took = loop.time() - began
        with pytest.raises(TimeoutError):  # and the iteration the data node is in is still waited for
            await asyncio.wait_for(stage._wait_done(40, asyncio.Event()), 2)
        return took

    took = asyncio.run(go())
    assert stage._done_upto[DATA] == 39
    assert took < stage.settings.retry_s * 4  # not one poll per iteration: 36 of them took less than one


def test_the_memory_slots_of_a_data_node_that_is_gone_are_freed():
    """A data node killed mid-iteration leaves forwards that will see no backward: they no longer
    hold the stage's memory (refusing the other data nodes) once the view has lost it, and the node
    back under the same id gets its first forward computed, not "taken already"."""
    stage = worker(1)  # memory: 2 microbatches
    data = Peer(DATA, "data", 0, None, "ONLINE")
    stage.swarm.live = [data]
    x = torch.randn(2, 16, 64)

    async def go():
        await stage._replicas()
        for mb in (0, 1):
            await stage._on_forward(DATA, hop(mb), {"x": x})
        await settle(stage)
        with pytest.raises(PipelineError, match="memory full"):
            await stage._on_forward(DATA, hop(2), {"x": x})
        stage.swarm.live = []  # it died
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(stage._wait_done(0, asyncio.Event()), 1)
        assert not stage._cache
        stage.swarm.live = [data]  # back, same id
        stage.swarm.calls.clear()
        await stage._on_forward(DATA, hop(0), {"x": x})
        await settle(stage)
        assert len(stage._cache) == 1 and [c[1] for c in stage.swarm.calls] == ["pp.arrive"]
        # one never seen as a data node (joining now) keeps its microbatches while the view lags
        newcomer = b"\x09" * 32
        await stage._on_forward(newcomer, {**hop(1), "origin": newcomer}, {"x": x})
        stage.swarm.live = []
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(stage._wait_done(0, asyncio.Event()), 1)
        assert [key[1] for key in stage._cache] == [newcomer]

    asyncio.run(go())


def test_a_reducer_whose_replicas_are_past_the_iteration_takes_their_state_instead_of_stepping_alone():
    """A chaos run: a data node came back, restored stage 0 and, the smaller id, was its reducer,
    while the other data node had reduced that iteration alone: the reducer waited reduce_timeout_s,
    stepped alone, and the two replicas parted for good. Now it sees the other past the iteration
    (its heartbeat) and takes its state, and goes on in the iteration that one is in."""
    me, mate = b"\x01" * 32, b"\x05" * 32
    reducer = worker(1, me=me)
    reducer.settings = dataclasses.replace(reducer.settings, reduce_timeout_s=30.0)
    reducer.swarm.live = [Peer(me, "stage", 1, None, "ONLINE"), Peer(mate, "stage", 1, None, "ONLINE",
                                                                    metrics={"iteration": 7.0})]
    before = {n: t.clone() for n, t in reducer.module.state_dict().items()}
    for p in reducer.module.parameters():  # gradients of its own, which it must not step with alone
        p.grad = torch.ones_like(p)
    reducer._count = 2

    async def go():
        await asyncio.wait_for(reducer._reduce_as_reducer(4, [me, mate]), 10)

    asyncio.run(go())
    assert [c[:2] for c in reducer.swarm.calls] == [(mate, "pp.state")]  # it asked the one ahead for its state
    after = reducer.module.state_dict()
    assert all(torch.equal(after[n], before[n]) for n in before)  # and did not step alone
    assert reducer._count == 0


def test_the_state_a_node_gives_right_after_its_step_is_labelled_with_the_next_iteration():
    """A chaos run: between a reduce's step and the loop's move to the next iteration (the hash
    and snapshot written, which awaits), pp.state paired the stepped weights with the old
    iteration; the node that restored from them did that iteration again and stayed a step ahead
    of its stage for good."""
    me = b"\x01" * 32
    node = worker(1, me=me)
    node.swarm.live = [Peer(me, "stage", 1, None, "ONLINE")]

    async def go():
        await node.begin_at(4)
        before, _ = await node._on_state(b"\x02" * 32, {}, {})
        for p in node.module.parameters():
            p.grad = torch.ones_like(p)
        node._count = 1
        await node._reduce_and_step(4)
        after, _ = await node._on_state(b"\x02" * 32, {}, {})
        return before, after

    before, after = asyncio.run(go())
    assert node.iteration == 4  # the loop has not moved on yet
    assert before["iteration"] == 4 and after["iteration"] == 5


def test_a_reducer_keeps_the_answers_of_its_last_reduce_only():
    """Each reduce's answer holds the stage's averaged gradients: kept for every iteration, the
    reducers of a soak grew 2-4 GB an hour."""
    me = b"\x01" * 32
    reducer = worker(1, me=me)
    reducer.swarm.live = [Peer(me, "stage", 1, None, "ONLINE")]

    async def go():
        for k in range(6):
            for p in reducer.module.parameters():
                p.grad = torch.ones_like(p)
            reducer._count = 1
            await reducer._reduce_and_step(k)
            reducer.iteration = k + 1

    asyncio.run(go())
    assert set(reducer._reduce_result) == {5}


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


def test_a_replica_missing_from_the_view_still_gets_the_reduce():
    """A stage mate whose heartbeat is late is not in the fresh view; the replica that took part in
    the last reduce with it still sends its gradients there instead of stepping alone."""
    mate, me = b"\x01" * 32, b"\x02" * 32
    w = worker(1, me=me)
    w.swarm.live = [Peer(me, "stage", 1, None, "ONLINE")]
    w._mates = {mate}
    w.swarm.replies["pp.reduce"] = {"skip": True, "resync": False}
    asyncio.run(w._reduce_and_step(0))
    assert [(c[0], c[1], c[4]) for c in w.swarm.calls] == [(mate, "pp.reduce", True)]
    assert w._mates == {mate}


def test_a_mate_that_does_not_answer_is_left_out_and_the_next_replica_reduces():
    mate, me = b"\x01" * 32, b"\x02" * 32
    w = worker(1, me=me)
    w.swarm.live = [Peer(me, "stage", 1, None, "ONLINE")]
    w.swarm.unreachable = {mate}
    w._mates = {mate}
    before = weights_hash(w.module)
    asyncio.run(w._reduce_and_step(0))
    assert [c[1] for c in w.swarm.calls] == ["pp.reduce"]  # tried once, then reduced alone
    assert w._mates == set() and w._reduce_result[0].done()
    assert weights_hash(w.module) == before  # nothing was processed: no step


def test_a_probe_takes_the_shortest_of_its_pings():
    """A busy node answers a ping late (200-300 ms over a 45 ms link in a full run): the latency is
    half the shortest round trip of the probe's pings, and the echo's extra time gives the bandwidth."""
    class Pings:
        def __init__(self):
            self.delays = [0.30, 0.02, 0.08]  # the first ping waits behind work

        async def call(self, target, method, args, tensors=None):
            await asyncio.sleep(self.delays.pop(0) if method == "ping" else 0.02 + 0.05)
            return {}, dict(tensors or {})

    latency_ms, bandwidth = asyncio.run(probe(Pings(), b"t" * 32, 64 << 10))
    assert 9.0 <= latency_ms < 30.0  # half of about 20 ms, not of 300 ms
    assert bandwidth > 0
