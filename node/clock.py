"""Is this node's clock off? Judged from the signed timestamps of the records other nodes publish.

Peers heartbeat every few seconds, so the newest record of a live peer is at most a few seconds
old. When the newest records of several live peers (peers whose records keep coming: a newer one
was read within the last minute, so they are not simply dead) agree with each other but all sit
more than the heartbeat TTL before (or after) this node's clock, the odd one out is this node's
clock: peers then judge it dead (it is behind) or it judges them dead (it is ahead), and beyond the
envelope window (``Limits.max_future_s`` ahead, ``max_age_s`` behind) they refuse its messages.
The node says so in its log instead of failing silently, once the skew has lasted ``persist_s``: a
slow DHT can make every record look old for a few seconds, a wrong clock stays. Pure logic;
node/dht.py feeds it every record it reads.
"""
from __future__ import annotations

from dataclasses import dataclass, field

RECENT_S = 60.0  # only what was read in the last minute counts
MIN_PEERS = 2  # one peer alone may be the one whose clock is off, or simply dead
REPEAT_S = 60.0  # the same warning at most once a minute


@dataclass
class ClockWatch:
    tolerance_s: float  # skews up to this (the heartbeat TTL) are harmless
    max_future_s: float
    max_age_s: float
    persist_s: float | None = None  # how long a skew must last to be reported (default 2 x tolerance_s)
    # peer -> (its newest timestamp, that minus our clock when we read it, when a newer one last came)
    _newest: dict[bytes, tuple[float, float, float]] = field(default_factory=dict)
    _warned_at: float = float("-inf")
    _warned_skew: float = 0.0
    _over_since: float | None = None

    def observe(self, peer: bytes, timestamp: float, now: float) -> None:
        """A record of ``peer`` signed at ``timestamp`` was read at ``now`` (this node's clock)."""
        old = self._newest.get(peer)
        if old is None:
            self._newest[peer] = (timestamp, timestamp - now, float("-inf"))  # not yet seen to advance
        elif timestamp > old[0]:
            self._newest[peer] = (timestamp, timestamp - now, now)

    def skew_s(self, now: float) -> float | None:
        """How far this node's clock seems ahead (> 0) or behind (< 0) of its peers', when at least
        MIN_PEERS peers agree on it (their newest records within ``tolerance_s`` of each other)."""
        recent = sorted(offset for _, offset, at in self._newest.values() if now - at <= RECENT_S)
        if len(recent) < MIN_PEERS:
            return None
        # the largest group of peers whose newest records agree: the swarm's clock
        best: list[float] = []
        for i in range(len(recent)):
            group = [o for o in recent[i:] if o - recent[i] <= self.tolerance_s]
            if len(group) > len(best):
                best = group
        if len(best) < MIN_PEERS:
            return None
        return -max(best)  # the freshest agreeing record was signed about now by a correct clock

    def warning(self, now: float) -> str | None:
        """A line for the log when the skew matters (at most once a minute), else None."""
        skew = self.skew_s(now)
        if skew is None or abs(skew) <= self.tolerance_s:
            self._over_since = None
            return None
        if self._over_since is None:
            self._over_since = now
        persist = 2 * self.tolerance_s if self.persist_s is None else self.persist_s
        if now - self._over_since < persist:
            return None
        if now - self._warned_at < REPEAT_S and abs(skew - self._warned_skew) < self.tolerance_s:
            return None
        self._warned_at, self._warned_skew = now, skew
        peers = sum(1 for _, _, at in self._newest.values() if now - at <= RECENT_S)
        if skew > 0:
            effect = (f"peers refuse its messages (more than {self.max_future_s:.0f} s in their future)"
                      if skew > self.max_future_s else "it judges live peers dead")
            return (f"clock check: this node's clock seems {skew:.0f} s ahead of the swarm's (the newest records of "
                    f"{peers} peers are that old; or they all stopped); {effect}. Set the clock right (NTP).")
        effect = (f"peers refuse its messages (more than {self.max_age_s:.0f} s in their past)" if -skew > self.max_age_s
                  else "peers judge it dead (its heartbeats look old)")
        return (f"clock check: this node's clock seems {-skew:.0f} s behind the swarm's (the newest records of "
                f"{peers} peers are stamped that far in its future); {effect}. Set the clock right (NTP).")
