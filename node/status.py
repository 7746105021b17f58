"""``swarmtrain status``: read the swarm as a client-mode DHT peer and report runs, nodes and events."""
from __future__ import annotations

import asyncio
import logging
import time

from node.config import NodeConfig
from node.dht import RUNS_DIRECTORY, DHTReadError, SwarmDHT
from node.runner import access_for_run, read_events, read_members, timeouts_for_run
from protocol.errors import ProtocolError
from protocol.keys import generate_private_key, node_id_hex
from protocol.runspec import RunSpec, loads_spec, run_id as compute_run_id, verify_spec

logger = logging.getLogger(__name__)

MAX_RUNS = 32  # the runs directory is open to anyone: list at most this many


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


async def _run_report(swarm: SwarmDHT, config: NodeConfig, run_id: bytes, spec: RunSpec, now: float) -> dict:
    access, timeouts = access_for_run(spec), timeouts_for_run(config, spec)
    members, events = await asyncio.gather(
        read_members(swarm, run_id, timeouts, access), read_events(swarm, run_id, access)
    )
    nodes = [dict(m.to_json(now), run_id=run_id.hex()) for m in members.values()]
    nodes.sort(key=lambda n: (n["state"] != "ONLINE", n["public_name"], n["id"]))
    counts: dict[str, int] = {}
    for node in nodes:
        counts[node["state"]] = counts.get(node["state"], 0) + 1
    run = {"run_id": run_id.hex(), "name": spec.run.name, "mode": spec.run.mode, "access": spec.run.access,
           "heartbeat_ttl_s": spec.swarm.heartbeat_ttl_s, "states": counts, "nodes": len(nodes)}
    events_json = [
        {"run_id": run_id.hex(), "event": e.event, "subject": node_id_hex(e.subject), "detail": e.detail, "at": e.at}
        for e in events
    ]
    return {"run": run, "nodes": nodes, "events": events_json}


async def _collect(swarm: SwarmDHT, config: NodeConfig, spec: RunSpec | None) -> dict:
    if spec is not None:
        specs = {compute_run_id(spec): spec}
    else:
        specs = _specs_from_directory(await swarm.read(RUNS_DIRECTORY))
    now = time.time()
    parts = await asyncio.gather(*(_run_report(swarm, config, rid, s, now) for rid, s in specs.items()))
    return {
        "time": now,
        "runs": [part["run"] for part in parts],
        "nodes": [node for part in parts for node in part["nodes"]],
        "events": [event for part in parts for event in part["events"]],
    }


def collect_status(config: NodeConfig, spec: RunSpec | None) -> dict:
    """One report; raises DHTReadError when the swarm does not answer in time."""
    swarm = SwarmDHT(generate_private_key(), b"", None, config.timeouts, initial_peers=config.initial_peers,
                     host_maddrs=("/ip4/127.0.0.1/tcp/0",), client_mode=True)
    try:
        return asyncio.run(asyncio.wait_for(_collect(swarm, config, spec), config.timeouts.dht_s * 2))
    except TimeoutError:
        raise DHTReadError(f"the swarm did not answer within {config.timeouts.dht_s * 2:.0f} s") from None
    finally:
        swarm.shutdown()


def format_status(report: dict) -> str:
    lines = []
    if not report["runs"]:
        lines.append("no runs found in this swarm")
    for run in report["runs"]:
        states = ", ".join(f"{count} {state}" for state, count in sorted(run["states"].items()))
        lines.append(f"run {run['run_id'][:16]} {run['name']!r} mode {run['mode']} ({run['access']}): "
                     f"{run['nodes']} nodes ({states})")
        for node in (n for n in report["nodes"] if n["run_id"] == run["run_id"]):
            where = f"stage {node['stage']}" if node["stage"] is not None else (node["expert"] or "")
            lines.append(
                f"  {node['id'][:16]}  {node['public_name'] or '-':<12} {node['role']:<8} {where:<9} "
                f"{node['state']:<8} seen {node['last_seen_s']:.1f} s ago  v{node['version']}  {node['device']}"
            )
    for event in report["events"][-10:]:
        lines.append(f"event {time.strftime('%H:%M:%S', time.gmtime(event['at']))} {event['event']}: {event['detail']}")
    return "\n".join(lines)
