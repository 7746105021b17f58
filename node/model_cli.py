"""`swarmtrain export`, `generate` and `eval`: a pipeline run's stages as one model file, and what it does.

export reads the run's members as a client of the swarm, asks one live replica of every stage for
its weights (RPC ``pp.state``), renames each stage's local block indices to the whole model's and
writes one safetensors file whose metadata names the preset. generate samples from such a file;
eval measures validation perplexity along the full path and along skip paths. User errors are one
line on stderr and a non-zero exit, as in node.cli.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import random
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

EXIT_USAGE = 2  # the same codes as node.cli
EXIT_FAILURE = 1
FORMAT = "swarmtrain.lm/1"  # metadata["format"] of the files export writes
LIVE = ("ONLINE", "JOINING")


class ModelCliError(Exception):
    """A user-facing failure: the message says what was wrong and what to do (exit 2)."""


class SwarmStateError(ModelCliError):
    """The request was fine but the swarm cannot serve it now, e.g. a stage has no live replica (exit 1)."""


# ---- argument parsing ------------------------------------------------------------------------


def add_model_parsers(commands: Any) -> None:
    """Add the export, generate and eval subcommands to a `parser.add_subparsers()` object."""
    export = commands.add_parser("export", help="assemble a pipeline run's stages into one safetensors model file",
                                 description="Fetch the weights of one live replica of every stage of a pipeline "
                                             "run and write the whole model as a safetensors file.")
    export.add_argument("--run", required=True, help="the run spec (TOML)")
    export.add_argument("--initial-peers", nargs="+", metavar="MADDR", default=None,
                        help="multiaddrs of peers already in the swarm")
    export.add_argument("--out", required=True, help="the .safetensors file to write")
    export.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    export.add_argument("--key", default=None,
                        help="private runs: the node key (from keygen) that --token was issued for, or the owner key")
    export.add_argument("--token", default=None, help="private runs: a join token for --key")
    export.add_argument("--config", default=None, help="TOML file with node settings ([node] table)")
    export.add_argument("--log-format", choices=("plain", "json"), default=None, help="log line format")
    export.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR")

    generate = commands.add_parser("generate", help="sample text from an exported model file")
    generate.add_argument("--model", required=True, metavar="FILE", help="a file written by `swarmtrain export`")
    generate.add_argument("--prompt", required=True, help="text to continue")
    generate.add_argument("--tokens", type=int, default=200, help="bytes to sample")
    generate.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0: greedy)")
    generate.add_argument("--seed", type=int, default=0, help="sampling seed (the same seed gives the same text)")
    generate.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")

    evaluate = commands.add_parser("eval", help="validation perplexity of an exported model, full path and skip paths")
    evaluate.add_argument("--model", required=True, metavar="FILE", help="a file written by `swarmtrain export`")
    evaluate.add_argument("--domains", nargs="+", default=None, metavar="DOMAIN",
                          help="domains whose validation split to use (default: the run's)")
    evaluate.add_argument("--stages", type=int, default=None, help="pipeline stages (default: the run's)")
    evaluate.add_argument("--path-length", type=int, default=None,
                          help="stages on a skip path, stage 0 included (default: half the stages)")
    evaluate.add_argument("--max-paths", type=int, default=8,
                          help="evaluate all skip paths of that length, or this many sampled by --seed")
    evaluate.add_argument("--max-tokens", type=int, default=32768, help="validation tokens per domain")
    evaluate.add_argument("--seq-len", type=int, default=None, help="context length (default: the run's)")
    evaluate.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the skip-path sample")
    evaluate.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")


def _fail(command: str, error: ModelCliError) -> int:
    print(f"swarmtrain {command}: error: {error}", file=sys.stderr)
    return EXIT_FAILURE if isinstance(error, SwarmStateError) else EXIT_USAGE


# ---- names: stages <-> the whole model --------------------------------------------------------


def expected_stage_state(cfg, stage: int, blocks: range) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Name -> (shape, dtype) of a stage module's state dict, without allocating it."""
    import torch

    from trainer.model import build_stage

    with torch.device("meta"):
        module = build_stage(cfg, stage, blocks, seed=0)
    return {name: (tuple(t.shape), t.dtype) for name, t in module.state_dict().items()}


def check_stage_state(expected: Mapping[str, tuple[tuple[int, ...], Any]], state: Mapping[str, Any]) -> None:
    """Raise ValueError unless ``state`` has exactly the expected names, shapes and dtypes."""
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"missing {missing[:3]} unexpected {unexpected[:3]}")
    for name, (shape, dtype) in expected.items():
        tensor = state[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"{name} is {tensor.dtype} {tuple(tensor.shape)}, expected {dtype} {shape}")


def stage_weights(answer: Mapping[str, Any]) -> dict[str, Any]:
    """The stage module's weights from a ``pp.state`` answer: the module's state dict itself, or its
    ``w/<name>`` entries when the answer also carries optimizer state (``o/<name>/<key>``)."""
    if any(name.startswith("w/") for name in answer):
        return {name[2:]: t for name, t in answer.items() if name.startswith("w/")}
    return dict(answer)


def stage_to_lm_names(stage: int, state: Mapping[str, Any], blocks: range) -> dict[str, Any]:
    """A stage's state dict under the whole model's names: local ``blocks.i`` becomes ``blocks.blocks[i]``."""
    out = {}
    for name, tensor in state.items():
        head, _, rest = name.partition(".")
        if head == "blocks":
            local, _, param = rest.partition(".")
            if not local.isdigit() or int(local) >= len(blocks):
                raise ValueError(f"stage {stage}: {name} is not one of its {len(blocks)} blocks")
            out[f"blocks.{blocks[int(local)]}.{param}"] = tensor
        elif stage == 0 and head in ("tok_emb", "norm", "head"):
            out[name] = tensor
        else:
            raise ValueError(f"stage {stage}: unexpected tensor {name}")
    return out


def assemble_state(ranges: Sequence[range], stage_states: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """The whole model's state dict from every stage's (``ranges[s]``: stage s's global block indices)."""
    missing = [s for s in range(len(ranges)) if s not in stage_states]
    if missing:
        raise ValueError(f"no weights for stage {', '.join(map(str, missing))}")
    out: dict[str, Any] = {}
    for stage, blocks in enumerate(ranges):
        out.update(stage_to_lm_names(stage, stage_states[stage], blocks))
    return out


def lm_from_state(cfg, state: Mapping[str, Any]):
    """An LM holding exactly ``state`` (strict: every name and shape must match the preset)."""
    import torch

    from trainer.model import LM

    with torch.device("meta"):  # the weights come from ``state``; nothing to initialise
        model = LM(cfg, seed=0)
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    except RuntimeError as error:
        raise ValueError(" ".join(str(error).split())[:300]) from None
    return model.eval()


# ---- the model file ---------------------------------------------------------------------------


def save_model(path: Path, state: Mapping[str, Any], metadata: Mapping[str, str]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp), metadata=dict(metadata))
    os.replace(tmp, path)  # a reader never sees half a file


def load_model(path: str | Path):
    """(LM, metadata) from a file that export wrote; ModelCliError says what is wrong with it."""
    from safetensors import SafetensorError, safe_open

    from trainer.model import ModelConfig

    path = Path(path)
    if not path.is_file():
        raise ModelCliError(f"model file {path} does not exist (`swarmtrain export` writes one)")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = dict(f.metadata() or {})
            state = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError) as error:
        raise ModelCliError(f"{path} is not a safetensors model file ({error})") from None
    preset = metadata.get("preset")
    if not preset:
        raise ModelCliError(f"{path} names no model preset in its metadata; was it written by swarmtrain export?")
    try:
        cfg = ModelConfig.from_preset(preset)
    except ValueError as error:
        raise ModelCliError(f"{path}: {error}") from None
    try:
        return lm_from_state(cfg, state), metadata
    except ValueError as error:
        raise ModelCliError(f"{path} does not hold a {preset} model: {error}") from None


def _meta(metadata: Mapping[str, str], key: str, default: Any) -> Any:
    """A metadata value (JSON text) of the default's type; the default when absent or malformed."""
    try:
        value = json.loads(metadata[key]) if key in metadata else default
    except json.JSONDecodeError:
        return default
    if isinstance(default, float) and type(value) is int:
        value = float(value)
    return value if default is None or type(value) is type(default) else default


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelCliError(f"--device {name} was requested but no CUDA GPU is visible; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ModelCliError(f"--device must be auto, cpu or cuda[:i], not {name!r}") from None


# ---- evaluation -------------------------------------------------------------------------------


def skip_orders(num_stages: int, path_length: int, max_paths: int, seed: int) -> list[list[int]]:
    """Skip paths visiting ``path_length - 1`` of stages 1..S-1 in order: all, or ``max_paths`` sampled."""
    every = [list(c) for c in itertools.combinations(range(1, num_stages), path_length - 1)]
    if len(every) <= max_paths:
        return every
    return sorted(random.Random(seed).sample(every, max_paths))


def validation_windows(domains: Sequence[str], val_fraction: float, seed: int, seq_len: int, max_tokens: int):
    """Non-overlapping (input, target) windows of each domain's validation split, int64 (N, seq_len)."""
    import torch

    from trainer.data import load_domain, split_domain

    inputs, targets = [], []
    for name in domains:
        val = split_domain(load_domain(name), val_fraction, seed=seed).val[: max_tokens + 1].long()
        count = (len(val) - 1) // seq_len
        if count == 0:
            raise ValueError(f"domain {name!r} has {len(val)} validation bytes, fewer than --seq-len {seq_len} + 1")
        inputs.append(val[: count * seq_len].view(count, seq_len))
        targets.append(val[1 : count * seq_len + 1].view(count, seq_len))
    return torch.cat(inputs), torch.cat(targets)


def path_loss(stages, inputs, targets, order: Sequence[int], batch_size: int) -> float:
    """Mean next-byte cross-entropy along one path."""
    import torch

    from trainer.model import forward_path

    total = 0.0
    with torch.no_grad():
        for i in range(0, len(inputs), batch_size):
            _, loss = forward_path(stages, inputs[i : i + batch_size], order, targets[i : i + batch_size])
            total += float(loss) * len(inputs[i : i + batch_size])
    return total / len(inputs)


def evaluate(model, inputs, targets, num_stages: int, blocks_per_stage: Sequence[int] | None,
             path_length: int, max_paths: int, seed: int, batch_size: int) -> dict:
    """Loss and perplexity of the full path and of skip paths of ``path_length`` stages."""
    from trainer.model import split_model

    stages = split_model(model, num_stages, blocks_per_stage)

    def entry(order: list[int]) -> dict:
        loss = path_loss(stages, inputs, targets, order, batch_size)
        return {"order": [0, *order], "loss": loss, "perplexity": math.exp(loss)}

    full = entry(list(range(1, num_stages)))
    skips = [entry(order) for order in skip_orders(num_stages, path_length, max_paths, seed)]
    skip_loss = sum(s["loss"] for s in skips) / len(skips)
    return {"stages": num_stages, "path_length": path_length, "tokens": inputs.numel(), "full_path": full,
            "skip_paths": skips, "skip": {"loss": skip_loss, "perplexity": math.exp(skip_loss)},
            "skip_increase_pct": 100 * (math.exp(skip_loss - full["loss"]) - 1)}


# ---- export over the swarm --------------------------------------------------------------------


def replicas_by_stage(members: Mapping[bytes, Any], num_stages: int) -> dict[int, list]:
    """Live pipeline members per stage, ONLINE before JOINING, then the most recently seen first."""
    by_stage: dict[int, list] = {s: [] for s in range(num_stages)}
    for member in members.values():
        a = member.announcement
        if member.state in LIVE and a.role.value in ("data", "stage") and a.stage in by_stage:
            by_stage[a.stage].append(member)
    for replicas in by_stage.values():
        replicas.sort(key=lambda m: (m.state != "ONLINE", -m.last_seen, m.id))
    return by_stage


async def _fetch_stage(rpc, stage: int, replicas: list, expected: dict) -> tuple[int, dict, str]:
    """(iteration, state dict, node id) from the first replica that answers with valid weights."""
    from hivemind.p2p import PeerID

    from node.rpc import RpcError
    from trainer.pipeline.runtime import PipelineError, fetch_state

    reasons = []
    for member in replicas:
        async def call(args: dict, member=member) -> tuple[dict, dict]:
            sender, result, tensors = await rpc.call(PeerID.from_base58(member.announcement.peer_id), "pp.state", args)
            if sender != member.public_key:
                raise ValueError("it answered with another node's key")
            return result, tensors

        try:
            iteration, state, *_ = await fetch_state(call, weights_only=True)
            if iteration < 0:
                raise ValueError(f"bad iteration {iteration!r}")
            weights = stage_weights(state)
            check_stage_state(expected, weights)
            return iteration, weights, member.id
        except (RpcError, ValueError, PipelineError) as error:
            reasons.append(f"{member.id[:12]}: {error}")
    raise SwarmStateError(f"stage {stage}: none of its {len(replicas)} live replicas gave valid weights "
                        f"({'; '.join(reasons)[:400]})")


async def _fetch_all(swarm, spec, cfg, ranges: list[range], key, token, timeouts) -> dict[int, tuple[int, dict, str]]:
    from node.rpc import RpcEndpoint
    from node.runner import access_for_run, read_members
    from protocol.runspec import run_id as compute_run_id

    run_id, access = compute_run_id(spec), access_for_run(spec)
    replicas = replicas_by_stage(await read_members(swarm, run_id, timeouts, access), len(ranges))
    missing = [str(s) for s, found in replicas.items() if not found]
    if missing:
        which = f"stage {missing[0]} has" if len(missing) == 1 else f"stages {', '.join(missing)} have"
        raise SwarmStateError(f"{which} no live replica in run {spec.run.name!r}; start a node for each or wait "
                            "until one is ONLINE (swarmtrain status --run RUN)")
    try:
        rpc = RpcEndpoint(await swarm.p2p(), key, run_id, access, timeouts, token=token, clock=time.time)
        found = await asyncio.gather(*(_fetch_stage(rpc, s, replicas[s], expected_stage_state(cfg, s, r))
                                       for s, r in enumerate(ranges)))
    finally:
        await swarm.close_p2p()
    return dict(enumerate(found))


def _export_key(args: argparse.Namespace, spec, token: bytes | None):
    from protocol.errors import ProtocolError
    from protocol.keys import generate_private_key, public_key_bytes
    from protocol.runspec import run_id as compute_run_id

    if args.key:
        from node.identity import read_private_key

        key = read_private_key(Path(args.key))
    else:
        key = generate_private_key()  # a public run answers anyone; a throwaway identity will do
    if spec.run.access == "private":
        from protocol.access import AccessPolicy

        if token is None and public_key_bytes(key).hex() != spec.owner.public_key:
            raise ModelCliError(f"run {spec.run.name!r} is private: pass --key with a node key and --token with a join "
                                "token issued for it (swarmtrain token issue), or the owner's key as --key")
        try:
            owner = bytes.fromhex(spec.owner.public_key)
            AccessPolicy(True, owner, compute_run_id(spec)).check(public_key_bytes(key), token, time.time())
        except ProtocolError as error:
            raise ModelCliError(f"the stages would refuse this key: {error}") from None
    elif token is not None:
        raise ModelCliError(f"run {spec.run.name!r} is public; drop --token")
    return key


def export_model(args: argparse.Namespace) -> str:
    """Fetch, assemble, verify and write; returns the line to print."""
    from node.config import load_node_config
    from protocol.access import token_from_text
    from protocol.runspec import load_spec, run_id as compute_run_id, verify_spec
    from trainer.model import ModelConfig, stage_block_ranges

    flags = {k: getattr(args, k) for k in ("initial_peers", "token", "log_format", "log_level") if getattr(args, k)}
    config = load_node_config({k: tuple(v) if isinstance(v, list) else v for k, v in flags.items()},
                              config_path=args.config)
    out = Path(args.out)
    if out.is_dir():
        raise ModelCliError(f"{out} is a directory; --out takes the file to write, e.g. {out / 'model.safetensors'}")
    if out.exists() and not args.force:
        raise ModelCliError(f"{out} already exists; pass --force to overwrite it")
    if not out.parent.is_dir():
        raise ModelCliError(f"directory {out.parent} does not exist; create it or pick another --out")
    if not config.initial_peers:
        raise ModelCliError("export needs --initial-peers to find the swarm")
    spec = load_spec(args.run)
    verify_spec(spec)
    if spec.run.mode != "pipeline":
        raise ModelCliError(f"run {spec.run.name!r} is a {spec.run.mode} run; export assembles pipeline stages")
    try:
        cfg = ModelConfig.from_preset(spec.model.preset)
        ranges = stage_block_ranges(cfg.n_layers, spec.pipeline.stages, spec.pipeline.blocks_per_stage)
    except ValueError as error:
        raise ModelCliError(f"run {spec.run.name!r}: {error}") from None
    token = token_from_text(config.token) if config.token else None
    key = _export_key(args, spec, token)

    # the cheap checks passed: now hivemind and the swarm
    from node.dht import SwarmDHT
    from node.logs import setup_logging
    from node.runner import timeouts_for_run

    setup_logging(config.log_format, config.log_level or "WARNING")
    timeouts = timeouts_for_run(config, spec)
    swarm = SwarmDHT(key, b"", None, timeouts, initial_peers=config.initial_peers,
                     host_maddrs=("/ip4/127.0.0.1/tcp/0",), client_mode=True)
    try:
        found = asyncio.run(_fetch_all(swarm, spec, cfg, ranges, key, token, timeouts))
    finally:
        swarm.shutdown()
    try:
        state = assemble_state(ranges, {s: st for s, (_, st, _) in found.items()})
        model = lm_from_state(cfg, state)  # strict: the stages add up to exactly the preset's model
    except ValueError as error:
        raise ModelCliError(f"the stages' weights do not make a {spec.model.preset} model: {error}") from None
    iterations = {str(s): it for s, (it, _, _) in found.items()}
    save_model(out, state, {
        "format": FORMAT, "preset": spec.model.preset, "run_id": compute_run_id(spec).hex(), "run_name": spec.run.name,
        "stages": str(spec.pipeline.stages), "blocks_per_stage": json.dumps([len(r) for r in ranges]),
        "iterations": json.dumps(iterations), "nodes": json.dumps({str(s): n for s, (_, _, n) in found.items()}),
        "seq_len": str(spec.model.seq_len), "domains": json.dumps(spec.data.domains),
        "val_fraction": repr(spec.data.val_fraction), "data_seed": str(spec.train.seed),
        "exported_at": str(int(time.time()))})
    at = ", ".join(f"stage {s} at {it}" for s, it in iterations.items())
    return f"wrote {out}: {spec.model.preset} model, {model.num_params():,} parameters; iterations done: {at}"


# ---- commands ---------------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    try:
        print(export_model(args), flush=True)
    except ModelCliError as error:
        return _fail("export", error)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from trainer.data import decode, encode

    try:
        if not args.prompt:
            raise ModelCliError("--prompt is empty; give some text to continue")
        if not 0 <= args.tokens <= 1 << 20:
            raise ModelCliError("--tokens must be in 0..1048576")
        if not 0 <= args.temperature < 1e3:
            raise ModelCliError("--temperature must be >= 0")
        device = _device(args.device)
        model, _ = load_model(args.model)
    except ModelCliError as error:
        return _fail("generate", error)
    model.to(device)
    tokens = torch.tensor([encode(args.prompt)], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    out = model.generate(tokens, args.tokens, temperature=args.temperature, generator=generator)
    print(decode(out[0].cpu()), flush=True)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    try:
        report = _evaluate(args)
    except ModelCliError as error:
        return _fail("eval", error)
    if args.json:
        print(json.dumps(report, sort_keys=True), flush=True)
        return 0
    full, skip = report["full_path"], report["skip"]
    lines = [f"{report['model']}: {report['preset']} model, {report['stages']} stages, {report['tokens']:,} "
             f"validation tokens ({', '.join(report['domains'])})",
             f"full path {'-'.join(map(str, full['order']))}: loss {full['loss']:.4f}  "
             f"perplexity {full['perplexity']:.3f}"]
    for path in report["skip_paths"]:
        lines.append(f"  skip path {'-'.join(map(str, path['order']))}: loss {path['loss']:.4f}  "
                     f"perplexity {path['perplexity']:.3f}")
    lines.append(f"skip paths of {report['path_length']} stages (mean): loss {skip['loss']:.4f}  perplexity "
                 f"{skip['perplexity']:.3f} ({report['skip_increase_pct']:+.1f}% vs the full path)")
    print("\n".join(lines), flush=True)
    return 0


def _evaluate(args: argparse.Namespace) -> dict:
    from trainer.data import EMBEDDED_DOMAINS, DomainError
    from trainer.model import stage_block_ranges

    device = _device(args.device)
    model, metadata = load_model(args.model)
    cfg = model.cfg
    num_stages = args.stages if args.stages is not None else _meta(metadata, "stages", 0)
    if num_stages < 2:
        raise ModelCliError("pass --stages (at least 2): the file does not say how many stages its run had")
    blocks = _meta(metadata, "blocks_per_stage", None)
    usable = isinstance(blocks, list) and len(blocks) == num_stages and all(type(b) is int for b in blocks)
    blocks = blocks if args.stages is None and usable else None
    try:
        stage_block_ranges(cfg.n_layers, num_stages, blocks)
    except ValueError as error:
        raise ModelCliError(f"--stages {num_stages}: {error}") from None
    path_length = args.path_length if args.path_length is not None else (num_stages + 1) // 2
    if not 1 <= path_length < num_stages:
        raise ModelCliError(f"--path-length must be in 1..{num_stages - 1} (stage 0 included; "
                            f"{num_stages} is the full path)")
    seq_len = args.seq_len if args.seq_len is not None else min(_meta(metadata, "seq_len", 256), cfg.max_seq_len)
    if not 1 <= seq_len <= cfg.max_seq_len:
        raise ModelCliError(f"--seq-len must be in 1..{cfg.max_seq_len} for the {metadata['preset']} preset")
    for flag in ("max_paths", "max_tokens", "batch_size"):
        if getattr(args, flag) < 1:
            raise ModelCliError(f"--{flag.replace('_', '-')} must be at least 1")
    domains = args.domains or _meta(metadata, "domains", None) or list(EMBEDDED_DOMAINS)
    try:
        inputs, targets = validation_windows(domains, _meta(metadata, "val_fraction", 0.1),
                                             _meta(metadata, "data_seed", 0), seq_len, args.max_tokens)
    except (DomainError, FileNotFoundError, ValueError) as error:
        raise ModelCliError(f"cannot load the validation data: {error}") from None
    model.to(device)
    report = evaluate(model, inputs.to(device), targets.to(device), num_stages, blocks, path_length,
                      args.max_paths, args.seed, args.batch_size)
    return {"model": str(args.model), "preset": metadata["preset"], "domains": list(domains), "seq_len": seq_len,
            **report}
