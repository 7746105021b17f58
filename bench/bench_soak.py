"""Soak: a local swarm of one mode runs for N minutes with chaos on, then every "nothing lost" check.

Chaos (tests/chaos, docs/chaos.md), from a seeded schedule: kill -9 of random nodes (restarted
from their data dir), SIGSTOP/SIGCONT freezes longer than the heartbeat TTL, partitions (network
namespaces where root, else the RPC transport hook), lossy links, full disks (a small tmpfs per
node, where root), a running node's clock moved 60 s ahead for a while, and two nodes whose clocks
run a second fast and a second slow all along. The
run's steps are more than it can do: after N minutes the harness stops injecting, waits until
every node is back at work and stops the nodes (they write their reports).

Figures: iterations (pipeline), steps (zo) or steps checkpointed over the jobs (experts) completed, faults injected by kind, recoveries, data
lost (failed nothing-lost checks: must be zero), and the resident memory of every node process and
of its p2pd, sampled every 10 s from /proc: the peak, and the least-squares slope over each node's
longest life (after its first minute) in MiB per hour: a leak shows as a slope that stays up.

    python bench/bench_soak.py --minutes 30 --mode pipeline|zo|experts|all [--seed 0] [--no-record] [--keep DIR]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO, record  # noqa: E402
from tests.chaos import (ChaosOptions, ChaosPlan, ChaosSwarm, ExpertsMode, PipelineMode, ZoMode, describe,  # noqa: E402
                         experts_nothing_lost, failures, pipeline_nothing_lost, zo_nothing_lost)
from tests.chaos.procs import slope_mib_per_hour  # noqa: E402
from tests.chaos.schedule import counts_of  # noqa: E402

RATES = {"kill": 0.4, "freeze": 0.15, "partition": 0.1, "lossy": 0.1, "disk_full": 0.05, "skew": 0.05}  # per minute
DURATIONS = {"freeze": (5.0, 9.0), "partition": (6.0, 12.0), "lossy": (10.0, 30.0), "disk_full": (5.0, 15.0),
             "skew": (10.0, 20.0)}
TTL_S = 4.0
MODES = ("pipeline", "zo", "experts")
# What a node's data dir grows to in 30 minutes: an experts node keeps several checkpoints of the
# tiny preset (about 3 MiB each); a zo node's commit log grows by about 0.6 KiB a step (14 MiB on 2
# cores); a pipeline node keeps every weight snapshot (0.4 MiB each for the last stage, 40 of them
# in 6 minutes on 16 cores). A 16 MiB disk filled up by itself, which is not the fault injected.
DISK_MIB = 64


def mode_for(name: str):
    # more steps than the soak can do: the harness stops the nodes at the end
    if name == "zo":
        return ZoMode(nodes=4, steps=10**6, heartbeat_ttl_s=TTL_S, step_timeout_s=3.0, stop_faults_at=2.0)
    if name == "experts":  # three jobs for four nodes: one always joins a group (rounds averaged)
        return ExpertsMode(nodes=4, steps=(10**6,) * 3, checkpoint_every=20, heartbeat_ttl_s=TTL_S, stop_faults_at=2.0)
    return PipelineMode(stages=3, replicas=(2, 2, 1), iterations=10**6, heartbeat_ttl_s=TTL_S, stop_faults_at=2.0,
                        snapshot_every=25)


def memory_lines(result) -> tuple[list[str], dict]:
    lines, series = [], {}
    for name in sorted(result.specs):
        samples = [s for s in result.memory if s.node == name]
        if not samples:
            continue
        lives = Counter(s.life for s in samples)
        longest = [s for s in samples if s.life == max(lives, key=lives.get)]
        span = (longest[-1].at - longest[0].at) / 60
        node_slope = slope_mib_per_hour(longest, "node_mib")
        p2pd_slope = slope_mib_per_hour(longest, "p2pd_mib")
        fmt = lambda x: "n/a" if x is None else f"{x:+.1f}"  # noqa: E731
        quarters = [longest[min(len(longest) - 1, int(q * (len(longest) - 1)))] for q in (0, 0.25, 0.5, 0.75, 1)]
        lines.append(f"memory {name}: peak {max(s.node_mib for s in samples):.0f} MiB node processes, "
                     f"{max(s.p2pd_mib for s in samples):.0f} MiB p2pd; over its longest life ({span:.1f} min): "
                     f"node {' -> '.join(f'{s.node_mib:.0f}' for s in quarters)} MiB (slope {fmt(node_slope)} MiB/h), "
                     f"p2pd {' -> '.join(f'{s.p2pd_mib:.0f}' for s in quarters)} MiB (slope {fmt(p2pd_slope)} MiB/h)")
        series[name] = [[round(s.at - result.memory[0].at, 1), s.life, s.node_mib, s.p2pd_mib] for s in samples]
    return lines, series


def soak(mode_name: str, minutes: float, seed: int, workdir: Path) -> tuple[list[str], bool]:
    mode = mode_for(mode_name)
    plan = ChaosPlan.per_minute(seed, minutes, RATES, warmup_s=30.0, durations_s=DURATIONS)
    names = [spec.name for spec in mode.initial_nodes(workdir)]
    disk_mib = DISK_MIB
    options = ChaosOptions(plan, timeout_s=minutes * 60 + 900, stop_after_s=minutes * 60, max_down=2,
                           skews_s={names[1]: 1.0, names[-1]: -1.0}, memory_every_s=10.0, disk_mib=disk_mib,
                           env=getattr(mode, "env", {}))
    began = time.time()
    result = ChaosSwarm(workdir, mode, options, say=lambda text: print(text, flush=True)).run()
    if mode_name == "zo":
        checks = zo_nothing_lost(result, None)
        done = f"{result.progress} steps committed"
        recovered = Counter(r["by"] for r in result.recoveries)
    elif mode_name == "experts":
        checks = experts_nothing_lost(result, None, mode.heartbeat_ttl_s)
        done = f"{result.progress} steps checkpointed over {len(mode.steps)} jobs"
        recovered = Counter("from step 0" if r["start_step"] == 0 else (r["source"] or "?").split(" ")[0]
                            for r in result.recoveries if r["life"] > 0 or r["start_step"] > 0)
    else:
        checks = pipeline_nothing_lost(result, mode.stages, None, mode.heartbeat_ttl_s)
        done = f"{result.progress} iterations"
        recovered = Counter(r["method"] or "died restoring" for r in result.recoveries)
    print(describe(checks), flush=True)
    lost = failures(checks)
    mem, series = memory_lines(result)
    out = REPO / "bench" / "results" / f"soak_{mode_name}_memory.json"
    out.write_text(json.dumps({"columns": ["seconds", "life", "node_mib", "p2pd_mib"], "nodes": series}))
    skipped = counts_of(result.skipped)
    nodes = len(result.specs)
    lines = [
        f"mode {mode_name}: {nodes} nodes of the tiny preset on 127.0.0.1 (heartbeat TTL {TTL_S:g} s), "
        f"{(time.time() - began) / 60:.1f} min wall ({minutes:g} min of chaos), seed {seed}; "
        f"partitions by {'network namespaces' if result.netns else 'the RPC transport hook'}, "
        f"full disks {f'on a {disk_mib} MiB tmpfs per node' if result.disks else 'not injected (not root)'}; "
        f"clocks of two nodes +1 s and -1 s all along",
        f"completed: {done}",
        "faults injected: " + ", ".join(f"{k} {v}" for k, v in sorted(result.faults.items()))
        + (f" (not injected, no eligible node in time: {', '.join(f'{k} {v}' for k, v in sorted(skipped.items()))})"
           if skipped else ""),
        "recoveries: " + (", ".join(f"{k} {v}" for k, v in sorted(recovered.items())) or "none"),
        "at the stop: " + ("every node back at work and further than when the chaos ended" if result.drained else
                           next((e.detail for e in reversed(result.events) if e.kind == "stop"), "not stopped")),
        f"data lost: {len(lost)} failed nothing-lost checks of {len(checks)}"
        + (": " + "; ".join(f"{c.name}: {c.detail}" for c in lost) if lost else " (" + "; ".join(
            f"{c.name}: {c.detail}" for c in checks if c.detail) + ")"),
        *mem,
        f"memory samples every 10 s: bench/results/{out.name}",
    ]
    return lines, not lost and result.drained


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="minutes of chaos per mode (default 30)")
    parser.add_argument("--mode", choices=(*MODES, "all"), default="all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to BENCHMARKS.md")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="run in DIR/MODE and keep it (the nodes' logs, reports and data)")
    args = parser.parse_args()
    if args.minutes <= 0:
        parser.error("--minutes must be positive")
    ok = True
    for mode in MODES if args.mode == "all" else (args.mode,):
        if args.keep:
            (args.keep / mode).mkdir(parents=True, exist_ok=True)
        with (contextlib.nullcontext(str(args.keep / mode)) if args.keep
              else tempfile.TemporaryDirectory(prefix=f"bench-soak-{mode}-")) as tmp:
            lines, passed = soak(mode, args.minutes, args.seed, Path(tmp))
        ok = ok and passed
        if args.no_record:
            print("\n".join(lines))
        else:
            record(f"Soak with chaos: {mode} mode, {args.minutes:g} minutes", lines)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
