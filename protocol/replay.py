"""Freshness: a bounded replay guard over (sender, nonce) with per-sender floors, and strictly increasing sequence numbers."""
from __future__ import annotations

import heapq
import threading
import time
from typing import TYPE_CHECKING

from protocol.errors import Expired, Replayed

if TYPE_CHECKING:
    from protocol.envelope import Envelope


class ReplayGuard:
    """Remembers (sender, nonce) of accepted envelopes for ``window_s`` seconds, with bounded memory.

    Entries age by the envelope's own timestamp: one older than ``now - window_s`` raises Expired,
    so ``window_s >= Limits.max_age_s`` keeps every envelope open_envelope lets through remembered
    as long as it could be replayed.

    Memory is bounded by ``max_entries`` in all and ``max_per_sender`` per sender. To make room the
    guard forgets one entry (the sender's own oldest past ``max_per_sender``, the globally oldest
    when full) and raises a floor for that entry's sender only: that sender's envelopes stamped at or below its floor raise
    Replayed, so a forgotten nonce is never accepted twice. A flood from one key therefore costs
    other senders at most their oldest entries, never their fresh envelopes; a sender without a
    floor is judged only by its own nonces and the window.

    Floors are dropped once they fall out of the window. At most ``max_entries`` are kept; past
    that the lowest is folded into one floor shared by all senders. That keeps replays out at
    bounded memory; it refuses fresh envelopes of others only if more than ``max_entries`` keys
    each lose an entry within about ``Limits.max_future_s`` (floors are envelope timestamps, at most
    that far ahead of the clock).
    """

    def __init__(self, window_s: float = 300.0, max_entries: int = 100_000, max_per_sender: int = 4096) -> None:
        if window_s <= 0 or max_entries < 1 or max_per_sender < 1:
            raise ValueError("window_s must be > 0, max_entries and max_per_sender >= 1")
        self.window_s = float(window_s)
        self.max_entries = int(max_entries)
        self.max_per_sender = int(max_per_sender)
        self._seen: dict[tuple[bytes, bytes], float] = {}  # (sender, nonce) -> timestamp
        # Heaps of (timestamp, ...). Entries forgotten through another heap stay behind and are
        # skipped when they surface (valid only while _seen holds the same timestamp).
        self._by_time: list[tuple[float, bytes, bytes]] = []
        self._by_sender: dict[bytes, list[tuple[float, bytes]]] = {}
        self._floors: dict[bytes, float] = {}
        self._floors_by_value: list[tuple[float, bytes]] = []
        self._shared_floor = float("-inf")
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._seen)

    def floor_of(self, sender: bytes) -> float:
        """``sender``'s envelopes stamped at or below this are refused: a nonce that old may have been forgotten."""
        return max(self._floors.get(sender, float("-inf")), self._shared_floor)

    def entries_of(self, sender: bytes) -> int:
        return len(self._by_sender.get(sender, ()))

    def check_and_remember(self, env: "Envelope", now: float | None = None) -> None:
        now = time.time() if now is None else now
        sender, key = env.sender, (env.sender, env.nonce)
        with self._lock:
            cutoff = now - self.window_s
            self._forget_older_than(cutoff)
            if env.timestamp < cutoff:
                raise Expired(f"message is older than the replay window ({self.window_s:.0f}s)")
            self._check_floor(env)
            if key in self._seen:
                raise Replayed(f"nonce {env.nonce.hex()} from {sender.hex()[:16]} was already seen")
            if self.entries_of(sender) >= self.max_per_sender:
                self._forget_oldest_of(sender)
            while len(self._seen) >= self.max_entries:
                self._forget_globally_oldest()
            self._check_floor(env)  # forgetting just above may have raised this sender's floor past it
            self._seen[key] = env.timestamp
            heapq.heappush(self._by_time, (env.timestamp, sender, env.nonce))
            heapq.heappush(self._by_sender.setdefault(sender, []), (env.timestamp, env.nonce))

    def _check_floor(self, env: "Envelope") -> None:
        floor = self.floor_of(env.sender)
        if env.timestamp <= floor:
            raise Replayed(
                f"message timestamp {env.timestamp:.3f} is at or below its sender's replay floor {floor:.3f} "
                "(the guard forgot that sender's older nonces to stay within its memory bound)"
            )

    def _live(self, stamp: float, sender: bytes, nonce: bytes) -> bool:
        return self._seen.get((sender, nonce)) == stamp

    def _drop(self, stamp: float, sender: bytes, nonce: bytes) -> None:
        """Forget a live entry. It is always its sender's oldest, so it tops that sender's heap."""
        del self._seen[(sender, nonce)]
        own = self._by_sender[sender]
        heapq.heappop(own)
        if not own:
            del self._by_sender[sender]

    def _forget_older_than(self, cutoff: float) -> None:
        while self._by_time and self._by_time[0][0] < cutoff:
            entry = heapq.heappop(self._by_time)
            if self._live(*entry):
                self._drop(*entry)
        while self._floors_by_value and self._floors_by_value[0][0] < cutoff:
            # an envelope at or below such a floor is already refused as Expired
            floor, sender = heapq.heappop(self._floors_by_value)
            if self._floors.get(sender) == floor:
                del self._floors[sender]

    def _forget_globally_oldest(self) -> None:
        while True:
            entry = heapq.heappop(self._by_time)
            if self._live(*entry):
                break
        self._drop(*entry)
        self._raise_floor(entry[1], entry[0])

    def _forget_oldest_of(self, sender: bytes) -> None:
        stamp, nonce = self._by_sender[sender][0]
        self._drop(stamp, sender, nonce)  # its copy in _by_time is skipped when it surfaces
        self._raise_floor(sender, stamp)
        if len(self._by_time) > 2 * len(self._seen) + 1024:
            self._by_time = [(stamp, s, n) for (s, n), stamp in self._seen.items()]
            heapq.heapify(self._by_time)

    def _raise_floor(self, sender: bytes, stamp: float) -> None:
        if stamp <= self._floors.get(sender, float("-inf")):
            return
        self._floors[sender] = stamp
        heapq.heappush(self._floors_by_value, (stamp, sender))
        while len(self._floors) > self.max_entries:
            floor, other = heapq.heappop(self._floors_by_value)
            if self._floors.get(other) == floor:
                del self._floors[other]
                self._shared_floor = max(self._shared_floor, floor)
        if len(self._floors_by_value) > 2 * len(self._floors) + 1024:
            self._floors_by_value = [(floor, s) for s, floor in self._floors.items()]
            heapq.heapify(self._floors_by_value)


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
