"""The ``swarmtrain`` command line. Every user error becomes one line on stderr and a non-zero exit."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from node import __version__
from node.config import ConfigError, NodeConfig, load_node_config, parse_size, resolve_initial_peers
from node.console import NodeConsole
from node.health import add_health_parser, cmd_health, keep_bootstrap_health, write_maddrs
from node.identity import IdentityError, load_or_create_identity, read_private_key, write_private_key
from node.logs import setup_logging
from node.ensemble_cli import add_ensemble_parser, cmd_ensemble
from node.model_cli import add_model_parsers, cmd_eval, cmd_export, cmd_generate
from node.schedule_cli import add_schedule_parser, cmd_schedule

logger = logging.getLogger("swarmtrain")

EXIT_USAGE = 2
EXIT_FAILURE = 1


class CliError(Exception):
    """A user-facing failure: the message says what was wrong and what to do."""


# ---- argument parsing ------------------------------------------------------------------------


SETTINGS_EPILOG = (
    "Every flag can also be set as an environment variable SWARMTRAIN_<FLAG> (e.g. SWARMTRAIN_PUBLIC_NAME, "
    "SWARMTRAIN_INITIAL_PEERS as a comma-separated list, SWARMTRAIN_TIMEOUT_RPC_S) or in the [node] table of the "
    "--config file. Flags win over the environment, which wins over the file."
)


def _add_swarm_flags(parser: argparse.ArgumentParser, *, listens: bool = True) -> None:
    parser.add_argument("--initial-peers", nargs="+", metavar="MADDR", default=None,
                        help="multiaddrs of peers already in the swarm (from `swarmtrain bootstrap`)")
    parser.add_argument("--initial-peers-file", default=None, metavar="FILE",
                        help="more initial peers: a file of multiaddrs, one a line, such as the maddrs.txt a "
                             "bootstrap or node writes in its data dir (waited for while it does not exist yet)")
    if listens:  # status reads the swarm as a client: it listens nowhere and needs no identity
        parser.add_argument("--host-maddrs", nargs="+", metavar="MADDR", default=None,
                            help="multiaddrs to listen on (default /ip4/0.0.0.0/tcp/0)")
        parser.add_argument("--announce-maddrs", nargs="+", metavar="MADDR", default=None,
                            help="multiaddrs to tell others, e.g. a public IP behind NAT")
        parser.add_argument("--port", type=int, default=None,
                            help="TCP port to listen on (shorthand for --host-maddrs)")
        parser.add_argument("--data-dir", default=None, help="directory for the node key, cache and logs")
    parser.add_argument("--config", default=None, help="TOML file with node settings ([node] table)")
    parser.add_argument("--log-format", choices=("plain", "json"), default=None, help="log line format")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR")


def _add_status_flags(parser: argparse.ArgumentParser, port_help: str | None) -> None:
    """The status page and MQTT telemetry (docs/status.md)."""
    if port_help is not None:
        parser.add_argument("--status-port", type=int, default=None, metavar="PORT", help=port_help)
    parser.add_argument("--status-host", default=None, metavar="ADDR",
                        help="address the status page listens on (default 127.0.0.1; 0.0.0.0: every interface)")
    parser.add_argument("--mqtt", default=None, metavar="URL",
                        help=("publish signed status and metrics to this MQTT broker, mqtt://host:port"
                              if port_help is not None else
                              "also subscribe to the nodes' MQTT telemetry on this broker, mqtt://host:port"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarmtrain", description="Decentralized peer-to-peer training on a DHT swarm.")
    parser.add_argument("--version", action="version", version=f"swarmtrain {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    keygen = commands.add_parser("keygen", help="create an Ed25519 identity key and print its public key")
    keygen.add_argument("--out", required=True, help="where to write the private key (mode 0600)")
    keygen.add_argument("--force", action="store_true", help="overwrite an existing key file")

    run = commands.add_parser("run", help="create and inspect run specs")
    run_commands = run.add_subparsers(dest="run_command", metavar="SUBCOMMAND", required=True)
    init = run_commands.add_parser("init", help="write a new signed run spec")
    init.add_argument("--mode", required=True, choices=("pipeline", "zo", "experts"), help="training mode")
    init.add_argument("--preset", default="tiny", help="model preset: tiny, small, 124m, 350m, 1.3b")
    init.add_argument("--key", required=True, help="the run owner's private key (from keygen)")
    init.add_argument("--out", required=True, help="path of the TOML run spec to write")
    init.add_argument("--name", default=None, help="human-readable run name")
    init.add_argument("--access", choices=("public", "private"), default="public",
                      help="private runs admit only nodes holding a join token")
    init.add_argument("--stages", type=int, default=None, help="pipeline stages (pipeline mode)")
    init.add_argument("--steps", type=int, default=None, help="training steps of the run")
    init.add_argument("--lr", type=float, default=None, help="learning rate")
    init.add_argument("--domains", nargs="+", default=None, metavar="DOMAIN",
                      help="embedded domain names (python, prose, arithmetic) or paths of text files/directories")
    init.add_argument("--min-nodes", type=int, default=None,
                      help="zo mode: the first step waits until this many nodes are live")
    init.add_argument("--probes", type=int, default=None, help="zo mode: probes (one byte each) per node per step")
    init.add_argument("--aggregation", choices=("mean", "trimmed", "clip"), default=None,
                      help="zo mode: how the committed scalars are combined (trimmed and clip resist malicious nodes)")
    init.add_argument("--params", nargs="+", default=None, metavar="PATTERN",
                      help="zo mode: fnmatch patterns of the parameter names to train (default tok_emb.weight)")
    init.add_argument("--base-weights", default=None, metavar="FILE",
                      help="zo mode: base weights (torch.save state dict) whose hash the spec records")
    init.add_argument("--force", action="store_true", help="overwrite an existing spec file")
    show = run_commands.add_parser("show", help="verify a run spec and print its id")
    show.add_argument("spec", help="path of the run spec")

    token = commands.add_parser("token", help="join tokens for private runs")
    token_commands = token.add_subparsers(dest="token_command", metavar="SUBCOMMAND", required=True)
    issue = token_commands.add_parser("issue", help="issue a join token for one node of a private run")
    issue.add_argument("--run", required=True, help="the run spec")
    issue.add_argument("--key", required=True, help="the run owner's private key")
    issue.add_argument("--node", required=True, help="the node's public key (hex, printed by keygen or node)")
    issue.add_argument("--valid-hours", type=float, default=24.0, help="how long the token is valid")

    bootstrap = commands.add_parser("bootstrap", help="run a DHT bootstrap peer and print the multiaddrs to share",
                                    epilog=SETTINGS_EPILOG)
    _add_swarm_flags(bootstrap)

    node = commands.add_parser("node", help="join a run as a training node", epilog=SETTINGS_EPILOG)
    node.add_argument("--run", default=None, help="the signed run spec (TOML)")
    _add_swarm_flags(node)
    node.add_argument("--public-name", default=None, help="name shown on the status page")
    node.add_argument("--role", choices=("auto", "data", "stage", "spare"), default=None,
                      help="pipeline role; auto takes the stage with the fewest live replicas (a lost one first); "
                           "spare waits and takes the first lost stage")
    node.add_argument("--stage", type=int, default=None, help="serve this pipeline stage")
    node.add_argument("--device", default=None, help="auto, cpu or cuda[:i]")
    node.add_argument("--max-memory", default=None, metavar="SIZE",
                      help="bound on what training may take on the device (e.g. 4GiB, 512m): the stage's weights, "
                           "gradients, AdamW state and activations; caps the activation slots (pipeline.memory) "
                           "to what fits, refuses a stage or model that does not, and on CUDA is enforced by the "
                           "allocator (see docs/operations.md)")
    node.add_argument("--token", default=None, help="join token (text) for a private run")
    node.add_argument("--client-mode", action="store_true", default=None,
                      help="do not accept incoming DHT connections (behind NAT without relay)")
    node.add_argument("--base-weights", default=None, metavar="FILE",
                      help="zo mode: the run's base weights (else the model is initialised from the run's seed)")
    node.add_argument("--zo-join", choices=("auto", "replay", "snapshot"), default=None,
                      help="zo mode: catch up by replaying the commit log, by a weight snapshot, or the cheaper one")
    node.add_argument("--zo-report", default=None, metavar="FILE",
                      help="zo mode: write a JSON report (steps, losses, weight hashes, bytes) here when done")
    node.add_argument("--report", default=None, metavar="FILE",
                      help="pipeline mode: write a JSON report (losses, paths, weight hashes) here when done; "
                           "experts mode: keep a JSON report of the node's jobs and checkpoints here")
    node.add_argument("--keep-recovery-inputs", default=None, metavar="DIR",
                      help="pipeline mode: when this node rebuilds a lost stage, keep the neighbour weights and "
                           "gradient norms it used (safetensors and JSON) in DIR, to check the rebuild afterwards")
    node.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                      help="pipeline runs with recovery = \"checkpoint\" (the baseline): the folder every node "
                           "saves its stage to and rolls back from; all nodes must share it")
    node.add_argument("--snapshot-dir", default=None, metavar="DIR",
                      help="pipeline mode: write the stage's weights to DIR every --snapshot-every iterations, "
                           "to evaluate the run's model over time afterwards (bench/bench_recovery_loss.py)")
    node.add_argument("--snapshot-every", type=int, default=5, metavar="N",
                      help="pipeline mode: iterations between weight snapshots (default 5)")
    node.add_argument("--emulate-links", default=None, metavar="FILE",
                      help="one-machine runs: delay this node's RPC messages as the links of a scenario would "
                           "(JSON: scenario, time_scale, bytes_scale, locations by public name; see docs/pipeline.md)")
    _add_status_flags(node, "serve this node's status page (its run) on this TCP port")
    node.add_argument("--link-faults", default=None, metavar="FILE",
                      help="chaos tests: drop, delay or cut this node's RPC messages as FILE says, re-read when it "
                           "changes (JSON: drop, delay_s, jitter_s, nodes, partition; see docs/chaos.md)")
    node.add_argument("--zo-fault", default=None, help=argparse.SUPPRESS)  # tests only: see node.zo_node.parse_fault
    node.add_argument("--fault", default=None, help=argparse.SUPPRESS)  # tests only: parse_fault of pipeline_/experts_node

    status = commands.add_parser("status", help="show the swarm's runs and nodes", epilog=SETTINGS_EPILOG)
    _add_swarm_flags(status, listens=False)
    status.add_argument("--run", default=None, help="only this run (spec path)")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.add_argument("--serve", type=int, default=None, metavar="PORT",
                        help="serve the status page, JSON API, server-sent events and /metrics on this TCP port "
                             "(until Ctrl-C) instead of printing once")
    _add_status_flags(status, None)

    add_schedule_parser(commands)
    add_model_parsers(commands)
    add_health_parser(commands)
    add_ensemble_parser(commands)

    demo = commands.add_parser("demo", help="a local swarm (a skip pipeline by default) trains on the embedded data",
                               description="By default: 6 node processes and a spare train a 4-stage skip pipeline "
                                           "for 40 iterations; stage 2's only node is killed at iteration 8 and the "
                                           "spare rebuilds it from its neighbours (CheckFree). --quick: the same in "
                                           "5 nodes and 16 iterations, for CI.")
    demo.add_argument("--mode", choices=("pipeline", "zo", "experts", "single"), default="pipeline",
                      help="pipeline: a local swarm of node processes trains a skip pipeline; zo: a local swarm "
                           "fine-tunes with SPSA and one byte per probe; experts: a local swarm trains heterogeneous "
                           "and homogeneous domain expert ensembles of equal compute and compares them; single: one "
                           "process with AdamW")
    demo.add_argument("--steps", type=int, default=None,
                      help="training steps (default 300 single, 60 zo; experts: steps of each homogeneous expert, "
                           "default 150)")
    demo.add_argument("--quick", action="store_true",
                      help="the reduced form for CI: pipeline 5 nodes, 16 iterations, the kill at iteration 3 "
                           "(zo: 20 steps; experts: 40 steps per homogeneous expert; single: 60 steps)")
    demo.add_argument("--iterations", type=int, default=None, help="pipeline mode: training iterations (default 40)")
    demo.add_argument("--stages", type=int, default=None, help="pipeline mode: stages, stage 0 = data nodes (default 4)")
    demo.add_argument("--preset", default="tiny", help="model preset (single mode)")
    demo.add_argument("--nodes", type=int, default=None, help="node processes (default 6 pipeline, 4 zo, 3 experts)")
    demo.add_argument("--base-steps", type=int, default=60,
                      help="zo mode: backprop steps on prose that make the base weights the swarm fine-tunes")
    demo.add_argument("--fail", default=None, metavar="SPEC",
                      help="pipeline mode: kill -9 nodes during the run, e.g. stage=2@iter=5 (items joined by ',', "
                           "optional @replica=R) or a JSON failure schedule file; lost stages are rebuilt "
                           "(default: stage STAGES/2 at iteration 8, with --quick 3, at most a third of --iterations; "
                           "'none': no failure)")
    demo.add_argument("--spares", type=int, default=None,
                      help="pipeline mode: spare nodes that take lost stages (default: 1 when a node is killed, else 0)")
    demo.add_argument("--recovery", choices=("checkfree", "random", "checkpoint"), default="checkfree",
                      help="pipeline mode: how a lost stage is rebuilt (checkfree: from its neighbours, with swap "
                           "copies for the edge stages; the baselines random: re-initialised, and checkpoint: "
                           "everyone rolls back to the last checkpoint)")
    demo.add_argument("--json", action="store_true",
                      help="pipeline, zo and experts modes: the last line printed is one JSON object")
    return parser


def _flags(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            out[name] = tuple(value) if isinstance(value, list) else value
    return out


_NODE_FLAGS = ("run", "data_dir", "initial_peers", "initial_peers_file", "host_maddrs", "announce_maddrs", "port",
               "public_name", "role", "stage", "device", "token", "client_mode", "log_format", "log_level",
               "base_weights", "zo_join", "emulate_links", "max_memory", "status_port", "status_host", "mqtt",
               "link_faults")


# ---- commands --------------------------------------------------------------------------------


def cmd_keygen(args: argparse.Namespace) -> int:
    from protocol.keys import generate_private_key, public_key_bytes

    key = generate_private_key()
    write_private_key(Path(args.out), key, overwrite=args.force)
    print(public_key_bytes(key).hex())
    return 0


def cmd_run_init(args: argparse.Namespace) -> int:
    from protocol.runspec import dumps_spec, make_spec, run_id

    out = Path(args.out)
    if out.is_dir():
        raise CliError(f"{out} is a directory; --out takes the path of the spec file to write, e.g. {out / 'run.toml'}")
    if out.exists() and not args.force:
        raise CliError(f"{out} already exists; pass --force to overwrite it")
    overrides: dict[str, Any] = {}
    if args.name:
        overrides["name"] = args.name
    if args.stages is not None:
        overrides["stages"] = args.stages
    for flag in ("steps", "lr", "domains", "min_nodes", "probes", "aggregation", "params"):
        if getattr(args, flag) is not None:
            if args.mode != "zo" and flag in ("min_nodes", "probes", "aggregation", "params"):
                raise CliError(f"--{flag.replace('_', '-')} applies to --mode zo only")
            overrides[flag] = getattr(args, flag)
    if args.base_weights is not None:
        if args.mode != "zo":
            raise CliError("--base-weights applies to --mode zo only")
        overrides["base_hash"] = _base_hash(args.base_weights, args.preset, overrides.get("params"))
    if args.mode == "experts":
        from node.ensemble_cli import experts_overrides

        overrides = experts_overrides(args, overrides)
    spec = make_spec(args.mode, args.preset, read_private_key(Path(args.key)), access=args.access, **overrides)
    _check_model_fits(spec)
    out.write_text(dumps_spec(spec))
    print(f"run id {run_id(spec).hex()} written to {out}")
    return 0


def _base_hash(path: str, preset: str, params) -> str:
    import dataclasses

    from node.zo_node import BaseWeightsError, build_replica
    from protocol.runspec import RunSpec, ZoSection

    _model_config(preset)
    spec = RunSpec()
    spec = dataclasses.replace(spec, model=dataclasses.replace(spec.model, preset=preset),
                               zo=ZoSection(params=list(params or ["tok_emb.weight"])))
    try:
        return build_replica(spec, path)[1].hex()
    except BaseWeightsError as error:
        raise CliError(str(error)) from None


def _model_config(preset: str):
    from trainer.model import PRESETS

    if preset not in PRESETS:
        raise CliError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[preset]


def _check_model_fits(spec) -> None:
    """A spec whose stages cannot hold the model would be signed, shared, and fail on every node."""
    from trainer.model import stage_block_ranges

    model = _model_config(spec.model.preset)
    if spec.run.mode != "pipeline":
        return
    try:
        stage_block_ranges(model.n_layers, spec.pipeline.stages, spec.pipeline.blocks_per_stage)
    except ValueError as error:
        raise CliError(f"preset {spec.model.preset} has {model.n_layers} blocks, too few for "
                       f"{spec.pipeline.stages} stages ({error}); use fewer --stages or a larger --preset") from None


def load_verified_spec(path: str):
    from protocol.runspec import load_spec, verify_spec

    if not path:
        raise CliError("no run spec given: pass --run run.toml (create one with `swarmtrain run init`)")
    spec = load_spec(path)
    verify_spec(spec)
    return spec


def cmd_run_show(args: argparse.Namespace) -> int:
    from protocol.runspec import run_id

    spec = load_verified_spec(args.spec)
    print(f"run id {run_id(spec).hex()}: mode {spec.run.mode}, preset {spec.model.preset}, access {spec.run.access}")
    return 0


def cmd_token_issue(args: argparse.Namespace) -> int:
    from protocol.access import issue_token, token_to_text
    from protocol.keys import public_key_bytes
    from protocol.runspec import run_id

    spec = load_verified_spec(args.run)
    owner = read_private_key(Path(args.key))
    if public_key_bytes(owner).hex() != spec.owner.public_key:
        raise CliError(f"{args.key} is not the owner key of this run; tokens must be signed by the run's owner")
    try:
        node_public = bytes.fromhex(args.node)
    except ValueError:
        raise CliError("--node must be the node's public key in hex (64 characters)") from None
    if len(node_public) != 32:
        raise CliError("--node must be the node's public key in hex (64 characters)")
    if args.valid_hours <= 0:
        raise CliError("--valid-hours must be positive")
    token = issue_token(owner, run_id(spec), node_public, time.time() + args.valid_hours * 3600)
    print(token_to_text(token))
    return 0


def _install_stop(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


def cmd_bootstrap(args: argparse.Namespace) -> int:
    from node.dht import P2P_KEY_FILENAME, SwarmDHT
    from protocol.keys import generate_private_key, public_key_bytes

    config = resolve_initial_peers(load_node_config(_flags(args, _NODE_FLAGS), config_path=args.config))
    setup_logging(config.log_format, config.log_level or "INFO")
    # With a data dir (flag, SWARMTRAIN_DATA_DIR or --config) the bootstrap keeps its keys there, so
    # its multiaddrs (libp2p peer id included) stay the same across restarts, and writes them to
    # DATA_DIR/maddrs.txt for --initial-peers-file.
    data_dir = _ensure_data_dir(config.data_dir) if args.data_dir or config.data_dir != NodeConfig.data_dir else None
    key = load_or_create_identity(data_dir) if data_dir else generate_private_key()
    # The bootstrap peer belongs to no run: it stores every run's (signature-checked) records.
    swarm = SwarmDHT(key, b"", None, config.timeouts, initial_peers=config.initial_peers,
                     host_maddrs=config.resolved_host_maddrs(), announce_maddrs=config.announce_maddrs,
                     identity_path=str(data_dir / P2P_KEY_FILENAME) if data_dir else None)
    try:
        maddrs = swarm.visible_maddrs()
        print("share one of these multiaddrs as --initial-peers:")
        for maddr in maddrs:
            print(f"  {maddr}")
        sys.stdout.flush()
        if data_dir:
            write_maddrs(data_dir, maddrs)

        async def wait() -> None:
            stop = asyncio.Event()
            _install_stop(asyncio.get_running_loop(), stop)
            if data_dir:
                t = config.timeouts
                await keep_bootstrap_health(swarm, data_dir, public_key_bytes(key).hex(), t.heartbeat_interval_s,
                                            t.heartbeat_ttl_s, t.dht_request_s, stop)
                await swarm.close_p2p()
            await stop.wait()

        asyncio.run(wait())
    finally:
        swarm.shutdown()
    return 0


def _ensure_data_dir(path: str) -> Path:
    data_dir = Path(path)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        probe = data_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise CliError(f"data dir {data_dir} is not writable: {error.strerror}; pick another with --data-dir") from None
    return data_dir


def cmd_node(args: argparse.Namespace) -> int:
    from protocol.access import token_from_text
    from protocol.keys import public_key_bytes
    from protocol.runspec import run_id

    config = load_node_config(_flags(args, _NODE_FLAGS), config_path=args.config)
    spec = load_verified_spec(config.run)
    config = resolve_initial_peers(config)
    token = token_from_text(config.token) if config.token else None
    setup_logging(config.log_format, config.log_level or "INFO")
    from node.roles import choose_role  # torch and hivemind: imported once the cheap checks passed
    from node.runner import Node

    # Judge the role request before the swarm starts, not after a minute of DHT bootstrap.
    choose_role(spec.run.mode, spec.pipeline.stages, {}, config.role, config.stage)
    if config.max_memory:
        from node.memory_budget import check_budget

        stage = 0 if config.role == "data" else config.stage
        check_budget(spec, parse_size(config.max_memory), stage, spare=config.role == "spare")
    if spec.run.mode == "pipeline" and spec.pipeline.recovery == "checkpoint" and not getattr(args, "checkpoint_dir", None):
        raise CliError('this run\'s pipeline.recovery is "checkpoint" (the baseline): give --checkpoint-dir, a folder '
                       "every node of the run shares")
    if getattr(args, "snapshot_every", 1) < 1:
        raise CliError("--snapshot-every must be at least 1")
    zo = spec.run.mode == "zo"
    if zo:
        from node.zo_node import RECORD_NAMES, build_replica

        build_replica(spec, config.base_weights)  # a bad --base-weights fails here, before the swarm starts
    if spec.run.mode == "experts":
        from node.ensemble_cli import check_experts_node

        RECORD_NAMES = check_experts_node(spec, getattr(args, "fault", None))
    data_dir = _ensure_data_dir(config.data_dir)
    key = load_or_create_identity(data_dir)
    node_id = public_key_bytes(key).hex()
    # First, so that the owner of a private run can be asked for a token for this id.
    logger.info("node id %s (public key), run %s", node_id, run_id(spec).hex())
    if spec.run.access == "private" and token is None and node_id != spec.owner.public_key:
        raise CliError(f"run {spec.run.name!r} is private: ask its owner for a join token for node {node_id} "
                       f"(swarmtrain token issue --run RUN --key OWNER_KEY --node {node_id}) and pass it with --token")
    if spec.run.mode == "pipeline":
        from node.pipeline_node import RECORD_NAMES as PIPELINE_RECORDS
    node = Node(config, spec, key, token,
                app_record_names=PIPELINE_RECORDS if spec.run.mode == "pipeline"
                else RECORD_NAMES if spec.run.mode in ("zo", "experts") else ())
    node.has_worker = spec.run.mode in ("pipeline", "zo")
    if config.max_memory:
        from node.memory_budget import cap_cuda

        cap_cuda(node.device, parse_size(config.max_memory))
    console = NodeConsole(tty=None if config.log_format == "plain" else False)
    maddrs = node.start()
    try:
        console.addresses(maddrs)
        write_maddrs(data_dir, maddrs)
        console.route_logs()

        async def serve() -> None:
            stop = asyncio.Event()
            _install_stop(asyncio.get_running_loop(), stop)
            shown = asyncio.create_task(console.run(node, stop))
            services = await _node_services(node, config, stop)
            try:
                await work(stop)
            finally:
                await _end_services(services, config.timeouts.leave_grace_s)
            await shown

        async def work(stop: asyncio.Event) -> None:
            if spec.run.mode == "pipeline":
                from node.pipeline_node import run_pipeline_worker

                report = Path(args.report) if getattr(args, "report", None) else None
                keep = Path(args.keep_recovery_inputs) if getattr(args, "keep_recovery_inputs", None) else None
                checkpoints = Path(args.checkpoint_dir) if getattr(args, "checkpoint_dir", None) else None
                snapshots = (Path(args.snapshot_dir), args.snapshot_every) if getattr(args, "snapshot_dir", None) else None
                worker = run_pipeline_worker(node, stop, report, getattr(args, "fault", None), keep, checkpoints,
                                             snapshots)
            elif zo:
                from node.zo_node import run_zo_worker

                report = Path(args.zo_report) if getattr(args, "zo_report", None) else None
                worker = run_zo_worker(node, stop, config.base_weights, config.zo_join, report,
                                       getattr(args, "zo_fault", None))
            elif spec.run.mode == "experts":
                from node.experts_node import run_expert_worker

                report = Path(args.report) if getattr(args, "report", None) else None
                worker = run_expert_worker(node, stop, report, getattr(args, "fault", None))
            else:
                await node.run(stop)
                return
            task = asyncio.create_task(worker)  # it sets stop when the run's work is done
            task.add_done_callback(lambda _: stop.set())  # and when it fails: the node does not linger
            await node.run(stop)
            if task.done():
                task.result()  # a failed worker's error reaches the user
                return
            # stopped from outside (SIGTERM): a moment to end its step and write its report
            await asyncio.wait({task}, timeout=config.timeouts.leave_grace_s)
            if not task.done():
                task.cancel()
                # its own clean-up (a pipeline worker writes its report), bounded
                await asyncio.wait({task}, timeout=config.timeouts.leave_grace_s)
            elif not task.cancelled() and task.exception() is not None:
                # the node had left and closed its connections: what failed then is no error of the run
                logger.warning("the worker ended with an error while the node stopped: %s", task.exception())

        asyncio.run(serve())
    finally:
        node.shutdown()
    return 0


async def _node_services(node, config, stop: asyncio.Event) -> list[asyncio.Task]:
    """The status page (--status-port) and MQTT telemetry (--mqtt), when asked for."""
    tasks = []
    if config.status_port is not None:
        from node.status_server import node_server, run_for_node

        server = node_server(node)
        print(f"status page: {await server.start()}", flush=True)
        tasks.append(asyncio.create_task(run_for_node(node, server, stop)))
    if config.mqtt:
        from node.mqtt import publish_telemetry
        from node.mqtt_messages import parse_mqtt_url

        tasks.append(asyncio.create_task(publish_telemetry(node, parse_mqtt_url(config.mqtt), stop)))
    return tasks


async def _end_services(tasks: list[asyncio.Task], grace_s: float) -> None:
    if tasks:
        _, late = await asyncio.wait(tasks, timeout=grace_s)
        for task in late:
            task.cancel()


def cmd_status(args: argparse.Namespace) -> int:
    from node.status import collect_status, format_status

    config = resolve_initial_peers(load_node_config(_flags(args, _NODE_FLAGS), config_path=args.config))
    setup_logging(config.log_format, config.log_level or ("INFO" if args.serve is not None else "WARNING"))
    if not config.initial_peers:
        raise CliError("status needs --initial-peers (or --initial-peers-file) to find the swarm")
    spec = load_verified_spec(args.run) if args.run else None
    if args.serve is not None:
        if args.json:
            raise CliError("--json prints one report; --serve keeps serving them: choose one")
        if not 0 <= args.serve <= 65535:
            raise CliError(f"--serve {args.serve} is outside 0..65535")
        return _serve_status(config, spec, args.serve)
    if config.mqtt:
        raise CliError("--mqtt applies to --serve: a single report reads only the DHT")
    report = collect_status(config, spec)
    if args.json:
        print(json.dumps(report, indent=None, sort_keys=True))
    else:
        print(format_status(report))
    return 0


def _serve_status(config, spec, port: int) -> int:
    from node.status import observer_swarm
    from node.status_server import run_standalone, standalone_server

    swarm = observer_swarm(config)
    try:
        async def serve() -> None:
            stop = asyncio.Event()
            _install_stop(asyncio.get_running_loop(), stop)
            server = standalone_server(swarm, config, spec, port)
            print(f"status page: {await server.start()}", flush=True)
            await run_standalone(server, config, stop)

        asyncio.run(serve())
    finally:
        swarm.shutdown()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from trainer.train import TrainConfig, train_single_process

    setup_logging("plain", "WARNING")
    if args.steps is not None and args.steps <= 0:
        raise CliError("--steps must be positive")
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` or a CI time-out stops the demo as Ctrl-C does
    if args.mode == "zo":
        return _demo_zo(args)
    if args.mode == "pipeline":
        return _demo_pipeline(args)
    if args.mode == "experts":
        from node.ensemble_cli import demo_experts

        return demo_experts(args)
    if args.json:
        raise CliError("--json applies to --mode pipeline, zo and experts")
    _model_config(args.preset)
    config = TrainConfig(preset=args.preset, steps=args.steps or (60 if args.quick else 300))
    print(f"training the {config.preset} preset for {config.steps} steps on the embedded default data "
          f"(domains: {', '.join(config.domains) if config.domains else 'all'})", flush=True)

    def report(r) -> None:
        if r.val_loss is not None:
            train = f"{r.train_loss:.3f}" if r.train_loss is not None else "  -  "
            domains = "  ".join(f"{name} {loss:.2f}" for name, loss in sorted(r.val_loss_by_domain.items()))
            print(f"step {r.step:5d}  train loss {train}  validation loss {r.val_loss:.3f} ({domains})  "
                  f"{r.tokens_per_s:,.0f} tokens/s", flush=True)

    result = train_single_process(config, report)
    drop = 100 * (1 - result.final_val_loss / result.initial_val_loss)
    print(f"validation loss {result.initial_val_loss:.3f} -> {result.final_val_loss:.3f} ({drop:.0f}% lower)")
    print(_sample_text(result.model, "def "), flush=True)
    return 0


def _interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt  # the demo's finally-blocks stop its node processes and remove its folder


def _demo_zo(args: argparse.Namespace) -> int:
    from node.zo_demo import DemoError, run_demo

    args.nodes = (3 if args.quick else 4) if args.nodes is None else args.nodes
    if not 1 <= args.nodes <= 16:
        raise CliError("--nodes must be in 1..16 (each node process needs about 300 MB)")
    if args.base_steps < 0:
        raise CliError("--base-steps must be >= 0")
    try:
        result = run_demo(args.nodes, args.steps or (20 if args.quick else 60), args.base_steps, args.json)
    except DemoError as error:
        raise CliError(str(error)) from None
    if args.json:
        print(json.dumps(result, sort_keys=True))
        return 0 if result["weights_identical"] else EXIT_FAILURE
    print(f"{result['nodes']} nodes, {result['steps']} steps in {result['seconds']} s: validation loss "
          f"{result['loss_start']:.3f} -> {result['loss_end']:.3f}")
    print(f"replicas bit-identical: {'yes' if result['weights_identical'] else 'NO'}")
    print(f"on the wire: {result['payload_bytes_per_sample']} byte of payload per probe, "
          f"{result['wire_bytes_per_node_step']:,.0f} bytes per node per step with headers "
          f"(an fp32 ring all-reduce of the {result['params']:,} parameters: {result['allreduce_bytes_per_node_step']:,})")
    return 0 if result["weights_identical"] else EXIT_FAILURE


def _demo_pipeline(args: argparse.Namespace) -> int:
    from node.pipeline_demo import FULL, QUICK, DemoPlan, format_summary, run_demo
    from node.zo_demo import DemoError

    preset = QUICK if args.quick else FULL
    stages = preset["stages"] if args.stages is None else args.stages
    iterations = preset["iterations"] if args.iterations is None else args.iterations
    nodes = preset["nodes"] if args.nodes is None else args.nodes
    fail = args.fail
    if fail is None and iterations >= 3:  # the showcase: a middle stage's only node dies a third of the way in
        fail = f"stage={stages // 2}@iter={min(preset['fail_at'], iterations // 3)}"
    if not 2 <= stages <= 4:
        raise CliError("--stages must be in 2..4 for the tiny preset (4 blocks)")
    if not stages <= nodes <= 16:
        raise CliError(f"--nodes must be in {stages}..16: every stage needs a node")
    if iterations <= 0:
        raise CliError("--iterations must be positive")
    failures = []
    if fail is not None and fail != "none":
        from trainer.recovery.failures import FailureSpecError, load_failure_schedule, parse_fail_spec

        try:
            failures = (load_failure_schedule(fail, stages) if Path(fail).is_file() else parse_fail_spec(fail, stages))
        except FailureSpecError as error:
            raise CliError(f"--fail: {error}") from None
        if any(f.iteration >= iterations for f in failures):
            raise CliError(f"--fail: every failure's iteration must be below --iterations ({iterations})")
        if any(f.stage == 0 for f in failures) and nodes < stages + 1:
            raise CliError("--fail: killing a data node needs a second one (more --nodes): stage 0 is copied "
                           "from a live data node")
    spares = (1 if failures else 0) if args.spares is None else args.spares
    if not 0 <= spares <= 8:
        raise CliError("--spares must be in 0..8")
    plan = DemoPlan(nodes, stages, iterations, tuple(failures), spares, args.recovery)
    try:
        result = run_demo(plan, args.json)
    except DemoError as error:
        raise CliError(str(error)) from None
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print("\n".join(format_summary(result)))
    if not result["replicas_identical"]:
        differ = "; ".join(f"stage {stage}: " + ", ".join(f"{name} at iteration {last[0]} {last[1]}" if last else
                                                          f"{name} stepped never" for name, last in by_node.items())
                           for stage, by_node in result.get("replicas_differ", {}).items())
        print(f"swarmtrain demo: error: the replicas of a stage ended with different weights ({differ}); "
              f"the nodes' logs are in {result.get('logs', '?')}", file=sys.stderr)
        return EXIT_FAILURE
    return 0


def _sample_text(model, prompt: str) -> str:
    import torch

    from trainer.data import decode, encode

    model.eval()
    tokens = torch.tensor([encode(prompt)], dtype=torch.long)
    out = model.generate(tokens, 160, temperature=0.7, generator=torch.Generator().manual_seed(0))
    return f"a sample from the trained model, prompted with {prompt!r}:\n{decode(out[0])}"



COMMANDS = {
    "keygen": cmd_keygen,
    "bootstrap": cmd_bootstrap,
    "node": cmd_node,
    "status": cmd_status,
    "demo": cmd_demo,
    "schedule": cmd_schedule,
    "export": cmd_export,
    "generate": cmd_generate,
    "eval": cmd_eval,
    "health": cmd_health,
    "ensemble": cmd_ensemble,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = COMMANDS.get(args.command)
    if args.command == "run":
        handler = {"init": cmd_run_init, "show": cmd_run_show}[args.run_command]
    elif args.command == "token":
        handler = cmd_token_issue
    command = " ".join(filter(None, (args.command, getattr(args, "run_command", None),
                                     getattr(args, "token_command", None))))
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except (CliError, ConfigError, IdentityError) as error:
        print(f"swarmtrain {command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as error:  # noqa: BLE001 - mapped to one line below when it is a known user error
        message = _known_error(error)
        if message is None:
            raise
        print(f"swarmtrain {command}: error: {message}", file=sys.stderr)
        return EXIT_FAILURE


def _known_error(error: Exception) -> str | None:
    """Turn the library's specific errors into one line; unknown errors keep their traceback."""
    from protocol.errors import ProtocolError

    # Only modules already imported can have raised; importing torch and hivemind here would
    # add seconds to every error message.
    user_errors = [getattr(sys.modules.get(module), name, None) for module, name in
                   (("node.dht", "SwarmStartError"), ("node.dht", "DHTReadError"), ("node.runner", "DeviceError"),
                    ("node.status_server", "StatusServerError"),
                    ("node.roles", "RoleError"), ("node.averaging", "AveragingError"),
                    ("node.zo_node", "BaseWeightsError"), ("trainer.zo.replica", "ReplicaError"),
                    ("node.health", "HealthError"), ("node.memory_budget", "MemoryBudgetError"),
                    ("node.ensemble_cli", "EnsembleCliError"), ("ensemble.jobs", "JobError"))]
    if isinstance(error, tuple(cls for cls in user_errors if cls is not None)):
        return str(error)
    if isinstance(error, ProtocolError):
        return f"{type(error).__name__}: {error}"
    if isinstance(error, FileNotFoundError):
        return f"file not found: {error.filename}"
    if isinstance(error, PermissionError):
        return f"permission denied: {error.filename}"
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.strerror}: {error.filename}"
    return None


if __name__ == "__main__":
    sys.exit(main())
