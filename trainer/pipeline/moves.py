"""Neighbourhood of the scheduler's local search: random changes to a schedule that keep every
constraint except memory, which the simulator checks."""
from __future__ import annotations

import random
from typing import TYPE_CHECKING

from trainer.pipeline.schedule import MAX_SWAPS

if TYPE_CHECKING:
    from trainer.pipeline.scheduler import _Problem

Paths = list[tuple[int, tuple[int, ...]]]  # per microbatch: data node, visited nodes in order


def swap_patterns(length: int, max_swaps: int = MAX_SWAPS) -> list[tuple[int, ...]]:
    """Permutations of range(length) made of at most max_swaps disjoint neighbour swaps."""
    out = []

    def build(i: int, prefix: tuple[int, ...], swaps: int) -> None:
        if i >= length:
            out.append(prefix)
            return
        build(i + 1, prefix + (i,), swaps)
        if i + 1 < length and swaps < max_swaps:
            build(i + 2, prefix + (i + 1, i), swaps + 1)

    build(0, (), 0)
    return out


class Moves:
    """Random neighbours of a schedule; each method returns None when it finds no move."""

    def __init__(self, problem: "_Problem", rng: random.Random, assignment_fixed: bool) -> None:
        self.p = problem
        self.rng = rng
        self.assignment_fixed = assignment_fixed

    def propose(self, son: dict[int, int], paths: Paths, critical: int) -> tuple[dict[int, int], Paths] | None:
        rng = self.rng
        mine = [i for i, (d, _) in enumerate(paths) if d == critical]
        i = rng.choice(mine) if mine and rng.random() < 0.5 else rng.randrange(len(paths))
        roll = rng.random()
        if roll < 0.3:
            return son, self._replica(son, paths, i)
        if roll < 0.45:
            return son, self._order(son, paths, i)
        if roll < 0.7:
            return son, self._exchange_stage(son, paths, i)
        if roll < 0.85 or self.assignment_fixed:
            return son, self._exchange_path(paths, i)
        return self._swap_nodes(son, paths)

    def _replica(self, son, paths: Paths, i: int) -> Paths | None:
        data, nodes = paths[i]
        j = self.rng.randrange(len(nodes))
        others = [n for n in sorted(son) if son[n] == son[nodes[j]] and n != nodes[j]]
        if not others:
            return None
        new = list(nodes)
        new[j] = self.rng.choice(others)
        return _replace(paths, i, (data, tuple(new)))

    def _order(self, son, paths: Paths, i: int) -> Paths | None:
        data, nodes = paths[i]
        ordered = sorted(nodes, key=son.__getitem__)
        options = [tuple(ordered[k] for k in pat) for pat in self.p.patterns]
        options = [o for o in options if o != nodes]
        if not options:
            return None
        return _replace(paths, i, (data, self.rng.choice(options)))

    def _exchange_stage(self, son, paths: Paths, i: int) -> Paths | None:
        """Path i trades a stage for one it skips; path k trades back (or nobody, when the
        visit counts stay within +-1)."""
        data, nodes = paths[i]
        have = {son[n] for n in nodes}
        s = son[self.rng.choice(nodes)]
        missing = [t for t in self.p.nonzero if t not in have]
        if not missing:
            return None
        t = self.rng.choice(missing)
        counts = {st: 0 for st in self.p.nonzero}
        for _, ns in paths:
            for n in ns:
                counts[son[n]] += 1
        counts[s] -= 1
        counts[t] += 1
        out = _replace(paths, i, (data, self._with_stage(son, data, nodes, s, t)))
        if max(counts.values()) - min(counts.values()) <= 1 and self.rng.random() < 0.5:
            return out
        partners = [k for k, (_, ns) in enumerate(paths) if k != i and any(son[n] == t for n in ns)
                    and not any(son[n] == s for n in ns)]
        if not partners:
            return None
        k = self.rng.choice(partners)
        kd, kn = paths[k]
        return _replace(out, k, (kd, self._with_stage(son, kd, kn, t, s)))

    def _with_stage(self, son, data: int, nodes: tuple[int, ...], old: int, new: int) -> tuple[int, ...]:
        """`nodes` with stage `old` replaced by `new` (the cheapest replica for this cycle, ties
        at random), keeping the path's swap pattern where it still applies."""
        kept = [n for n in nodes if son[n] != old]
        cost = self.p.cost
        replicas = [n for n in sorted(son) if son[n] == new]
        pos = [k for k, n in enumerate(nodes) if son[n] == old][0]
        prev = data if pos == 0 else nodes[pos - 1]
        nxt = data if pos == len(nodes) - 1 else nodes[pos + 1]
        pick = min(replicas, key=lambda n: (cost[prev][n] + cost[n][nxt], self.rng.random()))
        ordered = sorted(kept + [pick], key=son.__getitem__)
        pattern = _pattern_of([son[n] for n in nodes])
        seq = tuple(ordered[k] for k in pattern)
        if _pattern_of([son[n] for n in seq]) is None:
            seq = tuple(ordered)
        return seq

    def _exchange_path(self, paths: Paths, i: int) -> Paths | None:
        data, nodes = paths[i]
        others = [k for k, (d, _) in enumerate(paths) if d != data]
        if not others:
            return None
        k = self.rng.choice(others)
        out = _replace(paths, i, (data, paths[k][1]))
        return _replace(out, k, (paths[k][0], nodes))

    def _swap_nodes(self, son, paths: Paths) -> tuple[dict[int, int], Paths] | None:
        u, v = self.rng.sample(sorted(son), 2)
        if son[u] == son[v]:
            return None
        swap = {u: v, v: u}
        new_son = dict(son)
        new_son[u], new_son[v] = son[v], son[u]
        return new_son, [(swap.get(d, d), tuple(swap.get(n, n) for n in ns)) for d, ns in paths]


def _pattern_of(stages: list[int]) -> tuple[int, ...] | None:
    ordered = sorted(stages)
    perm = tuple(ordered.index(s) for s in stages)
    return perm if perm in swap_patterns(len(stages)) else None


def _replace(paths: Paths, i: int, path: tuple[int, tuple[int, ...]]) -> Paths:
    out = list(paths)
    out[i] = path
    return out
