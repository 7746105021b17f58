"""Shared by the benchmark scripts: where results go and what machine produced them."""
from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nEvery entry was appended by a script in `bench/`; rerun the command to reproduce it.\n"


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def record(title: str, lines: list[str]) -> None:
    """Print the figures and append them to BENCHMARKS.md with the date, machine and command."""
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    entry = [f"## {title} — {stamp}", "", f"- machine: {machine()}", f"- command: `{command}`"]
    entry += [f"- {line}" for line in lines]
    text = "\n".join(entry) + "\n"
    print(text)
    if not BENCHMARKS.exists():
        BENCHMARKS.write_text(HEADER)
    with BENCHMARKS.open("a") as handle:
        handle.write("\n" + text)


def iteration_phases(data_reports: list[dict]) -> tuple[dict[int, float], dict[int, float]]:
    """From the data nodes' reports: when each iteration ended on the last of them (its paths,
    reduce and step done), and the longest time one of them spent on that iteration's paths."""
    ends: dict[int, float] = {}
    paths_s: dict[int, float] = {}
    for r in data_reports:
        for it, began, drive, reduce in r["phases"]:
            ends[it] = max(ends.get(it, 0.0), began + drive + reduce)
            paths_s[it] = max(paths_s.get(it, 0.0), drive)
    return ends, paths_s
