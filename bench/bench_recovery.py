"""Mean time to recovery of a lost pipeline stage on loopback, split into detection and restore.

Each trial starts a local swarm (bootstrap, one data node, one node per stage, one spare), kills
-9 the only node of one stage at a fixed iteration, and reads the spare's report and the
harness's kill time:
- detection: kill -> the leader marks the stage lost (its heartbeat expired, or RPCs to it failed);
- restore: lost -> the spare saw the job and won it (claim), fetched the neighbours' (or
  partner's) weights, rebuilt the stage and announced it (serving again);
- mttr = detection + restore.
Scenarios: a middle stage rebuilt by CheckFree, and an edge stage copied from its CheckFree+ swap
partner. Detection is bounded by the run's heartbeat settings (reported with the figures).

    python bench/bench_recovery.py [--trials 3] [--heartbeat 0.5 --ttl 4]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import record  # noqa: E402
from node.pipeline_demo import recoveries_of, run_pipeline_swarm, write_pipeline_spec  # noqa: E402
from trainer.recovery.failures import Failure  # noqa: E402

STAGES = 4
SCENARIOS = {  # name: (swap, stage killed, expected method)
    "middle stage, CheckFree": ("none", 2, "checkfree"),
    "edge stage, CheckFree+ swap copy": ("checkfree_plus", 1, "swap-copy"),
}


def trial(workdir: Path, swap: str, stage: int, args) -> dict:
    spec = write_pipeline_spec(workdir, STAGES, args.iterations, STAGES, swap=swap, blocks_per_stage=[1] * STAGES,
                               path_length=STAGES, move_after_s=600.0, heartbeat_interval_s=args.heartbeat,
                               heartbeat_ttl_s=args.ttl)
    reports, kills = run_pipeline_swarm(workdir, spec, STAGES, STAGES, 600, spares=1,
                                        failures=[Failure(args.kill_at, stage)])
    found = [r for r in recoveries_of(reports, kills) if "mttr_s" in r]
    if not found:
        raise SystemExit(f"no recovery in {workdir}: {reports}")
    return found[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=80)
    parser.add_argument("--kill-at", type=int, default=5, help="iteration at which the stage's node is killed")
    parser.add_argument("--heartbeat", type=float, default=0.5, help="swarm.heartbeat_interval_s")
    parser.add_argument("--ttl", type=float, default=4.0, help="swarm.heartbeat_ttl_s")
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = parser.parse_args()
    lines = [f"{STAGES} stages of the tiny preset (one block each), one node per stage, one spare, all processes on "
             f"127.0.0.1; heartbeat every {args.heartbeat} s, a node is dead after {args.ttl} s without one; the "
             f"stage's only node is killed (SIGKILL) at iteration {args.kill_at}; {args.trials} trials each; "
             "median (min..max)"]
    for name, (swap, stage, method) in SCENARIOS.items():
        results = []
        for i in range(args.trials):
            with tempfile.TemporaryDirectory(prefix="bench-recovery-") as tmp:
                r = trial(Path(tmp), swap, stage, args)
            if r["method"] != method:
                raise SystemExit(f"{name}: expected {method}, the spare used {r['method']}")
            results.append(r)
            print(f"{name} trial {i}: {r}", flush=True)

        def spread(key: str) -> str:
            xs = [r[key] for r in results if key in r]
            return f"{statistics.median(xs):.2f} s ({min(xs):.2f}..{max(xs):.2f})"

        restore = [r["mttr_s"] - r["detection_s"] for r in results]
        claim = f"; of it, the spare winning the job {spread('claim_s')}" if all("claim_s" in r for r in results) else ""
        lines.append(f"{name} (stage {stage} by {method}): mttr {spread('mttr_s')}; detection "
                     f"{spread('detection_s')}; restore {statistics.median(restore):.2f} s "
                     f"({min(restore):.2f}..{max(restore):.2f}){claim}; fetching and rebuilding "
                     f"{spread('restore_s')}")
    if args.no_record:
        print("\n".join(lines))
    else:
        record("Neighbour recovery: time to recover a lost stage on loopback", lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
