"""Skip pipeline at a real model size on one GPU: node processes share the device, gcp20's links are
emulated scaled to the run, and one stage's only node is killed and rebuilt from its neighbours.

Three swarms of the same processes (2 data nodes, one node for each of stages 1..S-1, one spare;
node i at gcp20 location LOCATIONS[i], ``--emulate-links``), one after another in this run:
1. ``pipeline.schedule = "skip"`` (the scheduler's paths, path_length S - 1);
2. ``pipeline.schedule = "full"`` (full pipelines through every stage, SkipPipe's DT-FM* baseline);
3. skip again, and the only node of stage ``--kill-stage`` is killed (SIGKILL) at ``--kill-at``; the
   spare rebuilds the stage from its neighbours (CheckFree, swap none so no stage has a swap partner).
Figures: median wall time per iteration on the leader's schedule (bench_pipeline_links.measure),
tokens/s from it, the simulator's prediction, the recovery's time (kill -> serving again, split into
detection and restore), and the loss curves as a PNG.

Scaling of the links (docs/pipeline.md, "Link emulation"): bytes_scale = this run's activation bytes
per microbatch / gcp20's; time_scale = this device's forward time of one microbatch through one
stage (measured here, alone on the device, before the swarms start) / gcp20's (sec_per_layer_sample
x layers_per_stage x samples_per_microbatch), so that transfers shrink as compute does and the
compute : transfer ratio of gcp20 holds.

    python bench/bench_scale_pipeline.py                      # GPU: 350m, 4 stages
    OMP_NUM_THREADS=1 python bench/bench_scale_pipeline.py --preset tiny --device cpu \\
        --iterations 8 --kill-at 3 --seq-len 64 --microbatch-size 4 --no-record   # CPU smoke test
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import REPO, iteration_phases, record  # noqa: E402
from bench.plot_png import line_chart  # noqa: E402
from node.pipeline_demo import recoveries_of, run_pipeline_swarm, summarize_pipeline, write_pipeline_spec  # noqa: E402
from node.zo_demo import DemoError  # noqa: E402
from trainer.model import LM, ModelConfig, stage_block_ranges  # noqa: E402
from trainer.pipeline.scenario import shipped_scenario  # noqa: E402
from trainer.recovery.failures import Failure  # noqa: E402

LOCATIONS = ["Belgium", "Canada", "Germany", "Iowa", "Japan", "LA", "Oregon", "Singapore"]
COLOUR_NAMES = ["blue", "red", "green", "purple", "orange", "cyan"]


def stage_forward_s(cfg: ModelConfig, stages: int, microbatch_size: int, seq_len: int, device: torch.device) -> float:
    """Median forward time of one microbatch through one stage's blocks (the whole model's forward
    over the stages), alone on the device."""
    model = LM(cfg, seed=0).to(device)
    x = torch.randint(0, cfg.vocab_size, (microbatch_size, seq_len), device=device)
    times = []
    with torch.no_grad():
        for i in range(13):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            began = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= 3:  # warm-up: kernels chosen, memory pooled
                times.append(time.perf_counter() - began)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return statistics.median(times) / stages


def measure(reports: list[dict]) -> dict:
    """Per iteration after the first: the wall time from the previous iteration's end to this one's
    over the data nodes (reduce and step included), the part spent on the microbatches' paths, and
    where the data nodes' paths came from (the leader's schedule or their own plan). Unlike
    bench_pipeline_links.measure, iterations on local plans count too: the full-pipeline schedule
    with one replica per stage puts every microbatch on one data node, which the runtime refuses
    (a schedule must give each data node its own microbatches), so there both plan full paths
    themselves."""
    published = {p["version"]: p for r in reports for p in r.get("published", [])}
    data = [r for r in reports if r["stage"] == 0]
    ends, paths_s = iteration_phases(data)
    total = [ends[it] - ends[it - 1] for it in sorted(ends) if it - 1 in ends]
    paths = [paths_s[it] for it in sorted(ends) if it - 1 in ends]
    sources = [source for r in data for _, source, _ in r["plans"]]
    predicted = [published[v]["predicted_s"] for r in data for _, source, v in r["plans"]
                 if source == "leader" and v in published]
    median = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
    return {"timed": len(total), "total_s": median(total), "mean_s": sum(total) / len(total) if total else None,
            "paths_s": median(paths), "predicted_s": median(predicted),
            "on_leader": sources.count("leader"), "planned": len(sources),
            "skipped": sum(r["skipped"] for r in data), "rerouted": sum(r["rerouted"] for r in data)}


def names_of(nodes: int, spares: int, stages: int) -> list[str]:
    """The public names run_pipeline_swarm gives node i."""
    return [f"stage{i % stages}-{i}" for i in range(nodes)] + [f"spare{j}" for j in range(spares)]


def run_one(workdir: Path, label: str, policy: str, kill: bool, links: Path, args) -> dict:
    nodes = args.stages - 1 + args.data_nodes  # node i serves stage i % stages: data, 1..S-1, a second data node
    workdir.mkdir(parents=True, exist_ok=True)
    spec = write_pipeline_spec(
        workdir, args.stages, args.iterations, nodes, preset=args.preset, name=f"bench-scale-{label}",
        path_length=args.stages if policy == "full" else args.stages - 1, swap="none", schedule=policy,
        recovery="checkfree", microbatches=args.microbatches, microbatch_size=args.microbatch_size,
        seq_len=args.seq_len, memory=args.memory, lr=args.lr, heartbeat_interval_s=args.heartbeat,
        heartbeat_ttl_s=args.ttl, move_after_s=600.0)
    failures = [Failure(args.kill_at, args.kill_stage)] if kill else []
    extra = {i: ["--emulate-links", str(links)] for i in range(nodes + 1)}
    began = time.time()
    try:
        reports, kills = run_pipeline_swarm(workdir, spec, nodes, args.stages, args.timeout, device=args.device,
                                            spares=1, failures=failures, extra_args=extra)
    except DemoError as error:
        for log in sorted(workdir.glob("*.log")):
            print(f"---- {log.name} (tail) ----\n{log.read_text(errors='replace')[-3000:]}", flush=True)
        raise SystemExit(f"{label}: {error}") from None
    served = [r for r in reports if r["stage"] is not None]
    out = measure(served)
    out.update(summarize_pipeline(served, args.stages))
    data = [r for r in served if r["stage"] == 0]
    out["tokens_per_iteration"] = sum(r["tokens"] for r in data) / max(1, out["iterations"])
    out["wall_s"] = round(time.time() - began, 1)
    out["kills"] = [{k: v for k, v in kill.items() if k != "at"} for kill in kills]
    out["recoveries"] = recoveries_of(reports, kills)
    # the loss curve: the data nodes' mean loss per iteration against seconds since the run's first loss
    by_iteration: dict[int, list[tuple[float, float]]] = {}
    for r in data:
        for it, at, loss in r["losses"]:
            by_iteration.setdefault(it, []).append((at, loss))
    t0 = min((at for pts in by_iteration.values() for at, _ in pts), default=began)
    out["curve"] = [(max(at for at, _ in pts) - t0, sum(loss for _, loss in pts) / len(pts))
                    for _, pts in sorted(by_iteration.items())]
    out["kill_s"] = [k["at"] - t0 for k in kills if k["node"]]
    return out


def report_lines(results: dict[str, dict], args, *, gpu: str, cfg: ModelConfig, local_fwd: float, gcp_fwd: float,
                 time_scale: float, bytes_scale: float, local_bytes: int, names: list[str]) -> list[str]:
    """Draws the loss curves to ``args.png``; returns the BENCHMARKS.md lines."""
    series = [(label, r["curve"]) for label, r in results.items()]
    ys = [y for _, pts in series for _, y in pts]
    for label, r in results.items():
        for at in r["kill_s"]:
            series.append((f"kill in '{label}'", [(at, min(ys)), (at, max(ys))]))
    args.png.parent.mkdir(parents=True, exist_ok=True)
    legend = line_chart(args.png, series)

    full = results["full"]["total_s"] if "full" in results else None
    lines = [
        f"GPU: {gpu}, torch {torch.__version__}; fp32 weights and compute, activations fp32 on the wire",
        f"{args.preset} preset, {cfg.param_count():,} parameters, {args.stages} stages of "
        f"{[len(r) for r in stage_block_ranges(cfg.n_layers, args.stages)]} blocks; microbatches of "
        f"{args.microbatch_size} x {args.seq_len} tokens, {args.microbatches} per data node per iteration, memory "
        f"{args.memory}, AdamW lr {args.lr}, {args.iterations} iterations per swarm",
        f"processes, all on the one device: bootstrap + {args.data_nodes} data node(s) + 1 node for each of stages 1..{args.stages - 1} "
        f"+ 1 spare, at gcp20's {', '.join(LOCATIONS[:len(names)])}; links emulated (--emulate-links) with "
        f"time_scale {time_scale:.5f} (one stage's forward of a microbatch: {1000 * local_fwd:.2f} ms here alone on "
        f"the device, gcp20's {gcp_fwd:.2f} s) and bytes_scale {bytes_scale:.5f} ({local_bytes / 2**20:.0f} MiB of "
        "activations per microbatch here, gcp20's 32 MiB); heartbeat every "
        f"{args.heartbeat} s, dead after {args.ttl} s",
        "per swarm: median wall time per iteration after the first (one iteration's end to the next's over the data "
        "nodes, reduce and step included), tokens/s = tokens of an iteration / that time, the part spent on the "
        "paths and the leader's simulated time for its published schedule. The full run's leader publishes one "
        "full pipeline (one replica per stage) carrying all microbatches on one data node; the runtime takes a "
        "schedule only when it gives each data node its own microbatches, so there both data nodes plan full "
        "paths (every stage, path_length = stages) themselves",
    ]
    for label, r in results.items():
        if r["total_s"] is None:
            lines.append(f"{label}: no iteration ran on the leader's schedule; whole run {r['tokens_per_s']} tokens/s")
            continue
        ratio = f" = {r['total_s'] / full:.2f}x full" if full else ""
        predicted = f", the leader's simulator predicted {r['predicted_s']:.3f} s" if r["predicted_s"] else ""
        lines.append(
            f"{label}: **{r['tokens_per_iteration'] / r['total_s']:,.0f} tokens/s**, median {r['total_s']:.3f} s per "
            f"iteration{ratio} (mean {r['mean_s']:.3f} s; paths {r['paths_s']:.3f} s{predicted}; {r['timed']} "
            f"iterations timed; the data nodes followed the leader's schedule in {r['on_leader']} of "
            f"{r['planned']} iterations, planned locally in the rest); whole run from the reports "
            f"{r['tokens_per_s']:,} tokens/s; loss "
            f"{r['loss_start']:.3f} -> {r['loss_end']:.3f}; {r['skipped']} hops skipped, {r['rerouted']} rerouted; "
            f"replicas identical at the end: {'yes' if r['replicas_identical'] else 'NO'}; swarm wall-clock "
            f"{r['wall_s']:.0f} s with start-up")
    killed = results.get("skip + kill", {"recoveries": [], "kills": []})
    found = [rec for rec in killed["recoveries"] if "mttr_s" in rec]
    if found:
        rec = found[0]
        lines.append(f"recovery in 'skip + kill': stage {rec['stage']}'s only node killed at iteration "
                     f"{killed['kills'][0]['iteration']}, rebuilt by {rec['method']} on {rec['node']} at iteration "
                     f"{rec['iteration']}: **serving again {rec['mttr_s']:.2f} s after the kill** (noticed after "
                     f"{rec.get('detection_s', float('nan')):.2f} s; fetching neighbours' weights and rebuilding "
                     f"{rec['restore_s']:.2f} s)")
    elif "skip + kill" in results:
        lines.append(f"recovery in 'skip + kill': none recorded (kills {killed['kills']}, recoveries "
                     f"{killed['recoveries']})")
    lines.append(f"loss curves (data nodes' mean loss per iteration against seconds since each swarm's first "
                 f"iteration): `{args.png.relative_to(REPO) if args.png.is_relative_to(REPO) else args.png}`; "
                 + ", ".join(f"{COLOUR_NAMES[i % len(COLOUR_NAMES)]}: {name}" for i, (name, _) in enumerate(legend)))
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="350m")
    parser.add_argument("--device", default="cuda", help="cuda or cpu (a smoke test)")
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--data-nodes", type=int, default=1, choices=(1, 2),
                        help="2: stage 0 has two replicas, which reduce its gradients (~87M for 350m) every iteration")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--microbatches", type=int, default=6, help="per data node per iteration (gcp20: 6)")
    parser.add_argument("--microbatch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--memory", type=int, default=3, help="microbatches held per node (gcp20: 3)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--kill-stage", type=int, default=2, help="a middle stage: rebuilt from both neighbours")
    parser.add_argument("--kill-at", type=int, default=5, help="iteration at which its node is killed")
    parser.add_argument("--heartbeat", type=float, default=0.5, help="swarm.heartbeat_interval_s")
    parser.add_argument("--ttl", type=float, default=4.0, help="swarm.heartbeat_ttl_s")
    parser.add_argument("--timeout", type=float, default=400.0, help="seconds for each swarm")
    parser.add_argument("--png", type=Path, default=REPO / "bench" / "results" / "scale_pipeline_loss.png")
    parser.add_argument("--keep", type=Path, default=None, help="keep the swarms' logs and reports here")
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to BENCHMARKS.md")
    parser.add_argument("--runs", nargs="+", choices=("skip", "full", "kill"), default=["skip", "full", "kill"],
                        help="which swarms to run: skip, full (the baseline), kill (skip with one stage killed)")
    args = parser.parse_args()
    if not 0 < args.kill_stage < args.stages - 1:
        sys.exit("--kill-stage must be a middle stage (1 .. stages - 2): CheckFree rebuilds it from both neighbours")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU is visible; use --device cpu for a smoke test")
    if device.type == "cpu":
        torch.set_num_threads(1)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none (CPU)"
    cfg = ModelConfig.from_preset(args.preset)
    gcp = shipped_scenario()
    local_fwd = stage_forward_s(cfg, args.stages, args.microbatch_size, args.seq_len, device)
    gcp_fwd = gcp.forward_s(gcp.nodes[0].id)
    time_scale = local_fwd / gcp_fwd
    local_bytes = args.microbatch_size * args.seq_len * cfg.d_model * 4  # fp32 activations on the wire
    bytes_scale = local_bytes / (gcp.activation_bytes_per_sample * gcp.samples_per_microbatch)
    print(f"one stage's forward of a microbatch here: {1000 * local_fwd:.2f} ms; gcp20's {gcp_fwd:.3f} s -> "
          f"time_scale {time_scale:.5f}, bytes_scale {bytes_scale:.5f}", flush=True)

    runs = {label: how for label, how in
            {"skip": ("skip", False), "full": ("full", False), "skip + kill": ("skip", True)}.items()
            if label.split(" + ")[-1] in args.runs}
    results: dict[str, dict] = {}
    keep = args.keep
    tmp = None
    if keep is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-scale-pipeline-")
        keep = Path(tmp.name)
    else:
        shutil.rmtree(keep, ignore_errors=True)
    try:
        keep.mkdir(parents=True, exist_ok=True)
        links = keep / "links.json"
        names = names_of(args.stages - 1 + args.data_nodes, 1, args.stages)
        links.write_text(json.dumps({"scenario": "skippipe_gcp20", "time_scale": time_scale,
                                     "bytes_scale": bytes_scale,
                                     "locations": dict(zip(names, LOCATIONS))}))
        for label, (policy, kill) in runs.items():
            results[label] = run_one(keep / label.replace(" + ", "-"), label, policy, kill, links, args)
            shown = {k: v for k, v in results[label].items() if k != "curve"}
            print(f"{label}: {json.dumps(shown)}", flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()

    lines = report_lines(results, args, gpu=gpu, cfg=cfg, local_fwd=local_fwd, gcp_fwd=gcp_fwd,
                         time_scale=time_scale, bytes_scale=bytes_scale, local_bytes=local_bytes, names=names)
    if args.no_record:
        print("\n".join("- " + line for line in lines))
    else:
        record(f"Skip pipeline on one GPU, {args.preset}, emulated gcp20 links, one stage killed", lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
