"""Loss under Byzantine peers, with and without the defences, against the honest run (same seeds).

zo: ``--zo-nodes`` node processes on 127.0.0.1 (16 by default), ``--zo-attackers`` of them (3)
sending max-scalar, sign-flip or ALIE scalars (``swarmtrain node --zo-fault``; docs/byzantine.md),
once with the plain mean and once with CenteredClip and bans (``zo.aggregation = "clip"``), plus
the honest run of each. Every run has the same node keys (so the same data per node), base weights,
owner and spec apart from the aggregation, so runs of one aggregation share their run id and probe
seeds. The attackers are the nodes with the 2nd.. smallest ids (the first committer is honest).
The same matrix also runs in one process with the swarm's arithmetic (trainer/zo/spsa.train_local,
bans included): ``--zo-local-only`` runs only that.

pipeline: 6 node processes (2 data nodes; stages 1 and 2 with 2 replicas each); one stage-1 replica
is Byzantine from iteration 2 (``--fault nan-activations|scale-activations|garbage-gradients``),
with ``pipeline.guard = "ban"`` and ``"off"``, plus the honest run.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import record  # noqa: E402
from node.pipeline_demo import run_pipeline_swarm, summarize_pipeline, write_pipeline_spec  # noqa: E402
from node.zo_demo import place_node_keys, pretrain_base, run_local_swarm, summarize, write_spec  # noqa: E402
from node.zo_node import build_replica, node_data  # noqa: E402
from protocol.keys import generate_private_key  # noqa: E402
from protocol.runspec import load_spec, run_id  # noqa: E402
from trainer.zo.aggregate import Aggregation  # noqa: E402
from trainer.zo.attacks import ATTACKS, Attack, LocalAttacks  # noqa: E402
from trainer.zo.spsa import ZOSettings, train_local  # noqa: E402

KEY_SEED = 16
CREATED = "2025-01-01T00:00:00+00:00"
PP_FAULTS = ("nan-activations", "scale-activations", "garbage-gradients")


def fmt(x: float | None) -> str:
    return "n/a" if x is None else ("NaN" if isinstance(x, float) and math.isnan(x) else f"{x:.3f}")


# ---- zo ------------------------------------------------------------------------------------------


def zo_swarm(workdir: Path, base: Path, owner, args, aggregation: str, attack: str | None) -> dict:
    workdir.mkdir()
    ids = place_node_keys(workdir, args.zo_nodes, KEY_SEED)
    attackers = sorted(ids)[1:1 + args.zo_attackers] if attack else []
    spec_path = write_spec(workdir, base, args.zo_nodes, args.zo_steps, owner=owner, created=CREATED,
                           aggregation=aggregation, heartbeat_interval_s=2.0, heartbeat_ttl_s=12.0,
                           step_timeout_s=10.0)
    began = time.monotonic()
    reports = run_local_swarm(workdir, spec_path, base, args.zo_nodes, timeout_s=args.timeout,
                              extra_args={ids.index(a): ["--zo-fault", attack] for a in attackers})
    summary = summarize(reports, args.zo_nodes)
    banned = reports[0]["banned"]
    return {"loss": summary["loss_end"], "start": summary["loss_start"], "identical": summary["weights_identical"],
            "banned": [[step, "attacker" if bytes.fromhex(node) in attackers else "HONEST"] for step, node in banned],
            "wall_s": round(time.monotonic() - began, 1), "steps": summary["steps"]}


def zo_local(spec_path: Path, base: Path, ids: list[bytes], steps: int, aggregation: str, attack: str | None,
             attackers: int) -> dict:
    spec = load_spec(spec_path)
    settings = dataclasses.replace(ZOSettings.from_spec(spec), aggregation=Aggregation(aggregation), steps=steps)
    bad = sorted(ids)[1:1 + attackers] if attack else []
    tamper = LocalAttacks({n: Attack(attack, settings.quantizer, seed=i) for i, n in enumerate(bad)},
                          settings.quantizer) if bad else None
    replica, _ = build_replica(spec, str(base))
    result = train_local(replica, settings, run_id(spec), ids, [node_data(spec, n)[0] for n in ids],
                         node_data(spec, ids[0])[1], eval_every=10, tamper=tamper)
    return {"loss": result.losses[-1][2], "start": result.losses[0][2],
            "banned": sorted([step, "attacker" if n in bad else "HONEST"] for n, step in result.banned.items())}


def run_zo(args, workdir: Path) -> None:
    base = workdir / "base.pt"
    pretrain_base(base, args.base_steps)
    owner = generate_private_key()
    ids = place_node_keys(workdir / "keys", args.zo_nodes, KEY_SEED)
    attacks = [a for a in args.attacks.split(",") if a]
    cases = [(agg, attack) for agg in ("mean", "clip") for attack in [None, *attacks]]
    local, swarm = {}, {}
    for agg, attack in cases:
        spec_path = write_spec(workdir / "keys", base, args.zo_nodes, args.zo_steps, owner=owner, created=CREATED,
                               aggregation=agg)
        local[(agg, attack)] = zo_local(spec_path, base, ids, args.zo_steps, agg, attack, args.zo_attackers)
        print(f"local {agg} {attack or 'honest'}: {local[(agg, attack)]}", flush=True)
    if not args.zo_local_only:
        for agg, attack in cases:
            swarm[(agg, attack)] = zo_swarm(workdir / f"zo-{agg}-{attack or 'honest'}", base, owner, args, agg, attack)
            print(f"swarm {agg} {attack or 'honest'}: {swarm[(agg, attack)]}", flush=True)
    start = local[("mean", None)]["start"]
    lines = [
        f"configuration: tiny preset, base {args.base_steps} AdamW steps on prose, SPSA fine-tuning on arithmetic "
        f"(zo defaults: lr 3e-3, 1 probe per node per step, log quantizer, clip_factor 3, bans after 6 outliers "
        f"in 10 commits), {args.zo_steps} steps, {args.zo_nodes} nodes of which {args.zo_attackers} attack "
        f"(the 2nd.. smallest ids); the same node keys, data and base weights in every run",
        f"validation loss at step 0: {start:.3f}; each cell is the loss at step {args.zo_steps} "
        + ("(swarm of node processes on 127.0.0.1 / the same in one process)" if swarm else
           "(one process, the swarm's arithmetic: --zo-local-only; the machine did not carry the processes)"),
    ]
    for attack in [None, *attacks]:
        cells = []
        for agg in ("mean", "clip"):
            lo = local[(agg, attack)]
            sw = swarm.get((agg, attack))
            text = f"{agg} {fmt(sw['loss']) + ' / ' if sw else ''}{fmt(lo['loss'])}"
            bans = (sw or lo)["banned"]
            if agg == "clip" and attack is not None:
                text += f", banned: {', '.join(f'{who} at step {step}' for step, who in bans) or 'none'}"
            if sw and not sw["identical"]:
                text += ", REPLICAS DIFFER"
            cells.append(text)
        label = f"{args.zo_attackers} x {attack}" if attack else "honest"
        lines.append(f"{label}: " + "; ".join(cells))
    if swarm:
        walls = [s["wall_s"] for s in swarm.values()]
        lines.append(f"swarm runs: {len(swarm)}, {min(walls):.0f}-{max(walls):.0f} s each (start-up included), "
                     f"replicas bit-identical in {sum(s['identical'] for s in swarm.values())} of {len(swarm)}")
    record(f"Byzantine peers in mode zo ({args.zo_attackers} of {args.zo_nodes}): loss with and without "
           "CenteredClip + bans", lines)


# ---- pipeline --------------------------------------------------------------------------------------


def pp_run(workdir: Path, args, guard: str, fault: str | None) -> dict:
    workdir.mkdir()
    spec = write_pipeline_spec(workdir, 3, args.pp_iterations, 6, swap="none", guard=guard, heartbeat_ttl_s=8.0)
    extra = {1: ["--fault", f"{fault}-from-2"]} if fault else {}
    began = time.monotonic()
    reports, _ = run_pipeline_swarm(workdir, spec, 6, 3, timeout_s=args.timeout, extra_args=extra,
                                    may_die={"node1"} if fault else frozenset())
    honest = [r for r in reports if r["process"] != "node1" or not fault]
    summary = summarize_pipeline(honest, 3)
    bad = next((r["node"] for r in reports if r["process"] == "node1"), None) if fault else None
    data = [r for r in honest if r["stage"] == 0]
    bans = [row for r in honest for row in r.get("bans", [])]
    caught = [row for row in bans if row[1] == bad]
    first_seen = min((row[0] for row in caught if row[3] == "seen"), default=None)
    tail = [sum(x for _, _, x in r["losses"][-3:]) / len(r["losses"][-3:]) for r in data if r["losses"]]
    return {"loss_start": summary["loss_start"], "loss_end3": sum(tail) / len(tail) if tail else None,
            "iterations": summary["iterations"], "finite": all(r.get("weights_finite", True) for r in honest),
            "first_seen": first_seen, "banned_by": len({r["node"] for r in honest
                                                         if any(row[1] == bad for row in r.get("bans", []))}),
            "false_bans": len([row for row in bans if row[1] != bad]),
            "reason": caught[0][2][:90] if caught else "",
            "excluded": sum(1 for r in honest for row in r.get("excluded", []) if row[1] == bad),
            "wall_s": round(time.monotonic() - began, 1)}


def run_pipeline(args, workdir: Path) -> None:
    results = {}
    faults = [f for f in PP_FAULTS if f in args.pp_faults.split(",")]
    for guard, fault in [("ban", None)] + [(g, f) for f in faults for g in ("ban", "off")]:
        results[(guard, fault)] = pp_run(workdir / f"pp-{guard}-{fault or 'honest'}", args, guard, fault)
        print(f"pipeline {guard} {fault or 'honest'}: {results[(guard, fault)]}", flush=True)
    honest = results[("ban", None)]
    lines = [
        f"configuration: tiny preset, 3 stages (stage 0 on the 2 data nodes, stages 1 and 2 with 2 replicas each), "
        f"path length 3, 4 microbatches of 4 x 64 tokens per data node per iteration, AdamW lr 3e-3, "
        f"{args.pp_iterations} iterations on the leader's schedules; the Byzantine replica is a stage-1 node, "
        "from iteration 2 on; guard factor 8 (pipeline.outlier_factor)",
        f"honest: loss {fmt(honest['loss_start'])} -> {fmt(honest['loss_end3'])} (mean of the last 3 iterations, "
        f"both data nodes), false bans {honest['false_bans']}",
    ]
    for fault in faults:
        on, off = results[("ban", fault)], results[("off", fault)]
        lines.append(
            f"{fault}: guard on: loss {fmt(on['loss_end3'])}, honest weights finite: {on['finite']}, "
            f"first caught in iteration {on['first_seen']}, banned by {on['banned_by']} of 5 honest nodes, "
            f"left out of {on['excluded']} reduce(s), false bans {on['false_bans']} ({on['reason']}); "
            f"guard off: loss {fmt(off['loss_end3'])}, honest weights finite: {off['finite']}")
    record("Byzantine stage replica in the skip pipeline: detection, ban and loss, guard on and off", lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("zo", "pipeline", "all"), default="all")
    parser.add_argument("--zo-nodes", type=int, default=16)
    parser.add_argument("--zo-attackers", type=int, default=3)
    parser.add_argument("--zo-steps", type=int, default=40)
    parser.add_argument("--zo-local-only", action="store_true", help="the zo matrix in one process only")
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--base-steps", type=int, default=30)
    parser.add_argument("--pp-iterations", type=int, default=12)
    parser.add_argument("--pp-faults", default=",".join(PP_FAULTS), help="pipeline faults to run, comma-separated")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per swarm run")
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it (the nodes' logs and reports)")
    args = parser.parse_args()
    if unknown := set(args.pp_faults.split(",")) - set(PP_FAULTS):
        parser.error(f"unknown --pp-faults {', '.join(sorted(unknown))}; choose from {', '.join(PP_FAULTS)}")
    torch.set_num_threads(1)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    with (contextlib.nullcontext(str(args.keep)) if args.keep
          else tempfile.TemporaryDirectory(prefix="swarmtrain-byzantine-")) as tmp:
        if args.part in ("zo", "all"):
            run_zo(args, Path(tmp))
        if args.part in ("pipeline", "all"):
            run_pipeline(args, Path(tmp))


if __name__ == "__main__":
    main()
