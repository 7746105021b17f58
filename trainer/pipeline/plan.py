"""Paths for one data node's microbatches of one iteration, from the live replicas it sees.

A stand-in for the leader's scheduled plan: deterministic in (iteration, data node, microbatch),
balanced over stages and replicas, network-blind. Each path visits ``path_length - 1`` distinct
stages of 1..S-1 in order; with the CheckFree+ swap, odd microbatches swap stages (1, 2) and
(S-2, S-1) where both are on the path.
"""
from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence

Hop = tuple[int, bytes]  # (stage, node id)


def _pick(seed: bytes, n: int) -> int:
    return int.from_bytes(hashlib.blake2b(seed, digest_size=8).digest(), "little") % n


def stage_sets(num_stages: int, hops: int, count: int, offset: int) -> list[list[int]]:
    """``count`` sets of ``hops`` stages from 1..S-1 that visit every stage as evenly as possible
    (+-1): stage choice rotates through the stages, starting at ``offset``."""
    stages = list(range(1, num_stages))
    out = []
    for m in range(count):
        start = (offset + m * hops) % len(stages)
        chosen = sorted({stages[(start + i) % len(stages)] for i in range(hops)})
        out.append(chosen)
    return out


def swapped(order: list[int], num_stages: int) -> list[int]:
    """CheckFree+: swap stages (1, 2) and (S-2, S-1) where both are on the path, next to each other."""
    order = list(order)
    for a, b in ((1, 2), (num_stages - 2, num_stages - 1)):
        if a < b and a in order and b in order:
            i, j = order.index(a), order.index(b)
            if abs(i - j) == 1:
                order[i], order[j] = order[j], order[i]
    return order


def plan_paths(
    iteration: int,
    data_node: bytes,
    microbatches: int,
    num_stages: int,
    path_length: int,
    swap: str,
    replicas: Mapping[int, Sequence[bytes]],
) -> list[list[Hop]]:
    """One path per microbatch: the (stage, node) hops between leaving the data node and coming
    back. Stages without a live replica are left out of every path."""
    hops = min(path_length - 1, num_stages - 1)
    seed = data_node + struct.pack("<Q", iteration)
    offset = _pick(seed + b"offset", max(1, num_stages - 1))
    paths = []
    for m, stages in enumerate(stage_sets(num_stages, hops, microbatches, offset)):
        order = swapped(stages, num_stages) if swap == "checkfree_plus" and m % 2 == 1 else stages
        path = []
        for stage in order:
            nodes = sorted(replicas.get(stage, ()))
            if nodes:
                path.append((stage, nodes[_pick(seed + struct.pack("<QQ", m, stage), len(nodes))]))
        paths.append(path)
    return paths
