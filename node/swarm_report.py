"""The swarm report behind ``swarmtrain status --json``, the status page and ``/api/v1/swarm``.

Pure logic: what was read from the DHT (announcements and heartbeats as members, published events,
the pipeline leader's job board and the spares' claims) becomes one JSON-ready dict with nodes,
stage coverage, experts, ZO progress, structured events and a headline.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from node.membership import Member
from protocol.keys import node_id_hex
from protocol.messages import Event, Role
from protocol.runspec import RunSpec
from trainer.recovery.jobs import claim_winner, jobs_from_record, moves_from_record

REPORT_VERSION = 1
LIVE = ("ONLINE", "JOINING")
MAX_EVENTS = 200
HEALTHY, RECOVERING, DEGRADED = "healthy", "recovering", "degraded"
_SEVERITY = {HEALTHY: 0, RECOVERING: 1, DEGRADED: 2}
_CIRCUIT = "/p2p-circuit"

# The detail texts of the events that trainer/pipeline/leader.py and node/pipeline_node.py publish.
_STAGE = re.compile(r"\bstage (\d{1,4})\b")
_SERVED_AGAIN = re.compile(r"stage (\d{1,4}) is served again after ([0-9]+(?:\.[0-9]+)?) s")
_RESTORED = re.compile(r"stage (\d{1,4}) restored by ([a-z_+-]{1,32}) in ([0-9]+(?:\.[0-9]+)?) s")
_MERGE_WINDOW_S = 120.0  # a restorer's event and the leader's "served again" of one recovery


@dataclass(frozen=True)
class RunReading:
    """One run as read from the DHT at one moment."""

    run_id: bytes
    spec: RunSpec
    members: Mapping[bytes, Member]
    events: Sequence[Event] = ()
    board: dict | None = None  # the pipeline leader's pp.recovery record (trainer/recovery/jobs.py)
    claims: Mapping[bytes, dict] = field(default_factory=dict)  # pp.claim records by signer


def reachability(maddrs: Sequence[str]) -> str:
    """What the node's own announced addresses say: only relay circuits means peers reach it relayed."""
    if not maddrs:
        return "unknown"
    return "relayed" if all(_CIRCUIT in m for m in maddrs) else "direct"


def node_json(member: Member, run_id: bytes, now: float) -> dict:
    out = member.to_json(now)
    out.update(run_id=run_id.hex(), reachability=reachability(member.announcement.maddrs),
               dead_reason=member.dead_reason, last_seen=member.last_seen)
    return out


def _live(members: Mapping[bytes, Member]) -> set[bytes]:
    return {key for key, m in members.items() if m.state in LIVE}


def _name(member: Member | None, key: bytes) -> str:
    if member is not None and member.announcement.public_name:
        return member.announcement.public_name
    return node_id_hex(key)[:12]


def _metric(member: Member, name: str) -> float | None:
    return member.heartbeat.metrics.get(name) if member.heartbeat is not None else None


def stage_coverage(reading: RunReading, now: float) -> dict:
    """Stages x replicas: ``served`` (an ONLINE replica), ``joining`` (only JOINING ones), ``recovering``
    (none, but a live spare holds a claim on it or the leader named a node to move there) or ``lost``."""
    members = reading.members
    live = _live(members)
    lost_since = jobs_from_record(reading.board)
    movers = {stage: node for node, stage in moves_from_record(reading.board).items() if node in live}
    stages = []
    for stage in range(reading.spec.pipeline.stages):
        replicas = sorted(
            (m for m in members.values()
             if m.announcement.stage == stage and m.announcement.role in (Role.DATA, Role.STAGE)),
            key=lambda m: (m.state not in LIVE, m.announcement.public_name, m.id))
        online = sum(1 for m in replicas if m.state == "ONLINE")
        joining = sum(1 for m in replicas if m.state == "JOINING")
        taker = claim_winner(reading.claims, stage, now, live) or movers.get(stage)
        if online:
            state = "served"
        elif joining:
            state = "joining"
        elif taker is not None:
            state = "recovering"
        else:
            state = "lost"
        stages.append({
            "stage": stage, "state": state, "online": online, "joining": joining,
            "lost_since": lost_since.get(stage) if state in ("lost", "recovering") else None,
            "recovering_by": None if taker is None or state != "recovering" else node_id_hex(taker),
            "recovering_by_name": None if taker is None or state != "recovering" else _name(members.get(taker), taker),
            "replicas": [{"id": m.id, "public_name": m.announcement.public_name, "state": m.state} for m in replicas],
        })
    spares = sum(1 for key in live if members[key].announcement.role == Role.SPARE)
    return {"stages": stages, "lost": [s["stage"] for s in stages if s["state"] in ("lost", "recovering")],
            "spares": spares}


def expert_progress(members: Mapping[bytes, Member], events: Sequence[Event]) -> list[dict]:
    """Experts from the nodes that announce ``role = "expert"`` with ``expert = <job name>``; progress
    from their heartbeat metrics ``expert_step`` / ``expert_steps`` and ``loss``; done after an
    ``expert_done`` event about it (its node announced the expert, or the detail names it)."""
    by_name: dict[str, list[Member]] = {}
    for member in members.values():
        a = member.announcement
        if a.role == Role.EXPERT and a.expert:
            by_name.setdefault(a.expert, []).append(member)
    done: set[str] = set()
    for event in events:
        if event.event != "expert_done":
            continue
        subject = members.get(event.subject)
        if subject is not None and subject.announcement.expert:
            done.add(subject.announcement.expert)
        done.update(name for name in by_name if re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", event.detail))
    experts = []
    for name, nodes in sorted(by_name.items()):
        live = [m for m in nodes if m.state in LIVE]
        reporting = [m for m in (live or nodes) if _metric(m, "expert_step") is not None]
        lead = max(reporting, key=lambda m: (_metric(m, "expert_step"), m.last_seen), default=None)
        step = int(_metric(lead, "expert_step")) if lead is not None else None
        steps_value = _metric(lead, "expert_steps") if lead is not None else None
        steps = int(steps_value) if steps_value else None
        loss = _metric(lead, "loss") if lead is not None else None
        finished = name in done or (step is not None and steps is not None and step >= steps)
        state = "done" if finished else "training" if live else "stalled"
        experts.append({
            "name": name, "state": state, "step": step, "steps": steps,
            "progress": min(1.0, step / steps) if step is not None and steps else (1.0 if finished else None),
            "loss": loss, "nodes": sorted(m.id for m in live),
            "node_names": sorted(m.announcement.public_name or m.id[:12] for m in live),
        })
    return experts


def zo_progress(reading: RunReading) -> dict:
    """The replicas' head step, the run's steps, bytes per step and the last validation loss."""
    live = [m for m in reading.members.values() if m.state in LIVE and m.announcement.role == Role.ZO]
    steps = [(_metric(m, "zo_step") or 0.0, m) for m in live]
    head = max(steps, key=lambda item: item[0], default=(None, None))
    wire = [v for v in (_metric(m, "bytes_per_step") for m in live) if v is not None]
    zo = reading.spec.zo
    return {
        "step": int(head[0]) if head[0] is not None else None,
        "steps": reading.spec.train.steps,
        "nodes": len(live),
        "min_nodes": zo.min_nodes,
        # one byte per probe and node is the payload; bytes_per_step is what a node's RPCs really sent
        "payload_bytes_per_step": zo.probes * len(live),
        "bytes_per_step": sum(wire) / len(wire) if wire else None,
        "val_loss": _metric(head[1], "val_loss") if head[1] is not None else None,
    }


def pipeline_progress(reading: RunReading) -> dict:
    data = [m for m in reading.members.values() if m.state in LIVE and m.announcement.role == Role.DATA]
    iterations = [v for v in (_metric(m, "iteration") for m in data) if v is not None]
    losses = [v for v in (_metric(m, "loss") for m in data) if v is not None]
    return {"iteration": int(max(iterations)) if iterations else None, "steps": reading.spec.train.steps,
            "loss": sum(losses) / len(losses) if losses else None,
            "tokens_per_s": sum(_metric(m, "tokens_per_s") or 0.0 for m in data)}


def structured_events(run_id: bytes, events: Sequence[Event], members: Mapping[bytes, Member]) -> list[dict]:
    """Events with the stage, recovery method and durations their detail carries. A restorer's
    ``recovery`` (with the method) and the leader's (with the time the stage was lost) of one stage
    within a couple of minutes are one recovery."""
    items = []
    for event in events:
        item = {"run_id": run_id.hex(), "event": event.event, "subject": node_id_hex(event.subject),
                "subject_name": _name(members.get(event.subject), event.subject), "detail": event.detail,
                "at": event.at, "stage": None, "method": None, "duration_s": None, "restore_s": None,
                "observer": False}
        stage = _STAGE.search(event.detail)
        if stage and event.event in ("stage_lost", "recovery"):
            item["stage"] = int(stage.group(1))
        if event.event == "recovery":
            if served := _SERVED_AGAIN.search(event.detail):
                item["duration_s"] = float(served.group(2))
            if restored := _RESTORED.search(event.detail):
                item["method"], item["restore_s"] = restored.group(2), float(restored.group(3))
        items.append(item)
    merged: list[dict] = []
    restorers = [i for i in items if i["event"] == "recovery" and i["method"] is not None]
    used: set[int] = set()
    for item in items:
        if item["event"] == "recovery" and item["method"] is None:
            match = next((r for r in restorers if id(r) not in used and r["stage"] == item["stage"]
                          and abs(r["at"] - item["at"]) <= _MERGE_WINDOW_S), None)
            if match is not None:
                used.add(id(match))
                item = dict(item, method=match["method"], restore_s=match["restore_s"],
                            detail=f"{item['detail']} (rebuilt by {match['subject_name']}: {match['method']})")
        merged.append(item)
    return [i for i in merged if id(i) not in used]


def run_health(run: dict) -> tuple[str, list[str]]:
    """healthy, recovering (a lost stage is being taken over) or degraded, with the reasons."""
    label = run["name"] or run["run_id"][:12]
    live = run["states"].get("ONLINE", 0) + run["states"].get("JOINING", 0)
    if live == 0:
        return DEGRADED, [f"run {label}: no live node"]
    state, reasons = HEALTHY, []

    def worse(new: str, reason: str) -> None:
        nonlocal state
        reasons.append(reason)
        if _SEVERITY[new] > _SEVERITY[state]:
            state = new

    for stage in (run.get("coverage") or {}).get("stages", []):
        if stage["state"] == "lost":
            worse(DEGRADED, f"run {label}: stage {stage['stage']} has no live replica")
        elif stage["state"] == "recovering":
            worse(RECOVERING, f"run {label}: stage {stage['stage']} is being restored by {stage['recovering_by_name']}")
        elif stage["state"] == "joining":
            worse(RECOVERING, f"run {label}: stage {stage['stage']} has only joining replicas")
    for expert in run.get("experts", []):
        if expert["state"] == "stalled":
            worse(DEGRADED, f"run {label}: expert {expert['name']} has no live node")
    zo = run.get("zo")
    if zo is not None and zo["nodes"] < zo["min_nodes"]:
        worse(DEGRADED, f"run {label}: {zo['nodes']} of zo.min_nodes={zo['min_nodes']} nodes live")
    return state, reasons


def headline(runs: Sequence[dict]) -> dict:
    if not runs:
        return {"state": DEGRADED, "reasons": ["no runs found in this swarm"]}
    state, reasons = HEALTHY, []
    for run in runs:
        reasons.extend(run["health"]["reasons"])
        if _SEVERITY[run["health"]["state"]] > _SEVERITY[state]:
            state = run["health"]["state"]
    return {"state": state, "reasons": reasons}


def run_report(reading: RunReading, now: float) -> dict:
    """The run's entry, its nodes and its events."""
    spec, run_id = reading.spec, reading.run_id
    nodes = [node_json(m, run_id, now) for m in reading.members.values()]
    nodes.sort(key=lambda n: (n["state"] != "ONLINE", n["public_name"], n["id"]))
    counts: dict[str, int] = {}
    for node in nodes:
        counts[node["state"]] = counts.get(node["state"], 0) + 1
    run = {"run_id": run_id.hex(), "name": spec.run.name, "mode": spec.run.mode, "access": spec.run.access,
           "heartbeat_interval_s": spec.swarm.heartbeat_interval_s, "heartbeat_ttl_s": spec.swarm.heartbeat_ttl_s,
           "states": counts, "nodes": len(nodes), "coverage": None, "experts": [], "zo": None, "progress": None}
    if spec.run.mode == "pipeline":
        run["coverage"] = stage_coverage(reading, now)
        run["progress"] = pipeline_progress(reading)
    run["experts"] = expert_progress(reading.members, reading.events)
    if spec.run.mode == "zo":
        run["zo"] = zo_progress(reading)
    state, reasons = run_health(run)
    run["health"] = {"state": state, "reasons": reasons}
    return {"run": run, "nodes": nodes, "events": structured_events(run_id, reading.events, reading.members)}


def build_report(readings: Sequence[RunReading], now: float) -> dict:
    """The whole swarm: what ``/api/v1/swarm`` and ``swarmtrain status --json`` return."""
    parts = [run_report(r, now) for r in readings]
    runs = [p["run"] for p in parts]
    events = sorted((e for p in parts for e in p["events"]), key=lambda e: e["at"])[-MAX_EVENTS:]
    return {
        "version": REPORT_VERSION,
        "time": now,
        "headline": headline(runs),
        "runs": runs,
        "nodes": [n for p in parts for n in p["nodes"]],
        "events": events,
    }
