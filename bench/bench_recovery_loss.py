"""Loss against wall-clock under stage failures: CheckFree+, CheckFree, checkpoint-and-restart,
random re-initialisation and no failures, the same failure schedule for each (per rate).

A local swarm of node processes (tiny preset, 4 stages of one block: one data node and one node per
stage, plus one spare per scheduled failure) trains for a fixed number of iterations while the
harness kills (SIGKILL) the nodes the schedule names. The schedule is drawn per hourly failure rate
h from one seed: each middle stage fails during an iteration with p = 1 - (1 - h)^(t / 3600),
where t is the *real* iteration time a demo iteration stands for (``--real-iteration-s``; the
demo runs ``--time-scale`` times faster than the run it models, which also scales the
checkpoint baseline's restart delay). A stage cannot fail again for ``--min-gap`` iterations.

The loss is the validation loss of the swarm's model over time: every node writes its stage's
weights every ``--snapshot-every`` iterations (``swarmtrain node --snapshot-dir``); afterwards the
model the swarm held at each of the data node's snapshots (the stages that stepped that iteration; a
lost stage is skipped, as the pipeline skips it) is evaluated along the full path on the run's
validation split (the same windows for every run). The target is the no-failure run's validation
loss at 75 % of its snapshots; each run reports the wall-clock seconds until its validation loss
first reaches it. The data node's training loss (on batches it has not seen) is reported beside it.

    python bench/bench_recovery_loss.py [--iterations 120] [--rates 0.05 0.10 0.16]

On a machine of many cores, ``--parallel N --cpus-per-swarm K`` runs N swarms at once, each pinned
to its own K cores (its processes inherit the affinity), so that e.g. 8 swarms on 16 cores each run
as on a 2-core machine and the iteration time, which the failure schedule is scaled to, stays
that of one.
"""
from __future__ import annotations

import argparse
import os
import queue
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO, record  # noqa: E402
from bench.plot_png import line_chart  # noqa: E402
from node.model_cli import path_loss, validation_windows  # noqa: E402
from node.pipeline_demo import recoveries_of, run_pipeline_swarm, write_pipeline_spec  # noqa: E402
from node.pipeline_node import stage_module  # noqa: E402
from node.zo_demo import DemoError  # noqa: E402
from protocol.runspec import load_spec  # noqa: E402
from trainer.pipeline.snapshots import list_snapshots, load_snapshot, models_over_time  # noqa: E402
from trainer.recovery.failures import failure_probability, sample_failures  # noqa: E402

STAGES = 4
METHODS = {  # name: run spec settings
    "CheckFree+": dict(swap="checkfree_plus", recovery="checkfree"),
    "CheckFree": dict(swap="none", recovery="checkfree"),
    "checkpoint-restart": dict(swap="none", recovery="checkpoint"),
    "random re-init": dict(swap="none", recovery="random"),
}


def smooth(points: list[tuple[float, float]], n: int = 5) -> list[tuple[float, float]]:
    return [(points[i][0], sum(y for _, y in points[max(0, i - n + 1):i + 1]) / len(points[max(0, i - n + 1):i + 1]))
            for i in range(len(points))]


VAL_TOKENS_PER_DOMAIN = 8192


def validation_curve(snapshot_root: Path, spec_path: Path, start: float) -> list[tuple[float, float]]:
    """(seconds since ``start``, validation loss) of the model at each data-node snapshot."""
    spec = load_spec(spec_path)
    inputs, targets = validation_windows(spec.data.domains, spec.data.val_fraction, spec.train.seed,
                                         spec.model.seq_len, VAL_TOKENS_PER_DOMAIN)
    stages = [stage_module(spec, s) for s in range(STAGES)]
    curve = []
    for head, parts in models_over_time(list_snapshots(snapshot_root), STAGES, slack_s=30.0):
        for stage, snapshot in [(0, head), *parts.items()]:
            stages[stage].load_state_dict(load_snapshot(snapshot))
        curve.append((head.at - start, path_loss(stages, inputs, targets, sorted(parts), 64)))
    return curve


def run(workdir: Path, settings: dict, failures, args) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    spec = write_pipeline_spec(workdir, STAGES, args.iterations, STAGES, blocks_per_stage=[1] * STAGES,
                               path_length=STAGES, move_after_s=600.0, heartbeat_interval_s=0.5, heartbeat_ttl_s=4.0,
                               checkpoint_every=args.checkpoint_every,
                               restart_delay_s=round(args.restart_s * args.time_scale, 3), **settings)
    snapshot_args = ["--snapshot-dir", str(workdir / "snapshots"), "--snapshot-every", str(args.snapshot_every)]
    checkpoint_args = (["--checkpoint-dir", str(workdir / "checkpoints")] if settings.get("recovery") == "checkpoint"
                       else [])
    extra = {i: snapshot_args + checkpoint_args for i in range(STAGES + len(failures))}
    began = time.time()
    reports, kills = run_pipeline_swarm(workdir, spec, STAGES, STAGES, args.limit_s, spares=len(failures),
                                        failures=failures, extra_args=extra)
    data = next(r for r in reports if r["stage"] == 0 and r["losses"])
    start = data["losses"][0][1]
    train = [(t - start, loss) for _, t, loss in data["losses"]]
    return {"curve": validation_curve(workdir / "snapshots", spec, start), "train": smooth(train),
            "wall_s": time.time() - began, "kills": len(kills), "recoveries": recoveries_of(reports, kills),
            # a failure due while its stage had no running replica (still being rebuilt) kills nothing
            "missed": [f"stage {k['stage']} at {k['iteration']}" for k in kills if k["node"] is None],
            "iterations": len(train)}


@contextmanager
def run_folder(keep: Path | None, name: str) -> Iterator[Path]:
    """A run's working folder: under ``keep`` (kept), or a temporary one."""
    if keep is not None:
        folder = keep / name.replace(" ", "-").replace("+", "plus")
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="bench-loss-") as tmp:
        yield Path(tmp)


def shown(path: Path) -> str:
    """A plot's path as BENCHMARKS.md names it: relative to the repository when it is inside."""
    full, repo = path.resolve(), REPO.resolve()
    return str(full.relative_to(repo)) if full.is_relative_to(repo) else str(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=120)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.05, 0.10, 0.16])
    parser.add_argument("--real-iteration-s", type=float, default=300.0,
                        help="the real iteration time a demo iteration stands for")
    parser.add_argument("--time-scale", type=float, default=1 / 750,
                        help="demo time / real time (a demo iteration takes about 0.4 s here)")
    parser.add_argument("--restart-s", type=float, default=300.0, help="real restart time of the checkpoint baseline")
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--min-gap", type=int, default=25)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--snapshot-every", type=int, default=5, help="iterations between validation points")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"), help="folder for the PNG plots")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS), metavar="METHOD",
                        help=f"the recoveries compared (default all: {', '.join(METHODS)})")
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep every run's folder (logs, reports, snapshots) under this folder")
    parser.add_argument("--limit-s", type=float, default=900.0,
                        help="a swarm still running after this many seconds is recorded as not finished")
    parser.add_argument("--parallel", type=int, default=1, help="swarms run at once")
    parser.add_argument("--cpus-per-swarm", type=int, default=0,
                        help="pin each swarm (all its processes) to its own this many cores (0: no pinning)")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    if args.parallel < 1 or args.cpus_per_swarm < 0:
        parser.error("--parallel must be at least 1 and --cpus-per-swarm at least 0")
    cores = sorted(os.sched_getaffinity(0))
    if args.cpus_per_swarm and args.parallel * args.cpus_per_swarm > len(cores):
        parser.error(f"--parallel {args.parallel} x --cpus-per-swarm {args.cpus_per_swarm} needs more than the "
                     f"{len(cores)} cores this process may use")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"{STAGES} stages of the tiny preset (one block each): one data node, one node per stage, a spare per "
             f"scheduled failure, on 127.0.0.1; {args.iterations} iterations; a demo iteration stands for "
             f"{args.real_iteration_s:.0f} s of a real run (time scale {args.time_scale:.4g}); checkpoint baseline: "
             f"every {args.checkpoint_every} iterations, restart {args.restart_s:.0f} s real = "
             f"{args.restart_s * args.time_scale:.2f} s here; loss = validation loss of the swarm's model (weight "
             f"snapshots every {args.snapshot_every} iterations, evaluated afterwards on {VAL_TOKENS_PER_DOMAIN} "
             "validation tokens per domain along the full path of the stages then serving; see the script's "
             "docstring); train = the data node's training loss, smoothed over 5 iterations"]
    if args.parallel > 1 or args.cpus_per_swarm:
        lines.append(f"{args.parallel} swarm(s) at once" + (f", each pinned to {args.cpus_per_swarm} of the "
                     f"{len(cores)} cores" if args.cpus_per_swarm else ""))
    slots: queue.Queue = queue.Queue()
    for i in range(args.parallel):
        slots.put(cores[i * args.cpus_per_swarm:(i + 1) * args.cpus_per_swarm] if args.cpus_per_swarm else None)

    def pinned(name: str, settings: dict, failures) -> dict | str:
        """One swarm on a free slot of cores; a swarm that hangs or fails gives its error's text."""
        slot = slots.get()
        try:
            if slot is not None:
                os.sched_setaffinity(0, slot)  # this thread: the processes it starts inherit it
            with run_folder(args.keep, name) as folder:
                return run(folder, settings, failures, args)
        except DemoError as error:  # one swarm that hangs or fails does not lose the others' figures
            return f"did not finish ({error})"
        finally:
            if slot is not None:
                os.sched_setaffinity(0, cores)
            slots.put(slot)

    schedules = {rate: sample_failures(rate, args.real_iteration_s, STAGES, args.iterations, args.seed,
                                       min_gap=args.min_gap) for rate in args.rates}
    with ThreadPoolExecutor(args.parallel) as pool:
        base_job = pool.submit(pinned, "none", dict(swap="none", recovery="checkfree"), [])
        jobs = {(rate, name): pool.submit(pinned, f"h{round(rate * 100):02d}-{name}", METHODS[name], schedules[rate])
                for rate in args.rates for name in args.methods}
        base = base_job.result()
        if isinstance(base, str):
            raise SystemExit(f"the run without failures {base}")
        target_at = base["curve"][int(0.75 * (len(base["curve"]) - 1))]
        target = target_at[1]

        def reach(curve) -> str:
            t = next((t for t, y in curve if y <= target), None)
            return f"{t:.1f} s" if t is not None else "not reached"

        lines.append(f"no failures: target validation loss {target:.3f} (its loss at 75 % of the run) reached at "
                     f"{reach(base['curve'])}; final {base['curve'][-1][1]:.3f} after {base['curve'][-1][0]:.1f} s "
                     f"(train {base['train'][-1][1]:.3f})")
        print(lines[-1], flush=True)
        for rate in args.rates:
            p = failure_probability(rate, args.real_iteration_s)
            failures = schedules[rate]
            schedule = ", ".join(f"stage {f.stage} at {f.iteration}" for f in failures) or "none drawn"
            series = [("no failures", base["curve"])]
            parts = []
            for name in args.methods:
                result = jobs[(rate, name)].result()
                if isinstance(result, str):
                    parts.append(f"{name}: {result}")
                    print(f"h={rate}: {parts[-1]}", flush=True)
                    continue
                series.append((name, result["curve"]))
                mttr = [r["mttr_s"] for r in result["recoveries"] if "mttr_s" in r]
                parts.append(f"{name}: target at {reach(result['curve'])}, final {result['curve'][-1][1]:.3f} after "
                             f"{result['curve'][-1][0]:.1f} s (train {result['train'][-1][1]:.3f}; "
                             f"{result['iterations']} iterations trained"
                             + (f", recoveries {', '.join(r['method'] for r in result['recoveries'])}" if mttr else "")
                             + (f", mttr {sum(mttr) / len(mttr):.1f} s" if mttr else "")
                             + (f"; not injected, no process served the stage then: {', '.join(result['missed'])}"
                                if result["missed"] else "") + ")")
                print(f"h={rate}: {parts[-1]}", flush=True)
            png = out / f"recovery_loss_h{round(rate * 100):02d}.png"
            legend = line_chart(png, series)
            colours = "; ".join(f"{name} rgb{colour}" for name, colour in legend)
            lines.append(f"h = {rate:.0%}/hour (p = {p:.4f} per stage per iteration; failures: {schedule}): "
                         + "; ".join(parts) + f"; plot `{shown(png)}` ({colours})")
    if args.no_record:
        print("\n".join(lines))
    else:
        record("Neighbour recovery: loss against wall-clock under failures", lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
