"""Mode zo on the wire: one-byte contributions and the committer's signed, chained commits.

contribution  envelope kind "zo.contrib", body {"step": t, "sample": j, "q": byte}; signed by the
              node whose seed hash(run, t, node, j) made the perturbation.
commit        envelope kind "zo.commit", body {"step": t, "prev": H(commit t-1), "contribs": [...]}:
              the committer's ordered choice of contribution envelopes (verbatim, so nobody can
              forge a peer's scalar), chained to the previous commit by its hash; and, once the
              run has banned nodes (trainer/zo/bans.py), "banned": [node ids, sorted], every node
              banned so far, whose contributions the commit therefore leaves out.

H(commit) is blake2b-256 of the commit's envelope bytes; the chain of step 0 starts from
GENESIS. Records in logs are opened without an age limit: a log is replayed long after signing.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

from protocol import wire
from protocol.envelope import Envelope, Limits, open_envelope, seal
from protocol.errors import MalformedMessage, ProtocolError

CONTRIB_KIND = "zo.contrib"
COMMIT_KIND = "zo.commit"
HASH_BYTES = 32
GENESIS = bytes(HASH_BYTES)
MAX_STEP = (1 << 63) - 1
MAX_SAMPLES = 64  # per node per step (runspec MAX_ZO_PROBES)
MAX_CONTRIBS = 4096  # per commit
MAX_BANNED = 1024  # node ids a commit may list as banned
# Contributions and commits are chained history, bound to their step: their own timestamps are not
# what keeps them fresh, in either direction (the RPC envelope that carries one is time-checked). A
# node whose clock was ahead for a while must still be able to read its own log and commit what it
# accepted then, once its clock is right again.
CONTRIB_LIMITS = Limits(max_bytes=512, max_age_s=math.inf, max_future_s=math.inf)
COMMIT_LIMITS = Limits(max_bytes=MAX_CONTRIBS * 512 + 4096, max_age_s=math.inf, max_future_s=math.inf)


class CommitError(ProtocolError):
    """A commit that does not belong at this point of the log (wrong step, broken chain, wrong signer)."""


@dataclass(frozen=True)
class Contribution:
    sender: bytes
    step: int
    sample: int
    q: int
    raw: bytes  # the signed envelope, carried verbatim inside commits


@dataclass(frozen=True)
class Commit:
    committer: bytes
    step: int
    prev: bytes
    contributions: tuple[Contribution, ...]
    raw: bytes
    banned: tuple[bytes, ...] = ()  # nodes banned as of this commit (none of them contributes to it)

    @property
    def hash(self) -> bytes:
        return commit_hash(self.raw)


def commit_hash(raw: bytes) -> bytes:
    return hashlib.blake2b(raw, digest_size=HASH_BYTES, person=b"swarmtrain/zo-c").digest()


def seal_contribution(key, run_id: bytes, step: int, sample: int, q: int) -> bytes:
    body = {"step": wire.require_int(step, "step", 0, MAX_STEP), "sample": wire.require_int(sample, "sample", 0,
            MAX_SAMPLES - 1), "q": wire.require_int(q, "q", 0, 0xFF)}
    return seal(key, kind=CONTRIB_KIND, run_id=run_id, body=body, seq=step * MAX_SAMPLES + sample,
                limits=CONTRIB_LIMITS)


def open_contribution(raw: bytes, run_id: bytes) -> Contribution:
    """Check signature, run, kind and fields; raises a ProtocolError naming what is wrong."""
    envelope = open_envelope(wire.require_bytes(raw, "contribution"),
                             CONTRIB_KIND, CONTRIB_LIMITS, run_id=run_id)
    body = _exact(envelope, ("step", "sample", "q"))
    step = wire.require_int(body["step"], "step", 0, MAX_STEP)
    sample = wire.require_int(body["sample"], "sample", 0, MAX_SAMPLES - 1)
    q = wire.require_int(body["q"], "q", 0, 0xFF)
    return Contribution(envelope.sender, step, sample, q, raw)


def seal_commit(key, run_id: bytes, step: int, prev: bytes, contributions: list[Contribution],
                banned: tuple[bytes, ...] = ()) -> bytes:
    if len(contributions) > MAX_CONTRIBS:
        raise MalformedMessage(f"a commit holds at most {MAX_CONTRIBS} contributions")
    body = {"step": step, "prev": wire.require_bytes(prev, "prev", length=HASH_BYTES),
            "contribs": [c.raw for c in contributions]}
    if banned:  # left out when empty: the commits of a run without bans are what they always were
        body["banned"] = _banned_list(list(banned))
    return seal(key, kind=COMMIT_KIND, run_id=run_id, body=body, seq=step, limits=COMMIT_LIMITS)


def open_commit(raw: bytes, run_id: bytes, max_samples: int = MAX_SAMPLES) -> Commit:
    """Verify a commit and every contribution inside it (all of the same step, no duplicates,
    ``sample < max_samples``). Chain and signer are the log's business (trainer.zo.log)."""
    envelope = open_envelope(wire.require_bytes(raw, "commit"), COMMIT_KIND,
                             COMMIT_LIMITS, run_id=run_id)
    body = _exact(envelope, ("step", "prev", "contribs", "banned") if "banned" in envelope.body
                  else ("step", "prev", "contribs"))
    step = wire.require_int(body["step"], "step", 0, MAX_STEP)
    prev = wire.require_bytes(body["prev"], "prev", length=HASH_BYTES)
    banned = tuple(_banned_list(body["banned"])) if "banned" in body else ()
    raws = wire.require_type(body["contribs"], list, "contribs")
    if len(raws) > MAX_CONTRIBS:
        raise MalformedMessage(f"a commit holds at most {MAX_CONTRIBS} contributions, got {len(raws)}")
    seen: set[tuple[bytes, int]] = set()
    contributions = []
    for item in raws:
        c = open_contribution(item, run_id)
        if c.step != step:
            raise CommitError(f"commit of step {step} carries a contribution of step {c.step}")
        if c.sample >= max_samples:
            raise CommitError(f"contribution sample {c.sample} is outside the run's {max_samples} probes")
        if (c.sender, c.sample) in seen:
            raise CommitError(f"commit of step {step} carries a duplicate contribution")
        if c.sender in banned:
            raise CommitError(f"commit of step {step} carries a contribution of a node it lists as banned")
        seen.add((c.sender, c.sample))
        contributions.append(c)
    return Commit(envelope.sender, step, prev, tuple(contributions), raw, banned)


def _banned_list(raw: object) -> list[bytes]:
    """Node ids, strictly increasing (so one set has one encoding), at most MAX_BANNED."""
    items = wire.require_type(raw, list, "banned")
    if not 0 < len(items) <= MAX_BANNED:
        raise MalformedMessage(f"banned must list 1..{MAX_BANNED} node ids")
    ids = [wire.require_bytes(item, "banned node", length=32) for item in items]
    if any(a >= b for a, b in zip(ids, ids[1:])):
        raise MalformedMessage("banned node ids must be sorted and distinct")
    return ids


def _exact(envelope: Envelope, names: tuple[str, ...]) -> dict:
    body = envelope.body
    if set(body) != set(names):
        raise MalformedMessage(f"{envelope.kind} body must have exactly the keys {list(names)}")
    return body
