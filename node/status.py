"""``swarmtrain status``: read the swarm as a client-mode DHT peer and report runs, nodes and events."""
from __future__ import annotations

import asyncio
import time

from node.config import NodeConfig
from node.dht import RUNS_DIRECTORY, SwarmDHT
from node.runner import read_events, read_members, timeouts_for_run
from protocol.keys import generate_private_key, node_id_hex
from protocol.runspec import RunSpec, run_id as compute_run_id


async def _collect(swarm: SwarmDHT, config: NodeConfig, spec: RunSpec | None) -> dict:
    timeouts = timeouts_for_run(config, spec) if spec is not None else config.timeouts
    runs: dict[bytes, dict] = {}
    if spec is not None:
        runs[compute_run_id(spec)] = {"name": spec.run.name, "mode": spec.run.mode}
    else:
        for record in (await swarm.read(RUNS_DIRECTORY)).values():
            run_id = record.envelope.run_id
            name, mode = record.msg.get("name"), record.msg.get("mode")
            runs.setdefault(run_id, {"name": name if isinstance(name, str) else "",
                                     "mode": mode if isinstance(mode, str) else ""})
    now = time.time()
    report: dict = {"time": now, "runs": [], "nodes": [], "events": []}
    for run_id, info in sorted(runs.items()):
        members, events = await asyncio.gather(read_members(swarm, run_id, timeouts), read_events(swarm, run_id))
        nodes = [dict(m.to_json(now), run_id=run_id.hex()) for m in members.values()]
        nodes.sort(key=lambda n: (n["state"] != "ONLINE", n["public_name"], n["id"]))
        counts: dict[str, int] = {}
        for node in nodes:
            counts[node["state"]] = counts.get(node["state"], 0) + 1
        report["runs"].append({"run_id": run_id.hex(), **info, "states": counts, "nodes": len(nodes)})
        report["nodes"].extend(nodes)
        report["events"].extend(
            {"run_id": run_id.hex(), "event": e.event, "subject": node_id_hex(e.subject), "detail": e.detail, "at": e.at}
            for e in events
        )
    return report


def collect_status(config: NodeConfig, spec: RunSpec | None) -> dict:
    run_id = compute_run_id(spec) if spec is not None else b""
    swarm = SwarmDHT(generate_private_key(), run_id, None, config.timeouts, initial_peers=config.initial_peers,
                     host_maddrs=("/ip4/127.0.0.1/tcp/0",), client_mode=True)
    try:
        return asyncio.run(_collect(swarm, config, spec))
    finally:
        swarm.shutdown()


def format_status(report: dict) -> str:
    lines = []
    if not report["runs"]:
        lines.append("no runs found in this swarm")
    for run in report["runs"]:
        states = ", ".join(f"{count} {state}" for state, count in sorted(run["states"].items()))
        lines.append(f"run {run['run_id'][:16]} {run['name']!r} mode {run['mode']}: {run['nodes']} nodes ({states})")
        for node in (n for n in report["nodes"] if n["run_id"] == run["run_id"]):
            where = f"stage {node['stage']}" if node["stage"] is not None else (node["expert"] or "")
            lines.append(
                f"  {node['id'][:16]}  {node['public_name'] or '-':<12} {node['role']:<8} {where:<9} "
                f"{node['state']:<8} seen {node['last_seen_s']:.1f} s ago  v{node['version']}  {node['device']}"
            )
    for event in report["events"][-10:]:
        lines.append(f"event {time.strftime('%H:%M:%S', time.gmtime(event['at']))} {event['event']}: {event['detail']}")
    return "\n".join(lines)
