"""Byzantine stage replicas, in one process: the guard's checks, bans shared through records, the
reduce leaving a bad replica out, and the test-only faults. The multi-process test is
tests/test_pipeline_byzantine.py."""
from __future__ import annotations

import asyncio
import math

import pytest
import torch

from node.pipeline_node import GARBAGE_FAULT, SCALE_FAULT, parse_fault, stage_module
from protocol.keys import generate_private_key
from protocol.runspec import make_spec
from trainer.pipeline.guard import Guard, GuardSettings
from trainer.pipeline.runtime import BANS_RECORD, PipelineError, PipelineSettings, PipelineWorker
from trainer.swarm import Peer

ME, BAD, MATE, DATA = (bytes([i]) * 32 for i in (1, 2, 3, 4))
SPEC = make_spec("pipeline", "tiny", generate_private_key(), stages=2, blocks_per_stage=[3, 1], path_length=2,
                 swap="none", seq_len=16)


def acts(scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(seed)) * scale


def test_non_finite_activations_ban_at_once_and_outliers_after_two_strikes_in_a_row():
    guard = Guard(GuardSettings(factor=8.0, warmup=4))
    for i in range(4):
        assert guard.check(MATE, 1, "x", acts(1.0 + 0.1 * i, seed=i), iteration=0) is None
    bad = acts()
    bad[0, 3, 5] = math.nan
    assert "non-finite activations from stage 1" in guard.check(BAD, 1, "x", bad)
    assert BAD in guard.bans
    assert "banned" in guard.check(BAD, 1, "x", acts())  # nothing more is taken from it
    # a replica whose outputs are 20 x its stage mate's and the running scale: refused, and banned
    # at its second outlier in a row (too small counts too)
    reason = guard.check(DATA, 1, "x", acts(20.0, seed=5), iteration=1)
    assert "20 x the scale" in reason.replace("19.9", "20").replace("20.1", "20") or "x the scale" in reason
    assert DATA not in guard.bans
    assert guard.check(DATA, 1, "x", acts(0.01, seed=6), iteration=1) is not None and DATA in guard.bans
    # an accepted tensor clears the strikes: outliers now and then are refused, never banned
    other = bytes([7]) * 32
    for i in range(3):
        assert guard.check(other, 1, "x", acts(30.0, seed=i), iteration=1) is not None
        assert guard.check(other, 1, "x", acts(1.0, seed=i), iteration=1) is None
    assert other not in guard.bans


def test_activations_scaled_upstream_are_blamed_on_the_node_that_scaled_them_not_the_last_hop():
    """A data node sees stage 2's outputs; a Byzantine stage-1 replica's 20 x outputs stay 20 x through
    the honest stage-2 replica after it (the residual stream). The last hop is not blamed while it is
    the one node of the route vouched for by accepted activations; when the route gives no single
    suspect, the tensor is refused and no one gets a strike."""
    guard = Guard(GuardSettings(factor=8.0, warmup=4))
    h1, s1, h2, s2 = (bytes([i]) * 32 for i in (11, 12, 13, 14))  # stage 1: h1 honest, s1 Byzantine
    for i in range(4):  # iterations 0-1: every route honest
        assert guard.check(h2, 2, "x", acts(1.0, seed=i), iteration=i // 2, upstream=(s1,)) is None
        assert guard.check(s2, 2, "x", acts(1.0, seed=10 + i), iteration=i // 2, upstream=(h1,)) is None
    # iteration 2: s1 scales its outputs; s1 and h2 were both vouched for in iteration 1: no suspect
    assert guard.check(s2, 2, "x", acts(1.0, seed=19), iteration=2, upstream=(h1,)) is None
    reason = guard.check(h2, 2, "x", acts(20.0, seed=20), iteration=2, upstream=(s1,))
    assert reason is not None and "no strike" in reason
    # iterations 3 and 4: h2 delivers honest activations from h1; s1 vouched for by nothing since
    # iteration 1: it is blamed, in both, and banned; h2 never is
    for k in (3, 4):
        assert guard.check(s2, 2, "x", acts(1.0, seed=20 + k), iteration=k, upstream=(h1,)) is None
        assert guard.check(h2, 2, "x", acts(1.0, seed=21 + k), iteration=k, upstream=(h1,)) is None
        reason = guard.check(h2, 2, "x", acts(20.0, seed=30 + k), iteration=k, upstream=(s1,), ident=(k, 0, 0))
        assert reason is not None and "which came through " + s1.hex()[:16] in reason
    assert s1 in guard.bans and h2 not in guard.bans and guard.check(s2, 2, "x", acts(1.0, seed=30), iteration=4,
                                                                     upstream=(h1,)) is None
    # a route where both nodes are suspects (a steady schedule: h3 only ever after s3): refused, no strike
    lone = Guard(GuardSettings(factor=8.0, warmup=4))
    h3, s3 = bytes([15]) * 32, bytes([16]) * 32
    for i in range(4):
        assert lone.check(s2, 2, "x", acts(1.0, seed=40 + i), iteration=i // 2, upstream=(h1,)) is None
    for k in range(2, 6):
        assert lone.check(s2, 2, "x", acts(1.0, seed=45 + k), iteration=k, upstream=(h1,)) is None
        assert "no strike" in lone.check(h3, 2, "x", acts(20.0, seed=50 + k), iteration=k, upstream=(s3,))
    assert not lone.bans
    # the one suspect of its route (here the last hop, after a vouched-for one) is still banned
    for k in (7, 8):
        assert lone.check(s2, 2, "x", acts(1.0, seed=60 + k), iteration=k, upstream=(h1,)) is None
        assert lone.check(s3, 2, "x", acts(20.0, seed=70 + k), iteration=k, upstream=(h1,)) is not None
    assert s3 in lone.bans and h1 not in lone.bans
    # a stage node takes the route on the sender's word: it may clear the sender, never blame another
    word = Guard(GuardSettings(factor=8.0, warmup=4))
    for i in range(4):
        assert word.check(h2, 2, "x", acts(1.0, seed=80 + i), iteration=2, upstream=(h1,), blame_upstream=False) is None
    assert word.check(s2, 2, "x", acts(1.0, seed=90), iteration=4, upstream=(h1,), blame_upstream=False) is None
    assert word.check(h2, 2, "x", acts(1.0, seed=95), iteration=4, upstream=(h1,), blame_upstream=False) is None
    for m in range(3):
        reason = word.check(h2, 2, "x", acts(20.0, seed=91 + m), iteration=4, upstream=(s1,), blame_upstream=False)
        assert "no strike" in reason
    assert not word.bans


def test_a_refused_tensor_sent_again_is_one_strike_not_two():
    """The demo with both stage-1 nodes killed: a data node refused an honest stage-2 node's gradient,
    the node retried the same delivery, and the second look at the same tensor banned it."""
    guard = Guard(GuardSettings(factor=8.0, warmup=4))
    for i in range(4):
        assert guard.check(MATE, 2, "grad", acts(1e-3, seed=i), iteration=i, ident=("arrive", i, 0, 0)) is None
    other = bytes([8]) * 32
    assert guard.check(other, 2, "grad", acts(1e-3, seed=5), iteration=4, ident=("arrive", 4, 0, 0)) is None
    outlier = acts(1e-3 * 40, seed=6)
    first = guard.check(MATE, 2, "grad", outlier, iteration=4, ident=("arrive", 4, 1, 0))
    assert first is not None and guard.check(MATE, 2, "grad", outlier, iteration=4, ident=("arrive", 4, 1, 0)) == first
    assert MATE not in guard.bans
    # another tensor that is off the scale too is the second strike
    assert guard.check(MATE, 2, "grad", acts(1e-3 * 40, seed=7), iteration=4, ident=("arrive", 4, 2, 0)) is not None
    assert MATE in guard.bans


def test_a_scale_that_moves_for_every_replica_of_a_stage_is_no_outlier():
    guard = Guard(GuardSettings(factor=8.0, warmup=4))
    mate2 = bytes([8]) * 32
    for i in range(4):
        for node in (MATE, mate2):
            assert guard.check(node, 2, "x", acts(0.06, seed=i), iteration=i) is None
    # both replicas' outputs grow 11x within an iteration, as the tiny model's last stage did in
    # training: the first one seen is refused once (its mate still looks as before), then both pass
    assert guard.check(MATE, 2, "x", acts(0.68, seed=9), iteration=4) is not None
    assert guard.check(mate2, 2, "x", acts(0.68, seed=10), iteration=4) is None
    assert guard.check(MATE, 2, "x", acts(0.70, seed=11), iteration=4) is None
    assert not guard.bans
    # a stage seen for the first time, without mates: judged by every stage's scale (its median is
    # still 0.06), with f^3 (alone, an honest stage's gradients grew 218x after a neighbour was rebuilt
    # by a swap copy in the multi-process recovery run)
    lone = bytes([9]) * 32
    assert guard.check(lone, 3, "x", acts(0.06 * 300, seed=12), iteration=5) is None
    assert "x the scale" in guard.check(lone, 3, "x", acts(0.06 * 2000, seed=13), iteration=5)
    # gradients: kept apart from activations; they may shrink by any factor (they do early in
    # training), but not grow 20 x while their stage mates' do not
    for i in range(4):
        for node in (MATE, mate2):
            assert guard.check(node, 2, "grad", acts(1e-3, seed=i), iteration=i) is None
    assert guard.check(MATE, 2, "grad", acts(1e-6), iteration=5) is None
    # 9x at once is no outlier yet (an honest stage's did that early in a run, while a stage was
    # skipped): gradients are judged with 2f; activations with f
    assert guard.check(mate2, 2, "grad", acts(9e-3, seed=20), iteration=5) is None
    assert "x the scale" in guard.check(mate2, 2, "grad", acts(2e-2), iteration=6)
    off = Guard(GuardSettings(enabled=False))
    bad = acts()
    bad[0, 0, 0] = math.inf
    assert off.check(BAD, 1, "x", bad) is None and not off.bans


def grads(scale: float, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(8, 8, generator=g) * scale, "b": torch.randn(8, generator=g) * scale}


def test_gradients_of_a_path_that_skipped_a_stage_are_judged_on_that_paths_scale():
    """Seen in a multi-process run: after a stage-2 node died, the gradients of the microbatches that
    skipped stage 2 reached the data node 30x larger than those that went through it; judged on one
    scale, the honest stage-1 node that sent them was banned."""
    guard = Guard(GuardSettings(factor=8.0, warmup=4))
    for i in range(6):  # microbatches through stages 1 and 2, from both stage-1 replicas
        assert guard.check(MATE if i % 2 else ME, 1, "grad", acts(1e-4, seed=i), iteration=i // 2, path=(1, 2)) is None
    # stage 2 skipped: 30x, from one replica, and its mate's (through stage 2) are as before
    for i in range(6):
        assert guard.check(ME, 1, "grad", acts(3e-3, seed=10 + i), iteration=3 + i, path=(1,)) is None
        assert guard.check(MATE, 1, "grad", acts(1e-4, seed=20 + i), iteration=3 + i, path=(1, 2)) is None
    assert not guard.bans
    # on the skipped path's own scale a garbage gradient still stands out, and on the usual path too
    assert "x the scale" in guard.check(BAD, 1, "grad", acts(1.0, seed=30), iteration=9, path=(1,))
    assert "x the scale" in guard.check(BAD, 1, "grad", acts(3e-3, seed=31), iteration=9, path=(1, 2))
    # where the path is not known (a stage node's gradients), one scale for all, as before
    other = Guard(GuardSettings(factor=8.0, warmup=4))
    for i in range(6):
        assert other.check(MATE if i % 2 else ME, 1, "grad", acts(1e-4, seed=i), iteration=i // 2) is None
    assert "x the scale" in other.check(ME, 1, "grad", acts(3e-3, seed=10), iteration=3)


def test_the_reduce_leaves_out_non_finite_and_garbage_gradients():
    guard = Guard(GuardSettings(factor=8.0, warmup=4))
    nan = grads(1.0)
    nan["b"][2] = math.inf
    out = guard.check_gradients(1, {ME: (grads(1.0), 4), MATE: (grads(2.5, 1), 4), BAD: (nan, 4)}, trusted=ME)
    assert list(out) == [BAD] and BAD in guard.bans  # an honest mate at 2.5 x is kept
    garbage = {ME: (grads(1.0), 4), MATE: (grads(100.0, 2), 4), DATA: (grads(0.0), 0)}
    out = guard.check_gradients(1, garbage, trusted=ME)
    assert list(out) == [MATE] and "x the reference" in out[MATE] and MATE not in guard.bans  # a strike
    # gradients for "no microbatches" add to the sum, not to the count: they are judged as one
    # microbatch's (a data node's head has such gradients when no backward came back)
    assert guard.check_gradients(0, {ME: (grads(1.0), 4), DATA: (grads(1.0, 3), 0)}, trusted=ME) == {}
    assert list(guard.check_gradients(0, {ME: (grads(1.0), 4), DATA: (grads(50.0, 3), 0)}, trusted=ME)) == [DATA]
    # our own is trusted even when it is the odd one out; after warmup the history is the reference
    assert guard.check_gradients(1, {ME: (grads(50.0), 1), MATE: (grads(1.0), 1)}, trusted=ME) == {}
    for seed in range(4):
        guard.check_gradients(1, {ME: (grads(1.0, seed), 1)}, trusted=ME)
    assert list(guard.check_gradients(1, {MATE: (grads(30.0, 7), 1)})) == [MATE]


def test_faults_tamper_from_their_iteration_on():
    nan = parse_fault("nan-activations-from-2")["tamper"]
    x = acts()
    assert torch.equal(nan("x", 1, x), x) and torch.isnan(nan("x", 2, x)).sum() == 1
    assert torch.equal(nan("grad", 5, x), x)
    scale = parse_fault("scale-activations")["tamper"]
    assert torch.equal(scale("x", 0, x), x * SCALE_FAULT)
    garbage = parse_fault("garbage-gradients-from-1")["tamper"]
    g = acts(0.01)
    assert torch.equal(garbage("param", 0, g), g) and torch.equal(garbage("x", 3, x), x)
    noisy = garbage("grad", 1, g)
    assert torch.isfinite(noisy).all() and noisy.std() > GARBAGE_FAULT / 2 * g.std()
    for wrong in ("nan-activations-from-", "nan-activations-from-x", "garbage"):
        with pytest.raises(ValueError, match="unknown fault"):
            parse_fault(wrong)


class RecordingSwarm:
    """A fixed view, records to read, and what the worker published and reported."""

    def __init__(self, my_id: bytes, records: dict | None = None):
        self.my_id = my_id
        self.handlers = {}
        self.live = [Peer(n, "stage" if s else "data", s, None, "ONLINE") for n, s in
                     ((ME, 1), (BAD, 1), (MATE, 1), (DATA, 0))]
        self.records = records or {}
        self.published: list[tuple[str, dict]] = []
        self.events: list[tuple[str, str]] = []

    def serve(self, method, handler):
        self.handlers[method] = handler

    async def peers(self, **_):
        return list(self.live)

    async def read(self, name):
        return self.records.get(name, {})

    async def publish(self, name, body, ttl_s):
        self.published.append((name, body))
        return True

    async def report_event(self, event, detail):
        self.events.append((event, detail))

    async def call(self, *args, **kwargs):
        return {}, {}


def stage_worker(swarm) -> PipelineWorker:
    settings = PipelineSettings(num_stages=2, path_length=2, swap="none", microbatches=2, memory=2, iterations=3,
                                lr=1e-2, slot_wait_s=0.1, reduce_timeout_s=1.0, retry_s=0.05)
    return PipelineWorker(swarm, 1, stage_module(SPEC, 1), settings, guard=GuardSettings(warmup=2))


def test_a_replica_sending_nan_is_refused_banned_announced_and_left_out_of_paths_and_reduces():
    swarm = RecordingSwarm(MATE)
    w = stage_worker(swarm)

    async def scenario():
        await w._replicas()
        bad = torch.full((2, 16, 64), math.nan)
        args = {"iteration": 0, "mb": 0, "attempt": 0, "origin": DATA, "route": [], "visited": [[1, BAD]],
                "skipped": 0, "rerouted": 0}
        with pytest.raises(PipelineError, match="refused: non-finite activations from stage 1"):
            await w._on_forward(BAD, args, {"x": bad})
        await asyncio.gather(*w._tasks)
        return await w._replicas()

    replicas = asyncio.run(scenario())
    assert BAD not in replicas[1] and set(replicas[1]) == {ME, MATE}
    assert swarm.events and swarm.events[0][0] == "banned" and BAD.hex() in swarm.events[0][1]
    assert swarm.published == [(BANS_RECORD, {"bans": [[BAD, w.guard.bans[BAD]]]})]
    assert w.report.refused == 1 and w.report.bans[0][1:] == [BAD.hex(), w.guard.bans[BAD], "seen"]
    assert not w._cache  # nothing was computed with it


def test_each_accuser_has_its_first_ban_believed_unless_it_is_banned_itself():
    x, y, z = (bytes([i]) * 32 for i in (7, 8, 9))
    records = {BANS_RECORD: {DATA: {"bans": [[BAD, "non-finite activations from stage 1"], [x, "second"]]},
                             BAD: {"bans": [[ME, "made up"], [y, "made up too"]]},
                             z: {"bans": [[x, "from a node banned here"]]},
                             y: {"bans": [["junk"], [x, "behind junk"]]}, x: {"bans": "not a list"}}}
    w = stage_worker(RecordingSwarm(MATE, records))
    w.guard.ban(z, "reported by another", adopted=True)
    asyncio.run(w._refresh_bans(force=True))
    # DATA's first, and BAD's first too (one malicious member can exclude one other, on record)
    assert set(w.guard.bans) == {BAD, ME, z}
    assert sorted(row[1] for row in w.report.bans) == sorted([BAD.hex(), ME.hex()])
    assert w.guard.bans[BAD] == f"reported by {DATA.hex()[:16]}: non-finite activations from stage 1"
    assert all(row[3] == "adopted" for row in w.report.bans)
    w._announce_bans()  # adopted bans are not this node's to announce
    assert w._announced == []


def test_the_reducer_leaves_out_a_garbage_replica_and_steps_on_the_rest():
    swarm = RecordingSwarm(ME)
    w = stage_worker(swarm)
    honest = stage_worker(RecordingSwarm(MATE))
    tokens = torch.randn(2, 16, 64)

    async def reduce(k: int) -> dict[str, torch.Tensor]:
        for worker in (w, honest):
            worker.module(tokens).pow(2).mean().backward()
            worker._count = 2
        mate_grads = honest._grads()
        honest.optimizer.zero_grad(set_to_none=True)
        w._reduce_inbox[(k, MATE)] = (mate_grads, 2, b"h")
        w._reduce_inbox[(k, BAD)] = ({n: torch.randn_like(g) * 1e4 for n, g in mate_grads.items()}, 2, b"h")
        expected = {n: (g + mate_grads[n]) / 4 for n, g in w._grads().items()}
        await w._reduce_as_reducer(k, [ME, BAD, MATE])
        await asyncio.gather(*w._tasks)  # the ban's event and record
        return expected

    expected = asyncio.run(reduce(0))
    assert [row[:2] for row in w.report.excluded] == [[0, BAD.hex()]] and BAD not in w.guard.bans  # a strike
    assert w.report.grad_norms[-1][1] == pytest.approx(
        float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in expected.values()]))))
    asyncio.run(reduce(1))
    assert [row[:2] for row in w.report.excluded] == [[0, BAD.hex()], [1, BAD.hex()]] and BAD in w.guard.bans
    assert BAD not in w._mates and MATE in w._mates
    assert all(torch.isfinite(p).all() for p in w.module.parameters())
    assert swarm.events[0][0] == "banned" and BAD.hex() in swarm.events[0][1]


def test_garbage_gradients_from_the_only_replica_a_data_node_sees_are_refused():
    """The multi-process Byzantine runs: on a steady schedule a data node sees one replica of
    stage 1 for many iterations, so it never has a stage mate to compare with. With f^3 for that
    case, the garbage replica's 100x gradients were taken, went into the data nodes' step, and the
    honest replicas' gradients then looked 22x off scale and were banned (5 false bans). But honest
    lone gradients drift too (20-25x within the window in the checkpoint baseline test, while stage
    2 was skipped), and a 2f rule with strikes banned the honest stage-1 node there: a lone outlier
    is refused, with no strike, and joins the scale; the garbage replica is banned at its reduce."""
    guard = Guard(GuardSettings(factor=8.0, warmup=4, window=8))
    for i in range(8):  # two iterations of honest gradients, all from BAD (still honest)
        assert guard.check(BAD, 1, "grad", acts(1e-3, seed=i), iteration=i // 4, path=(1, 2)) is None
    assert guard.check(BAD, 1, "grad", acts(9e-3, seed=8), iteration=2, path=(1, 2)) is None  # 9x: honest moves
    assert "no strike" in guard.check(BAD, 1, "grad", acts(0.05, seed=9), iteration=2, path=(1, 2))
    assert "no strike" in guard.check(BAD, 1, "grad", acts(0.05, seed=10), iteration=2, path=(1, 2))
    assert BAD not in guard.bans
    # a scale that really moved 50x is followed: refused until half the window holds it
    refused = 2
    while guard.check(BAD, 1, "grad", acts(0.05, seed=10 + refused), iteration=3, path=(1, 2)) is not None:
        refused += 1
    assert refused == 3 and BAD not in guard.bans  # the third joined, the fourth passed
    # with a stage mate to compare with, an outlier is a strike as before
    for i in range(2):
        assert guard.check(MATE, 1, "grad", acts(0.05, seed=30 + i), iteration=3, path=(1, 2)) is None
    assert "no strike" not in guard.check(BAD, 1, "grad", acts(50.0, seed=40), iteration=3, path=(1, 2))
    assert guard.check(BAD, 1, "grad", acts(50.0, seed=41), iteration=3, path=(1, 2)) is not None
    assert BAD in guard.bans


def test_the_scales_start_afresh_when_a_lost_stage_is_served_again():
    guard = Guard(GuardSettings(factor=8.0, warmup=4))
    for i in range(6):
        assert guard.check(MATE, 1, "grad", acts(1e-4, seed=i), iteration=i) is None
    assert guard.check_gradients(1, {ME: (grads(1.0), 1)}, trusted=ME) == {}
    assert guard.check(MATE, 1, "grad", acts(1e-4 * 218, seed=6), iteration=6) is not None  # a strike
    guard.forget_scales()
    # a neighbour rebuilt: gradients 218x, taken until the new scale has its warm-up, then judged on it
    for i in range(4):
        assert guard.check(MATE, 1, "grad", acts(1e-4 * 218, seed=10 + i), iteration=7) is None
    assert MATE not in guard.bans
    assert guard.check(MATE, 1, "grad", acts(1e-4 * 218 * 20, seed=20), iteration=8) is not None
    bad = acts(1e-4)
    bad[0, 0, 0] = math.nan
    guard.forget_scales()
    assert "non-finite" in guard.check(MATE, 1, "grad", bad, iteration=8) and MATE in guard.bans  # always judged


def test_a_replica_judges_the_reducers_average_with_twice_the_factor():
    """An honest stage-2 replica banned its reducer in a full run: the average was 10.4x the
    replica's own per-microbatch norm (the reducer takes contributions within f of its own, so an
    honest average can be about f off a replica whose microbatches gave small gradients)."""
    guard = Guard(GuardSettings(factor=8.0, warmup=4))
    assert guard.check_gradients(2, {MATE: (grads(10.4), 1), ME: (grads(1.0, 1), 1)}, trusted=ME, slack=2.0) == {}
    assert list(guard.check_gradients(2, {MATE: (grads(10.4), 1), ME: (grads(1.0, 1), 1)}, trusted=ME)) == [MATE]
    assert list(guard.check_gradients(2, {MATE: (grads(50.0), 1), ME: (grads(1.0, 1), 1)}, trusted=ME,
                                      slack=2.0)) == [MATE]


def test_a_stage_served_again_in_the_view_starts_the_workers_scales_afresh():
    swarm = RecordingSwarm(MATE)
    w = stage_worker(swarm)
    for i in range(4):
        assert w.guard.check(DATA, 0, "grad", acts(1e-3, seed=i), iteration=i) is None

    async def look():
        return await w._replicas()

    asyncio.run(look())
    asyncio.run(look())  # nothing changed: the scales stay
    assert w.guard.check(DATA, 0, "grad", acts(1e-1, seed=9), iteration=5) is not None
    swarm.live = [p for p in swarm.live if p.stage != 0]  # stage 0 lost
    asyncio.run(look())
    assert w.guard._scales  # a loss alone changes nothing
    swarm.live.append(Peer(bytes([9]) * 32, "data", 0, None, "ONLINE"))  # and served again
    asyncio.run(look())
    assert w.guard.check(DATA, 0, "grad", acts(1e-1, seed=10), iteration=6) is None  # warm-up again
    # a spare that rebuilt stage 1 is a new replica, also when this node never saw the stage lost
    for i in range(4):
        assert w.guard.check(DATA, 0, "grad", acts(1e-1, seed=20 + i), iteration=7) is None
    assert w.guard.check(DATA, 0, "grad", acts(10.0, seed=30), iteration=8) is not None
    swarm.live = [p for p in swarm.live if p.id != BAD] + [Peer(bytes([10]) * 32, "stage", 1, None, "ONLINE")]
    asyncio.run(look())
    assert w.guard.check(DATA, 0, "grad", acts(10.0, seed=31), iteration=9) is None


def test_a_refused_delivery_from_the_route_ends_the_wait_and_a_strangers_does_not():
    """A multi-process Byzantine run stalled 60 s (arrival_timeout_s) an iteration: the data node
    refused the garbage replica's gradient at its first strike and went on waiting for it."""
    w = stage_worker(RecordingSwarm(MATE))
    for i in range(4):
        assert w.guard.check(ME, 1, "grad", acts(1e-3, seed=i), iteration=0, path=(1,)) is None
    stranger = bytes([9]) * 32

    async def deliver(sender: bytes, m: int, t: torch.Tensor) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        future.expected_shape, future.stages, future.nodes = (2, 16, 64), (1,), {BAD}
        w._arrivals[(1, m, 0, "grad")] = future
        with pytest.raises(PipelineError, match="refused"):
            await w._on_arrive(sender, {"iteration": 1, "mb": m, "attempt": 0, "kind": "grad"}, {"t": t})
        return future

    async def scenario():
        from_route = await deliver(BAD, 0, acts(1.0))  # 1000x the scale
        from_stranger = await deliver(stranger, 1, torch.full((2, 16, 64), math.nan))
        return from_route, from_stranger

    from_route, from_stranger = asyncio.run(scenario())
    assert from_route.done() and from_route.result() is None
    assert not from_stranger.done()


def test_a_reducer_without_gradients_of_its_own_judges_a_replica_with_twice_the_factor():
    """The leader-kill test, once: a data node died, the other stage-1 replica took every microbatch,
    and the reducer, with none of its own, found it 14.4x and then 9.1x its history and banned it."""
    guard = Guard(GuardSettings(factor=8.0, warmup=4))
    for seed in range(4):
        assert guard.check_gradients(1, {ME: (grads(1.0, seed), 1), MATE: (grads(1.0, seed + 9), 1)}, trusted=ME) == {}
    assert guard.check_gradients(1, {ME: (grads(0.0), 0), MATE: (grads(14.4, 20), 1)}, trusted=ME) == {}
    assert list(guard.check_gradients(1, {ME: (grads(0.0), 0), MATE: (grads(100.0, 21), 1)}, trusted=ME)) == [MATE]
    # with its own gradient the reference stays as tight as before
    assert list(guard.check_gradients(1, {ME: (grads(1.0, 30), 1), MATE: (grads(14.4, 31), 1)}, trusted=ME)) == [MATE]
