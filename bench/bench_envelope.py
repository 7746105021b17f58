"""Envelope throughput: seal/s and open/s for a small and a 64 KiB body; appends a line to BENCHMARKS.md."""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol.envelope import Limits, open_envelope, seal

RUN = bytes(range(16))
BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nOne line per run, appended by the scripts in bench/.\n\n"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def rate(fn, seconds: float) -> float:
    """Calls per second of ``fn`` over about ``seconds``."""
    count, start = 0, time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(50):
            fn()
        count += 50
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - start)


def measure(body: dict, seconds: float) -> tuple[float, float, int]:
    key = Ed25519PrivateKey.from_private_bytes(b"\x42" * 32)
    data = seal(key, kind="bench", run_id=RUN, body=body, seq=1)
    limits = Limits(max_bytes=1 << 20)
    seal_rate = rate(lambda: seal(key, kind="bench", run_id=RUN, body=body, seq=1), seconds)
    open_rate = rate(lambda: open_envelope(data, "bench", limits, run_id=RUN), seconds)
    return seal_rate, open_rate, len(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    parser.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = parser.parse_args()
    cases = {
        "small": {"state": "online", "step": 123, "metrics": {"loss": 2.5, "lr": 3e-4}, "uptime_s": 12.0},
        "64KiB": {"blob": os.urandom(64 * 1024)},
    }
    figures = []
    for name, body in cases.items():
        seal_rate, open_rate, size = measure(body, args.seconds)
        line = f"{name} ({size} B): seal {seal_rate:,.0f}/s, open {open_rate:,.0f}/s"
        print(line, flush=True)
        figures.append(line)
    if args.no_record:
        return
    machine = f"{platform.platform()}, {cpu_model()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    command = "python " + " ".join(shlex.quote(a) for a in ["bench/bench_envelope.py", *sys.argv[1:]])
    entry = f"- {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} | {machine} | `{command}` | envelope: {'; '.join(figures)}\n"
    new = not BENCHMARKS.exists()
    with BENCHMARKS.open("a", encoding="utf-8") as handle:
        if new:
            handle.write(HEADER)
        handle.write(entry)
    print(f"appended to {BENCHMARKS}")


if __name__ == "__main__":
    main()
