"""Regression tests for handlers a peer could crash, stall or make allocate without bound (found
reviewing them for issue 10); each refuses with its own reason and keeps nothing."""
from __future__ import annotations

import asyncio
import time

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from node.config import Timeouts
from node.pipeline_node import stage_module
from node.rpc import REQUEST_KIND
from protocol.access import AccessPolicy
from protocol.envelope import seal
from protocol.keys import public_key_bytes
from protocol.runspec import make_spec, run_id
from tests.rpc_memory import frame, memory_endpoint, peer_id, serve_bytes
from trainer.pipeline.runtime import MAX_DATA_NODES, PipelineError, PipelineSettings, PipelineWorker
from trainer.swarm import Peer, SwarmCallError

ME, MATE, OTHER = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32
SPEC = make_spec("pipeline", "tiny", Ed25519PrivateKey.from_private_bytes(b"\x05" * 32), stages=2,
                 blocks_per_stage=[3, 1], path_length=2, swap="none", seq_len=16, microbatch_size=2)


class ViewSwarm:
    def __init__(self, peers):
        self.my_id, self._peers, self.handlers = ME, peers, {}

    def serve(self, method, handler):
        self.handlers[method] = handler

    async def peers(self, **_):
        return list(self._peers)

    async def call(self, *args, **kwargs):
        raise SwarmCallError("unreachable")


def worker(stage: int) -> PipelineWorker:
    peers = [Peer(MATE, "stage", 1, None, "ONLINE"), Peer(OTHER, "data", 0, None, "ONLINE")]
    settings = PipelineSettings(num_stages=2, path_length=2, swap="none", microbatches=2, memory=2, iterations=3,
                                lr=1e-2, slot_wait_s=0.05, done_timeout_s=0.1, reduce_timeout_s=0.05,
                                retry_s=0.001, hop_attempts=1, microbatch_size=2)
    return PipelineWorker(ViewSwarm(peers), stage, stage_module(SPEC, stage), settings)


def forward_args(**extra) -> dict:
    return {"iteration": 0, "mb": 0, "attempt": 0, "origin": OTHER, "route": [], "visited": [], "skipped": 0,
            "rerouted": 0, **extra}


@pytest.mark.parametrize("shape,reason", [((2, 257, 64), "1..256"), ((2, 8, 32), "64"), ((3, 8, 64), "3 samples")])
def test_a_forward_bigger_than_the_model_or_microbatch_is_refused_before_computing(shape, reason):
    """Attention costs time squared: a 2M-token forward would stall the node's event loop for minutes."""
    w = worker(1)
    with pytest.raises(PipelineError, match=reason):
        asyncio.run(w._on_forward(OTHER, forward_args(), {"x": torch.zeros(shape)}))
    assert not w._cache and w.report.microbatches == 0 and w._slots._value == 2


def test_an_arrival_of_the_wrong_shape_is_refused_and_the_right_one_still_lands():
    """A data node fed a wrongly shaped tensor for a pending microbatch used to fail in its loss and stop."""
    w = worker(0)

    async def go():
        future = asyncio.get_running_loop().create_future()
        future.expected_shape = (2, 16, 64)
        w._arrivals[(0, 0, 0, "x")] = future
        args = {"iteration": 0, "mb": 0, "attempt": 0, "kind": "x", "visited": [], "skipped": 0, "rerouted": 0}
        with pytest.raises(PipelineError, match="shape"):
            await w._on_arrive(MATE, args, {"t": torch.zeros(5, 16, 64)})
        assert not future.done()
        await w._on_arrive(MATE, args, {"t": torch.zeros(2, 16, 64)})
        return future.result()[1].shape

    assert asyncio.run(go()) == (2, 16, 64)


def test_reduces_come_only_from_replicas_and_for_near_iterations():
    w = worker(1)
    grads = {name: torch.zeros_like(p) for name, p in w.module.named_parameters()}
    with pytest.raises(PipelineError, match="only replicas"):
        asyncio.run(w._on_reduce(OTHER, {"iteration": 0, "count": 1, "hash": b"x"}, grads))
    for k in (3, 10**9):  # each would have kept a full gradient until the node reached that iteration
        with pytest.raises(PipelineError, match="too far ahead"):
            asyncio.run(w._on_reduce(MATE, {"iteration": k, "count": 1, "hash": b"x"}, grads))
    assert not w._reduce_inbox and not w._reduce_result


def test_the_data_nodes_a_stage_tracks_are_bounded():
    w = worker(1)
    for i in range(MAX_DATA_NODES + 500):  # origins are whatever the previous hop names
        w._mark_done(i.to_bytes(32, "big"), 1)
    assert len(w._done_upto) == MAX_DATA_NODES


def test_a_handler_whose_wait_runs_out_answers_timeout_not_internal_error():
    owner = Ed25519PrivateKey.from_private_bytes(b"\x06" * 32)
    rid = run_id(make_spec("zo", "tiny", owner))
    endpoint = memory_endpoint(Ed25519PrivateKey.from_private_bytes(b"\x07" * 32), rid,
                               AccessPolicy(False, public_key_bytes(owner), rid), Timeouts())

    async def slow(context, args, tensors):
        await asyncio.wait_for(asyncio.Event().wait(), 0.01)

    endpoint.register("slow", slow)
    body = {"method": "slow", "args": {}, "tensors": [], "token": None, "to": str(endpoint.p2p.peer_id)}
    request = seal(owner, kind=REQUEST_KIND, run_id=rid, body=body, seq=time.time_ns())
    reply = asyncio.run(serve_bytes(endpoint, peer_id(1), frame(request)))
    assert reply.kind == "Timeout"
