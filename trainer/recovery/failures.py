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

import math
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
_ENTRY_KEYS = ("stage", "iteration", "replica")
_INT = re.compile(r"[0-9]+")  # not \d: that also takes other scripts' digits
_FORM = "expected stage=S@iter=K[@replica=R]"


def _check_stage(failure: Failure, num_stages: int | None, where: str) -> None:
    if num_stages is not None and failure.stage >= num_stages:
        raise FailureSpecError(f"{where}: stage {failure.stage} does not exist (stages 0..{num_stages - 1})")


def _parse_item(item: str) -> Failure:
    fields: dict[str, int] = {}
    for part in item.split("@"):
        key, _, value = (x.strip() for x in part.partition("="))
        if key not in _KEYS:
            raise FailureSpecError(f"{item!r}: unknown key {key!r}; {_FORM}")
        if _KEYS[key] in fields:
            raise FailureSpecError(f"{item!r}: {_KEYS[key]} given twice; {_FORM}")
        if not _INT.fullmatch(value):
            raise FailureSpecError(f"{item!r}: {key} must be a non-negative integer, not {value!r}")
        fields[_KEYS[key]] = int(value)
    for needed, name in (("stage", "stage"), ("iteration", "iter")):
        if needed not in fields:
            raise FailureSpecError(f"{item!r}: no {name}=; {_FORM}")
    return Failure(**fields)


def parse_fail_spec(text: str, num_stages: int | None = None) -> list[Failure]:
    """``stage=S@iter=K[@replica=R]`` items joined by ',' or ';', sorted."""
    items = [item.strip() for item in re.split(r"[,;]", text or "")]
    if not any(items):
        raise FailureSpecError(f"empty failure spec; {_FORM}, items joined by ',' or ';'")
    seen: set[Failure] = set()
    for item in items:
        if not item:
            raise FailureSpecError(f"{text!r}: an empty item between separators; {_FORM}")
        failure = _parse_item(item)
        _check_stage(failure, num_stages, repr(item))
        if failure in seen:
            raise FailureSpecError(f"{item!r}: the same failure is listed twice")
        seen.add(failure)
    return sorted(seen)


def _schedule_entry(entry: object, where: str) -> Failure:
    if not isinstance(entry, dict):
        raise FailureSpecError(f"{where}: expected an object with stage, iteration and optional replica")
    unknown = sorted(set(entry) - set(_ENTRY_KEYS))
    if unknown:
        raise FailureSpecError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
                               "expected stage, iteration and optional replica")
    for key in ("stage", "iteration"):
        if key not in entry:
            raise FailureSpecError(f"{where}: no {key!r}")
    for key, value in entry.items():
        if type(value) is not int or value < 0:  # type(), not isinstance: true is not a stage
            raise FailureSpecError(f"{where}: stage, iteration and replica are non-negative integers, "
                                   f"but {key!r} is {value!r}")
    return Failure(**entry)


def load_failure_schedule(path: str | Path, num_stages: int | None = None) -> list[Failure]:
    """A JSON list of {"stage", "iteration", "replica" (optional)}, or {"failures": [...]}; sorted."""
    raw = read_json_file(path, "failure schedule", FailureSpecError)
    if isinstance(raw, dict):
        if set(raw) != {"failures"}:
            raise FailureSpecError(f"{path}: expected a list of failures or {{\"failures\": [...]}}, "
                                   f"not an object with the keys {', '.join(map(repr, sorted(raw))) or '(none)'}")
        raw = raw["failures"]
    if not isinstance(raw, list):
        raise FailureSpecError(f"{path}: expected a list of failures or {{\"failures\": [...]}}")
    seen: set[Failure] = set()
    for i, entry in enumerate(raw):
        where = f"{path}: failure {i}"
        failure = _schedule_entry(entry, where)
        _check_stage(failure, num_stages, where)
        if failure in seen:
            raise FailureSpecError(f"{where}: the same failure is listed twice")
        seen.add(failure)
    return sorted(seen)


def failure_probability(hourly_rate: float, iteration_s: float) -> float:
    """The chance that a stage fails during one iteration of ``iteration_s`` real seconds."""
    if not 0 <= hourly_rate < 1:
        raise FailureSpecError(f"the hourly failure rate must be in [0, 1), not {hourly_rate!r}")
    if not 0 < iteration_s < math.inf:
        raise FailureSpecError(f"the iteration time must be a positive number of seconds, not {iteration_s!r}")
    return 1 - (1 - hourly_rate) ** (iteration_s / 3600)


def scaled_iteration_s(demo_iteration_s: float, time_scale: float) -> float:
    """The real iteration time a demo iteration stands for (demo time = real time x time_scale)."""
    if not 0 < time_scale <= 1:
        raise FailureSpecError(f"time_scale must be in (0, 1], not {time_scale!r}")
    if not 0 < demo_iteration_s < math.inf:
        raise FailureSpecError(f"the demo iteration time must be positive seconds, not {demo_iteration_s!r}")
    return demo_iteration_s / time_scale


def sample_failures(hourly_rate: float, iteration_s: float, num_stages: int, iterations: int, seed: int,
                    stages: Iterable[int] | None = None, min_gap: int = 0) -> list[Failure]:
    """Failures drawn at the hourly rate, iteration by iteration and stage by stage in a fixed order
    (the same seed, the same schedule); a stage that failed cannot fail again for ``min_gap``
    iterations. Stage 0 is left out by default: it lives on every data node."""
    p = failure_probability(hourly_rate, iteration_s)
    if min_gap < 0:
        raise FailureSpecError(f"min_gap must be >= 0, not {min_gap}")
    chosen = sorted(set(range(1, num_stages) if stages is None else stages))
    if any(not 0 <= stage < num_stages for stage in chosen):
        raise FailureSpecError(f"stages {chosen}: each must be in 0..{num_stages - 1}")
    rng = random.Random(seed)
    last: dict[int, int] = {}
    failures = []
    for k in range(1, iterations):
        for stage in chosen:
            # Draw even while a stage is recovering, so min_gap does not shift the other stages' draws.
            hit = rng.random() < p
            if hit and (stage not in last or k - last[stage] > min_gap):
                failures.append(Failure(k, stage))
                last[stage] = k
    return failures


def due(failures: Sequence[Failure], iteration: int, done: set[Failure]) -> list[Failure]:
    """The failures the run has reached and that are not yet in ``done``, sorted."""
    return sorted(f for f in failures if f.iteration <= iteration and f not in done)
