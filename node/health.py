"""Node health: the node rewrites ``DATA_DIR/health.json`` with every heartbeat, and
``swarmtrain health`` judges that file. A container's HEALTHCHECK runs the command in the node's
own container, so it needs no port and no DHT: the file is the interface (exit 0 healthy, 1 not,
as Docker reads it)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HEALTH_FILENAME = "health.json"
MADDRS_FILENAME = "maddrs.txt"  # the multiaddrs to share, for --initial-peers-file
MAX_HEALTH_BYTES = 64 << 10


class HealthError(RuntimeError):
    """The node is not healthy, or its health file cannot be read; the message says which."""


@dataclass(frozen=True)
class Health:
    """What the node last knew about itself, written after each heartbeat."""

    state: str  # JOINING, ONLINE or LEAVING (protocol.messages.NodeState)
    role: str  # data, stage, spare, zo, expert, ... ("" before the node chose one)
    stage: int | None
    serving: bool  # its worker is doing the role's work (a stage is served, zo steps run, ...)
    peers: int  # libp2p peers this node is connected to
    live_members: int  # other live nodes of the run in the node's last membership view
    heartbeat_stored: bool  # some peer accepted the last heartbeat
    step: int
    updated_at: float  # unix time of this record
    heartbeat_ttl_s: float  # the run's: a record older than this is stale, as peers would judge it
    pid: int
    node_id: str
    run_id: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, raw: Any) -> "Health":
        if not isinstance(raw, dict):
            raise HealthError("the health file does not hold a JSON object")
        names = {f.name: f for f in dataclasses.fields(cls)}
        missing = sorted(set(names) - set(raw))
        if missing:
            raise HealthError(f"the health file lacks {', '.join(missing)} (written by another version?)")
        values = {name: raw[name] for name in names}
        for name in ("state", "role", "node_id", "run_id"):
            if not isinstance(values[name], str):
                raise HealthError(f"health file: {name} is not a string")
        for name in ("serving", "heartbeat_stored"):
            if not isinstance(values[name], bool):
                raise HealthError(f"health file: {name} is not true/false")
        for name in ("peers", "live_members", "step", "pid"):
            if not isinstance(values[name], int) or isinstance(values[name], bool):
                raise HealthError(f"health file: {name} is not an integer")
        for name in ("updated_at", "heartbeat_ttl_s"):
            if not isinstance(values[name], (int, float)) or isinstance(values[name], bool):
                raise HealthError(f"health file: {name} is not a number")
        if values["stage"] is not None and (not isinstance(values["stage"], int) or isinstance(values["stage"], bool)):
            raise HealthError("health file: stage is not an integer or null")
        return cls(**values)


def write_health(data_dir: Path, health: Health) -> None:
    """Atomic replace: a HEALTHCHECK that reads mid-write sees the old record, never half a file."""
    _replace_text(Path(data_dir) / HEALTH_FILENAME, json.dumps(health.to_json(), sort_keys=True))


def write_maddrs(data_dir: Path, maddrs: list[str]) -> None:
    _replace_text(Path(data_dir) / MADDRS_FILENAME, "".join(f"{maddr}\n" for maddr in maddrs))


def _replace_text(path: Path, text: str) -> None:
    """Write a temporary file beside ``path`` and rename it over ``path``; when the write fails (a full
    disk) the temporary file goes and ``path`` keeps its old contents. Not fsynced: these files are
    rewritten every few seconds and are worth nothing after a crash."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def read_health(data_dir: Path) -> Health:
    path = Path(data_dir) / HEALTH_FILENAME
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_HEALTH_BYTES + 1)
    except FileNotFoundError:
        raise HealthError(f"no health file {path}: no node has run with --data-dir {data_dir} "
                          "(or it has not finished joining)") from None
    except OSError as error:
        raise HealthError(f"cannot read {path}: {error.strerror}") from None
    if len(raw) > MAX_HEALTH_BYTES:
        raise HealthError(f"{path} is larger than {MAX_HEALTH_BYTES} bytes; it is not a health file")
    try:
        return Health.from_json(json.loads(raw))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise HealthError(f"{path} is not JSON") from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def problems(health: Health, now: float, pid_alive: bool) -> list[str]:
    """Why the node is not healthy; empty when it is. Healthy = its process runs, the record is
    fresh (younger than the run's heartbeat ttl), it is ONLINE, connected (at least one libp2p peer,
    and a peer took its last heartbeat) and serving (a spare standing by counts: that is its job).
    A bootstrap is healthy while it runs and keeps its record fresh."""
    found = []
    bootstrap = health.role == "bootstrap"  # the first peer of a swarm: nobody may have connected yet
    if not pid_alive:
        found.append(f"node process {health.pid} is not running")
    age = now - health.updated_at
    if age > health.heartbeat_ttl_s:
        found.append(f"last heartbeat {age:.0f} s ago (stale after {health.heartbeat_ttl_s:.0f} s)")
    if health.state != "ONLINE":
        found.append(f"state {health.state}")
    if not bootstrap and (health.peers < 1 or not health.heartbeat_stored):
        found.append(f"not connected ({health.peers} peers, last heartbeat "
                     f"{'stored' if health.heartbeat_stored else 'stored by no peer'})")
    if not health.serving and health.role != "spare":
        found.append(f"not serving yet (role {health.role or 'none'})")
    return found


def describe(health: Health, now: float) -> str:
    where = f" stage {health.stage}" if health.stage is not None else ""
    work = "serving" if health.serving else "standing by" if health.role == "spare" else "not serving"
    return (f"{health.state} {health.role or '-'}{where}, {work}, step {health.step}, {health.peers} peers, "
            f"{health.live_members} other live nodes, heartbeat {now - health.updated_at:.1f} s ago")


async def keep_bootstrap_health(swarm, data_dir: Path, node_id: str, interval_s: float, ttl_s: float,
                                request_s: float, stop) -> None:
    """A bootstrap has no run and no heartbeats: it rewrites its health record every ``interval_s``
    so that the image's HEALTHCHECK judges it too (``swarm``: node.dht.SwarmDHT)."""
    import asyncio
    import logging

    while not stop.is_set():
        peers = 0
        try:
            p2p = await swarm.p2p()
            peers = len(await asyncio.wait_for(p2p.list_peers(), request_s))
        except Exception as error:  # noqa: BLE001 - p2pd's errors are bare (or a timeout); 0 peers says it
            logging.getLogger(__name__).debug("could not list libp2p peers: %s", error)
        health = Health(state="ONLINE", role="bootstrap", stage=None, serving=swarm.dht.is_alive(), peers=peers,
                        live_members=0, heartbeat_stored=True, step=0, updated_at=time.time(), heartbeat_ttl_s=ttl_s,
                        pid=os.getpid(), node_id=node_id, run_id="")
        try:
            write_health(data_dir, health)
        except OSError as error:
            logging.getLogger(__name__).warning("cannot write the health file in %s: %s", data_dir, error.strerror)
        try:
            await asyncio.wait_for(stop.wait(), interval_s)
        except TimeoutError:
            pass


# ---- the command -----------------------------------------------------------------------------


def add_health_parser(commands: Any) -> argparse.ArgumentParser:
    health = commands.add_parser(
        "health", help="exit 0 if the local node is connected and serving (for container health checks)",
        description="Read the health file that a running `swarmtrain node` keeps in its data dir (rewritten "
                    "with every heartbeat) and exit 0 when the node is ONLINE, connected to peers, serving, "
                    "and its last heartbeat is younger than the run's heartbeat ttl; else print why and exit 1.",
        epilog="The data dir also comes from SWARMTRAIN_DATA_DIR or the --config file, as for `swarmtrain node`.")
    health.add_argument("--data-dir", default=None, help="the node's data dir (default ./swarmtrain-data)")
    health.add_argument("--config", default=None, help="TOML file with node settings ([node] table)")
    health.add_argument("--json", action="store_true", help="print the health record and the verdict as JSON")
    return health


def cmd_health(args: argparse.Namespace) -> int:
    from node.config import load_node_config

    flags = {"data_dir": args.data_dir} if args.data_dir is not None else {}
    config = load_node_config(flags, config_path=args.config)
    health = read_health(Path(config.data_dir))
    now = time.time()
    found = problems(health, now, _pid_alive(health.pid))
    if args.json:
        print(json.dumps({"healthy": not found, "problems": found, **health.to_json()}, sort_keys=True))
        sys.stdout.flush()
    if found:
        raise HealthError("unhealthy: " + "; ".join(found))
    if not args.json:
        print(f"healthy: {describe(health, now)}")
    return 0
