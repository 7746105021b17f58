"""`swarmtrain ensemble plan|fetch|eval|generate`, `run init --mode experts` and `demo --mode experts`.

plan judges each domain's difficulty (a seed model's loss, or zlib), derives the heterogeneous and
homogeneous allocations of one compute budget and writes them into a signed run spec. fetch, eval and
generate take the run's experts either from the swarm (every job's most advanced checkpoint, fetched
from a live node that keeps it and verified against its digest) or from folders of checkpoint files
(a node's store, or what fetch wrote). User errors are one line on stderr and a non-zero exit.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

EXIT_USAGE = 2  # the same codes as node.cli
EXIT_FAILURE = 1
LIVE = ("ONLINE", "JOINING")


class EnsembleCliError(Exception):
    """A user-facing failure: the message says what was wrong and what to do (exit 2)."""


class EnsembleSwarmError(EnsembleCliError):
    """The request was fine but the swarm cannot serve it now (exit 1)."""


# ---- argument parsing ------------------------------------------------------------------------


def _add_source(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="the experts run spec (TOML)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--initial-peers", nargs="+", metavar="MADDR", default=None,
                        help="fetch every job's latest checkpoint from the swarm (verified against its digest)")
    source.add_argument("--checkpoints", nargs="+", metavar="DIR", default=None,
                        help="folders of checkpoint files: a node's store (DATA_DIR/experts/RUN_ID/checkpoints) "
                             "or what `ensemble fetch` wrote")
    parser.add_argument("--key", default=None,
                        help="private runs: the node key (from keygen) that --token was issued for, or the owner key")
    parser.add_argument("--token", default=None, help="private runs: a join token for --key")
    parser.add_argument("--config", default=None, help="TOML file with node settings ([node] table)")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR")


def add_ensemble_parser(commands: Any) -> None:
    ensemble = commands.add_parser("ensemble", help="domain expert ensembles: plan a run, fetch, evaluate, sample")
    sub = ensemble.add_subparsers(dest="ensemble_command", metavar="SUBCOMMAND", required=True)

    plan = sub.add_parser("plan", help="judge the domains, allocate equal compute to both ensembles, write the spec",
                          description="Write a signed experts run spec whose heterogeneous allocation (larger "
                                      "experts and more steps for harder domains) and homogeneous allocation have "
                                      "the same total compute (sum of parameters x steps), with a dense model of "
                                      "that compute as a third baseline.")
    plan.add_argument("--key", required=True, help="the run owner's private key (from keygen)")
    plan.add_argument("--out", required=True, help="path of the TOML run spec to write")
    plan.add_argument("--force", action="store_true", help="overwrite an existing spec file")
    plan.add_argument("--name", default=None, help="human-readable run name")
    plan.add_argument("--access", choices=("public", "private"), default="public")
    plan.add_argument("--domains", nargs="+", default=None, metavar="DOMAIN",
                      help="embedded domain names (python, prose, arithmetic) or paths of text files/directories")
    plan.add_argument("--preset", default="tiny", help="base shape of the experts (tiny, small, 124m, ...)")
    plan.add_argument("--steps", type=int, default=200, help="steps of each homogeneous expert: sets the budget")
    plan.add_argument("--lr", type=float, default=3e-3, help="learning rate of every expert")
    plan.add_argument("--heterogeneity", choices=("both", "steps", "sizes"), default="both",
                      help="what the heterogeneous plan varies with difficulty: expert widths and steps (the "
                           "default; the better one in bench/bench_experts.py), steps only, or widths only")
    plan.add_argument("--seed-steps", type=int, default=100,
                      help="steps of the shared seed model whose per-domain loss judges difficulty (0: zlib)")
    plan.add_argument("--no-dense", action="store_true", help="leave out the dense baseline")
    plan.add_argument("--checkpoint-every", type=int, default=20, help="steps between checkpoints (and averages)")
    plan.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    plan.add_argument("--seq-len", type=int, default=128, help="bytes per sequence")

    fetch = sub.add_parser("fetch", help="download every job's latest checkpoint from the swarm, verified")
    _add_source(fetch)
    fetch.add_argument("--out", required=True, metavar="DIR", help="folder to write the checkpoint files into")

    evaluate = sub.add_parser("eval", help="validation perplexity per domain: experts, both ensembles, both rules, dense")
    _add_source(evaluate)
    evaluate.add_argument("--max-tokens", type=int, default=16384, help="eval tokens per domain")
    evaluate.add_argument("--prior-tokens", type=int, default=8192,
                          help="tokens per domain of the prior split that estimate the posterior rule's prior")
    evaluate.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    evaluate.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")

    generate = sub.add_parser("generate", help="sample text from an ensemble")
    _add_source(generate)
    generate.add_argument("--prompt", required=True, help="text to continue")
    generate.add_argument("--ensemble", choices=("heterogeneous", "homogeneous", "dense"), default="heterogeneous")
    generate.add_argument("--rule", choices=("posterior", "uniform"), default="posterior",
                          help="posterior: the per-token domain posterior mixture; uniform: mean of log-probabilities")
    generate.add_argument("--tokens", type=int, default=200, help="bytes to sample")
    generate.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0: greedy)")
    generate.add_argument("--seed", type=int, default=0, help="sampling seed")
    generate.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")


# ---- planning --------------------------------------------------------------------------------


def _plan_settings(domains, preset: str, steps: int, lr: float, heterogeneity: str, seed_steps: int, dense: bool,
                   checkpoint_every: int, batch_size: int, seq_len: int):
    from ensemble.plan import PlanSettings
    from protocol.runspec import EMBEDDED_DOMAINS
    from trainer.model import PRESETS

    if preset not in PRESETS:
        raise EnsembleCliError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}")
    for flag, value, low in (("--steps", steps, 1), ("--seed-steps", seed_steps, 0),
                             ("--checkpoint-every", checkpoint_every, 1), ("--batch-size", batch_size, 1),
                             ("--seq-len", seq_len, 1)):
        if value < low:
            raise EnsembleCliError(f"{flag} must be at least {low}")
    if not 0 < lr < 1e3:
        raise EnsembleCliError("--lr must be positive")
    if seq_len > PRESETS[preset].max_seq_len:
        raise EnsembleCliError(f"--seq-len {seq_len} exceeds the {preset} preset's max_seq_len {PRESETS[preset].max_seq_len}")
    domains = tuple(domains or EMBEDDED_DOMAINS)
    if len(set(domains)) != len(domains):
        raise EnsembleCliError("--domains: entries must be distinct")
    return PlanSettings(domains=domains, preset=preset, base_steps=steps, lr=lr, heterogeneity=heterogeneity,
                        seed_steps=seed_steps, dense=dense, checkpoint_every=checkpoint_every, batch_size=batch_size,
                        seq_len=seq_len)


def _plan(settings, say=None):
    from ensemble.plan import plan
    from trainer.data import DomainError

    try:
        return plan(settings, say)
    except (DomainError, FileNotFoundError, ValueError) as error:
        raise EnsembleCliError(f"cannot plan the run: {error}") from None


def experts_overrides(args: argparse.Namespace, overrides: dict) -> dict:
    """`run init --mode experts`: the default plan (difficulty by zlib, no seed model), so that the spec
    holds both allocations; `ensemble plan` offers the seed model and the other choices."""
    from ensemble.plan import section_overrides

    settings = _plan_settings(overrides.get("domains"), args.preset, overrides.pop("steps", 200),
                              overrides.pop("lr", 3e-3), "both", 0, True, 20, 8, 128)
    section, _ = _plan(settings)
    return {**overrides, "experts": section_overrides(section)}


def allocation_lines(section, labels) -> list[str]:
    from ensemble.allocation import params

    lines = [f"budget {section.budget:,} parameter-steps per ensemble; difficulty ({section.difficulty_source}): "
             + ", ".join(f"{label} {d:.3f}" for label, d in zip(labels, section.difficulty))]
    for name in ("heterogeneous", "homogeneous", "dense"):
        entries = getattr(section, name)
        for i, expert in enumerate(entries):
            where = "all domains" if expert.domain == "*" else labels[i]
            p = params(expert)
            lines.append(f"  {name:<13} {where:<12} {p:>11,} parameters x {expert.steps:>6} steps = {p * expert.steps:>14,}")
    return lines


def cmd_plan(args: argparse.Namespace) -> int:
    from ensemble.jobs import domain_labels
    from ensemble.plan import section_overrides
    from node.identity import read_private_key
    from protocol.runspec import dumps_spec, make_spec, run_id

    out = Path(args.out)
    if out.is_dir():
        raise EnsembleCliError(f"{out} is a directory; --out takes the path of the spec file to write")
    if out.exists() and not args.force:
        raise EnsembleCliError(f"{out} already exists; pass --force to overwrite it")
    settings = _plan_settings(args.domains, args.preset, args.steps, args.lr, args.heterogeneity, args.seed_steps,
                              not args.no_dense, args.checkpoint_every, args.batch_size, args.seq_len)
    owner = read_private_key(Path(args.key))
    section, _ = _plan(settings, lambda line: print(line, flush=True))
    overrides: dict[str, Any] = {"domains": list(settings.domains), "experts": section_overrides(section),
                                 "batch_size": args.batch_size, "seq_len": args.seq_len}
    if args.name:
        overrides["name"] = args.name
    spec = make_spec("experts", args.preset, owner, access=args.access, **overrides)
    out.write_text(dumps_spec(spec))
    print("\n".join(allocation_lines(spec.experts, domain_labels(spec.data.domains))))
    print(f"run id {run_id(spec).hex()} written to {out}")
    return 0


def check_experts_node(spec, fault: str | None) -> tuple[str, ...]:
    """Before a node starts: the run's jobs must build and the fault (tests) must parse; the record names."""
    from ensemble.jobs import JobError, jobs_from_spec
    from node.experts_node import RECORD_NAMES, parse_fault

    try:
        jobs_from_spec(spec)
        parse_fault(fault)
    except (JobError, ValueError) as error:
        raise EnsembleCliError(str(error)) from None
    return RECORD_NAMES


# ---- where the experts come from -------------------------------------------------------------


def _load_spec(path: str):
    from ensemble.jobs import JobError, jobs_from_spec
    from protocol.runspec import load_spec, verify_spec

    spec = load_spec(path)
    verify_spec(spec)
    if spec.run.mode != "experts":
        raise EnsembleCliError(f"run {spec.run.name!r} is a {spec.run.mode} run, not an experts run")
    try:
        return spec, jobs_from_spec(spec)
    except JobError as error:
        raise EnsembleCliError(str(error)) from None


def states_from_folders(folders: list[str], jobs) -> dict[str, tuple[dict, int, str]]:
    """{job name: (state, step, digest hex)}: each job's most advanced checkpoint in the folders."""
    from ensemble.checkpoint import CheckpointError, CheckpointStore
    from ensemble.train import CheckpointMismatch, checkpoint_meta

    names = {job.name for job in jobs}
    found: dict[str, tuple[dict, int, str]] = {}
    for folder in folders:
        if not Path(folder).is_dir():
            raise EnsembleCliError(f"--checkpoints {folder} is not a folder")
        store = CheckpointStore(Path(folder))
        for digest in store.digests():
            try:
                state = store.get(digest)
                name, step, _ = checkpoint_meta(state)
            except (CheckpointError, CheckpointMismatch) as error:
                logger.warning("skipped %s: %s", store.path(digest), error)
                continue
            if name in names and (name not in found or step > found[name][1]):
                found[name] = (state, step, digest.hex())
    missing = [job.name for job in jobs if job.name not in found]
    if missing:
        raise EnsembleCliError(f"no checkpoint of {', '.join(missing)} in {', '.join(folders)}")
    return found


async def _fetch_all(swarm, spec, jobs, key, token, timeouts) -> dict[str, tuple[dict, int, str]]:
    from hivemind.p2p import PeerID

    from ensemble.board import CKPT_RECORD, build_board
    from ensemble.checkpoint import CheckpointRejected, fetch_checkpoint
    from ensemble.worker import CKPT_METHOD
    from node.rpc import RpcEndpoint, RpcError
    from node.runner import access_for_run, read_members
    from protocol.runspec import run_id as compute_run_id

    run_id, access = compute_run_id(spec), access_for_run(spec)
    members = await read_members(swarm, run_id, timeouts, access)
    live = {pk: m for pk, m in members.items() if m.state in LIVE}
    records = await swarm.read(CKPT_RECORD, run_id=run_id, access=access)
    board = build_board(len(jobs), {}, {s: r.msg for s, r in records.items()}, set(live), time.time())
    found: dict[str, tuple[dict, int, str]] = {}
    try:
        rpc = RpcEndpoint(await swarm.p2p(), key, run_id, access, timeouts, token=token, clock=time.time)
        for job, view in zip(jobs, board.jobs):
            latest = view.latest
            if latest is None:
                raise EnsembleSwarmError(f"job {job.name} has no checkpoint in the swarm yet")
            reasons = []
            holders = sorted(board.where.get(latest.digest, ()), key=lambda n: (n != latest.node, n))
            for holder in holders:
                member = live[holder]

                async def call(args: dict, member=member) -> tuple[dict, dict]:
                    sender, result, tensors = await rpc.call(PeerID.from_base58(member.announcement.peer_id),
                                                             CKPT_METHOD, args)
                    if sender != member.public_key:
                        raise CheckpointRejected("it answered with another node's key")
                    return result, tensors

                try:
                    state = await fetch_checkpoint(call, latest.digest, job.name)
                except (CheckpointRejected, RpcError, ValueError) as error:
                    logger.info("checkpoint of %s from %s: %s", job.name, member.id[:16], error)
                    reasons.append(f"{member.id[:12]}: {error}")
                    continue
                found[job.name] = (state, latest.step, latest.digest.hex())
                break
            else:
                raise EnsembleSwarmError(f"job {job.name}: no live node gave its checkpoint {latest.digest.hex()[:16]} "
                                         f"(step {latest.step}) intact ({'; '.join(reasons)[:400] or 'none keeps it'})")
    finally:
        await swarm.close_p2p()
    return found


def states_from_swarm(args: argparse.Namespace, spec, jobs) -> dict[str, tuple[dict, int, str]]:
    from node.config import load_node_config
    from node.model_cli import ModelCliError, _export_key
    from protocol.access import token_from_text

    flags = {k: getattr(args, k) for k in ("initial_peers", "token", "log_level") if getattr(args, k)}
    config = load_node_config({k: tuple(v) if isinstance(v, list) else v for k, v in flags.items()},
                              config_path=args.config)
    token = token_from_text(config.token) if config.token else None
    try:
        key = _export_key(args, spec, token)
    except ModelCliError as error:
        raise EnsembleCliError(str(error)) from None
    from node.dht import SwarmDHT
    from node.runner import timeouts_for_run

    timeouts = timeouts_for_run(config, spec)
    swarm = SwarmDHT(key, b"", None, timeouts, initial_peers=config.initial_peers,
                     host_maddrs=("/ip4/127.0.0.1/tcp/0",), client_mode=True)
    try:
        return asyncio.run(_fetch_all(swarm, spec, jobs, key, token, timeouts))
    finally:
        swarm.shutdown()


def _states(args: argparse.Namespace, spec, jobs) -> dict[str, tuple[dict, int, str]]:
    if args.checkpoints:
        return states_from_folders(args.checkpoints, jobs)
    return states_from_swarm(args, spec, jobs)


def _models(jobs, states, device: str) -> dict:
    from ensemble.train import CheckpointMismatch, ExpertTrainer

    models = {}
    for job in jobs:
        trainer = ExpertTrainer(job, seed=0, device=device)
        try:
            trainer.load(states[job.name][0])
        except CheckpointMismatch as error:
            raise EnsembleCliError(f"the checkpoint of {job.name} does not fit the run's job: {error}") from None
        models[job.name] = trainer.model.eval()
    return models


def _device(name: str) -> str:
    from node.model_cli import ModelCliError, _device as parse

    try:
        return str(parse(name))
    except ModelCliError as error:
        raise EnsembleCliError(str(error)) from None


def _splits(spec):
    from ensemble.data import three_way_split
    from trainer.data import DomainError

    try:
        return [three_way_split(d, spec.data.val_fraction, spec.experts.prior_fraction, spec.train.seed)
                for d in spec.data.domains]
    except (DomainError, FileNotFoundError) as error:
        raise EnsembleCliError(f"cannot load the run's domains: {error}") from None


# ---- commands --------------------------------------------------------------------------------


def cmd_fetch(args: argparse.Namespace) -> int:
    from ensemble.checkpoint import CheckpointStore

    spec, jobs = _load_spec(args.run)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise EnsembleCliError(f"--out {out} exists and is not a folder")
    states = _states(args, spec, jobs)
    store = CheckpointStore(out)
    for job in jobs:
        state, step, digest = states[job.name]
        store.put(state)
        print(f"{job.name}: step {step}/{job.steps}, checkpoint {digest[:16]} (verified)")
    print(f"wrote {len(jobs)} checkpoints to {out}")
    return 0


def run_eval(args: argparse.Namespace) -> dict:
    import torch

    from ensemble.evaluate import EvalSettings, evaluate_table, heterogeneous_wins
    from ensemble.jobs import domain_labels

    for flag in ("max_tokens", "prior_tokens", "batch_size"):
        if getattr(args, flag) < 1:
            raise EnsembleCliError(f"--{flag.replace('_', '-')} must be at least 1")
    spec, jobs = _load_spec(args.run)
    device = _device(args.device)
    states = _states(args, spec, jobs)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    models = _models(jobs, states, device)
    settings = EvalSettings(seq_len=spec.model.seq_len, max_tokens=args.max_tokens, prior_tokens=args.prior_tokens,
                            batch_size=args.batch_size, device=device)
    table = evaluate_table(jobs, models, _splits(spec), domain_labels(spec.data.domains), settings)
    steps = {job.name: job.steps for job in jobs}
    for row in table["rows"]:
        if row["name"] in states:
            row["steps_done"] = states[row["name"]][1]
            row["steps"] = steps[row["name"]]
            row["checkpoint"] = states[row["name"]][2]
    table["heterogeneous_wins"] = {rule: heterogeneous_wins(table, rule) for rule in ("posterior", "uniform")}
    table["run"] = spec.run.name
    table["budget"] = spec.experts.budget
    return table


def cmd_eval(args: argparse.Namespace) -> int:
    from ensemble.evaluate import format_table

    table = run_eval(args)
    if args.json:
        print(json.dumps(table, sort_keys=True), flush=True)
        return 0
    unfinished = [f"{r['name']} ({r['steps_done']}/{r['steps']})" for r in table["rows"]
                  if "steps_done" in r and r["steps_done"] < r["steps"]]
    print(f"run {table['run']}: validation perplexity per domain ({table['seq_len']}-byte windows, "
          f"{sum(table['tokens'].values()):,} tokens); each ensemble and the dense model cost "
          f"{table['budget']:,} parameter-steps")
    print(format_table(table))
    wins = table["heterogeneous_wins"]
    print(f"heterogeneous below homogeneous on {len(wins['posterior'])} of {len(table['domains'])} domains "
          f"(posterior rule), {len(wins['uniform'])} (uniform rule)")
    if unfinished:
        print(f"not finished yet: {', '.join(unfinished)}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from ensemble.evaluate import EvalSettings, estimate_priors, generate
    from ensemble.jobs import DENSE, domain_labels
    from trainer.data import decode, encode

    if not args.prompt:
        raise EnsembleCliError("--prompt is empty; give some text to continue")
    if not 0 <= args.tokens <= 1 << 16:
        raise EnsembleCliError("--tokens must be in 0..65536")
    if not 0 <= args.temperature < 1e3:
        raise EnsembleCliError("--temperature must be >= 0")
    spec, jobs = _load_spec(args.run)
    members = [job for job in jobs if job.ensemble == args.ensemble]
    if not members:
        raise EnsembleCliError(f"run {spec.run.name!r} has no {args.ensemble} jobs")
    device = _device(args.device)
    states = _states(args, spec, members)
    models = _models(members, states, device)
    log_prior = torch.zeros(len(members))
    if args.rule == "posterior" and args.ensemble != DENSE:
        labels = domain_labels(spec.data.domains)
        priors = estimate_priors(members, models, _splits(spec), labels,
                                 EvalSettings(seq_len=spec.model.seq_len, device=device))[args.ensemble]
        log_prior = torch.tensor([priors[label] for label in labels]).mean(0).log()
    tokens = generate([models[j.name] for j in members], encode(args.prompt), args.tokens, rule=args.rule,
                      log_prior=log_prior, temperature=args.temperature,
                      generator=torch.Generator().manual_seed(args.seed), device=device)
    print(decode(tokens), flush=True)
    return 0


SUBCOMMANDS = {"plan": cmd_plan, "fetch": cmd_fetch, "eval": cmd_eval, "generate": cmd_generate}


def cmd_ensemble(args: argparse.Namespace) -> int:
    from node.logs import setup_logging
    from protocol.errors import ProtocolError

    command = f"ensemble {args.ensemble_command}"
    setup_logging("plain", getattr(args, "log_level", None) or "WARNING")
    try:
        return SUBCOMMANDS[args.ensemble_command](args)
    except EnsembleCliError as error:
        print(f"swarmtrain {command}: error: {error}", file=sys.stderr)
        return EXIT_FAILURE if isinstance(error, EnsembleSwarmError) else EXIT_USAGE
    except ProtocolError as error:
        print(f"swarmtrain {command}: error: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_USAGE


# ---- the demo --------------------------------------------------------------------------------


def demo_experts(args: argparse.Namespace) -> int:
    from node.experts_demo import DemoError, run_demo

    nodes = 3 if args.nodes is None else args.nodes
    if not 1 <= nodes <= 16:
        print("swarmtrain demo: error: --nodes must be in 1..16", file=sys.stderr)
        return EXIT_USAGE
    steps = (40 if getattr(args, "quick", False) else 150) if args.steps is None else args.steps
    try:
        result = run_demo(nodes, steps, args.json)
    except (DemoError, EnsembleCliError) as error:
        print(f"swarmtrain demo: error: {error}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print(json.dumps(result, sort_keys=True), flush=True)
    else:
        print(result["table"])
        print(f"heterogeneous below homogeneous on {result['heterogeneous_wins']} of {len(result['domains'])} "
              f"domains at equal compute ({result['budget']:,} parameter-steps each); {result['nodes']} nodes, "
              f"{result['seconds']:.0f} s")
    return 0
