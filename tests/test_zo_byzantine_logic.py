"""Mode zo against Byzantine scalars, pure parts: CenteredClip, outliers and bans, the attacks,
commits that record bans. The multi-process test is tests/test_zo_byzantine.py."""
from __future__ import annotations

import random

import pytest
import torch

from kernels import rademacher
from protocol.errors import MalformedMessage
from protocol.keys import generate_private_key, public_key_bytes
from protocol.zo import GENESIS, CommitError, open_commit, open_contribution, seal_commit, seal_contribution
from trainer.zo.aggregate import Aggregation, centered_clip, update_of
from trainer.zo.attacks import Attack, parse_attack
from trainer.zo.bans import BanRule, newly_banned, outlier_counts
from trainer.zo.log import CommitLog
from trainer.zo.quantize import LEVELS, SIGN, Quantizer
from trainer.zo.seeds import probe_seed

RUN = bytes(range(16))
CLIP = Aggregation("clip", clip_factor=3.0)


def honest(n: int, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [rng.gauss(0.0, 1.0) for _ in range(n)]


# ---- CenteredClip --------------------------------------------------------------------------------


def test_centered_clip_is_the_fixed_point_of_the_vector_iteration():
    """The K coefficients solve v = v + (1/K) sum_k (u_k - v) min(1, tau / ||u_k - v||) for real
    Rademacher directions of 16,384 elements (the tiny preset's trained embedding), to within the
    1/sqrt(d) the orthogonality costs."""
    g = honest(13) + [64.0, -64.0, 64.0]
    scalars, weight = CLIP.combine(g)
    coeffs = [s / weight for s in scalars]
    d = 16384
    z = torch.stack([rademacher(probe_seed(RUN, 0, bytes([i]) * 32, 0), 0, d).double() for i in range(len(g))])
    u = torch.tensor(g, dtype=torch.float64)[:, None] * z
    tau = CLIP.radius(g) * d ** 0.5
    v = torch.zeros(d, dtype=torch.float64)
    for _ in range(200):  # the textbook iteration, on the full vectors
        diff = u - v
        w = torch.clamp(tau / diff.norm(dim=1), max=1.0)
        v = v + (w[:, None] * diff).mean(dim=0)
    exact = torch.linalg.solve(z @ z.T, z @ v).tolist()  # v lies in the span of the directions
    for a, b in zip(coeffs, exact):
        assert a == pytest.approx(b, rel=0.02, abs=1e-3)
    # and the attackers were pulled in to about the radius
    assert all(abs(s) < 1.1 * CLIP.radius(g) for s in scalars[13:])


def test_centered_clip_takes_honest_scalars_as_sent_and_bounds_a_minority():
    g = honest(16, seed=1)
    inside = [max(-2.0, min(2.0, x)) for x in g]  # all within 3 x median |g| (about 2 sigma)
    assert centered_clip(inside, CLIP.radius(inside)) == (inside, 16.0)
    q = Quantizer()
    entries = [(bytes([i]) * 32, 0, q.encode(x, 0.5)) for i, x in enumerate(inside)]
    assert update_of(entries, RUN, 3, 0.01, q, CLIP) == update_of(entries, RUN, 3, 0.01, q, Aggregation("mean"))
    # three attackers at g_max: each pulls at most about tau / W instead of 64 / K
    attacked = g[:13] + [64.0, 64.0, -64.0]
    scalars, weight = CLIP.combine(attacked)
    tau = CLIP.radius(attacked)
    assert 13.0 <= weight < 13.5
    assert all(abs(s) / weight < 1.1 * tau / 13 for s in scalars[13:])
    assert all(abs(s) / weight < 0.25 for s in scalars[13:]) and 64.0 / 16 == 4.0


def test_centered_clip_edge_cases():
    assert CLIP.combine([]) == ([], 0)
    assert CLIP.combine([0.0, 0.0, 0.0, 5.0]) == ([0.0] * 4, 4)  # median |g| = 0: no update
    assert CLIP.combine([2.5]) == ([2.5], 1.0)
    g = honest(9, seed=5) + [-64.0]
    assert CLIP.combine(g) == CLIP.combine(list(g))  # deterministic, bit for bit


# ---- outliers and bans ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys():
    return [generate_private_key() for _ in range(6)]


def commit_of(keys, step: int, qs: list[int], banned: tuple[bytes, ...] = (), prev: bytes = GENESIS):
    contribs = sorted((open_contribution(seal_contribution(k, RUN, step, 0, q), RUN) for k, q in zip(keys, qs)),
                      key=lambda c: c.sender)
    return open_commit(seal_commit(keys[0], RUN, step, prev, contribs, banned), RUN)


def test_a_node_repeatedly_beyond_the_radius_is_banned_and_honest_ones_are_not(keys):
    q = Quantizer()
    rng = random.Random(2)
    attacker = public_key_bytes(keys[5])
    rule = BanRule(window=10, after=6)

    def step_bytes(bad: bool) -> list[int]:
        honest_q = [q.encode(rng.gauss(0, 1), rng.random()) for _ in range(5)]
        return honest_q + [LEVELS | (SIGN if rng.random() < 0.5 else 0) if bad else q.encode(rng.gauss(0, 1), 0.5)]

    commits = [commit_of(keys, s, step_bytes(bad=s >= 2)) for s in range(10)]  # the attack starts at step 2
    counts = outlier_counts(commits, CLIP, q)
    assert counts[attacker] == [8, 10]
    assert all(counts[public_key_bytes(k)][0] <= 2 for k in keys[:5])
    assert newly_banned(commits[:7], (), CLIP, q, rule) == {}  # 5 outliers so far: not yet
    bans = newly_banned(commits, (), CLIP, q, rule)
    assert list(bans) == [attacker] and "8 of its 10 scalars" in bans[attacker]
    assert newly_banned(commits, (attacker,), CLIP, q, rule) == {}  # banned once
    assert newly_banned(commits, (), Aggregation("mean"), q, rule) == {}  # mean takes everything as sent
    assert newly_banned(commits, (), CLIP, q, BanRule(10, 0)) == {}  # bans switched off
    assert newly_banned(commits, (), Aggregation("trimmed"), q, rule) == bans  # the same outlier rule
    with pytest.raises(ValueError):
        BanRule(window=0)


def test_commits_record_bans_and_refuse_a_banned_contribution(keys):
    q = Quantizer()
    attacker = public_key_bytes(keys[5])
    commit = commit_of(keys[:5], 4, [q.encode(0.3, 0.5)] * 5, banned=(attacker,))
    assert commit.banned == (attacker,) and len(commit.contributions) == 5
    assert commit_of(keys[:5], 4, [1] * 5).banned == ()  # no key at all when nobody is banned
    with pytest.raises(CommitError, match="banned"):
        commit_of(keys, 4, [1] * 6, banned=(attacker,))
    ids = sorted(public_key_bytes(k) for k in keys[:2])
    with pytest.raises(MalformedMessage, match="sorted"):
        open_commit(seal_commit(keys[0], RUN, 1, GENESIS, [], tuple(reversed(ids))), RUN)
    with pytest.raises(MalformedMessage):
        open_commit(seal_commit(keys[0], RUN, 1, GENESIS, [], (b"short",)), RUN)


def test_the_banned_list_survives_a_snapshot_restart_of_the_log(tmp_path, keys):
    banned = tuple(sorted(public_key_bytes(k) for k in keys[4:]))
    log = CommitLog(RUN, path=tmp_path / "commits.log")
    log.restart_at(40, bytes(32), public_key_bytes(keys[0]), 5, banned)
    assert log.banned == banned
    loaded = CommitLog.load(tmp_path / "commits.log", RUN)
    assert loaded.banned == banned and loaded.start == 40
    log.append(commit_of(keys[:4], 40, [3] * 4, banned=banned, prev=bytes(32)))
    assert log.banned == banned


# ---- attacks -------------------------------------------------------------------------------------


def test_attacks_send_what_they_claim():
    q = Quantizer()
    honest_byte = q.encode(0.8, 0.5)
    flip = parse_attack("sign-flip", q, 0)
    assert q.decode(flip(honest_byte, [])) == -q.decode(honest_byte) and flip(0, []) == 0
    maxed = parse_attack("max-scalar", q, 0)
    assert all(maxed(honest_byte, []) & LEVELS == LEVELS for _ in range(10))  # level 127 is g_max
    others = honest(15, seed=3)
    alie = parse_attack("alie", q, 0)
    assert alie(honest_byte, []) == honest_byte  # nothing to hide among yet
    mean = sum(others) / 15
    std = (sum((x - mean) ** 2 for x in others) / 15) ** 0.5
    for g in (0.8, -0.8):
        sent = q.decode(alie(q.encode(g, 0.5), others))
        assert sent == pytest.approx(mean - (1 if g > 0 else -1) * 1.5 * std, rel=0.1)  # against descent
        assert not CLIP.outliers(others + [sent])[-1]  # and inside the radius: it is never flagged
    assert parse_attack("alie-0.5", q, 0).z == 0.5
    assert parse_attack("alie-x", q, 0) is None and parse_attack("other", q, 0) is None
    with pytest.raises(ValueError):
        Attack("alie", q, z=float("nan"))


def test_node_fault_names():
    from node.zo_node import parse_fault

    assert isinstance(parse_fault("alie-2", 1, Quantizer())["tamper"], Attack)
    assert parse_fault("corrupt-at-5", 1) == {"corrupt_at": 5}
    with pytest.raises(ValueError, match="unknown fault"):
        parse_fault("flip", 1)


def test_the_local_trainer_bans_like_a_committer():
    """train_local (the benchmarks' in-process twin of the swarm) applies the same ban rule."""
    from trainer.data import batches, embedded_domain, split_domain
    from trainer.model import LM, ModelConfig
    from trainer.zo.attacks import LocalAttacks
    from trainer.zo.replica import Replica
    from trainer.zo.spsa import ZOSettings, train_local

    data = split_domain(embedded_domain("arithmetic", max_bytes=200_000), 0.1)
    val = [next(batches(data.val, 4, 16, seed=9))]
    nodes = [bytes([i]) * 32 for i in range(5)]
    settings = ZOSettings(steps=12, batch_size=4, seq_len=16, params=("tok_emb.weight",), aggregation=CLIP)
    q = settings.quantizer
    result = train_local(Replica(LM(ModelConfig.from_preset("tiny"), seed=0), settings.params), settings, RUN, nodes,
                         [batches(data.train, 4, 16, seed=i) for i in range(5)], val, eval_every=12,
                         tamper=LocalAttacks({nodes[3]: Attack("max-scalar", q, seed=1)}, q))
    assert result.banned == {nodes[3]: 6}  # six outliers in steps 0..5
