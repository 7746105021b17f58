"""Every decoder of peer data under atheris (libFuzzer, coverage-guided): no crash, no hang, bounded memory.

A short run per target here (tests/fuzz_targets.py names them and what each may raise); long runs
are bench/bench_fuzz.py's. The handlers that review and the state machine found crashable or
unbounded have their regression tests in tests/test_hostile_handlers.py.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.harness import REPO, child_env

# Inputs per target: the RPC targets and the run spec cost milliseconds per input, the rest microseconds.
SLOW = {"rpc.frame": 300, "rpc.request_body": 200, "runspec": 300, "pipeline.fetch_state": 500}
RUNS = 1000


def run_targets(names: list[str]) -> list[dict]:
    command = [sys.executable, "-m", "tests.fuzz_targets", "--runs", str(RUNS), *names]
    command += [f"--runs-for={name}={runs}" for name, runs in SLOW.items()]
    done = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(names), done.stderr[-3000:]
    return results


def all_targets() -> list[str]:
    done = subprocess.run([sys.executable, "-m", "tests.fuzz_targets", "--list"], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=120)
    return done.stdout.split()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_every_decoder_survives_coverage_guided_fuzzing():
    names = all_targets()
    assert {"envelope", "message.rpc.request", "tensor", "runspec", "token", "record.validator", "rpc.frame",
            "zo.contribution", "zo.commit", "pipeline.state_part"} <= set(names)
    results = run_targets(names)
    failed = [r for r in results if r["crashes"] or r["rc"]]
    assert not failed, "\n\n".join(f"{r['target']}: {r['artifacts']}\n{r['tail']}" for r in failed)
    for result in results:
        assert result["runs"] >= SLOW.get(result["target"], RUNS), result  # it really ran that many inputs
