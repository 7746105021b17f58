"""Envelope throughput: seal/s and open/s for a small and a 64 KiB body, on one core; recorded in BENCHMARKS.md."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from bench.common import record  # noqa: E402
from protocol.envelope import Limits, open_envelope, seal  # noqa: E402

RUN = bytes(range(16))


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
    parser.add_argument("--no-record", action="store_true", help="print the figures, do not append to BENCHMARKS.md")
    args = parser.parse_args()
    cases = {
        "small": {"state": "online", "step": 123, "metrics": {"loss": 2.5, "lr": 3e-4}, "uptime_s": 12.0},
        "64KiB": {"blob": os.urandom(64 * 1024)},
    }
    lines = []
    for name, body in cases.items():
        seal_rate, open_rate, size = measure(body, args.seconds)
        lines.append(f"{name} ({size} B): seal {seal_rate:,.0f}/s, open {open_rate:,.0f}/s")
    if args.no_record:
        print("\n".join(lines))
    else:
        record("Envelope throughput, seal and open (Ed25519, msgpack), one core", lines)


if __name__ == "__main__":
    main()
