"""`swarmtrain schedule`: plan a skip-pipeline iteration for a scenario and compare it with the
baselines in the same simulator. Errors are one line on stderr and a non-zero exit, as in node.cli."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence

EXIT_USAGE = 2  # the same codes as node.cli
EXIT_FAILURE = 1
RANDOM_SKIP_SEEDS = 5


def add_schedule_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `schedule` subcommand to a `parser.add_subparsers()` object."""
    schedule = subparsers.add_parser(
        "schedule", help="plan skip-pipeline paths for a scenario and simulate one iteration",
        description="Plan a stage assignment and one path per microbatch for a scenario (JSON, format in "
                    "docs/scenario.md) and print its simulated iteration time next to the full-pipeline and "
                    "random-skip baselines.")
    schedule.add_argument("--scenario", required=True, metavar="FILE", help="scenario JSON file")
    schedule.add_argument("--json", action="store_true", help="end with one JSON object on the last line")
    schedule.add_argument("--timeline", metavar="OUT.svg", default=None,
                          help="write a Gantt chart of the scheduled iteration (SVG)")
    schedule.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                          help="scheduler wall-time limit (default 30 s for 20 nodes, up to 300 s for 100)")
    schedule.add_argument("--max-evaluations", type=int, default=None, metavar="N",
                          help="simulations the search may run; it is deterministic when this, not the "
                               "time budget, ends it (default by node count)")
    schedule.add_argument("--seed", type=int, default=0, help="search seed (the same seed gives the same schedule)")
    return schedule


class _UserError(Exception):
    pass


def cmd_schedule(args: argparse.Namespace) -> int:
    """Run `swarmtrain schedule`; returns the exit code."""
    from trainer.pipeline import ScenarioError, ScheduleError, SimulationError

    try:
        report, svg = _plan(args)
    except (_UserError, ScenarioError, ScheduleError, SimulationError) as error:
        print(f"swarmtrain schedule: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if svg is not None:
        try:
            Path(args.timeline).write_text(svg)
        except OSError as error:
            print(f"swarmtrain schedule: error: cannot write --timeline {args.timeline}: {error.strerror}",
                  file=sys.stderr)
            return EXIT_FAILURE
    print(_summary(report), flush=True)
    if args.json:
        print(json.dumps(report, sort_keys=True), flush=True)
    return 0


def _plan(args: argparse.Namespace) -> tuple[dict[str, Any], str | None]:
    from trainer.pipeline import full_pipeline_schedule, load_scenario, random_skip_schedule, simulate
    from trainer.pipeline.scheduler import SchedulerConfig, plan_schedule
    from trainer.pipeline.timeline import timeline_svg

    if args.time_budget is not None and args.time_budget <= 0:
        raise _UserError("--time-budget must be positive (seconds)")
    if args.max_evaluations is not None and args.max_evaluations < 1:
        raise _UserError("--max-evaluations must be at least 1")
    scenario = load_scenario(args.scenario)
    baseline = simulate(scenario, full_pipeline_schedule(scenario)).iteration_time
    random_times = [simulate(scenario, random_skip_schedule(scenario, seed)).iteration_time
                    for seed in range(RANDOM_SKIP_SEEDS)]
    plan = plan_schedule(scenario, config=SchedulerConfig(
        seed=args.seed, time_budget_s=args.time_budget, max_evaluations=args.max_evaluations))
    result = simulate(scenario, plan.schedule)
    random_skip = statistics.median(random_times)
    report = {
        "scenario": scenario.name,
        "baseline_s": baseline,
        "random_skip_s": random_skip,
        "random_skip_seeds": RANDOM_SKIP_SEEDS,
        "scheduled_s": result.iteration_time,
        "ratio_to_baseline": result.iteration_time / baseline,
        "random_skip_ratio_to_baseline": random_skip / baseline,
        "published_ratios_to_baseline": dict(scenario.anchor_ratios_to_baseline),
        "stage_of_node": {str(n): s for n, s in sorted(plan.schedule.stage_of_node.items())},
        "paths": [{"microbatch": p.microbatch, "data_node": p.data_node, "nodes": p.nodes(),
                   "stages": [0, *(s for s, _ in p.visits), 0]} for p in plan.schedule.paths],
        "scheduler": {"seed": args.seed, "evaluations": plan.evaluations, "wall_s": plan.elapsed_s,
                      "stopped_by": plan.stopped_by},
    }
    svg = None
    if args.timeline:
        labels = {n.id: n.location for n in scenario.nodes}
        svg = timeline_svg(result, stage_of_node=plan.schedule.stage_of_node, labels=labels,
                           title=f"{scenario.name}: scheduled skip pipeline")
    return report, svg


def _summary(r: dict[str, Any]) -> str:
    s = r["scheduler"]
    return "\n".join([
        f"scenario {r['scenario']}",
        f"full-pipeline baseline  {r['baseline_s']:8.2f} s",
        f"random skip (median of {r['random_skip_seeds']}) {r['random_skip_s']:8.2f} s  "
        f"ratio {r['random_skip_ratio_to_baseline']:.3f}",
        f"scheduled               {r['scheduled_s']:8.2f} s  ratio {r['ratio_to_baseline']:.3f}",
        f"scheduler: {s['evaluations']} simulations in {s['wall_s']:.1f} s (stopped by {s['stopped_by']}, "
        f"seed {s['seed']})",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry (python -m node.schedule_cli ...), the same as `swarmtrain schedule ...`."""
    parser = argparse.ArgumentParser(prog="swarmtrain")
    add_schedule_parser(parser.add_subparsers(dest="command", required=True))
    return cmd_schedule(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
