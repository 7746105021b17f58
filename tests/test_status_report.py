"""The swarm report's pure logic over constructed records: stage coverage, the headline, experts (the
issue 7 contract), ZO progress, structured recovery events, curves and the feed's liveness changes."""
from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from node.membership import Member
from node.status_feed import StatusFeed
from node.swarm_report import RunReading, build_report, reachability, structured_events
from protocol.keys import generate_private_key, public_key_bytes
from protocol.messages import Event, Heartbeat, NodeAnnouncement, NodeState, Role
from protocol.runspec import make_spec, run_id

NOW = 1_700_000_000.0
SCHEMA = json.loads((Path(__file__).resolve().parent.parent / "node/status_page/swarm.schema.json").read_text())
OWNER = generate_private_key()
PIPELINE = make_spec("pipeline", "tiny", OWNER, name="pipe", stages=3)
ZO = make_spec("zo", "tiny", OWNER, name="zo-run", min_nodes=2, probes=4)
EXPERTS = make_spec("experts", "tiny", OWNER, name="ens")


def key(n: int) -> bytes:
    """A deterministic 32-byte key; its order follows n (the pipeline leader is the smallest)."""
    return bytes([n]) * 32


def member(n: int, role: Role, *, stage=None, expert=None, state="ONLINE", metrics=None, name=None,
           maddrs=("/ip4/127.0.0.1/tcp/4000",), seen=NOW - 1) -> tuple[bytes, Member]:
    announcement = NodeAnnouncement(peer_id=f"peer{n}", public_name=name or f"n{n}", role=role, stage=stage,
                                    expert=expert, device="cpu", throughput=0.0, version="0.1.0",
                                    state=NodeState.ONLINE if state in ("ONLINE", "DEAD") else NodeState(state),
                                    maddrs=list(maddrs))
    heartbeat = Heartbeat(state=NodeState.ONLINE if state in ("ONLINE", "DEAD") else NodeState(state), step=0,
                          metrics=dict(metrics or {}))
    return key(n), Member(key(n).hex(), key(n), announcement, heartbeat, state, seen,
                          "no heartbeat for 9.0 s" if state == "DEAD" else "")


def pipeline_reading(*members, board=None, claims=None, events=()) -> RunReading:
    return RunReading(run_id(PIPELINE), PIPELINE, dict(members), list(events), board, claims or {})


def report_of(*readings) -> dict:
    return build_report(list(readings), NOW)


def served_swarm(overrides: dict | None = None) -> list:
    """A data node and one replica each of stages 1 and 2; ``overrides`` replaces some by position."""
    nodes = {0: member(1, Role.DATA, stage=0, metrics={"iteration": 12.0, "loss": 3.2, "tokens_per_s": 500.0}),
             1: member(2, Role.STAGE, stage=1), 2: member(3, Role.STAGE, stage=2)}
    nodes.update(overrides or {})
    return list(nodes.values())


def test_every_stage_served_is_healthy_and_lists_replicas():
    report = report_of(pipeline_reading(*served_swarm(), member(4, Role.STAGE, stage=1, state="JOINING")))
    run = report["runs"][0]
    assert report["headline"] == {"state": "healthy", "reasons": []}
    stages = run["coverage"]["stages"]
    assert [(s["stage"], s["state"], s["online"], s["joining"]) for s in stages] == [
        (0, "served", 1, 0), (1, "served", 1, 1), (2, "served", 1, 0)]
    assert [r["public_name"] for r in stages[1]["replicas"]] == ["n2", "n4"]
    assert run["progress"] == {"iteration": 12, "steps": PIPELINE.train.steps, "loss": 3.2, "tokens_per_s": 500.0}


def test_a_stage_whose_only_replica_died_is_lost_and_degrades_the_swarm():
    report = report_of(pipeline_reading(*served_swarm({2: member(3, Role.STAGE, stage=2, state="DEAD")}),
                                        board={"lost": [[2, NOW - 5.0]], "moves": []}))
    stage = report["runs"][0]["coverage"]["stages"][2]
    assert stage["state"] == "lost" and stage["lost_since"] == NOW - 5.0
    assert stage["replicas"] == [{"id": key(3).hex(), "public_name": "n3", "state": "DEAD"}]
    assert report["runs"][0]["coverage"]["lost"] == [2]
    assert report["headline"]["state"] == "degraded"
    assert report["headline"]["reasons"] == ["run pipe: stage 2 has no live replica"]


def test_a_lost_stage_claimed_by_a_live_spare_is_recovering():
    spare = member(9, Role.SPARE, name="spare0")
    dead = member(3, Role.STAGE, stage=2, state="DEAD")
    claims = {key(9): {"stage": 2, "until": NOW + 60.0}}
    report = report_of(pipeline_reading(*served_swarm({2: dead}), spare, claims=claims))
    stage = report["runs"][0]["coverage"]["stages"][2]
    assert (stage["state"], stage["recovering_by_name"]) == ("recovering", "spare0")
    assert report["headline"] == {"state": "recovering", "reasons": ["run pipe: stage 2 is being restored by spare0"]}
    assert report["runs"][0]["coverage"]["spares"] == 1
    # an expired lease, or a claimant that died, restores nothing
    expired = {key(9): {"stage": 2, "until": NOW - 1.0}}
    assert report_of(pipeline_reading(*served_swarm({2: dead}), spare, claims=expired))["headline"]["state"] == "degraded"
    gone = member(9, Role.SPARE, name="spare0", state="DEAD")
    assert report_of(pipeline_reading(*served_swarm({2: dead}), gone, claims=claims))["headline"]["state"] == "degraded"


def test_a_stage_the_leader_moves_a_node_into_is_recovering():
    board = {"lost": [[2, NOW - 40.0]], "moves": [[key(4), 2]]}
    mover = member(4, Role.STAGE, stage=1)
    report = report_of(pipeline_reading(*served_swarm({2: member(3, Role.STAGE, stage=2, state="DEAD")}), mover,
                                        board=board))
    assert report["runs"][0]["coverage"]["stages"][2]["state"] == "recovering"


def test_no_runs_and_no_live_nodes_are_degraded():
    assert report_of()["headline"] == {"state": "degraded", "reasons": ["no runs found in this swarm"]}
    report = report_of(pipeline_reading(member(1, Role.DATA, stage=0, state="DEAD")))
    assert report["headline"]["state"] == "degraded"
    assert report["headline"]["reasons"][0] == "run pipe: no live node"


def test_experts_and_their_progress_from_the_announced_contract():
    # issue 7: role "expert", expert = <job name>, heartbeat metrics expert_step / expert_steps / loss
    members = dict([
        member(1, Role.EXPERT, expert="python", metrics={"expert_step": 30.0, "expert_steps": 120.0, "loss": 2.5}),
        member(2, Role.EXPERT, expert="prose", metrics={"expert_step": 80.0, "expert_steps": 80.0, "loss": 1.9}),
        member(3, Role.EXPERT, expert="arithmetic", metrics={"expert_step": 10.0, "expert_steps": 200.0}, state="DEAD"),
        member(4, Role.EXPERT, expert="python-large", metrics={"expert_step": 5.0, "expert_steps": 50.0, "loss": 4.0}),
    ])
    events = [Event("expert_done", key(4), "python-large finished after 50 steps", NOW - 2)]
    report = report_of(RunReading(run_id(EXPERTS), EXPERTS, members, events))
    experts = {e["name"]: e for e in report["runs"][0]["experts"]}
    assert (experts["python"]["state"], experts["python"]["step"], experts["python"]["steps"]) == ("training", 30, 120)
    assert experts["python"]["progress"] == pytest.approx(0.25) and experts["python"]["loss"] == 2.5
    assert experts["prose"]["state"] == "done"  # every step trained
    assert experts["python-large"]["state"] == "done"  # its expert_done event, though its steps were not all counted
    assert experts["arithmetic"]["state"] == "stalled" and experts["arithmetic"]["nodes"] == []
    assert report["headline"]["reasons"] == ["run ens: expert arithmetic has no live node"]
    jsonschema.validate(StatusFeed(1.0, 3.0).snapshot(NOW) | report | _freshness(), SCHEMA)


def test_expert_done_named_in_the_detail_does_not_match_a_longer_name():
    members = dict([member(1, Role.EXPERT, expert="python", metrics={"expert_step": 3.0, "expert_steps": 9.0}),
                    member(2, Role.EXPERT, expert="python-large", metrics={"expert_step": 3.0, "expert_steps": 9.0})])
    events = [Event("expert_done", key(7), "expert python-large is done", NOW)]  # reported by some other node
    experts = {e["name"]: e["state"] for e in report_of(RunReading(run_id(EXPERTS), EXPERTS, members, events))["runs"][0]["experts"]}
    assert experts == {"python": "training", "python-large": "done"}


def test_zo_progress_and_too_few_replicas():
    members = dict([member(1, Role.ZO, metrics={"zo_step": 41.0, "val_loss": 2.75, "bytes_per_step": 900.0}),
                    member(2, Role.ZO, metrics={"zo_step": 40.0, "val_loss": 2.8, "bytes_per_step": 1100.0})])
    zo = report_of(RunReading(run_id(ZO), ZO, members))["runs"][0]["zo"]
    assert zo == {"step": 41, "steps": ZO.train.steps, "nodes": 2, "min_nodes": 2, "payload_bytes_per_step": 8,
                  "bytes_per_step": 1000.0, "val_loss": 2.75}
    alone = report_of(RunReading(run_id(ZO), ZO, dict([member(1, Role.ZO, metrics={"zo_step": 3.0})])))
    assert alone["headline"]["reasons"] == ["run zo-run: 1 of zo.min_nodes=2 nodes live"]


def test_recovery_events_carry_stage_method_and_durations():
    events = [
        Event("stage_lost", key(1), "stage 2 has no live replica", NOW - 20),
        Event("recovery", key(9), "stage 2 restored by checkfree in 0.8 s, serving 9.5 s after it was lost", NOW - 10.5),
        Event("recovery", key(1), "stage 2 is served again after 9.8 s", NOW - 10),
        Event("recovery", key(1), "stage 1 is served again after 4.0 s", NOW - 5),
    ]
    members = dict([member(1, Role.DATA, stage=0, name="leader"), member(9, Role.STAGE, stage=2, name="spare0")])
    items = structured_events(run_id(PIPELINE), events, members)
    assert [(i["event"], i["stage"], i["method"], i["duration_s"], i["restore_s"]) for i in items] == [
        ("stage_lost", 2, None, None, None),
        ("recovery", 2, "checkfree", 9.8, 0.8),  # the restorer's event folded into the leader's
        ("recovery", 1, None, 4.0, None),
    ]
    assert "spare0: checkfree" in items[1]["detail"] and items[1]["subject_name"] == "leader"


def test_the_feed_keeps_events_a_later_reading_missed():
    """One DHT read can miss a node's events record: the restorer's method must not drop off the report
    (it did on the status page in CI), and two observers' reports of one death stay one event."""
    restored = Event("recovery", key(9), "stage 2 restored by swap-copy in 0.8 s, serving 9.5 s after it was lost",
                     NOW - 10.5)
    served = Event("recovery", key(1), "stage 2 is served again after 9.8 s", NOW - 10)
    dead = Event("dead", key(3), "no heartbeat for 9.0 s", NOW - 12)
    feed = StatusFeed(1.0, 3.0)
    feed.update([pipeline_reading(*served_swarm(), events=[dead, restored, served])], NOW)
    again = Event("dead", key(3), "no heartbeat for 9.5 s", NOW - 11.5)  # another observer's report of the death
    report = feed.update([pipeline_reading(*served_swarm(), events=[again, served])], NOW + 1)
    recoveries = [e for e in report["events"] if e["event"] == "recovery"]
    assert [(e["stage"], e["method"], e["duration_s"]) for e in recoveries] == [(2, "swap-copy", 9.8)]
    assert [e["detail"] for e in report["events"] if e["event"] == "dead"] == ["no heartbeat for 9.0 s"]


def test_reachability_from_the_announced_addresses():
    assert reachability(["/ip4/1.2.3.4/tcp/1"]) == "direct"
    relay = "/ip4/5.6.7.8/tcp/1/p2p/QmRelay/p2p-circuit"
    assert reachability([relay]) == "relayed"
    assert reachability([relay, "/ip4/1.2.3.4/tcp/1"]) == "direct"
    assert reachability([]) == "unknown"


def _freshness() -> dict:
    return {"now": NOW, "data_time": NOW, "data_age_s": 0.0, "stale": False, "read_error": None, "read_s": 0.5, "refresh_s": 1.0,
            "stale_after_s": 3.0}


def test_the_schema_accepts_reports_and_rejects_broken_ones():
    feed = StatusFeed(1.0, 3.0)
    feed.update([pipeline_reading(*served_swarm(), board={"lost": [], "moves": []})], NOW)
    snapshot = feed.snapshot(NOW)
    jsonschema.validate(snapshot, SCHEMA)
    broken = json.loads(json.dumps(snapshot))
    broken["nodes"][0]["state"] = "ZOMBIE"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMA)
    missing = json.loads(json.dumps(snapshot))
    del missing["runs"][0]["coverage"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(missing, SCHEMA)


def test_feed_keeps_curves_per_step_and_sees_liveness_changes():
    feed = StatusFeed(1.0, 3.0)
    queue = feed.subscribe()
    first = served_swarm()
    feed.update([pipeline_reading(*first)], NOW)
    moved = served_swarm({0: member(1, Role.DATA, stage=0, metrics={"iteration": 13.0, "loss": 3.1}, seen=NOW + 1)})
    feed.update([pipeline_reading(*moved)], NOW + 1)
    feed.update([pipeline_reading(*moved)], NOW + 2)  # the same step again adds no point
    (series,) = feed.snapshot(NOW + 2)["series"]
    assert (series["kind"], series["label"]) == ("pipeline", "n1")
    assert [p[1:] for p in series["points"]] == [[12, 3.2], [13, 3.1]]
    dead = served_swarm({0: moved[0], 2: member(3, Role.STAGE, stage=2, state="DEAD")})
    report = feed.update([pipeline_reading(*dead)], NOW + 3)
    observed = [e for e in report["events"] if e["observer"]]
    assert [(e["event"], e["subject_name"]) for e in observed] == [("dead", "n3")]
    messages = []
    while not queue.empty():
        messages.append(queue.get_nowait().decode())
    kinds = [m.split("\n", 1)[0] for m in messages]
    assert kinds.count("event: swarm") == 4 and kinds.count("event: membership") == 1
    membership = next(m for m in messages if m.startswith("event: membership"))
    assert json.loads(membership.split("data: ", 1)[1])["subject"] == key(3).hex()
    # a partial snapshot (what the live stream sends) carries only the new points
    assert feed.snapshot(NOW + 3, appended={})["series"] == []


def test_a_subscriber_that_stops_reading_is_dropped_with_an_end_mark():
    feed = StatusFeed(1.0, 3.0)
    queue = feed.subscribe()
    for _ in range(40):
        feed.publish(b"event: tick\ndata: {}\n\n")
    assert queue not in feed.subscribers
    assert queue.get_nowait() is None


def test_freshness_turns_stale_and_reports_the_read_error():
    feed = StatusFeed(1.0, 3.0)
    assert feed.freshness(NOW)["stale"] is True  # nothing read yet
    feed.update([], NOW)
    assert feed.freshness(NOW + 2)["stale"] is False
    feed.failed("reading nodes timed out after 20 s")
    late = feed.freshness(NOW + 4)
    assert late["stale"] is True and late["read_error"] == "reading nodes timed out after 20 s"
    assert late["data_age_s"] == pytest.approx(4.0)


def test_peer_names_and_details_are_data_not_markup():
    events = [Event("join", key(5), "<img src=x onerror=alert(1)> joined", NOW)]
    items = structured_events(run_id(PIPELINE), events, dict([member(5, Role.STAGE, stage=1, name="<b>x</b>")]))
    assert items[0]["subject_name"] == "<b>x</b>"  # passed through verbatim; the page sets it as textContent
    page = (Path(__file__).resolve().parent.parent / "node/status_page/app.js").read_text()
    assert "innerHTML" not in page and "insertAdjacentHTML" not in page


def test_the_text_report_shows_the_headline_and_the_coverage():
    from node.status import format_status

    report = report_of(pipeline_reading(*served_swarm({2: member(3, Role.STAGE, stage=2, state="DEAD")})))
    lines = format_status(report).splitlines()
    assert lines[:2] == ["swarm degraded", "  run pipe: stage 2 has no live replica"]
    assert "  stages (online replicas): 0:1 1:1 2:0 LOST" in lines
    assert any("n3" in line and "DEAD" in line for line in lines)
