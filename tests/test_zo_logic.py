"""Mode zo, pure parts: seeds, the one-byte quantizer, aggregation, replicas, the commit log, messages."""
from __future__ import annotations

import math
import random
import statistics
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.envelope import seal
from protocol.errors import BadSignature, MalformedMessage, MessageTooLarge, ProtocolError, WrongKind, WrongRun
from protocol.keys import generate_private_key, public_key_bytes
from protocol.zo import (CONTRIB_KIND, GENESIS, CommitError, open_commit, open_contribution, seal_commit,
                         seal_contribution)
from trainer.data import batches, embedded_domain, split_domain
from trainer.model import LM, ModelConfig
from trainer.zo.aggregate import Aggregation, update_of
from trainer.zo.log import CommitLog, LogFileError
from trainer.zo.quantize import LEVELS, QuantizeError, Quantizer
from trainer.zo.replica import Replica, ReplicaError
from trainer.zo.seeds import probe_seed, rounding_uniform
from trainer.zo.spsa import ZOSettings, projected_gradient, train_local

RUN = bytes(range(16))
OTHER_RUN = bytes(16)


def tiny(seed: int = 0) -> LM:
    torch.manual_seed(seed)
    return LM(ModelConfig.from_preset("tiny"), seed=seed)


# ---- seeds -------------------------------------------------------------------------------------


def test_seeds_distinct_where_string_concatenation_collides():
    node = bytes(32)
    # "1" + "23" == "12" + "3": fixed-width fields cannot be confused that way
    assert probe_seed(RUN, 1, node, 23) != probe_seed(RUN, 12, node, 3)
    assert probe_seed(RUN, 0, node, 1) != probe_seed(RUN, 1, node, 0)
    seeds = {probe_seed(RUN, t, bytes([n]) * 32, j) for t in range(50) for n in range(8) for j in range(4)}
    assert len(seeds) == 50 * 8 * 4
    assert probe_seed(RUN, 5, node, 0) == probe_seed(RUN, 5, node, 0)
    assert probe_seed(RUN, 5, node, 0) != probe_seed(OTHER_RUN, 5, node, 0)
    with pytest.raises(ValueError):
        probe_seed(RUN[:15], 0, node, 0)
    with pytest.raises(ValueError):
        probe_seed(RUN, -1, node, 0)


def test_rounding_uniform_in_unit_interval_and_seeded():
    values = [rounding_uniform(s) for s in range(2000)]
    assert all(0.0 <= u < 1.0 for u in values)
    assert values == [rounding_uniform(s) for s in range(2000)]
    assert abs(statistics.mean(values) - 0.5) < 0.03


# ---- quantizer ---------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", ["log", "linear"])
def test_quantizer_byte_layout_and_extremes(scale):
    q = Quantizer(scale, g_max=64.0, g_min=1e-3)
    assert q.decode(0) == 0.0
    assert q.decode(LEVELS) == pytest.approx(64.0)
    assert q.decode(0x80 | LEVELS) == pytest.approx(-64.0)
    assert q.encode(1e9, 0.5) == LEVELS  # clipped: one byte bounds a peer's pull
    assert q.encode(-1e9, 0.5) == 0x80 | LEVELS
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(QuantizeError):
            q.encode(bad, 0.5)
    for bad in (-1, 256, 1.5, "7", None):
        with pytest.raises(QuantizeError):
            q.decode(bad)


@settings(max_examples=300)
@given(g=st.floats(-64.0, 64.0, allow_nan=False), u=st.floats(0.0, 1.0, exclude_max=True),
       scale=st.sampled_from(["log", "linear"]))
def test_quantizer_error_bounds(g, u, scale):
    q = Quantizer(scale, g_max=64.0, g_min=1e-3)
    byte = q.encode(g, u)
    assert 0 <= byte <= 255
    d = q.decode(byte)
    assert d == 0.0 or math.copysign(1.0, d) == math.copysign(1.0, g)
    if scale == "linear":
        assert abs(d - g) <= 64.0 / LEVELS * (1 + 1e-9)
    elif abs(g) >= 1e-3:
        assert abs(d - g) <= (q.ratio - 1) * abs(g) * (1 + 1e-9)
    else:
        assert abs(d - g) <= 1e-3 * (1 + 1e-9)


@pytest.mark.parametrize("g", [0.0004, 0.37, -2.5, 50.0])
def test_quantizer_unbiased(g):
    q = Quantizer("log", 64.0, 1e-3)
    rng = random.Random(1)
    mean = statistics.fmean(q.decode(q.encode(g, rng.random())) for _ in range(40000))
    assert mean == pytest.approx(g, rel=0.01)


# ---- aggregation -------------------------------------------------------------------------------


def test_trimmed_drops_the_extremes_and_clip_bounds_them():
    g = [0.5, -0.2, 64.0, 0.1]
    scalars, kept = Aggregation("trimmed", 0.25).combine(g)
    assert kept == 2 and scalars == [0.5, 0.0, 0.0, 0.1]  # the smallest (-0.2) and largest (64) dropped
    clipped, weight = Aggregation("clip", clip_factor=3.0).combine(g)
    tau = 3.0 * statistics.median(abs(x) for x in g)  # 1.05
    # CenteredClip: the three small scalars count fully; 64 is pulled in to the radius (around the
    # centre, not 0) and counts for about tau / 64 of a contribution (more in test_zo_byzantine_logic.py)
    assert [clipped[i] for i in (0, 1, 3)] == [0.5, -0.2, 0.1] and 0.9 * tau < clipped[2] < 1.1 * tau
    assert 3.0 < weight < 3.0 + tau / 64 + 0.01


def test_update_is_deterministic_and_scaled():
    q = Quantizer()
    entries = [(bytes([1]) * 32, 0, 0x10), (bytes([2]) * 32, 0, 0x90), (bytes([3]) * 32, 1, 0)]
    seeds, coeffs = update_of(entries, RUN, 7, 0.01, q, Aggregation())
    assert len(seeds) == 2  # the zero scalar is skipped
    assert seeds == [probe_seed(RUN, 7, bytes([1]) * 32, 0), probe_seed(RUN, 7, bytes([2]) * 32, 0)]
    assert coeffs[0] == -0.01 * q.decode(0x10) / 3 and coeffs[1] == -coeffs[0]
    assert (seeds, coeffs) == update_of(entries, RUN, 7, 0.01, q, Aggregation())


# ---- replica -----------------------------------------------------------------------------------


def test_perturb_never_touches_committed_weights():
    replica = Replica(tiny(), ["tok_emb.weight", "blocks.0.*"])
    before = replica.weights_hash()
    master = replica.master.clone()
    emb = next(s for s in replica.trained if s.name == "tok_emb.weight")
    committed_emb = master[emb.start : emb.start + emb.numel]
    replica.perturb(123, 1e-3)
    assert not torch.equal(replica.params["tok_emb.weight"].view(-1), committed_emb)
    replica.perturb(123, -1e-3)
    replica.restore()
    assert torch.equal(replica.master, master) and replica.weights_hash() == before
    assert torch.equal(replica.params["tok_emb.weight"].view(-1), committed_emb)


def test_two_replicas_stay_bit_identical_while_perturb_restore_does_not():
    a, b = Replica(tiny()), Replica(tiny())
    assert a.weights_hash() == b.weights_hash()
    rng = random.Random(0)
    for step in range(5):
        seeds = [rng.getrandbits(64) for _ in range(4)]
        coeffs = [rng.uniform(-1e-3, 1e-3) for _ in range(4)]
        a.perturb(seeds[0], 1e-3)  # a probes in between; b does not
        a.restore()
        a.apply(seeds, coeffs)
        b.apply(seeds, coeffs)
        assert a.weights_hash() == b.weights_hash()
    # in-place perturb and restore (what the published code does) drifts
    w = a.master.clone()
    from kernels import apply_update

    drifted = w.clone()
    apply_update(drifted, 0, [], [], 99, 1e-3)
    apply_update(drifted, 0, [], [], 99, -2e-3)
    apply_update(drifted, 0, [], [], 99, 1e-3)
    assert not torch.equal(drifted, w)


def test_replica_refuses_weights_that_do_not_fit():
    replica = Replica(tiny())
    state = replica.state()
    before = replica.weights_hash()
    with pytest.raises(ReplicaError):
        replica.load_state({k: v for k, v in state.items() if k != "norm.weight"})
    with pytest.raises(ReplicaError):
        replica.load_state({**state, "norm.weight": torch.zeros(3)})
    with pytest.raises(ReplicaError):
        replica.load_state({**state, "norm.weight": state["norm.weight"].double()})
    assert replica.weights_hash() == before
    with pytest.raises(ReplicaError):
        Replica(tiny(), ["no.such.*"])
    with pytest.raises(ReplicaError):
        Replica(tiny().to(torch.bfloat16))


def test_projected_gradient_is_a_directional_derivative():
    model = tiny()
    replica = Replica(model, ["norm.weight"])
    dom = split_domain(embedded_domain("arithmetic", max_bytes=200_000), 0.1)
    batch = next(batches(dom.train, 4, 64, seed=0))
    seed = 77
    g = projected_gradient(replica, batch, seed, 1e-3)
    params = dict(model.named_parameters())
    p = params["norm.weight"]
    p.requires_grad_(True)
    _, loss = model(*batch)
    loss.backward()
    from kernels import rademacher

    z = rademacher(seed, replica.trained[0].offset, p.numel())
    assert g == pytest.approx(float((p.grad.view(-1) * z).sum()), rel=0.05, abs=1e-3)


def test_local_spsa_lowers_the_loss_and_robust_aggregation_resists_a_malicious_node():
    data = split_domain(embedded_domain("arithmetic", max_bytes=400_000), 0.1)
    val = [next(batches(data.val, 8, 32, seed=9)) for _ in range(2)]
    nodes = [bytes([i]) * 32 for i in range(4)]
    cfg = ZOSettings(steps=40, lr=3e-3, batch_size=4, seq_len=32, params=("tok_emb.weight",),
                     aggregation=Aggregation("clip"))

    def run(tamper, aggregation):
        replica = Replica(tiny(), cfg.params)
        streams = [batches(data.train, 4, 32, seed=i) for i in range(4)]
        import dataclasses

        return train_local(replica, dataclasses.replace(cfg, aggregation=aggregation), RUN, nodes, streams, val,
                           eval_every=40, tamper=tamper)

    honest = run(None, Aggregation("mean"))
    assert honest.losses[-1][2] < honest.losses[0][2] - 0.15
    rng = random.Random(0)

    def attacker(step, node, q):  # node 0 always sends the largest magnitude, random sign
        return (0x80 if rng.random() < 0.5 else 0) | LEVELS if node == nodes[0] else q

    robust = run(attacker, Aggregation("clip"))
    assert robust.losses[-1][2] < robust.losses[0][2] - 0.1
    same = run(None, Aggregation("mean"))
    assert same.weights_hash == honest.weights_hash  # seeded end to end


# ---- messages and the commit log ---------------------------------------------------------------


@pytest.fixture(scope="module")
def keys():
    return [generate_private_key() for _ in range(3)]


def test_contribution_checks(keys):
    raw = seal_contribution(keys[0], RUN, 5, 0, 0x83)
    c = open_contribution(raw, RUN)
    assert (c.sender, c.step, c.sample, c.q) == (public_key_bytes(keys[0]), 5, 0, 0x83)
    with pytest.raises(WrongRun):
        open_contribution(raw, OTHER_RUN)
    tampered = bytearray(raw)
    tampered[-70] ^= 1
    with pytest.raises((BadSignature, MalformedMessage)):
        open_contribution(bytes(tampered), RUN)
    for body in ({"step": 1, "sample": 0, "q": 256}, {"step": 1, "sample": 0, "q": -1},
                 {"step": 1, "sample": 0, "q": float("nan")}, {"step": 1, "sample": 0, "q": 1.0},
                 {"step": -1, "sample": 0, "q": 1}, {"step": 1, "sample": 0}, {"step": 1, "sample": 99, "q": 1},
                 {"step": 1, "sample": 0, "q": 1, "extra": 1}):
        bad = seal(keys[0], kind=CONTRIB_KIND, run_id=RUN, body=body, seq=1)
        with pytest.raises(ProtocolError):
            open_contribution(bad, RUN)
    with pytest.raises(WrongKind):
        open_contribution(seal(keys[0], kind="zo.commit", run_id=RUN, body={"step": 1, "sample": 0, "q": 1}, seq=1), RUN)
    with pytest.raises(MessageTooLarge):
        open_contribution(seal(keys[0], kind=CONTRIB_KIND, run_id=RUN, body={"step": 1, "sample": 0, "q": 1,
                                                                                "pad": b"x" * 1000}, seq=1), RUN)


def test_commit_checks(keys):
    contribs = [open_contribution(seal_contribution(k, RUN, 3, 0, 7), RUN) for k in keys]
    commit = open_commit(seal_commit(keys[0], RUN, 3, GENESIS, contribs), RUN)
    assert commit.committer == public_key_bytes(keys[0]) and len(commit.contributions) == 3
    with pytest.raises(CommitError, match="duplicate"):
        open_commit(seal_commit(keys[0], RUN, 3, GENESIS, contribs + contribs[:1]), RUN)
    wrong_step = [open_contribution(seal_contribution(keys[1], RUN, 4, 0, 7), RUN)]
    with pytest.raises(CommitError, match="step"):
        open_commit(seal_commit(keys[0], RUN, 3, GENESIS, wrong_step), RUN)
    with pytest.raises(CommitError, match="sample"):
        open_commit(seal_commit(keys[0], RUN, 3, GENESIS,
                                [open_contribution(seal_contribution(keys[1], RUN, 3, 2, 7), RUN)]), RUN, max_samples=1)


def test_commit_log_chain_fork_and_file(tmp_path, keys):
    path = tmp_path / "commits.log"
    log = CommitLog(RUN, path=path)
    raws = []
    for step in range(4):
        contribs = [open_contribution(seal_contribution(keys[1], RUN, step, 0, step), RUN)]
        raw = seal_commit(keys[0], RUN, step, log.head_hash, contribs)
        log.append(log.open(raw))
        raws.append(raw)
    assert log.head_step == 4 and log.since(1, 2) == raws[1:3] and log.since(9, 5) == []
    fork = log.open(seal_commit(keys[2], RUN, 4, GENESIS, []))
    with pytest.raises(CommitError, match="fork"):
        log.append(fork)
    with pytest.raises(CommitError, match="step"):
        log.append(log.open(seal_commit(keys[0], RUN, 6, log.head_hash, [])))
    with open(path, "ab") as f:
        f.write(b"\x40\x00\x00\x00torn")  # a crash in the middle of a record
    again = CommitLog.load(path, RUN)
    assert again.head_step == 4 and again.head_hash == log.head_hash
    with pytest.raises(LogFileError, match="another run"):
        CommitLog.load(path, OTHER_RUN)
    (tmp_path / "junk").write_bytes(b"not a log")
    with pytest.raises(LogFileError):
        CommitLog.load(tmp_path / "junk", RUN)
    # a log that starts at a snapshot remembers who committed before it and how many contributed
    log.restart_at(10, b"\x01" * 32, public_key_bytes(keys[0]), 5)
    again = CommitLog.load(path, RUN)
    assert (again.head_step, again.base_committer, again.base_contributors) == (10, public_key_bytes(keys[0]), 5)


def test_commits_and_contributions_stamped_by_a_clock_that_was_ahead_still_open():
    # A node whose clock ran a minute fast sealed these; once its clock is right again it must still
    # read its own log and commit what it accepted then (the RPC envelope around them is time-checked).
    key = generate_private_key()
    ahead = time.time() + 600.0
    raw = seal(key, kind=CONTRIB_KIND, run_id=RUN, body={"step": 3, "sample": 0, "q": 7}, seq=3 * 64,
               timestamp=ahead)
    contribution = open_contribution(raw, RUN)
    assert (contribution.step, contribution.q) == (3, 7)
    commit = open_commit(seal_commit(key, RUN, 3, GENESIS, [contribution]), RUN)
    assert [c.raw for c in commit.contributions] == [raw]
