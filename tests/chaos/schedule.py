"""A seeded schedule of faults: what happens when, and to which node (chosen when it happens).

Pure logic. Faults are spread over the chaos window one per slot (the window cut into as many
slots as there are faults, each fault at a random point of the middle of its slot), so that two
faults never land on top of each other and the swarm gets time to recover between them. The
victim is not fixed in advance, because which nodes live by then depends on the earlier faults:
each fault carries a random ``pick`` that the harness maps onto the nodes eligible at that moment.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

KINDS = ("kill", "freeze", "partition", "lossy", "disk_full", "skew")


@dataclass(frozen=True)
class Fault:
    at_s: float  # seconds after the chaos window opened
    kind: str  # one of KINDS
    pick: int  # victim = eligible[pick % len(eligible)]
    duration_s: float = 0.0  # how long a freeze, partition, lossy link or full disk lasts (0: a kill)

    def victim(self, eligible: list) -> object | None:
        return eligible[self.pick % len(eligible)] if eligible else None


@dataclass(frozen=True)
class ChaosPlan:
    """How much chaos: fault counts by kind over ``window_s`` seconds, starting ``warmup_s`` in."""

    seed: int = 0
    window_s: float = 60.0
    warmup_s: float = 0.0
    counts: dict[str, int] = field(default_factory=lambda: {"kill": 3, "freeze": 1})
    durations_s: dict[str, tuple[float, float]] = field(default_factory=dict)  # kind -> (shortest, longest)

    def __post_init__(self) -> None:
        unknown = set(self.counts) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown fault kind(s) {sorted(unknown)}; known: {', '.join(KINDS)}")
        if any(n < 0 for n in self.counts.values()) or self.window_s <= 0 or self.warmup_s < 0:
            raise ValueError("counts must be >= 0, window_s > 0 and warmup_s >= 0")
        for kind, (lo, hi) in self.durations_s.items():
            if not 0 <= lo <= hi:
                raise ValueError(f"durations_s[{kind!r}] must be (shortest, longest) with 0 <= shortest <= longest")

    @classmethod
    def per_minute(cls, seed: int, minutes: float, rates: dict[str, float], warmup_s: float = 0.0,
                   durations_s: dict[str, tuple[float, float]] | None = None) -> "ChaosPlan":
        """A soak's plan: ``rates[kind]`` faults per minute, rounded to whole faults over the run."""
        window = minutes * 60.0 - warmup_s
        counts = {kind: int(round(rate * window / 60.0)) for kind, rate in rates.items()}
        return cls(seed, window, warmup_s, counts, dict(durations_s or {}))


def make_schedule(plan: ChaosPlan) -> list[Fault]:
    """The plan's faults in time order; the same plan gives the same schedule."""
    rng = random.Random(plan.seed)
    kinds = [kind for kind in KINDS for _ in range(plan.counts.get(kind, 0))]
    rng.shuffle(kinds)
    if not kinds:
        return []
    slot = plan.window_s / len(kinds)
    faults = []
    for i, kind in enumerate(kinds):
        lo, hi = plan.durations_s.get(kind, (0.0, 0.0))
        duration = 0.0 if kind == "kill" else round(rng.uniform(lo, hi), 3)
        at = plan.warmup_s + slot * (i + rng.uniform(0.2, 0.6))
        faults.append(Fault(round(at, 3), kind, rng.randrange(1 << 30), duration))
    return faults


def counts_of(faults: list[Fault]) -> dict[str, int]:
    out: dict[str, int] = {}
    for fault in faults:
        out[fault.kind] = out.get(fault.kind, 0) + 1
    return out
