"""Lost stages, the job board, claims and moves: the pure logic (trainer/recovery/jobs.py), and the
leader's use of it over an in-process swarm."""
from __future__ import annotations

import asyncio

import pytest

from node.roles import RoleError, choose_role
from protocol.messages import Role
from trainer.pipeline.leader import Leader, LeaderSettings
from trainer.recovery.jobs import (CLAIM_RECORD, RECOVERY_RECORD, StageWatch, choose_mover, claim_winner,
                                   jobs_from_record, moves_from_record)
from trainer.swarm import Peer

A, B, C, D, E = (bytes([i]) * 32 for i in range(1, 6))


def test_stage_watch_reports_each_loss_once_and_how_long_it_lasted():
    watch = StageWatch(4)
    assert watch.update({A: 0, B: 1, C: 2, D: 3}, 100.0) == ([], [])
    assert watch.update({A: 0, B: 1, D: 3}, 101.0) == ([2], [])
    assert watch.update({A: 0, B: 1, D: 3}, 105.0) == ([], [])  # still lost: no new event
    assert watch.update({A: 0, B: 1, D: 3, E: 2}, 109.5) == ([], [(2, 8.5)])
    assert watch.lost == {}


def test_a_new_leader_keeps_the_earlier_loss_time():
    watch = StageWatch(3)
    watch.update({A: 0, B: 1}, 50.0)
    watch.adopt({"lost": [[2, 42.0], [1, 10.0]], "moves": []})
    assert watch.lost == {2: 42.0}  # stage 1 is served now: not adopted


def test_a_new_leader_reports_the_return_of_a_stage_its_predecessor_saw_lost():
    watch = StageWatch(3)
    watch.take_over({"lost": [[2, 40.0]], "moves": []})
    assert watch.update({A: 0, B: 1, C: 2}, 50.0) == ([], [(2, 10.0)])


def test_malformed_job_board_entries_are_left_out():
    body = {"lost": [[1, 5.0], ["2", 1.0], [3, "x"], [-1, 1.0], "junk", [4, 7.0, 1]],
            "moves": [[A, 2], [b"short", 1], [B, -1], [C, "1"], [D, 3]]}
    assert jobs_from_record(body) == {1: 5.0}
    assert moves_from_record(body) == {A: 2, D: 3}
    assert jobs_from_record("nonsense") == {} and moves_from_record({"moves": 7}) == {}


def test_the_smallest_live_claimant_with_an_unexpired_lease_wins():
    claims = {C: {"stage": 2, "until": 200.0}, B: {"stage": 2, "until": 90.0}, D: {"stage": 2, "until": 300.0},
              A: {"stage": 1, "until": 300.0}, E: {"stage": True, "until": 300.0}}
    assert claim_winner(claims, 2, 100.0) == C  # B's lease ran out
    assert claim_winner(claims, 2, 100.0, live={D, A}) == D  # C died while restoring
    assert claim_winner(claims, 3, 100.0) is None
    assert claim_winner(claims, 1, 400.0) is None


def test_the_mover_comes_from_the_most_replicated_stage_and_is_its_largest_id():
    assert choose_mover({A: 0, B: 1, C: 2}, 3) is None  # nobody to spare
    node, stage, why = choose_mover({A: 0, B: 0, C: 1, D: 1, E: 1}, 3)
    assert (node, stage) == (E, 1) and "most replicas (3)" in why
    node, stage, _ = choose_mover({A: 0, B: 0, C: 1, D: 1}, 3)
    assert (node, stage) == (D, 1)  # a tie: a middle stage gives its node before the data stage
    node, stage, _ = choose_mover({A: 0, E: 0, C: 1}, 3)
    assert (node, stage) == (E, 0)


def test_spare_role():
    choice = choose_role("pipeline", 4, {}, "spare")
    assert choice.role == Role.SPARE and choice.stage is None
    with pytest.raises(RoleError, match="serves no stage"):
        choose_role("pipeline", 4, {}, "spare", 2)


class BoardSwarm:
    """In-process swarm for the leader: a fixed view, records kept in memory, events recorded."""

    def __init__(self, me: bytes, peers: list[Peer]):
        self.my_id = me
        self.view = peers
        self.records: dict[str, dict[bytes, dict]] = {}
        self.events: list[tuple[str, str]] = []
        self.reads: dict[str, int] = {}
        self.misses: dict[str, int] = {}  # name -> reads of it still to miss

    def serve(self, method, handler):
        pass

    async def peers(self, *, fresh=False, **_):
        return list(self.view)

    async def publish(self, name, body, ttl_s):
        self.records.setdefault(name, {})[self.my_id] = body
        return True

    async def read(self, name):
        self.reads[name] = self.reads.get(name, 0) + 1
        if self.misses.get(name):  # a DHT read that misses every record of the name
            self.misses[name] -= 1
            return {}
        return dict(self.records.get(name, {}))

    async def report_event(self, event, detail):
        self.events.append((event, detail))


def _board_leader(move_after_s: float) -> tuple[list[Peer], BoardSwarm, Leader]:
    """A data node leading stage 1's two replicas and stage 2's one, over a BoardSwarm."""
    peers = [Peer(A, "data", 0, None, "ONLINE"), Peer(B, "stage", 1, None, "ONLINE"),
             Peer(C, "stage", 1, None, "ONLINE"), Peer(D, "stage", 2, None, "ONLINE")]
    swarm = BoardSwarm(A, peers)
    leader = Leader(swarm, LeaderSettings(microbatches=2, microbatch_size=2, memory=2, path_length=3, num_stages=3,
                                          layers_per_stage=1, activation_bytes_per_sample=64,
                                          move_after_s=move_after_s, plan_seconds=0.2, plan_evaluations=5), 0)
    return peers, swarm, leader


def test_the_leader_posts_lost_stages_and_moves_a_node_when_nobody_claims_one():
    peers, swarm, leader = _board_leader(move_after_s=0.0)
    swarm.view = peers[:3]  # stage 2's only node is gone
    asyncio.run(leader.tick())
    assert swarm.events == [("stage_lost", "stage 2 has no live replica")]
    board = swarm.records[RECOVERY_RECORD][A]
    assert list(jobs_from_record(board)) == [2]
    assert moves_from_record(board) == {C: 2}  # stage 1 has two replicas: its largest id moves
    # a claim by a live spare keeps the job open for it instead
    leader.moves.clear()
    swarm.view = [*peers[:3], Peer(E, "spare", None, None, "ONLINE")]
    swarm.records[CLAIM_RECORD] = {E: {"stage": 2, "until": 1e12}}
    asyncio.run(leader.tick())
    assert moves_from_record(swarm.records[RECOVERY_RECORD][A]) == {}
    # a read that misses the claim is not enough to move a node: it is read again first
    swarm.misses[CLAIM_RECORD], before = 1, swarm.reads[CLAIM_RECORD]
    asyncio.run(leader.tick())
    assert moves_from_record(swarm.records[RECOVERY_RECORD][A]) == {} and swarm.reads[CLAIM_RECORD] == before + 2
    # the stage is back: a recovery event, and the board is cleared
    swarm.view = [*peers[:3], Peer(E, "stage", 2, None, "ONLINE")]
    leader._measure = lambda live: asyncio.sleep(0)  # no probes in-process: the planner takes default links
    asyncio.run(leader.tick())
    assert swarm.events[-1][0] == "recovery" and "stage 2 is served again" in swarm.events[-1][1]
    assert jobs_from_record(swarm.records[RECOVERY_RECORD][A]) == {}


def test_a_claimant_that_seems_dead_for_a_moment_keeps_its_job_for_move_after_s(monkeypatch):
    """Under load a restoring spare's heartbeats lapsed for 7 s; the leader ignored its claim at once
    and moved a data node into the stage the spare was rebuilding."""
    clock = [1000.0]
    monkeypatch.setattr("trainer.pipeline.leader.time.time", lambda: clock[0])
    peers, swarm, leader = _board_leader(move_after_s=4.0)
    swarm.view = [*peers[:3], Peer(E, "spare", None, None, "ONLINE")]  # stage 2's only node is gone
    swarm.records[CLAIM_RECORD] = {E: {"stage": 2, "until": 1e12}}
    asyncio.run(leader.tick())
    clock[0] += 10.0  # long after the loss, the claimant is live: no move
    asyncio.run(leader.tick())
    assert moves_from_record(swarm.records[RECOVERY_RECORD][A]) == {}
    swarm.view = peers[:3]  # the claimant's heartbeats lapse
    clock[0] += 3.0
    asyncio.run(leader.tick())
    assert moves_from_record(swarm.records[RECOVERY_RECORD][A]) == {}
    clock[0] += 1.5  # move_after_s without a live claimant: the job goes to a mover
    asyncio.run(leader.tick())
    assert moves_from_record(swarm.records[RECOVERY_RECORD][A]) == {C: 2}


def test_a_node_that_leads_again_starts_from_what_is_lost_now(monkeypatch):
    """Heartbeats flapped at start-up: the leader saw stage 2 lost for a moment, a smaller id took the
    lead, and 90 s later, when stage 2 was really lost, the first node led again. It kept the loss
    time of its first stint, found move_after_s long past and moved a node into the stage at once,
    while the spares were claiming it: the stage was rebuilt twice."""
    clock = [1000.0]
    monkeypatch.setattr("trainer.pipeline.leader.time.time", lambda: clock[0])
    peers, swarm, leader = _board_leader(move_after_s=4.0)
    swarm.view = peers[:3]  # stage 2's node misses a heartbeat
    asyncio.run(leader.tick())
    assert list(jobs_from_record(swarm.records[RECOVERY_RECORD][A])) == [2]
    smaller = Peer(bytes(32), "data", 0, None, "ONLINE")
    swarm.view = [smaller, *peers]  # stage 2 is back, and a smaller id leads
    clock[0] += 1.0
    asyncio.run(leader.tick())
    assert not leader.leading
    swarm.records.pop(RECOVERY_RECORD)  # A's record expires (its TTL is 10 s)
    clock[0] += 90.0
    swarm.view = peers[:3]  # the smaller node is gone and stage 2 is really lost: A leads again
    asyncio.run(leader.tick())
    assert leader.leading and jobs_from_record(swarm.records[RECOVERY_RECORD][A]) == {2: clock[0]}
    assert moves_from_record(swarm.records[RECOVERY_RECORD][A]) == {}
    clock[0] += 2.0  # within move_after_s of the real loss: nobody is moved yet
    asyncio.run(leader.tick())
    assert moves_from_record(swarm.records[RECOVERY_RECORD][A]) == {}
    clock[0] += 2.5
    asyncio.run(leader.tick())
    assert moves_from_record(swarm.records[RECOVERY_RECORD][A]) == {C: 2}
