"""The RPC rate limiter's arithmetic and its configuration (the endpoint's use of it: test_access_control.py)."""
from __future__ import annotations

import pytest

from node.config import ConfigError, RateLimits, load_node_config
from node.ratelimit import RateLimiter

A, B = b"\x01" * 32, b"\x02" * 32


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_allows_its_burst_then_its_rate():
    clock = Clock()
    limiter = RateLimiter(RateLimits(calls_per_s=2.0, burst=3.0), clock)
    assert [limiter.take(A, "m") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take(A, "m") == pytest.approx(0.5)  # refused: the next token comes in half a second
    assert limiter.take(A, "m") == pytest.approx(0.5)  # a refused call costs nothing
    clock.now += 0.5
    assert limiter.take(A, "m") == 0.0
    clock.now += 100.0  # idle: refilled, but never past the burst
    assert [limiter.take(A, "m") for _ in range(4)][-1] > 0


def test_buckets_are_per_peer_and_per_method_with_overrides():
    limiter = RateLimiter(RateLimits(calls_per_s=1.0, burst=1.0, methods=("big=1:5",)), Clock())
    assert limiter.take(A, "m") == 0.0 and limiter.take(A, "m") > 0
    assert limiter.take(B, "m") == 0.0  # another peer
    assert limiter.take(A, "other") == 0.0  # another method
    assert [limiter.take(A, "big") for _ in range(5)] == [0.0] * 5  # its own burst


def test_the_buckets_kept_are_bounded():
    limiter = RateLimiter(RateLimits(max_tracked=10), Clock())
    for i in range(1000):
        limiter.take(i.to_bytes(32, "big"), "m")
    assert len(limiter) == 10


def test_rate_limits_from_the_environment_and_refused_when_malformed():
    config = load_node_config({}, env={"SWARMTRAIN_RATE_LIMITS_CALLS_PER_S": "7",
                                       "SWARMTRAIN_RATE_LIMITS_METHODS": "ping=1:3, pp.state=2:8"})
    assert config.rate_limits.for_method("ping") == (1.0, 3.0)
    assert config.rate_limits.for_method("pp.state") == (2.0, 8.0)
    assert config.rate_limits.for_method("echo") == (7.0, 200.0)
    assert RateLimits().for_method("zo.snapshot") == (0.5, 4.0)  # the default for state-copying handlers
    for env in ({"SWARMTRAIN_RATE_LIMITS_METHODS": "ping=fast"}, {"SWARMTRAIN_RATE_LIMITS_METHODS": "ping=0:3"},
                {"SWARMTRAIN_RATE_LIMITS_CALLS_PER_S": "0"}, {"SWARMTRAIN_RATE_LIMITS_BURST": "0.5"}):
        with pytest.raises(ConfigError, match="rate_limits"):
            load_node_config({}, env=env)
