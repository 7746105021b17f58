"""Heterogeneous vs homogeneous domain expert ensembles at equal compute (HDEE), on the embedded domains.

For each seed: plan the run as `swarmtrain ensemble plan` does (a seed model judges each domain's
difficulty; the heterogeneous plan gives harder domains wider experts and more steps; the homogeneous
plan and a dense model get the same total compute, the sum of parameters x steps), train every job in
this process with the same trainer the swarm nodes use, and evaluate as `swarmtrain ensemble eval`:
per-domain validation perplexity of each expert alone, both ensembles under both combination rules,
and the dense model; then count the domains where the heterogeneous ensemble is below the homogeneous.

The swarm adds no arithmetic of its own (its nodes run the same ExpertTrainer, one job at a time, or
average in a group): training here in one process measures the plans, not the transport.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import record  # noqa: E402
from ensemble.data import batch_seed, init_seed, job_batches, three_way_split  # noqa: E402
from ensemble.evaluate import EvalSettings, evaluate_table, format_table, heterogeneous_wins, row_name  # noqa: E402
from ensemble.jobs import domain_labels, jobs_from_spec  # noqa: E402
from ensemble.plan import PlanSettings, plan, section_overrides  # noqa: E402
from ensemble.train import ExpertTrainer  # noqa: E402
from protocol.keys import generate_private_key  # noqa: E402
from protocol.runspec import EMBEDDED_DOMAINS, make_spec  # noqa: E402


def run_seed(args: argparse.Namespace, seed: int) -> tuple[dict, dict]:
    settings = PlanSettings(domains=tuple(args.domains), preset=args.preset, base_steps=args.steps, lr=args.lr,
                            heterogeneity=args.heterogeneity, seed_steps=args.seed_steps, batch_size=args.batch_size,
                            seq_len=args.seq_len, seed=seed)
    started = time.perf_counter()
    section, _ = plan(settings)
    spec = make_spec("experts", args.preset, generate_private_key(), domains=list(args.domains), seed=seed,
                     batch_size=args.batch_size, seq_len=args.seq_len, experts=section_overrides(section))
    splits = [three_way_split(d, spec.data.val_fraction, spec.experts.prior_fraction, seed) for d in spec.data.domains]
    by_source = dict(zip(spec.data.domains, splits))
    jobs = jobs_from_spec(spec)
    models = {}
    seconds = {}
    for job in jobs:
        t = time.perf_counter()
        trainer = ExpertTrainer(job, seed=init_seed(seed, job.data_key), device=args.device)
        trainer.train_steps(job.steps, job_batches([by_source[d].train for d in job.domains], args.batch_size,
                                                   args.seq_len, batch_seed(seed, job.data_key)))
        models[job.name] = trainer.model
        seconds[job.name] = time.perf_counter() - t
        print(f"seed {seed}: {job.name} {job.params:,} params x {job.steps} steps: final training loss "
              f"{trainer.last_loss:.3f} ({seconds[job.name]:.0f} s)", flush=True)
    table = evaluate_table(jobs, models, splits, domain_labels(spec.data.domains),
                           EvalSettings(seq_len=args.seq_len, max_tokens=args.max_tokens, device=args.device))
    table["budget"] = spec.experts.budget
    table["difficulty"] = dict(zip(table["domains"], spec.experts.difficulty))
    table["plan"] = {job.name: (job.params, job.steps) for job in jobs}
    table["seconds"] = time.perf_counter() - started
    print(format_table(table), flush=True)
    return table, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--domains", nargs="+", default=list(EMBEDDED_DOMAINS))
    parser.add_argument("--steps", type=int, default=300, help="steps of each homogeneous expert (sets the budget)")
    parser.add_argument("--seed-steps", type=int, default=100, help="steps of the seed model that judges difficulty")
    parser.add_argument("--heterogeneity", choices=("both", "steps", "sizes"), default="both")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=16384, help="eval tokens per domain")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tables = [run_seed(args, seed)[0] for seed in args.seeds]

    domains = tables[0]["domains"]
    het, hom = row_name("heterogeneous", "posterior"), row_name("homogeneous", "posterior")
    het_u, hom_u = row_name("heterogeneous", "uniform"), row_name("homogeneous", "uniform")

    def ppl(table: dict, name: str, domain: str) -> float:
        return next(r for r in table["rows"] if r["name"] == name)["perplexity"][domain]

    def mean(name: str, domain: str) -> float:
        return math.exp(sum(math.log(ppl(t, name, domain)) for t in tables) / len(tables))

    device = args.device if args.device == "cpu" else f"{args.device} ({torch.cuda.get_device_name(0)})"
    first = tables[0]
    lines = [f"{args.preset} preset base shape on {device}, {args.threads} torch thread(s); domains "
             f"{', '.join(domains)}; batch {args.batch_size} x {args.seq_len} bytes; homogeneous experts "
             f"{args.steps} steps each; heterogeneity {args.heterogeneity}; seed model {args.seed_steps} steps; "
             f"seeds {', '.join(map(str, args.seeds))}; eval on {first['tokens'][domains[0]]:,} tokens per domain "
             "(the eval split), the posterior prior estimated on the separate prior split",
             f"budget per ensemble and for the dense model: {first['budget']:,} parameter-steps; plan of seed "
             f"{args.seeds[0]}: " + ", ".join(f"{n} {p:,} x {s}" for n, (p, s) in first["plan"].items()),
             "difficulty (seed model loss, nats/byte) of seed " + f"{args.seeds[0]}: " +
             ", ".join(f"{d} {v:.3f}" for d, v in first["difficulty"].items())]
    for table, seed in zip(tables, args.seeds):
        wins = heterogeneous_wins(table, "posterior")
        wins_u = heterogeneous_wins(table, "uniform")
        cells = "; ".join(f"{d}: het {ppl(table, het, d):.3f} vs hom {ppl(table, hom, d):.3f} (uniform rule "
                          f"{ppl(table, het_u, d):.3f} vs {ppl(table, hom_u, d):.3f}), dense {ppl(table, 'dense', d):.3f}"
                          for d in domains)
        lines.append(f"seed {seed}: perplexity {cells}; **heterogeneous wins {len(wins)} of {len(domains)}** "
                     f"domains (posterior rule), {len(wins_u)} (uniform rule); {table['seconds']:.0f} s")
        experts = "; ".join(f"{r['name']} " + " ".join(f"{r['perplexity'][d]:.2f}" for d in domains)
                            for r in table["rows"] if r["kind"] == "expert")
        lines.append(f"seed {seed}, each expert alone ({' / '.join(domains)}): {experts}")
    if len(tables) > 1:
        cells = "; ".join(f"{d}: het {mean(het, d):.3f} vs hom {mean(hom, d):.3f}, dense {mean('dense', d):.3f}"
                          for d in domains)
        wins = sum(mean(het, d) < mean(hom, d) for d in domains)
        lines.append(f"geometric mean over the seeds: {cells}; heterogeneous wins {wins} of {len(domains)}")
    if args.no_record:
        print("\n".join(lines))
    else:
        record("Domain expert ensembles: heterogeneous vs homogeneous at equal compute", lines)


if __name__ == "__main__":
    main()
