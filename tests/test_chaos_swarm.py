"""Short chaos runs of each mode (zo, pipeline, experts) over real node processes: at least three
kill -9s and one freeze longer than the heartbeat TTL (plus a full disk in the pipeline), from a seeded
schedule; every "nothing lost" check holds at the end (tests/chaos/checks.py).

A run has more steps than it can do: the harness stops the nodes (SIGTERM) once every fault of the
schedule was injected and ended and every node is back at work, so that how many faults land does
not depend on how fast the machine trains (a run of fixed length ended before its faults on a quiet
machine). The checks then compare the nodes with each other at the end rather than with the run's
last step; tests of each mode's finished runs are elsewhere (tests/test_*_swarm.py)."""
from __future__ import annotations

import pytest

from tests.chaos import (ChaosOptions, ChaosPlan, ChaosSwarm, ExpertsMode, PipelineMode, ZoMode, describe,
                         experts_nothing_lost, failures, pipeline_nothing_lost, zo_nothing_lost)
from tests.chaos.modes import PP_ITERATION


RUN_FOREVER = 10**6  # steps: more than a run does before the harness stops it


def logged_by_others(result, name: str, text: str) -> bool:
    return any(text in p.text() for p in result.procs if p.name != name)


def check_kills_and_freezes(result) -> None:
    assert result.stopped and result.drained and not result.skipped, (result.skipped, result.events[-5:])
    assert result.faults.get("kill", 0) >= 3 and result.faults.get("freeze", 0) >= 1, (result.faults, result.skipped)
    for event in (e for e in result.events if e.kind == "kill"):
        # every killed node came back from its data dir and went back to work
        assert any(p.name == event.node and p.started_at > event.at for p in result.procs), event
    [frozen] = [e.node for e in result.events if e.kind == "freeze"][:1]
    # frozen longer than the TTL: its peers judged it dead, and saw it come back
    assert logged_by_others(result, frozen, f"event: dead {frozen}"), frozen
    assert logged_by_others(result, frozen, f"event: join {frozen}"), frozen


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_zo_swarm_under_kills_and_a_freeze_loses_no_committed_step(tmp_path):
    mode = ZoMode(nodes=4, steps=RUN_FOREVER, stop_faults_at=2.0)
    plan = ChaosPlan(seed=14, window_s=28.0, counts={"kill": 3, "freeze": 1}, durations_s={"freeze": (4.5, 5.5)})
    result = ChaosSwarm(tmp_path, mode, ChaosOptions(plan, timeout_s=300, max_down=2, stop_when_done=True)).run()
    check_kills_and_freezes(result)
    checks = zo_nothing_lost(result, None)
    assert not failures(checks), describe(checks)
    # a killed node resumed from its own commit log (then fetched what it missed)
    assert any(r["by"] == "resume" for r in result.recoveries), result.recoveries


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_pipeline_under_kills_a_freeze_and_a_full_disk_loses_no_stage(tmp_path):
    mode = PipelineMode(stages=3, replicas=(2, 2, 1), iterations=RUN_FOREVER, snapshot_every=2, stop_faults_at=2.0)
    plan = ChaosPlan(seed=5, window_s=30.0, counts={"kill": 3, "freeze": 1, "disk_full": 1},
                     durations_s={"freeze": (4.5, 5.5), "disk_full": (6.0, 7.0)})
    options = ChaosOptions(plan, timeout_s=300, max_down=2, disk_mib=32, stop_when_done=True)
    result = ChaosSwarm(tmp_path, mode, options).run()
    check_kills_and_freezes(result)
    checks = pipeline_nothing_lost(result, mode.stages, None, mode.heartbeat_ttl_s)
    assert not failures(checks), describe(checks)
    assert "replica" in {r["method"] for r in result.recoveries}, result.recoveries
    if result.disks:  # the node on the full disk skipped its weight snapshots and trained on
        [full] = [e for e in result.events if e.kind == "disk_full"]
        freed = next(e.at for e in result.events if e.kind == "end-disk_full" and e.node == full.node)
        life = [p for p in result.procs if p.name == full.node and p.started_at < full.at][-1]
        done = [(line.at, int(m[1])) for line in life.messages() if (m := PP_ITERATION.fullmatch(line.message))]
        # every snapshot due while the disk was full was skipped (how many fell due depends on the speed)
        due = [k for at, k in done if full.at < at < freed and (k + 1) % mode.snapshot_every == 0]
        skipped = [line.message for line in life.messages() if "skipped: No space left on device" in line.message]
        assert len(skipped) >= len(due), (due, skipped)
        assert any(at > freed for at, _ in done), "it did not train on after the disk was freed"
        assert life.state == "killed" or life.popen.returncode == 0, life.popen.returncode


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_experts_under_kills_and_a_freeze_lose_no_checkpointed_step(tmp_path):
    mode = ExpertsMode(nodes=4, steps=(RUN_FOREVER,) * 3, stop_faults_at=2.0)
    plan = ChaosPlan(seed=3, window_s=22.0, counts={"kill": 3, "freeze": 1}, durations_s={"freeze": (4.5, 5.5)})
    options = ChaosOptions(plan, timeout_s=300, max_down=2, disk_mib=64, env=mode.env, stop_when_done=True)
    result = ChaosSwarm(tmp_path, mode, options).run()
    check_kills_and_freezes(result)
    checks = experts_nothing_lost(result, None, mode.heartbeat_ttl_s)
    assert not failures(checks), describe(checks)
    # some job was taken up again mid-way from a checkpoint, not from step 0
    assert any(r["start_step"] > 0 and r["source"] for r in result.recoveries), result.recoveries
