"""The small interface through which trainer/ and ensemble/ talk to the swarm.

They never import hivemind: ``node.swarm_adapter.HivemindSwarm`` implements this over the DHT and
P2P, and tests may implement it in-process for pure-logic unit tests.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Awaitable, Callable, Mapping, Protocol

import torch


@dataclass(frozen=True)
class Peer:
    id: bytes  # the peer's Ed25519 public key: its identity in the run
    role: str
    stage: int | None
    expert: str | None
    state: str  # JOINING, ONLINE, LEAVING or DEAD
    public_name: str = ""
    metrics: Mapping[str, float] = field(default_factory=dict)


class SwarmCallError(RuntimeError):
    """A call to a peer failed: refused, unreachable or timed out."""


Tensors = Mapping[str, torch.Tensor]
MethodHandler = Callable[[bytes, dict, dict[str, torch.Tensor]], Awaitable[tuple[dict, Tensors]]]


class Swarm(Protocol):
    """What a trainer can ask of the swarm. Every method is a coroutine bounded by the node's timeouts."""

    @property
    def my_id(self) -> bytes: ...

    async def peers(
        self, *, role: str | None = None, stage: int | None = None, live_only: bool = True, fresh: bool = False
    ) -> list[Peer]:
        """Members of the run, optionally filtered; live means JOINING or ONLINE. ``fresh`` re-reads
        the DHT instead of answering from the last membership view."""
        ...

    async def call(
        self, peer: bytes, method: str, args: dict | None = None, tensors: Tensors | None = None,
        *, even_if_dead: bool = False,
    ) -> tuple[dict, dict[str, torch.Tensor]]:
        """Call ``method`` on ``peer``; raises SwarmCallError. A peer the view holds DEAD is refused
        unless ``even_if_dead`` (for a caller with reason to think the view is behind)."""
        ...

    def serve(self, method: str, handler: MethodHandler) -> None:
        """Answer calls of ``method``; the handler gets the caller's id, args and tensors."""
        ...

    async def publish(self, name: str, body: dict, ttl_s: float) -> bool:
        """Store a signed record under our own subkey of ``name``."""
        ...

    async def read(self, name: str) -> dict[bytes, dict]:
        """Every valid record under ``name``, by signer."""
        ...

    async def report_event(self, event: str, detail: str) -> None:
        """Record an event (protocol.messages.KNOWN_EVENTS) about this node where observers read events."""
        ...

    async def average(
        self, group: str, tensors: Tensors, weight: float = 1.0, *, group_size: int | None = None
    ) -> tuple[dict[str, torch.Tensor], int]:
        """Weighted average of ``tensors`` with the peers averaging ``group`` at the same time
        (sum of weight * tensor over sum of weights); returns the result and the group's size.
        Group members' results agree to within float rounding. Raises SwarmCallError when no
        group forms in time."""
        ...
