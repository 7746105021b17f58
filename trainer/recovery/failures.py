"""Failure injection for recovery experiments: which stage's node is killed (kill -9 of a real
process, by the harness in node/pipeline_demo.py) when the run reaches which iteration.

Failures come from a spec (``--fail stage=2@iter=5,stage=1@iter=9@replica=1``), a JSON schedule
file, or an hourly failure rate h. At rate h a stage fails during one iteration of t seconds with
p = 1 - (1 - h) ** (t / 3600). A local demo runs much faster than the run it stands for, so t is
the *real* iteration time the demo iteration represents: with time_scale 0.05 (the link
emulation's meaning: demo time = real time x time_scale) a 2 s demo iteration stands for 40 s, and
h = 10%/hour gives p = 1 - 0.9 ** (40 / 3600) per stage and iteration.
"""
from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from trainer.pipeline.scenario import read_json_file


class FailureSpecError(ValueError):
    """A failure spec or schedule that cannot be understood; the message names the bad part."""


@dataclass(frozen=True, order=True)
class Failure:
    iteration: int  # kill when the run reaches this iteration
    stage: int
    replica: int = 0  # which of the stage's running nodes, in the harness's order


_KEYS = {"stage": "stage", "iter": "iteration", "iteration": "iteration", "replica": "replica"}
_INT = re.compile(r"\d+")


def _checked(failures: list[Failure], num_stages: int | None, where: str) -> list[Failure]:
    if num_stages is not None:
        for f in failures:
            if f.stage >= num_stages:
                raise FailureSpecError(f"{where}: stage {f.stage} does not exist (stages 0..{num_stages - 1})")
    if len(set(failures)) != len(failures):
        raise FailureSpecError(f"{where}: the same failure is listed twice")
    return sorted(failures)


def parse_fail_spec(text: str, num_stages: int | None = None) -> list[Failure]:
    """``stage=S@iter=K[@replica=R]`` items joined by ',' or ';'."""
    items = [item.strip() for item in re.split(r"[,;]", text or "")]
    if not any(items):
        raise FailureSpecError("empty failure spec: expected items like stage=2@iter=5")
    failures = []
    for item in items:
        if not item:
            raise FailureSpecError(f"empty item in {text!r}")
        fields: dict[str, int] = {}
        for part in item.split("@"):
            key, _, value = (x.strip() for x in part.partition("="))
            if key not in _KEYS:
                raise FailureSpecError(f"{item!r}: unknown key {key!r}; expected stage=S@iter=K[@replica=R]")
            if _KEYS[key] in fields:
                raise FailureSpecError(f"{item!r}: {key} given twice")
            if not _INT.fullmatch(value):
                raise FailureSpecError(f"{item!r}: {key} must be a non-negative integer, not {value!r}")
            fields[_KEYS[key]] = int(value)
        for needed in ("stage", "iteration"):
            if needed not in fields:
                raise FailureSpecError(f"{item!r}: no {'iter' if needed == 'iteration' else needed}=; "
                                       "expected stage=S@iter=K[@replica=R]")
        failures.append(Failure(**fields))
    return _checked(failures, num_stages, "--fail")


def load_failure_schedule(path: str | Path, num_stages: int | None = None) -> list[Failure]:
    """A JSON list of {"stage", "iteration", "replica" (optional)}, or {"failures": [...]}."""
    raw = read_json_file(path, "failure schedule", FailureSpecError)
    entries = raw.get("failures") if isinstance(raw, dict) and set(raw) == {"failures"} else raw
    if not isinstance(entries, list):
        raise FailureSpecError(f"{path}: expected a list of failures or {{\"failures\": [...]}}")
    failures = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not {"stage", "iteration"} <= set(entry) \
                or not set(entry) <= {"stage", "iteration", "replica"}:
            raise FailureSpecError(f"{path}: failure {i} must be an object with stage, iteration and optional replica")
        if not all(type(v) is int and v >= 0 for v in entry.values()):
            raise FailureSpecError(f"{path}: failure {i}: stage, iteration and replica are non-negative integers")
        failures.append(Failure(**entry))
    return _checked(failures, num_stages, str(path))


def failure_probability(hourly_rate: float, iteration_s: float) -> float:
    """The chance that a stage fails during one iteration of ``iteration_s`` real seconds."""
    if not 0 <= hourly_rate < 1 or not iteration_s > 0:
        raise FailureSpecError("the hourly failure rate must be in [0, 1) and the iteration time > 0")
    return 1 - (1 - hourly_rate) ** (iteration_s / 3600)


def scaled_iteration_s(demo_iteration_s: float, time_scale: float) -> float:
    """The real iteration time a demo iteration stands for (demo time = real time x time_scale)."""
    if not 0 < time_scale <= 1 or not demo_iteration_s > 0:
        raise FailureSpecError("time_scale must be in (0, 1] and the demo iteration time > 0")
    return demo_iteration_s / time_scale


def sample_failures(hourly_rate: float, iteration_s: float, num_stages: int, iterations: int, seed: int,
                    stages: Iterable[int] | None = None, min_gap: int = 0) -> list[Failure]:
    """Failures drawn at the hourly rate, iteration by iteration and stage by stage in a fixed order
    (the same seed, the same schedule); a stage that failed cannot fail again for ``min_gap``
    iterations. Stage 0 is left out by default: it lives on every data node."""
    p = failure_probability(hourly_rate, iteration_s)
    rng = random.Random(seed)
    chosen = sorted(set(range(1, num_stages) if stages is None else stages))
    last: dict[int, int] = {}
    failures = []
    for k in range(1, iterations):
        for stage in chosen:
            hit = rng.random() < p
            if hit and k - last.get(stage, -10**9) > min_gap:
                failures.append(Failure(k, stage))
                last[stage] = k
    return failures


def due(failures: Sequence[Failure], iteration: int, done: set[Failure]) -> list[Failure]:
    return sorted(f for f in failures if f.iteration <= iteration and f not in done)
