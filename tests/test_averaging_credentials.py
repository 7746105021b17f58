"""An averaging round is kept only if every member proved it belongs to the run (hivemind checks nobody)."""
from __future__ import annotations

import time

import pytest

from node.averaging import AveragingError, Credentials, GroupAveraging
from node.config import Timeouts
from protocol.access import AccessPolicy, issue_token
from protocol.keys import generate_private_key, public_key_bytes

RUN = b"\x07" * 16


@pytest.fixture
def private_run():
    owner = generate_private_key()
    access = AccessPolicy(private=True, owner_public=public_key_bytes(owner), run_id=RUN)

    def member(peer_id: str, with_token: bool = True) -> GroupAveraging:
        key = generate_private_key()
        token = issue_token(owner, RUN, public_key_bytes(key), time.time() + 3600) if with_token else None
        return GroupAveraging(None, "p", Timeouts(), Credentials(key, RUN, access, token, peer_id))

    return member


def test_a_round_of_token_holders_is_kept(private_run):
    a, b = private_run("12D3KooWa"), private_run("12D3KooWb")
    gathered = {"12D3KooWa": a._join_envelope("L", 1.0), "12D3KooWb": b._join_envelope("L", 3.0)}
    a._check_group(gathered, "L")  # no error


@pytest.mark.parametrize("case", ["no token", "borrowed envelope", "other layout", "no envelope"])
def test_a_round_with_an_outsider_is_discarded(private_run, case):
    a = private_run("12D3KooWa")
    outsider = private_run("12D3KooWx", with_token=(case != "no token"))
    envelope = {
        "no token": outsider._join_envelope("L", 1.0),
        "borrowed envelope": a._join_envelope("L", 1.0),  # replayed under another peer id
        "other layout": outsider._join_envelope("M", 1.0),
        "no envelope": None,
    }[case]
    gathered = {"12D3KooWa": a._join_envelope("L", 1.0), "12D3KooWx": envelope}
    with pytest.raises(AveragingError, match="not allowed"):
        a._check_group(gathered, "L")


def test_a_failed_round_is_an_averaging_error_not_a_crash(private_run):
    """hivemind's step raises AllreduceException when no group forms or a peer drops mid-round (a node
    of the experts chaos run died of it); the node sees AveragingError and trains on."""
    import asyncio
    import contextlib

    import torch
    from hivemind.averaging.partition import AllreduceException

    class FailingAverager:
        def __init__(self):
            self.buffers = [torch.zeros(3)]

        @contextlib.contextmanager
        def get_tensors(self):
            yield self.buffers

        def step(self, **kwargs):
            raise AllreduceException("Averaging step failed: could not find a group")

    node = private_run("peer-a")

    async def averager(group, tensors, group_size):
        return FailingAverager()

    node._averager = averager
    with pytest.raises(AveragingError, match="AllreduceException: Averaging step failed"):
        asyncio.run(node.average("ex-0", {"w": torch.ones(3)}, 1.0))
