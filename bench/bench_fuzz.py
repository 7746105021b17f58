"""Fuzzing: every decoder of peer data under atheris for a fixed time; inputs tried and crashes found.

    python bench/bench_fuzz.py --seconds 60            # every target, a minute each
    python bench/bench_fuzz.py --seconds 600 rpc.frame zo.commit

Targets and their bounds (5 s and 32 MiB of Python memory per input) are in tests/fuzz_targets.py.
A crash is printed with its input file and fails the run (exit 1) after the figures are recorded.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO, record  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", help="target names (default: all)")
    parser.add_argument("--seconds", type=int, default=60, help="fuzzing time per target")
    args = parser.parse_args()
    command = [sys.executable, "-m", "tests.fuzz_targets", "--runs", "-1", "--seconds", str(args.seconds), *args.targets]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if not results:
        print(done.stderr[-3000:], file=sys.stderr)
        return 2
    crashes = sum(r["crashes"] for r in results)
    total = sum(r["runs"] for r in results)
    lines = [f"atheris (libFuzzer, coverage-guided) on each decoder for {args.seconds} s, seeded with valid "
             f"messages; per input at most 5 s and 32 MiB of Python allocations",
             f"{len(results)} targets, {total} inputs in all, {crashes} crashes"]
    lines += [f"{r['target']}: {r['runs']} inputs in {r['seconds']} s ({r['runs'] / max(r['seconds'], 1e-9):.0f}/s), "
              f"{r['crashes']} crashes" + (f" ({', '.join(r['artifacts'])})" if r["artifacts"] else "")
              for r in results]
    record("Fuzzing: inputs tried per decoder, crashes found", lines)
    for r in results:
        if r["crashes"]:
            print(f"\n{r['target']} crashed:\n{r['tail']}", file=sys.stderr)
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
