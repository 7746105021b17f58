"""Where a zo node's contribution for a step may go when the committer changes, in one process.

The swarm run of this (a frozen committer thawing while another took over) is
tests/test_chaos_swarm.py; here the rules themselves, on a worker over a fake view: a committer that
took other nodes' contributions for a step leads it until it seals it or lets them go, and a node
whose contribution went to a live node does not give it to another committer too.
"""
from __future__ import annotations

import asyncio

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol.keys import public_key_bytes
from protocol.runspec import make_spec, run_id
from protocol.zo import seal_contribution
from trainer.model import LM, ModelConfig
from trainer.swarm import Peer, SwarmCallError
from trainer.zo.replica import Replica
from trainer.zo.spsa import ZOSettings
from trainer.zo.worker import NOT_COMMITTER, ZOWorker


def _key(seed: int) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32)


KEYS = {name: _key(seed) for name, seed in (("x", 0x51), ("y", 0x52), ("h", 0x53), ("c", 0x54))}
IDS = {name: public_key_bytes(k) for name, k in KEYS.items()}
RUN = run_id(make_spec("zo", "tiny", _key(0x60)))


class View:
    """A fixed, editable view of live zo members; calls are recorded and answered by ``answer``."""

    def __init__(self, me: str, live: list[str]):
        self.my_id = IDS[me]
        self.live = list(live)
        self.calls: list[tuple[bytes, str]] = []
        self.answer = lambda peer, method: ({"accepted": 1, "late": 0}, {})

    def serve(self, method, handler):
        pass

    async def peers(self, *, role=None, stage=None, live_only=True, fresh=False):
        return [Peer(IDS[n], "zo", None, None, "ONLINE") for n in self.live]

    async def call(self, peer, method, args=None, tensors=None, *, even_if_dead=False):
        self.calls.append((peer, method))
        return self.answer(peer, method)

    async def publish(self, name, body, ttl_s):
        return True

    async def read(self, name):
        return {}


def zo_worker(me: str, live: list[str]) -> ZOWorker:
    replica = Replica(LM(ModelConfig.from_preset("tiny"), seed=0), ("tok_emb.weight",))
    settings = ZOSettings(probes=1, min_nodes=3, step_timeout_s=0.2, params=("tok_emb.weight",))
    return ZOWorker(View(me, live), KEYS[me], RUN, settings, replica, iter(()), [], base_hash=replica.weights_hash(),
                    retry_s=0.05)


def contribution(name: str, step: int = 0) -> bytes:
    return seal_contribution(KEYS[name], RUN, step, 0, 7)


def test_a_committer_holding_others_contributions_leads_the_step_even_when_a_smaller_id_comes_back():
    c, h, other, last = sorted(IDS, key=IDS.get)  # by id: c would lead when live
    node = zo_worker(h, [h, other, last])  # c looks dead (frozen past the heartbeat TTL)
    assert asyncio.run(node.committer()) == IDS[h]
    result, _ = asyncio.run(node._on_contribute(IDS[other], {"contribs": [contribution(other)]}, {}))
    assert result["accepted"] == 1
    # c comes back: h still leads step 0, since it holds a contribution that another committer must
    # not get as well (its sender keeps it with h, see the next test)
    node.swarm.live = [c, h, other, last]
    assert asyncio.run(node.committer()) == IDS[h]
    # once h lets it go (it closed the step without a quorum), c leads, and h refuses
    # contributions, saying it holds none
    node._pending.pop(0)
    assert asyncio.run(node.committer()) == IDS[c]
    with pytest.raises(Exception, match=NOT_COMMITTER):
        asyncio.run(node._on_contribute(IDS[last], {"contribs": [contribution(last)]}, {}))


def test_a_contribution_given_to_a_live_node_goes_to_no_other_committer_until_that_node_lets_it_go():
    x = zo_worker("x", ["x", "y", "h", "c"])
    x._own[0] = [contribution("x")]

    def contributed(node: ZOWorker) -> list[bytes]:
        return [peer for peer, method in node.swarm.calls if method == "zo.contribute"]

    def refuse(peer, method):
        if peer == IDS["h"] and method == "zo.contribute":
            raise SwarmCallError(f"zo.contribute failed: ProtocolError: {NOT_COMMITTER}")
        return {"accepted": 1, "late": 0}, {}

    async def go():
        stop = asyncio.Event()
        # step 0's committer was h (c looked dead): x gave it its contribution
        await x._follow(0, IDS["h"], stop)
        assert contributed(x) == [IDS["h"]]
        # c is back and is x's committer again; h, which holds x's contribution, is live: it goes to h
        x.swarm.calls.clear()
        await x._follow(0, IDS["c"], stop)
        assert contributed(x) == [IDS["h"]]
        # h says it does not lead the step (so holds nothing of it): now it may go to c
        x.swarm.calls.clear()
        x.swarm.answer = refuse
        await x._follow(0, IDS["c"], stop)
        await x._follow(0, IDS["c"], stop)
        assert contributed(x) == [IDS["h"], IDS["c"]]
        # and a holder that is no longer live does not keep it either
        y = zo_worker("y", ["x", "y", "h", "c"])
        y._own[0] = [contribution("y")]
        await y._follow(0, IDS["h"], stop)
        y.swarm.live = ["x", "y", "c"]
        y.swarm.calls.clear()
        await y._follow(0, IDS["c"], stop)
        assert contributed(y) == [IDS["c"]]

    asyncio.run(go())


def status(step: int, start: int) -> dict:
    return {"step": step, "start": start, "head": bytes(32), "base": bytes(32)}


def test_a_node_whose_chain_the_others_left_takes_a_snapshot_from_the_furthest():
    """A chaos run: two nodes each committed alone while the DHT hid everyone (a fork); the others
    resynced to one side, while a node that had rejoined on the other side refused that chain (not
    signed by the committer it knew, which was live) and could pull nothing else: stuck for good.
    When the nodes ahead are most of the live ones and none offers a chain it takes, it takes a
    snapshot from the furthest."""
    x = zo_worker("x", ["x", "y", "h", "c"])
    far = {"y": status(400, 100), "h": status(420, 272), "c": status(410, 366)}  # logs begin after x's head
    x.swarm.answer = lambda peer, method: ((far[next(n for n in IDS if IDS[n] == peer)], {}) if method == "zo.status"
                                           else ({}, {}))
    assert not asyncio.run(x._pull_from_any())
    assert x._resync_from == IDS["h"]
    # one node ahead of three is no majority: it may be the one on a fork
    x._resync_from = None
    few = {"y": status(0, 0), "h": status(420, 272), "c": status(0, 0)}
    x.swarm.answer = lambda peer, method: ((few[next(n for n in IDS if IDS[n] == peer)], {}) if method == "zo.status"
                                           else ({}, {}))
    assert not asyncio.run(x._pull_from_any()) and x._resync_from is None


def test_a_node_that_does_not_see_itself_in_the_swarm_is_blind():
    x = zo_worker("x", ["y", "h"])  # its own heartbeat is not in its view (stalled DHT stores)
    assert asyncio.run(x._blind())
    x.swarm.live = ["x", "y", "h"]
    assert not asyncio.run(x._blind())
