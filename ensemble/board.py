"""The job board: who holds which expert job (leases), where every checkpoint is, what is done.

Two record families, one record per node (its own subkey, signed):

- ``ex.lease`` {job, until, step, sync}: the node trains ``job`` and is at ``step``; ``sync`` is the
  round end at which it waits to average with the job's other holders (-1: it is not waiting). The
  claim is void after ``until`` (and the DHT drops the record soon after), or as soon as the node is
  no longer live.
- ``ex.ckpt`` {own: [[job, step, digest, done, loss, samples], ...], have: [[job, step, digest, done], ...]}:
  the latest checkpoint the node made of each job it trained, and every checkpoint it keeps (its own
  and the copies it keeps for others). A checkpoint names its job and step inside its own tensors,
  so a node that fetches one checks that it is what the record said.

Everything here is pure: the worker reads the records and acts on what these functions decide.
Records come from peers, so every field is checked and anything malformed is left out.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

LEASE_RECORD = "ex.lease"
CKPT_RECORD = "ex.ckpt"
RECORD_NAMES = (LEASE_RECORD, CKPT_RECORD)
MAX_OWN = 64
MAX_HAVE = 256
DIGEST_BYTES = 32


@dataclass(frozen=True)
class Lease:
    job: int
    until: float
    step: int
    sync: int = -1


@dataclass(frozen=True)
class Held:
    job: int
    step: int
    digest: bytes
    done: bool


@dataclass(frozen=True)
class Checkpoint:
    job: int
    step: int
    digest: bytes
    done: bool
    loss: float
    samples: int
    node: bytes  # who made it


def lease_body(job: int, until: float, step: int, sync: int = -1) -> dict:
    return {"job": job, "until": float(until), "step": step, "sync": sync}


def ckpt_body(own: Sequence[Checkpoint], have: Sequence[Held]) -> dict:
    return {"own": [[c.job, c.step, c.digest, c.done, float(c.loss), c.samples] for c in own[:MAX_OWN]],
            "have": [[h.job, h.step, h.digest, h.done] for h in have[:MAX_HAVE]]}


def _int(value: object, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def parse_lease(body: object, num_jobs: int) -> Lease | None:
    if not isinstance(body, dict):
        return None
    job, until, step, sync = body.get("job"), body.get("until"), body.get("step"), body.get("sync", -1)
    if not _int(job, 0, num_jobs - 1) or type(until) is not float or not math.isfinite(until) \
            or not _int(step, 0, 10**12) or not _int(sync, -1, 10**12):
        return None
    return Lease(job, until, step, sync)


def parse_ckpts(node: bytes, body: object, num_jobs: int) -> tuple[list[Checkpoint], list[Held]]:
    """(its own latest checkpoints, the checkpoints it keeps) from a node's ``ex.ckpt`` record."""
    own: list[Checkpoint] = []
    have: list[Held] = []
    if not isinstance(body, dict):
        return own, have
    items, digests = body.get("own"), body.get("have")
    if isinstance(items, list):
        for item in items[:MAX_OWN]:
            if not (isinstance(item, list) and len(item) == 6):
                continue
            job, step, digest, done, loss, samples = item
            if _int(job, 0, num_jobs - 1) and _int(step, 0, 10**12) and isinstance(digest, bytes) \
                    and len(digest) == DIGEST_BYTES and type(done) is bool and type(loss) is float \
                    and _int(samples, 0, 1 << 62):
                own.append(Checkpoint(job, step, digest, done, loss, samples, node))
    if isinstance(digests, list):
        for item in digests[:MAX_HAVE]:
            if isinstance(item, list) and len(item) == 4 and _int(item[0], 0, num_jobs - 1) \
                    and _int(item[1], 0, 10**12) and isinstance(item[2], bytes) and len(item[2]) == DIGEST_BYTES \
                    and type(item[3]) is bool:
                have.append(Held(*item))
    known = {h.digest for h in have}
    have += [Held(c.job, c.step, c.digest, c.done) for c in own if c.digest not in known]  # a node keeps what it made
    return own, have


@dataclass
class JobView:
    holders: list[bytes] = field(default_factory=list)  # live nodes with an unexpired lease, smallest id first
    latest: Checkpoint | None = None  # the most advanced checkpoint anyone made (done ones first)
    available: Held | None = None  # the most advanced one a live node keeps: where a resume starts
    leases: dict[bytes, Lease] = field(default_factory=dict)  # each holder's lease

    @property
    def done(self) -> bool:
        return self.latest is not None and self.latest.done


@dataclass
class Board:
    jobs: list[JobView]
    where: dict[bytes, set[bytes]]  # digest -> live nodes keeping it

    def all_done(self) -> bool:
        return all(view.done for view in self.jobs)


def _better(a: Checkpoint, b: Checkpoint | None) -> bool:
    """Whether ``a`` beats ``b``: done first, then the higher step, then the smaller node id."""
    if b is None:
        return True
    return (a.done, a.step) > (b.done, b.step) or ((a.done, a.step) == (b.done, b.step) and a.node < b.node)


def build_board(num_jobs: int, leases: Mapping[bytes, object], ckpts: Mapping[bytes, object],
                live: Collection[bytes], now: float) -> Board:
    """The board from every node's records; only live nodes hold jobs or serve checkpoints, but the
    checkpoints a dead node made still count as the job's progress."""
    jobs = [JobView() for _ in range(num_jobs)]
    for node, body in leases.items():
        lease = parse_lease(body, num_jobs)
        if lease is not None and node in live and lease.until > now:
            jobs[lease.job].holders.append(node)
            jobs[lease.job].leases[node] = lease
    for view in jobs:
        view.holders.sort()
    where: dict[bytes, set[bytes]] = {}
    for node, body in ckpts.items():
        own, have = parse_ckpts(node, body, num_jobs)
        for c in own:
            if _better(c, jobs[c.job].latest):
                jobs[c.job].latest = c
        if node in live:
            for held in have:
                where.setdefault(held.digest, set()).add(node)
                best = jobs[held.job].available
                if best is None or (held.done, held.step, best.digest) > (best.done, best.step, held.digest):
                    jobs[held.job].available = held
    return Board(jobs, where)


def remaining(view: JobView, steps: int) -> int:
    """Steps the job still needs: from its latest checkpoint, or from where its holders say they are."""
    if view.done:
        return 0
    at = max([view.latest.step if view.latest is not None else 0] + [lease.step for lease in view.leases.values()])
    return max(0, steps - at)


def choose_job(board: Board, me: bytes, job_steps: Sequence[int], job_compute: Sequence[int],
               min_group_steps: int) -> int | None:
    """The job a free node takes: an unclaimed one with the most compute left (so the long jobs start
    first), else a group to join: the running job with the most compute left per holder, if it has
    at least ``min_group_steps`` to go. None: nothing worth doing."""
    def left(i: int) -> int:
        return remaining(board.jobs[i], job_steps[i]) * (job_compute[i] // max(1, job_steps[i]))

    todo = [i for i, view in enumerate(board.jobs) if not view.done and remaining(view, job_steps[i]) > 0]
    open_jobs = [i for i in todo if not [h for h in board.jobs[i].holders if h != me]]
    if open_jobs:
        return max(open_jobs, key=lambda i: (left(i), -i))
    groups = [i for i in todo if remaining(board.jobs[i], job_steps[i]) >= min_group_steps]
    if not groups:
        return None
    return max(groups, key=lambda i: (left(i) / (len([h for h in board.jobs[i].holders if h != me]) + 1), -i))


def should_yield(board: Board, me: bytes, job: int, job_steps: Sequence[int], job_compute: Sequence[int],
                 min_group_steps: int) -> int | None:
    """Nodes that claimed at the same moment may hold the same job: of those, the smallest id stays,
    and another moves to an open job if there is one. Returns the job to move to, or None to stay."""
    rivals = [h for h in board.jobs[job].holders if h != me and h < me]
    if not rivals:
        return None
    others = Board([JobView([h for h in v.holders if h != me], v.latest, v.available, v.leases) for v in board.jobs],
                   board.where)
    better = choose_job(others, me, job_steps, job_compute, min_group_steps)
    if better is None or better == job or others.jobs[better].holders:
        return None
    return better


def round_peers(board: Board, me: bytes, job: int, round_start: int, round_end: int) -> tuple[list[bytes], list[bytes]]:
    """At the end of a round: (holders waiting to average at ``round_end``, holders still inside the
    round). Holders ahead or behind the round are neither: this node does not average with them."""
    ready, behind = [], []
    for node, lease in board.jobs[job].leases.items():
        if node == me:
            continue
        if lease.sync == round_end:
            ready.append(node)
        elif round_start <= lease.step < round_end:
            behind.append(node)
    return sorted(ready), sorted(behind)


def mirrors(digest: bytes, candidates: Collection[bytes], count: int) -> list[bytes]:
    """The ``count`` nodes (of ``candidates``) that keep a copy of ``digest``: rendezvous hashing, so
    every node agrees without talking, and a node leaving moves only its own share."""
    def score(node: bytes) -> bytes:
        return hashlib.blake2b(digest + node, digest_size=16, person=b"swarmtrain/ex-m").digest()

    return sorted(candidates, key=score)[:count]
