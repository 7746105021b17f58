"""Freshness: a bounded replay guard over (sender, nonce), and strictly increasing sequence numbers."""
from __future__ import annotations

import heapq
import threading
import time
from typing import TYPE_CHECKING

from protocol.errors import Expired, Replayed

if TYPE_CHECKING:
    from protocol.envelope import Envelope


class ReplayGuard:
    """Remembers (sender, nonce) of accepted envelopes for ``window_s`` seconds, in at most ``max_entries``.

    Entries are ordered by the envelope's own timestamp. An envelope older than ``now - window_s``
    raises Expired: the guard no longer remembers that far back, so it cannot vouch for it. Because
    entries age by envelope timestamp, ``window_s >= Limits.max_age_s`` is enough for every
    envelope that passes open_envelope's time check to be remembered as long as it could be replayed. When full, the guard forgets the oldest entry and raises a floor to its
    timestamp: from then on envelopes timestamped at or below the floor raise Replayed, so a
    forgotten nonce can never be accepted twice. The cost is that, under a flood, honest but late
    envelopes may be refused too.
    """

    def __init__(self, window_s: float = 300.0, max_entries: int = 100_000) -> None:
        if window_s <= 0 or max_entries < 1:
            raise ValueError("window_s must be > 0 and max_entries >= 1")
        self.window_s = float(window_s)
        self.max_entries = int(max_entries)
        self._seen: set[tuple[bytes, bytes]] = set()
        self._by_time: list[tuple[float, bytes, bytes]] = []
        self._floor = float("-inf")
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._seen)

    @property
    def floor(self) -> float:
        """Timestamps at or below this are refused because a nonce that old may have been forgotten."""
        return self._floor

    def check_and_remember(self, env: "Envelope", now: float | None = None) -> None:
        now = time.time() if now is None else now
        key = (env.sender, env.nonce)
        with self._lock:
            self._evict_older_than(now - self.window_s)
            if env.timestamp < now - self.window_s:
                raise Expired(f"message is older than the replay window ({self.window_s:.0f}s)")
            if env.timestamp <= self._floor:
                raise Replayed(
                    f"message timestamp {env.timestamp:.3f} is at or below the replay floor {self._floor:.3f} "
                    "(the guard was full and forgot older nonces)"
                )
            if key in self._seen:
                raise Replayed(f"nonce {env.nonce.hex()} from {env.sender.hex()[:16]} was already seen")
            while len(self._seen) >= self.max_entries:
                stamp, sender, nonce = heapq.heappop(self._by_time)
                self._seen.discard((sender, nonce))
                self._floor = max(self._floor, stamp)
            if env.timestamp <= self._floor:  # the eviction just above may have raised the floor past it
                raise Replayed(f"message timestamp {env.timestamp:.3f} is at or below the replay floor")
            self._seen.add(key)
            heapq.heappush(self._by_time, (env.timestamp, env.sender, env.nonce))

    def _evict_older_than(self, cutoff: float) -> None:
        while self._by_time and self._by_time[0][0] < cutoff:
            _, sender, nonce = heapq.heappop(self._by_time)
            self._seen.discard((sender, nonce))


class Sequencer:
    """Strictly increasing sequence numbers starting at the current time in microseconds.

    Starting from the clock means a restarted node continues above any number it used before
    (as long as it sent fewer than a million messages per second on average).
    """

    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()

    def next(self) -> int:
        with self._lock:
            self._last = max(self._last + 1, time.time_ns() // 1000)
            return self._last
