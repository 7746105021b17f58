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
import hashlib
import logging
import signal
import time
from dataclasses import dataclass
from typing import Mapping

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind.averaging import DecentralizedAverager
from hivemind.dht import DHT

from node.config import Timeouts
from node.dht import die_with_parent
from protocol.access import AccessPolicy
from protocol.envelope import Limits, Sequencer, open_envelope, seal
from protocol.errors import MalformedMessage, ProtocolError, WrongKey

logger = logging.getLogger(__name__)

JOIN_KIND = "avg.join"


class AveragingError(RuntimeError):
    """No group formed in time, or the all-reduce failed."""


class _ReapedAverager(DecentralizedAverager):
    """The averager runs in a forked child: make it die with the node, whatever kills the node."""

    def run(self) -> None:
        die_with_parent(signal.SIGKILL)
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


@dataclass(frozen=True)
class Credentials:
    """What a node shows its averaging group: hivemind's averager itself checks nobody."""

    key: Ed25519PrivateKey
    run_id: bytes
    access: AccessPolicy
    token: bytes | None
    peer_id: str


class GroupAveraging:
    """All averagers of one node, keyed by group name, group size and tensor layout.

    Each member passes a signed "avg.join" envelope through hivemind's all-gather; a round whose
    group holds a peer that is not allowed in the run (bad signature, no token in a private run,
    an envelope borrowed from another peer, another layout) is discarded.
    """

    def __init__(self, dht: DHT, prefix: str, timeouts: Timeouts, credentials: Credentials, *, client_mode: bool = False):
        self._dht = dht
        self._prefix = prefix
        self._timeouts = timeouts
        self._credentials = credentials
        self._seq = Sequencer()
        self._client_mode = client_mode
        self._averagers: dict[tuple, _ReapedAverager] = {}
        self._lock = asyncio.Lock()

    async def _averager(self, group: str, tensors: Mapping[str, torch.Tensor], group_size: int | None) -> _ReapedAverager:
        key = (group, group_size, _layout(tensors))
        averager = self._averagers.get(key)
        if averager is None:
            names = sorted(tensors)
            averager = _ReapedAverager(
                [torch.zeros_like(tensors[name], device="cpu") for name in names],
                self._dht,
                start=False,
                prefix=f"{self._prefix}/{group}/{_layout_digest(key[2])}",
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
            try:
                await asyncio.to_thread(averager.wait_until_ready, self._timeouts.startup_s)
            except TimeoutError:
                averager.shutdown()
                raise AveragingError(f"the averager for {group!r} did not start in {self._timeouts.startup_s:.0f} s")
            self._averagers[key] = averager
        return averager

    def _join_envelope(self, layout: str, weight: float) -> bytes:
        c = self._credentials
        body = {"peer_id": c.peer_id, "layout": layout, "weight": float(weight), "token": c.token}
        return seal(c.key, kind=JOIN_KIND, run_id=c.run_id, body=body, seq=self._seq.next())

    def _check_group(self, gathered: Mapping, layout: str) -> None:
        """Raise AveragingError unless every member of the round proved it belongs to the run."""
        c = self._credentials
        now = time.time()
        for peer_id, data in gathered.items():
            try:
                if not isinstance(data, bytes):
                    raise MalformedMessage("no signed join envelope")
                envelope = open_envelope(data, JOIN_KIND, Limits(max_bytes=4096), run_id=c.run_id, now=now)
                body = envelope.body
                if body.get("peer_id") != str(peer_id):
                    raise WrongKey("the join envelope belongs to another peer")
                if body.get("layout") != layout:
                    raise MalformedMessage("the peer averaged another tensor layout")
                c.access.check(envelope.sender, body.get("token"), now)
            except ProtocolError as error:
                raise AveragingError(f"round discarded: peer {peer_id} is not allowed: {type(error).__name__}: {error}")

    async def average(
        self, group: str, tensors: Mapping[str, torch.Tensor], weight: float, group_size: int | None = None
    ) -> AverageResult:
        """Average with whoever else averages ``group`` now; raises AveragingError if nobody joins in time."""
        if not tensors:
            raise ValueError("nothing to average")
        if not weight > 0:
            raise ValueError(f"averaging weight must be positive, not {weight}")
        names = sorted(tensors)
        layout = _layout_digest(_layout(tensors))
        async with self._lock:  # one round at a time per node keeps the shared buffers consistent
            averager = await self._averager(group, tensors, group_size)
            with averager.get_tensors() as buffers:
                for name, buffer in zip(names, buffers):
                    buffer.copy_(tensors[name].detach().to("cpu"))
            timeout = self._timeouts.averaging_matchmaking_s + self._timeouts.averaging_s
            try:
                gathered = await asyncio.to_thread(
                    averager.step, gather=self._join_envelope(layout, weight), weight=float(weight), timeout=timeout
                )
            except Exception as error:  # noqa: BLE001
                # hivemind raises bare AllreduceException, TimeoutError, MatchmakingException, ... when a
                # round fails (a peer died or left mid-round, no group formed): a failed round, never a
                # reason for the node to stop
                raise AveragingError(f"averaging {group!r} failed: {type(error).__name__}: {error}") from None
            if not gathered:
                raise AveragingError(f"no averaging group for {group!r} formed within {timeout:.0f} s")
            self._check_group(gathered, layout)
            with averager.get_tensors() as buffers:
                out = {name: buffer.clone() for name, buffer in zip(names, buffers)}
        return AverageResult(out, len(gathered))

    def shutdown(self) -> None:
        for averager in self._averagers.values():
            if averager.is_alive():
                averager.shutdown()
        self._averagers.clear()
