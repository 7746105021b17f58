"""Per-peer, per-method token buckets for the RPC handlers (limits from node.config.RateLimits)."""
from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from node.config import RateLimits


class RateLimiter:
    """One bucket per (peer, method): ``burst`` calls at once, then ``calls_per_s``.

    At most ``limits.max_tracked`` buckets are kept; the least recently used one is dropped past
    that (a dropped bucket comes back full, which is what an idle one would be anyway).
    """

    def __init__(self, limits: RateLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._buckets: OrderedDict[tuple[bytes, str], tuple[float, float]] = OrderedDict()  # -> (tokens, at)
        self._rates: dict[str, tuple[float, float]] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def _rate(self, method: str) -> tuple[float, float]:
        rate = self._rates.get(method)
        if rate is None:
            rate = self.limits.for_method(method)
            if len(self._rates) < 1024:  # the endpoint only asks for methods it serves
                self._rates[method] = rate
        return rate

    def take(self, peer: bytes, method: str) -> float:
        """0.0 when ``peer`` may call ``method`` now (one call is counted); otherwise the seconds
        until it may, and nothing is counted."""
        per_s, burst = self._rate(method)
        now = self._clock()
        key = (bytes(peer), method)
        tokens, at = self._buckets.pop(key, (burst, now))
        tokens = min(burst, tokens + (now - at) * per_s)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / per_s
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.limits.max_tracked:
            self._buckets.popitem(last=False)
        return wait
