"""Skip pipeline on one machine with gcp20's links emulated, scaled down: wall time per iteration of
the scheduler's paths vs the full pipeline vs network-blind random skip, each against the leader's
simulated prediction.

For each policy (run spec ``pipeline.schedule``) the script starts a bootstrap peer and the same
node processes at the same gcp20 locations (``--emulate-links``), trains the tiny preset for a
number of iterations, and reads the reports: the wall time of each iteration that ran on the
leader's published schedule (data nodes' loss timestamps, consecutive iterations), and the
iteration time the leader's simulator predicted for that schedule from its own probes of the links
and the nodes' reported compute times.

Scaling (docs/pipeline.md, "Link emulation"): bytes_scale = the tiny preset's activation bytes per
microbatch / gcp20's (32 MiB); time_scale is a flag (default 0.05): gcp20's 3.5 s transfers take
175 ms here.

    python bench/bench_pipeline_links.py [--iterations 12] [--time-scale 0.05]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import iteration_phases, record  # noqa: E402
from node.zo_demo import _first_maddr, _start, read_reports, stop_processes  # noqa: E402
from trainer.model import ModelConfig  # noqa: E402
from trainer.pipeline.scenario import shipped_scenario  # noqa: E402

STAGES = 4
REPLICAS = 2  # per stage, data nodes included
# one gcp20 location per node; NL and London are never both used (their link in the table is
# 1/1024 of its neighbours', most likely a unit slip: docs/scenario.md)
LOCATIONS = ["Belgium", "Canada", "Germany", "Iowa", "Japan", "LA", "Oregon", "Singapore"]
POLICIES = ("skip", "full", "random_skip")


def write_spec(workdir: Path, policy: str, iterations: int, microbatches: int, memory: int) -> Path:
    from protocol.keys import generate_private_key
    from protocol.runspec import dumps_spec, make_spec

    spec = make_spec("pipeline", "tiny", generate_private_key(), name=f"bench-links-{policy}", stages=STAGES,
                     path_length=STAGES if policy == "full" else STAGES - 1, swap="none", microbatches=microbatches,
                     microbatch_size=4, seq_len=64, memory=memory, steps=iterations, lr=3e-3, schedule=policy,
                     heartbeat_interval_s=1.0, heartbeat_ttl_s=8.0, min_nodes=STAGES * REPLICAS)
    path = workdir / f"{policy}.toml"
    path.write_text(dumps_spec(spec))
    return path


def run_policy(workdir: Path, policy: str, links: Path, args) -> list[dict]:
    spec = write_spec(workdir, policy, args.iterations, args.microbatches, args.memory)
    procs = []
    try:
        boot = _start(workdir, f"{policy}-bootstrap", ["bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0"])
        procs.append(boot)
        peer = _first_maddr(boot, 60)
        names = []
        for i in range(STAGES * REPLICAS):
            stage = i % STAGES
            name = f"n{i}"
            names.append(name)
            role = ["--role", "data"] if stage == 0 else ["--stage", str(stage)]
            procs.append(_start(workdir, f"{policy}-{name}", [
                "node", "--run", str(spec), "--data-dir", str(workdir / policy / name), "--initial-peers", peer,
                "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--device", "cpu", "--public-name", name,
                "--emulate-links", str(links), "--report", str(workdir / f"{policy}-{name}.json"), *role]))
        deadline = time.monotonic() + args.timeout
        while not all(p.popen.poll() is not None for p in procs[1:]):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{policy}: the swarm did not finish within {args.timeout:.0f} s; logs in {workdir}")
            time.sleep(0.5)
        return read_reports(procs[1:], [workdir / f"{policy}-{n}.json" for n in names])
    finally:
        stop_processes(procs)


def measure(reports: list[dict]) -> dict:
    """Per iteration that ran on the leader's schedule: the wall time from one iteration's end to the
    next's on the data nodes, the part of it spent on the microbatches (forward and backward along
    the paths: what the simulator models), and the simulator's prediction for that schedule."""
    published = {p["version"]: p for r in reports for p in r["published"]}
    data = [r for r in reports if r["stage"] == 0]
    ends, paths_s = iteration_phases(data)
    on_leader: dict[int, set] = {}
    for r in data:
        for it, source, version in r["plans"]:
            on_leader.setdefault(it, set()).add(version if source == "leader" else None)
    total, paths, predicted = [], [], []
    for it in sorted(ends):
        versions = on_leader.get(it, {None})
        if it - 1 not in ends or len(versions) != 1 or None in versions:
            continue  # the first iteration, or one that some data node planned locally or on another version
        total.append(ends[it] - ends[it - 1])
        paths.append(paths_s[it])
        predicted.append(published[next(iter(versions))]["predicted_s"])
    median = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
    return {
        "iterations": len(total), "total_s": median(total), "paths_s": median(paths), "predicted_s": median(predicted),
        "loss_end": [round(r["losses"][-1][2], 3) for r in data if r["losses"]],
        "skipped": sum(r["skipped"] for r in data), "rerouted": sum(r["rerouted"] for r in data),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--microbatches", type=int, default=6, help="per data node per iteration (gcp20: 6)")
    parser.add_argument("--memory", type=int, default=3, help="microbatches held per node (gcp20: 3)")
    parser.add_argument("--time-scale", type=float, default=0.05)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per policy")
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    args = parser.parse_args()

    gcp = shipped_scenario()
    cfg = ModelConfig.from_preset("tiny")
    local_bytes = 4 * 64 * cfg.d_model * 4  # microbatch_size x seq_len x d_model x fp32
    bytes_scale = local_bytes / (gcp.activation_bytes_per_sample * gcp.samples_per_microbatch)
    results = {}
    with tempfile.TemporaryDirectory(prefix="swarmtrain-bench-links-") as tmp:
        workdir = Path(tmp)
        links = workdir / "links.json"
        links.write_text(json.dumps({"scenario": "skippipe_gcp20", "time_scale": args.time_scale,
                                     "bytes_scale": bytes_scale,
                                     "locations": {f"n{i}": loc for i, loc in enumerate(LOCATIONS)}}))
        for policy in args.policies:
            began = time.monotonic()
            results[policy] = measure(run_policy(workdir, policy, links, args))
            results[policy]["wall_s"] = round(time.monotonic() - began, 1)
            print(policy, json.dumps(results[policy]), flush=True)
    lines = [f"{STAGES * REPLICAS} node processes + bootstrap (tiny preset, {STAGES} stages x {REPLICAS} replicas, "
             f"2 data nodes, {args.microbatches} microbatches of 4 x 64 tokens per data node, memory {args.memory}), "
             f"links of gcp20 at {', '.join(LOCATIONS)}, time_scale {args.time_scale}, bytes_scale {bytes_scale:.5f}; "
             f"{args.iterations} iterations per policy, the same machine and bench run",
             "per policy: median wall time per iteration (one iteration's end to the next's, reduce and step "
             "included), the part spent on the microbatches' paths, the simulator's prediction for the published "
             "schedule (it models the paths only) and its error against the paths' time"]
    base = results.get("full", {}).get("total_s")
    for policy, r in results.items():
        if r["total_s"] is None:
            lines.append(f"{policy}: no iteration ran on the leader's schedule")
            continue
        ratio = f" ({r['total_s'] / base:.2f}x full)" if base else ""
        lines.append(f"{policy}: {r['total_s']:.3f} s per iteration{ratio}; paths {r['paths_s']:.3f} s, predicted "
                     f"{r['predicted_s']:.3f} s, error {r['paths_s'] / r['predicted_s'] - 1:+.0%}; "
                     f"{r['iterations']} iterations timed, {r['skipped']} hops skipped, {r['rerouted']} rerouted, "
                     f"final loss {r['loss_end']}")
    record("Skip pipeline with emulated gcp20 links: schedule vs full pipeline vs random skip", lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
