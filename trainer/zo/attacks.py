"""Byzantine scalars, for tests and benchmarks only (``swarmtrain node --zo-fault``).

An attack replaces each byte a node would send. It sees the honest byte and the scalars the
other nodes sent in the previous commit (commits are public: every node holds them).

- max-scalar: the largest magnitude, g_max, with a random sign.
- sign-flip:  -g, the honest scalar with its sign flipped (BTARD's sign flipping).
- alie:       "a little is enough" (Baruch, Baruch & Goldberg 2019): mean - sign(g) z std of the
              others' scalars in the previous commit, z = 1.5 by default (``alie-Z`` sets it).
              Honest scalars are about N(0, s^2) and the clip radius is 3 x median |g|, about
              2 s, so 1.5 s stays inside it: never clipped, never an outlier, always pulling
              against this node's own descent direction with more than an honest node's
              typical magnitude (0.8 s).
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from trainer.zo.quantize import LEVELS, SIGN, Quantizer

ATTACKS = ("max-scalar", "sign-flip", "alie")
DEFAULT_ALIE_Z = 1.5


@dataclass
class Attack:
    kind: str
    quantizer: Quantizer
    seed: int = 0
    z: float = DEFAULT_ALIE_Z
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        if self.kind not in ATTACKS:
            raise ValueError(f"unknown attack {self.kind!r}; known: {', '.join(ATTACKS)}")
        if not (math.isfinite(self.z) and 0.0 <= self.z <= 100.0):
            raise ValueError(f"alie: z must be in [0, 100], got {self.z}")
        self.rng = random.Random(self.seed)

    def __call__(self, q: int, others: Sequence[float]) -> int:
        if self.kind == "max-scalar":
            return (SIGN if self.rng.random() < 0.5 else 0) | LEVELS
        if self.kind == "sign-flip":
            return q ^ SIGN if q & LEVELS else q
        g = self.quantizer.decode(q)
        if not others:  # nothing to hide among yet (the first step): send the honest byte
            return q
        mean = sum(others) / len(others)
        std = math.sqrt(sum((x - mean) * (x - mean) for x in others) / len(others))
        against = -1.0 if g > 0 or (g == 0 and self.rng.random() < 0.5) else 1.0
        return self.quantizer.encode(mean + against * self.z * std, self.rng.random())


def parse_attack(name: str, quantizer: Quantizer, seed: int) -> Attack | None:
    """``max-scalar``, ``sign-flip``, ``alie`` or ``alie-Z``; None for a name that is none of them."""
    if name in ATTACKS:
        return Attack(name, quantizer, seed)
    if name.startswith("alie-"):
        try:
            z = float(name[len("alie-"):])
        except ValueError:
            return None
        return Attack("alie", quantizer, seed, z)
    return None


class LocalAttacks:
    """``train_local``'s tamper hook for attacking nodes (node id -> Attack), each seeing what it
    would see in a swarm: the other nodes' scalars of the previous step."""

    def __init__(self, attacks: dict[bytes, Attack], quantizer: Quantizer):
        self.attacks = attacks
        self.quantizer = quantizer
        self._step = -1
        self._previous: list[tuple[bytes, float]] = []
        self._current: list[tuple[bytes, float]] = []

    def __call__(self, step: int, node: bytes, q: int) -> int:
        if step != self._step:
            self._previous, self._current, self._step = self._current, [], step
        attack = self.attacks.get(node)
        if attack is not None:
            q = attack(q, [g for n, g in self._previous if n != node])
        self._current.append((node, self.quantizer.decode(q)))
        return q
