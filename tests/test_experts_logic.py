"""Mode experts, pure logic: combination rules against hand-computed numbers, allocations of equal
compute, the three splits, the job board, checkpoints addressed by digest, resuming a job."""
from __future__ import annotations

import asyncio
import dataclasses
import math

import pytest
import torch

from ensemble.allocation import allocate, compute, params, size_groups
from ensemble.board import (Checkpoint, Held, build_board, choose_job, ckpt_body, lease_body, mirrors, parse_ckpts,
                            parse_lease, round_peers, should_yield)
from ensemble.checkpoint import CheckpointError, CheckpointRejected, CheckpointStore, fetch_checkpoint, recall
from ensemble.combine import estimate_prior, next_token_mixture, posterior_mixture, posterior_weights, uniform_mean
from ensemble.data import job_batches, stream_seed, three_way_split
from ensemble.jobs import JobError, expert_model, jobs_from_spec
from ensemble.plan import PlanSettings, plan, section_overrides
from ensemble.train import CheckpointMismatch, ExpertTrainer
from protocol.errors import InvalidSpec
from protocol.keys import generate_private_key
from protocol.runspec import ExpertSpec, dumps_spec, loads_spec, make_spec, verify_spec
from trainer.data import load_domain, split_domain

OWNER = generate_private_key()
DOMAINS = ("python", "prose", "arithmetic")


# ---- combination -----------------------------------------------------------------------------


def test_posterior_mixture_equals_a_hand_computed_example():
    # two experts, one sequence of three tokens; probabilities each expert gives the actual next token
    a, b = [0.5, 0.4, 0.1], [0.25, 0.2, 0.6]
    target = torch.tensor([[a], [b]]).log()  # (K=2, N=1, T=3)
    prior = torch.tensor([0.6, 0.4])
    # by hand: t0 weights = prior; t1 ∝ (0.6*0.5, 0.4*0.25) = (3/4, 1/4); t2 ∝ (0.6*0.5*0.4, 0.4*0.25*0.2) = (6/7, 1/7)
    expected_weights = [[0.6, 0.75, 6 / 7], [0.4, 0.25, 1 / 7]]
    expected = [0.6 * 0.5 + 0.4 * 0.25, 0.75 * 0.4 + 0.25 * 0.2, 6 / 7 * 0.1 + 1 / 7 * 0.6]  # 0.4, 0.35, 1.2/7
    weights = posterior_weights(target, prior.log()).exp()[:, 0, :]
    assert torch.allclose(weights, torch.tensor(expected_weights), atol=1e-6)
    mixture = posterior_mixture(target, prior.log()).exp()[0]
    assert torch.allclose(mixture, torch.tensor(expected), atol=1e-6)
    assert math.isclose(float(mixture[2]), 1.2 / 7, rel_tol=1e-5)


def test_generation_mixture_matches_the_sequence_rule():
    # the next-token form used for sampling gives the same probability as the table's rule at t = 2
    vocab = torch.tensor([[0.1, 0.9], [0.6, 0.4]]).log()  # each expert's distribution over 2 tokens at t2
    prefix = torch.tensor([math.log(0.5 * 0.4), math.log(0.25 * 0.2)])
    mixed = next_token_mixture(vocab, prefix, torch.tensor([0.6, 0.4]).log()).exp()
    assert torch.allclose(mixed, torch.tensor([6 / 7 * 0.1 + 1 / 7 * 0.6, 6 / 7 * 0.9 + 1 / 7 * 0.4]), atol=1e-6)
    assert math.isclose(float(mixed.sum()), 1.0, rel_tol=1e-6)


def test_uniform_mean_of_log_probabilities_is_normalised():
    logprobs = torch.tensor([[0.8, 0.2], [0.5, 0.5]]).log()  # (K=2, V=2)
    mixed = uniform_mean(logprobs).exp()
    geometric = torch.tensor([math.sqrt(0.4), math.sqrt(0.1)])  # exp of the mean log-probability
    assert torch.allclose(mixed, geometric / geometric.sum(), atol=1e-6)  # = (2/3, 1/3)


def test_prior_goes_to_the_expert_that_explains_the_held_out_sequences():
    # expert 0 explains three of four sequences much better; expert 1 the fourth
    good, bad = math.log(0.5), math.log(0.01)
    seq = torch.full((2, 4, 8), bad)
    seq[0, :3] = good
    seq[1, 3] = good
    prior = estimate_prior(seq)
    assert torch.allclose(prior, torch.tensor([0.75, 0.25]), atol=1e-3)
    # an expert that never wins keeps the floor, never exactly zero
    third = torch.cat([seq, torch.full((1, 4, 8), bad - 5)])
    assert 0 < float(estimate_prior(third)[2]) <= 1.01e-3


# ---- allocation ------------------------------------------------------------------------------


@pytest.mark.parametrize("heterogeneity", ["both", "sizes", "steps"])
@pytest.mark.parametrize("difficulty", [[1.2, 2.0, 1.7], [3.0, 1.0], [1.0, 1.0, 1.0, 1.0], [2.5]])
def test_allocations_have_equal_total_compute(heterogeneity, difficulty):
    domains = [f"d{i}" for i in range(len(difficulty))]
    plan_ = allocate(domains, difficulty, preset="tiny", base_steps=300, lr=3e-3, heterogeneity=heterogeneity)
    assert compute(plan_.homogeneous) == plan_.budget == len(domains) * params(plan_.homogeneous[0]) * 300
    largest = max(params(e) for e in plan_.heterogeneous)
    assert abs(compute(plan_.heterogeneous) - plan_.budget) <= largest / 2  # whole steps: within half a step
    assert abs(compute(plan_.dense) - plan_.budget) <= params(plan_.dense[0]) / 2
    assert [e.domain for e in plan_.heterogeneous] == domains


def test_harder_domains_get_larger_experts_or_more_compute():
    difficulty = [1.0, 2.0, 3.0]
    both = allocate(list(DOMAINS), difficulty, preset="tiny", base_steps=300, lr=3e-3, heterogeneity="both")
    widths = [expert_model(e).d_model for e in both.heterogeneous]
    assert widths == sorted(widths) and widths[0] < 64 < widths[2]
    spent = [params(e) * e.steps for e in both.heterogeneous]
    assert spent == sorted(spent) and spent[0] < both.budget / 3 < spent[2]
    steps = allocate(list(DOMAINS), difficulty, preset="tiny", base_steps=300, lr=3e-3, heterogeneity="steps")
    assert {expert_model(e).d_model for e in steps.heterogeneous} == {64}
    assert [e.steps for e in steps.heterogeneous] == sorted(e.steps for e in steps.heterogeneous)
    sizes = allocate(list(DOMAINS), difficulty, preset="tiny", base_steps=300, lr=3e-3, heterogeneity="sizes")
    assert len({e.steps for e in sizes.heterogeneous[:2]}) == 1
    assert size_groups([5.0, 1.0, 3.0, 2.0]) == [2, 0, 1, 1]


def test_the_plan_in_the_spec_is_reproducible_from_it():
    section, _ = plan(PlanSettings(domains=DOMAINS, base_steps=40, seed_steps=0))
    spec = make_spec("experts", "tiny", OWNER, experts=section_overrides(section))
    back = loads_spec(dumps_spec(spec))
    verify_spec(back)
    again = allocate(list(back.data.domains), back.experts.difficulty, preset="tiny", base_steps=40,
                     lr=back.experts.homogeneous[0].lr, heterogeneity=back.experts.heterogeneity)
    assert again.heterogeneous == back.experts.heterogeneous and again.homogeneous == back.experts.homogeneous
    assert again.dense == back.experts.dense and again.budget == back.experts.budget
    jobs = jobs_from_spec(back)
    assert [j.name for j in jobs] == ["het.python", "het.prose", "het.arithmetic", "hom.python", "hom.prose",
                                      "hom.arithmetic", "dense"]
    het = sum(j.compute for j in jobs if j.ensemble == "heterogeneous")
    hom = sum(j.compute for j in jobs if j.ensemble == "homogeneous")
    assert hom == back.experts.budget and abs(het - hom) <= max(j.params for j in jobs) / 2


def test_the_spec_refuses_a_bad_experts_section():
    good = {"domain": "python", "steps": 5}
    with pytest.raises(InvalidSpec, match="one entry per data.domains entry"):
        make_spec("experts", "tiny", OWNER, domains=["python", "prose"], experts={"heterogeneous": [good]})
    with pytest.raises(InvalidSpec, match=r"experts.heterogeneous\[0\].steps"):
        make_spec("experts", "tiny", OWNER, domains=["python"], experts={"heterogeneous": [{**good, "steps": 0}]})
    with pytest.raises(InvalidSpec, match="unknown key"):
        make_spec("experts", "tiny", OWNER, domains=["python"], experts={"heterogeneous": [{**good, "width": 3}]})
    with pytest.raises(InvalidSpec, match="experts.dense"):
        make_spec("experts", "tiny", OWNER, experts={"dense": [{"domain": "python"}]})
    with pytest.raises(InvalidSpec, match="heterogeneity"):
        make_spec("experts", "tiny", OWNER, experts={"heterogeneity": "random"})
    with pytest.raises(JobError, match="no expert jobs"):
        jobs_from_spec(make_spec("experts", "tiny", OWNER))
    with pytest.raises(JobError, match="head size"):
        expert_model(ExpertSpec(domain="python", d_model=50))


# ---- data ------------------------------------------------------------------------------------


def test_three_splits_are_disjoint_and_eval_is_the_validation_split():
    for domain in ("prose", "arithmetic"):
        splits = three_way_split(domain, 0.1, 0.05, seed=0, chunk_size=4096)
        standard = split_domain(load_domain(domain), 0.1, chunk_size=4096, seed=0)
        assert torch.equal(splits.eval, standard.val)
        assert len(splits.prior) > 0 and len(splits.train) > len(splits.prior) + len(splits.eval)
        # no 4 KiB chunk of the prior or eval split appears in training
        chunks = {bytes(splits.train[i : i + 4096].tolist()) for i in range(0, len(splits.train), 4096)}
        for held_out in (splits.prior, splits.eval):
            assert not any(bytes(held_out[i : i + 4096].tolist()) in chunks for i in range(0, len(held_out), 4096))
    dense = job_batches([torch.zeros(500, dtype=torch.uint8), torch.ones(500, dtype=torch.uint8)], 4, 16, seed=1)
    x, _ = next(dense)
    assert x[:, 0].tolist() == [0, 1, 0, 1]  # the dense model's batches take the domains in turn
    assert stream_seed(1, "ab", 2) != stream_seed(1, "a", "b2")


# ---- the job board ---------------------------------------------------------------------------


def _node(i: int) -> bytes:
    return bytes([i]) * 32


def test_board_leases_expire_and_dead_holders_free_their_job():
    a, b, c = _node(1), _node(2), _node(3)
    now = 1000.0
    leases = {a: lease_body(0, now + 10, 40), b: lease_body(1, now - 1, 5), c: lease_body(2, now + 10, 0)}
    ckpt = Checkpoint(0, 40, b"\x11" * 32, False, 2.0, 320, a)
    board = build_board(3, leases, {a: ckpt_body([ckpt], [])}, live={a, b}, now=now)
    assert board.jobs[0].holders == [a]
    assert board.jobs[1].holders == []  # b's lease ran out
    assert board.jobs[2].holders == []  # c is not live
    assert board.jobs[0].latest == ckpt and board.where[ckpt.digest] == {a}
    assert board.jobs[0].available.digest == ckpt.digest
    # a dies: its checkpoint still counts as the job's progress, but nobody serves it
    gone = build_board(3, leases, {a: ckpt_body([ckpt], [])}, live={b}, now=now)
    assert gone.jobs[0].latest == ckpt and gone.jobs[0].holders == [] and ckpt.digest not in gone.where
    # ... unless b kept a copy of an earlier one: that is where a resume starts
    older = Held(0, 30, b"\x10" * 32, False)
    kept = build_board(3, leases, {a: ckpt_body([ckpt], []), b: ckpt_body([], [older])}, live={b}, now=now)
    assert kept.jobs[0].latest == ckpt and kept.jobs[0].available == older and kept.where[older.digest] == {b}


def test_choose_job_takes_open_jobs_with_most_compute_left_then_joins_groups():
    a, b, me = _node(1), _node(2), _node(9)
    now = 0.0
    steps, compute_ = [100, 100, 300], [100 * 10, 100 * 20, 300 * 10]
    empty = build_board(3, {}, {}, {me}, now)
    assert choose_job(empty, me, steps, compute_, 40) == 2  # the dense-like job: most compute left
    busy = build_board(3, {a: lease_body(2, 10.0, 0)}, {}, {a, me}, now)
    assert choose_job(busy, me, steps, compute_, 40) == 1
    full = build_board(3, {a: lease_body(2, 10.0, 0), b: lease_body(1, 10.0, 0), _node(3): lease_body(0, 10.0, 0)},
                       {}, {a, b, _node(3), me}, now)
    assert choose_job(full, me, steps, compute_, 40) == 2  # a group: most compute left per holder
    done = Checkpoint(2, 300, b"\x22" * 32, True, 1.0, 1, a)
    nearly = Checkpoint(1, 90, b"\x33" * 32, False, 1.0, 1, b)
    late = build_board(3, {b: lease_body(1, 10.0, 90), _node(3): lease_body(0, 10.0, 70)},
                       {a: ckpt_body([done], []), b: ckpt_body([nearly], [])}, {a, b, _node(3), me}, now)
    assert choose_job(late, me, steps, compute_, 40) is None  # too little left to be worth joining


def test_simultaneous_claims_leave_the_smaller_id_and_move_the_other():
    small, big = _node(1), _node(2)
    steps, compute_ = [100, 100], [1000, 1000]
    both = build_board(2, {small: lease_body(0, 10.0, 0), big: lease_body(0, 10.0, 0)}, {}, {small, big}, 0.0)
    assert should_yield(both, small, 0, steps, compute_, 40) is None
    assert should_yield(both, big, 0, steps, compute_, 40) == 1


def test_round_peers_wait_for_the_ones_inside_the_round_only():
    me, ready, inside, ahead = _node(1), _node(2), _node(3), _node(4)
    leases = {ready: lease_body(0, 10.0, 40, sync=40), inside: lease_body(0, 10.0, 25),
              ahead: lease_body(0, 10.0, 40)}
    board = build_board(1, leases, {}, {me, ready, inside, ahead}, 0.0)
    assert round_peers(board, me, 0, 20, 40) == ([ready], [inside])


def test_malformed_records_are_left_out():
    assert parse_lease({"job": 7, "until": 1.0, "step": 0}, 3) is None
    assert parse_lease({"job": 0, "until": "soon", "step": 0}, 3) is None
    assert parse_lease({"job": True, "until": 1.0, "step": 0}, 3) is None
    assert parse_lease(["job"], 3) is None
    own, have = parse_ckpts(_node(1), {"own": [[0, 5, b"short", False, 1.0, 3], [0, 5, b"\x01" * 32, 0, 1.0, 3],
                                               [1, 5, b"\x02" * 32, True, 1.0, 3], "junk"],
                                       "have": [[0, 3, b"\x03" * 32, False], [5, 3, b"\x04" * 32, False],
                                                [0, 3, b"\x05" * 32], b"\x06" * 32]}, 2)
    assert [c.digest for c in own] == [b"\x02" * 32]
    assert [(h.job, h.digest) for h in have] == [(0, b"\x03" * 32), (1, b"\x02" * 32)]  # what it made, it keeps


def test_mirrors_are_agreed_without_talking():
    nodes = [_node(i) for i in range(1, 8)]
    chosen = mirrors(b"\x42" * 32, nodes, 2)
    assert len(chosen) == 2 and chosen == mirrors(b"\x42" * 32, list(reversed(nodes)), 2)
    # a keeper leaving moves only its own share
    rest = [n for n in nodes if n != chosen[0]]
    assert chosen[1] in mirrors(b"\x42" * 32, rest, 2)


# ---- checkpoints and resuming ----------------------------------------------------------------


def _jobs():
    section, _ = plan(PlanSettings(domains=("arithmetic",), base_steps=8, seed_steps=0, dense=False))
    return jobs_from_spec(make_spec("experts", "tiny", OWNER, domains=["arithmetic"],
                                    experts=section_overrides(section)))


def _stream(job, start: int):
    data = torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return job_batches([data], 2, 16, stream_seed(0, job.name, start))


def test_a_job_resumed_from_its_checkpoint_continues_exactly(tmp_path):
    torch.set_num_threads(1)
    job = _jobs()[0]
    straight = ExpertTrainer(job, seed=5)
    straight.train_steps(4, _stream(job, 0))
    straight.train_steps(4, _stream(job, 4))
    first = ExpertTrainer(job, seed=5)
    first.train_steps(4, _stream(job, 0))
    store = CheckpointStore(tmp_path)
    digest = store.put(first.state())
    resumed = ExpertTrainer(job, seed=99)  # another node: other initial weights, replaced by the checkpoint
    resumed.load(CheckpointStore(tmp_path).get(digest))
    assert resumed.step == 4 and resumed.samples == 8
    resumed.train_steps(4, _stream(job, 4))
    assert resumed.done and all(torch.equal(a, b) for a, b in zip(straight.model.state_dict().values(),
                                                                   resumed.model.state_dict().values()))
    other = dataclasses.replace(job, name="hom.other")
    with pytest.raises(CheckpointMismatch, match="of job"):
        ExpertTrainer(other, seed=0).load(store.get(digest))


def test_a_restarted_node_names_again_what_its_store_holds(tmp_path):
    """A node killed and restarted on its data dir: its own latest checkpoint of a job counts as its
    own again (so the job's progress and done flag are not lost with its old record), its latest
    copy of another job is served again, and what those supersede is removed."""
    from ensemble.worker import ExpertWorker, WorkerSettings

    torch.set_num_threads(1)
    mine, theirs = _jobs()[:2]
    me, peer = _node(7), _node(8)
    store = CheckpointStore(tmp_path)
    trainer = ExpertTrainer(mine, seed=1)
    trainer.train_steps(2, _stream(mine, 0))
    older = store.put(trainer.state(), me, 2.5)
    trainer.train_steps(mine.steps - 2, _stream(mine, 2))
    latest = store.put(trainer.state(), me, 1.25)
    stranger = ExpertTrainer(mine, seed=2)
    stranger.train_steps(2, _stream(mine, 0))
    behind_copy = store.put(stranger.state())  # a copy of the same job, behind what this node made
    other = ExpertTrainer(theirs, seed=3)
    other.train_steps(2, _stream(theirs, 0))
    old_copy = store.put(other.state())
    other.train_steps(2, _stream(theirs, 2))
    copy = store.put(other.state())

    catalog = {c.digest: c for c in store.catalog()}
    assert len(catalog) == 5
    assert (catalog[latest].job, catalog[latest].step, catalog[latest].maker, catalog[latest].loss) == \
        (mine.name, mine.steps, me, 1.25)
    assert catalog[latest].samples == trainer.samples and catalog[copy].maker is None
    own, copies, stale = recall(list(catalog.values()), [mine, theirs], me)
    assert own[mine.index].digest == latest and own[mine.index].done and own[mine.index].node == me
    assert copies == {theirs.index: Held(theirs.index, 4, copy, False)}
    assert {c.digest for c in stale} == {older, behind_copy, old_copy}
    # another node restarted on this folder (another id) sees only copies
    assert not recall(list(catalog.values()), [mine, theirs], peer)[0]

    class Swarm:
        my_id = me

    settings = WorkerSettings(batch_size=2, seq_len=16, checkpoint_every=2, lease_s=5.0, replicas=1, interval_s=0.1,
                              barrier_s=1.0, run_seed=0)
    worker = ExpertWorker(Swarm(), [mine, theirs], settings, CheckpointStore(tmp_path), lambda job: [])
    worker.recall()
    assert set(CheckpointStore(tmp_path).digests()) == {latest, copy}
    body = ckpt_body(list(worker.own.values()), worker._have())
    assert [c[:4] for c in body["own"]] == [[mine.index, mine.steps, latest, True]]
    assert sorted(h[2] for h in body["have"]) == sorted([latest, copy])


def test_checkpoints_are_addressed_by_digest_and_forgeries_are_rejected(tmp_path):
    job = _jobs()[0]
    trainer = ExpertTrainer(job, seed=1)
    trainer.train_steps(2, _stream(job, 0))
    store = CheckpointStore(tmp_path, part_bytes=64 << 10)  # several parts
    digest = store.put(trainer.state())
    assert store.digests() == [digest] and store.path(digest).name == f"{digest.hex()}.safetensors"

    async def fetch(tamper: bool, asked: bytes = digest, name: str = job.name):
        async def call(args):
            return store.answer(args["hash"], args["part"], tamper=tamper)
        return await fetch_checkpoint(call, asked, name)

    state = asyncio.run(fetch(False))
    assert set(state) == set(trainer.state()) and store.answer(digest, 0)[0]["parts"] > 1
    with pytest.raises(CheckpointRejected, match="digest"):
        asyncio.run(fetch(True))
    with pytest.raises(CheckpointRejected, match="not"):
        asyncio.run(fetch(False, name="het.other"))

    async def liar(args):  # serves another checkpoint under the asked-for address
        result, tensors = store.answer(digest, args["part"])
        return result, tensors
    other = CheckpointStore(tmp_path / "b")
    trainer.train_steps(1, _stream(job, 2))
    wanted = other.put(trainer.state())
    with pytest.raises(CheckpointRejected):
        asyncio.run(fetch_checkpoint(liar, wanted, job.name))
    # a file changed on disk is caught when read back
    raw = bytearray(store.path(digest).read_bytes())
    raw[-1] ^= 0x01
    store.path(digest).write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="does not hash"):
        CheckpointStore(tmp_path).get(digest)


def test_a_checkpoint_that_does_not_fit_on_the_disk_is_skipped_and_the_job_trains_on(tmp_path):
    from ensemble.worker import ExpertWorker, WorkerSettings

    torch.set_num_threads(1)
    job = _jobs()[0]

    class FullDisk(CheckpointStore):
        def put(self, state, maker=None, loss=math.nan):
            raise OSError(28, "No space left on device")

    class Swarm:
        my_id = _node(9)
        published: list = []

        async def publish(self, name, body, ttl):
            self.published.append(name)

    settings = WorkerSettings(batch_size=2, seq_len=16, checkpoint_every=2, lease_s=5.0, replicas=1, interval_s=0.1,
                              barrier_s=1.0, run_seed=0)
    worker = ExpertWorker(Swarm(), [job], settings, FullDisk(tmp_path), lambda job: [])
    trainer = ExpertTrainer(job, seed=1)
    trainer.train_steps(2, _stream(job, 0))
    asyncio.run(worker._checkpoint(job, trainer))  # no error: logged and skipped
    assert worker.own == {} and not list(tmp_path.iterdir())
    worker.store = CheckpointStore(tmp_path)  # room again: the next round's checkpoint is written
    asyncio.run(worker._checkpoint(job, trainer))
    assert worker.own[job.index].step == 2 and worker.store.has(worker.own[job.index].digest)
