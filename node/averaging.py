"""Weighted averaging of tensors within a group of peers, over hivemind's DecentralizedAverager.

One averager per (group, tensor layout), created on first use and kept: hivemind matches peers
that call ``step`` on the same DHT prefix within a matchmaking window and all-reduces their
tensors, each weighted by its ``weight`` (e.g. the number of microbatches a replica processed).

hivemind applies the average to each peer's tensors as a delta (local + (average - local)), so the
group's results agree to within float rounding, not bit for bit: code that needs bit-identical
replicas must reconcile them itself.
"""
from __future__ import annotations

import asyncio
import ctypes
import hashlib
import logging
import signal
from dataclasses import dataclass
from typing import Mapping

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.dht import DHT

from node.config import Timeouts

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


class AveragingError(RuntimeError):
    """No group formed in time, or the all-reduce failed."""


class _ReapedAverager(DecentralizedAverager):
    """The averager runs in a forked child: make it die with the node, whatever kills the node."""

    def run(self) -> None:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        super().run()


@dataclass(frozen=True)
class AverageResult:
    tensors: dict[str, torch.Tensor]
    group_size: int


def _layout(tensors: Mapping[str, torch.Tensor]) -> tuple:
    return tuple((name, tuple(t.shape), str(t.dtype)) for name, t in sorted(tensors.items()))


def _layout_digest(layout: tuple) -> str:
    """Same on every node (unlike hash(), which Python salts per process)."""
    return hashlib.sha256(repr(layout).encode()).hexdigest()[:12]


class GroupAveraging:
    """All averagers of one node, keyed by group name and tensor layout."""

    def __init__(self, dht: DHT, prefix: str, timeouts: Timeouts, *, client_mode: bool = False):
        self._dht = dht
        self._prefix = prefix
        self._timeouts = timeouts
        self._client_mode = client_mode
        self._averagers: dict[tuple[str, tuple], _ReapedAverager] = {}
        self._lock = asyncio.Lock()

    async def _averager(self, group: str, tensors: Mapping[str, torch.Tensor], group_size: int | None) -> _ReapedAverager:
        key = (group, _layout(tensors))
        averager = self._averagers.get(key)
        if averager is None:
            names = sorted(tensors)
            averager = _ReapedAverager(
                [torch.zeros_like(tensors[name], device="cpu") for name in names],
                self._dht,
                start=False,
                prefix=f"{self._prefix}/{group}/{_layout_digest(key[1])}",
                target_group_size=group_size,
                min_group_size=2,
                min_matchmaking_time=self._timeouts.averaging_matchmaking_s,
                # hivemind warns (rare deadlocks) unless requests time out within the matchmaking window
                request_timeout=min(self._timeouts.dht_request_s, self._timeouts.averaging_matchmaking_s / 2),
                allreduce_timeout=self._timeouts.averaging_s,
                client_mode=self._client_mode,
            )
            # hivemind ignores SIGINT in the parent while it forks and never restores it: put it back,
            # or Ctrl-C would stop working for the node.
            previous = signal.getsignal(signal.SIGINT)
            try:
                averager.run_in_background(await_ready=False)
            finally:
                signal.signal(signal.SIGINT, previous)
            self._averagers[key] = averager
            await asyncio.to_thread(averager.wait_until_ready, self._timeouts.startup_s)
        return averager

    async def average(
        self, group: str, tensors: Mapping[str, torch.Tensor], weight: float, group_size: int | None = None
    ) -> AverageResult:
        """Average with whoever else averages ``group`` now; raises AveragingError if nobody joins in time."""
        if not tensors:
            raise ValueError("nothing to average")
        if not weight > 0:
            raise ValueError(f"averaging weight must be positive, not {weight}")
        names = sorted(tensors)
        async with self._lock:  # one round at a time per node keeps the shared buffers consistent
            averager = await self._averager(group, tensors, group_size)
            with averager.get_tensors() as buffers:
                for name, buffer in zip(names, buffers):
                    buffer.copy_(tensors[name].detach().to("cpu"))
            timeout = self._timeouts.averaging_matchmaking_s + self._timeouts.averaging_s
            gathered = await asyncio.to_thread(averager.step, weight=float(weight), timeout=timeout)
            if not gathered:
                raise AveragingError(f"no averaging group for {group!r} formed within {timeout:.0f} s")
            with averager.get_tensors() as buffers:
                out = {name: buffer.clone() for name, buffer in zip(names, buffers)}
        return AverageResult(out, len(gathered))

    def shutdown(self) -> None:
        for averager in self._averagers.values():
            if averager.is_alive():
                averager.shutdown()
        self._averagers.clear()
