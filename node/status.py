"""``swarmtrain status``: read the swarm as a client-mode DHT peer and report runs, nodes and events.

``read_swarm`` does the reading (one pass over the runs directory, members, events and the pipeline
leader's job board); ``node/swarm_report.py`` turns it into the report. The status server
(node/status_server.py) repeats the same reading on a clock.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from node.config import NodeConfig
from node.dht import RUNS_DIRECTORY, DHTReadError, SwarmDHT
from node.membership import Member, derive_members
from node.runner import access_for_run, fetch_member_records, read_events, timeouts_for_run
from node.swarm_report import LIVE, RunReading, build_report
from protocol.errors import ProtocolError
from protocol.keys import generate_private_key
from protocol.messages import Heartbeat, Role
from protocol.runspec import RunSpec, loads_spec, run_id as compute_run_id, verify_spec
from trainer.recovery.jobs import CLAIM_RECORD, RECOVERY_RECORD

logger = logging.getLogger(__name__)

MAX_RUNS = 32  # the runs directory is open to anyone: list at most this many
MergeHeartbeats = Callable[[bytes, dict[bytes, tuple[float, Heartbeat]]], dict[bytes, tuple[float, Heartbeat]]]


def _specs_from_directory(records) -> dict[bytes, RunSpec]:
    """Runs whose directory entry carries a spec that is signed by its owner and hashes to its run id."""
    specs: dict[bytes, RunSpec] = {}
    for record in records.values():
        text = record.msg.get("spec")
        if not isinstance(text, str) or record.envelope.run_id in specs:
            continue
        try:
            spec = loads_spec(text)
            verify_spec(spec)
        except ProtocolError as error:
            logger.debug("ignored a runs-directory entry: %s", error)
            continue
        if compute_run_id(spec) == record.envelope.run_id:
            specs[record.envelope.run_id] = spec
    return dict(sorted(specs.items())[:MAX_RUNS])


def pipeline_leader(members: dict[bytes, Member]) -> bytes | None:
    """The live data or stage node with the smallest id (trainer/pipeline/leader.py's rule)."""
    return min((key for key, m in members.items() if m.state in LIVE and m.announcement.stage is not None
                and m.announcement.role in (Role.DATA, Role.STAGE)), default=None)


async def read_run(swarm: SwarmDHT, config: NodeConfig, run_id: bytes, spec: RunSpec,
                   merge: MergeHeartbeats | None = None, members: dict[bytes, Member] | None = None) -> RunReading:
    """One run, every record read at once. ``merge``: heartbeats that arrived another way (MQTT),
    merged in before liveness is judged; ``members``: a membership view already at hand (a node's
    own, refreshed every heartbeat interval), so that only the other records are read."""
    access, timeouts = access_for_run(spec), timeouts_for_run(config, spec)
    pipeline = spec.run.mode == "pipeline"

    async def nothing() -> dict:
        return {}

    records, events, boards, found = await asyncio.gather(
        fetch_member_records(swarm, run_id, access) if members is None else nothing(),
        read_events(swarm, run_id, access),
        swarm.read(RECOVERY_RECORD, run_id=run_id, access=access) if pipeline else nothing(),
        swarm.read(CLAIM_RECORD, run_id=run_id, access=access) if pipeline else nothing(),
    )
    if members is None:
        announcements, heartbeats = records
        if merge is not None:
            heartbeats = merge(run_id, heartbeats)
        members = derive_members(announcements, heartbeats, time.time(), timeouts.heartbeat_ttl_s)
    leader = pipeline_leader(members)
    board = boards[leader].msg if leader in boards else None
    claims = {sender: record.msg for sender, record in found.items()}
    return RunReading(run_id, spec, members, events, board, claims)


async def read_swarm(swarm: SwarmDHT, config: NodeConfig, spec: RunSpec | None,
                     merge: MergeHeartbeats | None = None) -> list[RunReading]:
    """Every run of the runs directory (or only ``spec``'s), read once."""
    if spec is not None:
        specs = {compute_run_id(spec): spec}
    else:
        specs = _specs_from_directory(await swarm.read(RUNS_DIRECTORY))
    return list(await asyncio.gather(*(read_run(swarm, config, rid, s, merge) for rid, s in specs.items())))


def observer_swarm(config: NodeConfig) -> SwarmDHT:
    """A client-mode DHT peer with a throwaway key: it belongs to no run and stores nothing."""
    return SwarmDHT(generate_private_key(), b"", None, config.timeouts, initial_peers=config.initial_peers,
                    host_maddrs=("/ip4/127.0.0.1/tcp/0",), client_mode=True)


def collect_status(config: NodeConfig, spec: RunSpec | None) -> dict:
    """One report; raises DHTReadError when the swarm does not answer in time."""
    swarm = observer_swarm(config)
    try:
        readings = asyncio.run(asyncio.wait_for(read_swarm(swarm, config, spec), config.timeouts.dht_s * 2))
    except TimeoutError:
        raise DHTReadError(f"the swarm did not answer within {config.timeouts.dht_s * 2:.0f} s") from None
    finally:
        swarm.shutdown()
    return build_report(readings, time.time())


def format_status(report: dict) -> str:
    lines = [f"swarm {report['headline']['state']}" + "".join(f"\n  {r}" for r in report["headline"]["reasons"])]
    for run in report["runs"]:
        states = ", ".join(f"{count} {state}" for state, count in sorted(run["states"].items()))
        lines.append(f"run {run['run_id'][:16]} {run['name']!r} mode {run['mode']} ({run['access']}): "
                     f"{run['nodes']} nodes ({states})")
        if run["coverage"] is not None:
            cells = " ".join(f"{s['stage']}:{s['online']}{'+' + str(s['joining']) if s['joining'] else ''}"
                             f"{'' if s['state'] == 'served' else ' ' + s['state'].upper()}"
                             for s in run["coverage"]["stages"])
            lines.append(f"  stages (online replicas): {cells}")
        for expert in run["experts"]:
            progress = f"{expert['step']}/{expert['steps']}" if expert["steps"] else str(expert["step"] or "-")
            lines.append(f"  expert {expert['name']}: {expert['state']} {progress}")
        if run["zo"] is not None:
            lines.append(f"  zo step {run['zo']['step']}/{run['zo']['steps']}, {run['zo']['nodes']} replicas")
        for node in (n for n in report["nodes"] if n["run_id"] == run["run_id"]):
            where = f"stage {node['stage']}" if node["stage"] is not None else (node["expert"] or "")
            lines.append(
                f"  {node['id'][:16]}  {node['public_name'] or '-':<12} {node['role']:<8} {where:<9} "
                f"{node['state']:<8} seen {node['last_seen_s']:.1f} s ago  v{node['version']}  {node['device']}"
            )
    for event in report["events"][-10:]:
        lines.append(f"event {time.strftime('%H:%M:%S', time.gmtime(event['at']))} {event['event']}: {event['detail']}")
    return "\n".join(lines)
