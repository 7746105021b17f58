"""Bans in mode zo: a node whose scalars are outliers again and again is left out of later commits.

The committer decides before sealing commit t, from the last ``window`` commits of its log (the
same on every node): a node with at least ``after`` outlier scalars (trainer/zo/aggregate.py:
beyond the clip radius of their commit) among its contributions there is banned. Commit t then
lists every node banned so far and carries none of their contributions; a later committer
continues from that list, and a committer that bans itself hands over (banned nodes are never
committers). Replicas apply exactly what a commit carries, so they stay bit-identical whatever
the ban decisions were; the list in each commit is the record of what was excluded and why it
is the same everywhere.

Only a robust aggregation bans (``mean`` takes every scalar as sent). Bans are for the run's
lifetime. An honest node's scalar is an outlier about 4 % of the time (|N(0,1)| > 2 with the
default clip_factor 3), so 6 of 10 happens to an honest node with odds near 1e-6 per window.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from protocol.zo import Commit
from trainer.zo.aggregate import Aggregation
from trainer.zo.quantize import Quantizer


@dataclass(frozen=True)
class BanRule:
    window: int = 10  # commits looked back on
    after: int = 6  # outlier scalars among a node's contributions in the window that ban it; 0 = never

    def __post_init__(self) -> None:
        if self.window < 1 or self.after < 0:
            raise ValueError(f"ban rule needs window >= 1 and after >= 0, got {self.window}, {self.after}")


def outlier_counts(commits: Sequence[Commit], aggregation: Aggregation,
                   quantizer: Quantizer) -> dict[bytes, list[int]]:
    """node -> [outlier scalars, scalars] over ``commits``."""
    counts: dict[bytes, list[int]] = {}
    for commit in commits:
        g = [quantizer.decode(c.q) for c in commit.contributions]
        for c, out in zip(commit.contributions, aggregation.outliers(g)):
            entry = counts.setdefault(c.sender, [0, 0])
            entry[0] += int(out)
            entry[1] += 1
    return counts


def newly_banned(commits: Sequence[Commit], banned: Sequence[bytes], aggregation: Aggregation,
                 quantizer: Quantizer, rule: BanRule) -> dict[bytes, str]:
    """Nodes the window of ``commits`` (the last ``rule.window`` before the step) bans now, with
    the reason; nodes in ``banned`` already are not repeated. Sorted by id."""
    if not aggregation.robust or rule.after == 0:
        return {}
    known = set(banned)
    out = {}
    for node, (outliers, total) in sorted(outlier_counts(commits[-rule.window:], aggregation, quantizer).items()):
        if node not in known and outliers >= rule.after:
            out[node] = (f"{outliers} of its {total} scalars in the last {min(len(commits), rule.window)} commits "
                         f"were outliers (beyond {aggregation.clip_factor:g} x the median |scalar|)")
    return out
