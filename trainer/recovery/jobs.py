"""Lost stages, recovery jobs and who takes them.

The pipeline leader watches the live stages. A stage with no live replica is *lost*: the leader
records an event, and its record ``pp.recovery`` lists the lost stages (the job board; the record
expires unless the leader renews it) with when each was lost. Data nodes plan around a lost stage
(skipping it in every path) until it is back.

Who recovers a lost stage, in this order:
1. a spare node (``--role spare``) or a node joining with ``--role auto`` (which takes the stage
   with the fewest replicas: a lost one). A spare takes a job with a lease: it publishes a claim
   ``pp.claim`` {stage, until}; of the unexpired claims of live nodes on a stage the smallest id
   wins, and the job is open again when the winner dies or its lease runs out first;
2. when nobody has claimed it ``move_after_s`` after it was lost, the leader names a node to move
   from the most replicated stage (at least two replicas; ties: a middle stage before the data
   stage, then the lowest index; the mover is that stage's largest id, so the stage's reducer
   stays). Spares are preferred because they cost no replica; moving one only halves the
   redundancy of a stage that had the most of it.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

RECOVERY_RECORD = "pp.recovery"
CLAIM_RECORD = "pp.claim"
MAX_JOBS = 1024


@dataclass
class StageWatch:
    """The leader's view of lost stages over time."""

    num_stages: int
    lost: dict[int, float] = field(default_factory=dict)  # stage -> when it was first seen lost

    def update(self, stage_of: Mapping[bytes, int], now: float) -> tuple[list[int], list[tuple[int, float]]]:
        """(stages newly lost, [(stage, seconds it was lost)] for stages back) given who serves what."""
        served = set(stage_of.values())
        newly = [s for s in range(self.num_stages) if s not in served and s not in self.lost]
        back = [(s, now - t) for s, t in sorted(self.lost.items()) if s in served]
        for s in newly:
            self.lost[s] = now
        for s, _ in back:
            del self.lost[s]
        return newly, back

    def take_over(self, body: object) -> None:
        """A new leader starts from its predecessor's record: stages lost there count as lost here
        until seen served (so their return is reported once, by someone)."""
        for stage, at in jobs_from_record(body).items():
            if 0 <= stage < self.num_stages:
                self.lost.setdefault(stage, at)

    def adopt(self, body: object) -> None:
        """Take the loss times from a previous leader's record, for stages lost now too."""
        for stage, at in jobs_from_record(body).items():
            if stage in self.lost:
                self.lost[stage] = min(self.lost[stage], at)


def jobs_from_record(body: object) -> dict[int, float]:
    """{stage: lost_at} from a ``pp.recovery`` record; malformed entries are left out."""
    jobs: dict[int, float] = {}
    items = body.get("lost") if isinstance(body, dict) else None
    if not isinstance(items, list):
        return jobs
    for item in items[:MAX_JOBS]:
        if isinstance(item, list) and len(item) == 2 and type(item[0]) is int and item[0] >= 0 \
                and isinstance(item[1], float):
            jobs[item[0]] = item[1]
    return jobs


def moves_from_record(body: object) -> dict[bytes, int]:
    """{node: stage it should move to} from a ``pp.recovery`` record."""
    moves: dict[bytes, int] = {}
    items = body.get("moves") if isinstance(body, dict) else None
    if not isinstance(items, list):
        return moves
    for item in items[:MAX_JOBS]:
        if isinstance(item, list) and len(item) == 2 and isinstance(item[0], bytes) and len(item[0]) == 32 \
                and type(item[1]) is int and item[1] >= 0:
            moves[item[0]] = item[1]
    return moves


def rollback_from_record(body: object) -> tuple[int, int] | None:
    """(epoch, iteration) of the checkpoint baseline's last rollback order in a ``pp.recovery`` record."""
    item = body.get("rollback") if isinstance(body, dict) else None
    if isinstance(item, list) and len(item) == 2 and all(type(x) is int and x >= 0 for x in item):
        return item[0], item[1]
    return None


def claim_winner(claims: Mapping[bytes, object], stage: int, now: float,
                 live: Collection[bytes] | None = None) -> bytes | None:
    """The smallest id with an unexpired claim on ``stage`` (and, given ``live``, still alive: a
    claimant that dies while it restores the stage leaves the job to the next)."""
    holders = [node for node, body in claims.items()
               if (live is None or node in live) and isinstance(body, dict) and body.get("stage") == stage and type(body.get("stage")) is int
               and isinstance(body.get("until"), float) and body["until"] > now]
    return min(holders, default=None)


def choose_mover(stage_of: Mapping[bytes, int], num_stages: int) -> tuple[bytes, int, str] | None:
    """(node, its stage, why) to move into a lost stage, or None when no stage has two replicas."""
    counts = {s: sum(1 for v in stage_of.values() if v == s) for s in range(num_stages)}
    rich = [s for s, n in counts.items() if n >= 2]
    if not rich:
        return None
    stage = max(rich, key=lambda s: (counts[s], s != 0, -s))
    node = max(n for n, s in stage_of.items() if s == stage)
    return node, stage, f"stage {stage} has the most replicas ({counts[stage]}); its largest id moves"
