"""Torch's first optimizer imports ``torch._dynamo`` (sympy, inductor, fsdp: 2.5 s of CPU on a quiet
core, 10 s when five nodes start together on two), holding the GIL. Done on a node's event loop,
that import stalls its heartbeats and RPCs for as long, and the nodes that started together look
dead to each other. A worker awaits ``ready()`` before it builds its first optimizer: the import
runs in a thread and the loop goes on. (Started only once the node is ONLINE, so that it does not
slow the join.)"""
from __future__ import annotations

import asyncio


def _import() -> None:
    import torch._dynamo  # noqa: F401  (the import is the point)


async def ready() -> None:
    """Return once ``torch._dynamo`` is imported, without blocking the event loop while it is."""
    await asyncio.to_thread(_import)
