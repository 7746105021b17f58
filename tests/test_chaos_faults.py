"""Focused chaos: partitions (network namespaces and the RPC transport hook), a lossy link, a full
disk and clock skew, each injected into one shared zo run of real node processes (one swarm
start-up for all of them: the suite's time budget), each judged by its own test.

The run: four zo nodes (two with their clocks 1.5 s fast and slow, within what the swarm
tolerates) and two bystanders started with their clocks 60 s ahead and 400 s behind. Faults, one
at a time: a node cut off by a network namespace partition (where root), one cut off by the
transport hook, a lossy link, a full disk under one node's data dir, and one node's running clock
moved 60 s ahead (beyond the envelope window) for a while.
"""
from __future__ import annotations

import re

import pytest

from tests.chaos import ChaosOptions, ChaosPlan, ChaosSwarm, ZoMode, describe, failures, zo_nothing_lost
from tests.chaos import netns
from tests.chaos.disk import available as disks_available


# KNOWN FAILURE (issue 10 stays open for it). Run until its faults are over (2026-12-03), 6 of the 8
# pass and 2 fail: while a network namespace partition black-holes one node's packets, every DHT
# store waits for it (hivemind waits for each of the nearest peers), heartbeats go unstored, every
# node sees every other dead, and the swarm commits nothing for the partition's 10 s and the
# seconds after (test_a_network_namespace_partition_...); the full disk injected just after the
# partition then finds no step to refuse (test_a_full_disk_...). Earlier (2026-12-02) the same
# blackout let a committer on the full disk commit steps 45-49 on a fork (a zo split brain: a
# contribution is not bound to one committer; docs/zo.md sketches a second commit phase).
pytestmark = pytest.mark.xfail(reason="a partition that black-holes a node stalls the DHT's stores (issue 10, open)",
                               strict=False)
AHEAD, BEHIND = "zo-ahead", "zo-behind"
SKEWS = {"zo-2": 1.5, "zo-3": -1.5}
RUN_FOREVER = 10**6  # stopped once every fault was injected and ended and every node is back at work


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    mode = ZoMode(nodes=4, steps=RUN_FOREVER, heartbeat_ttl_s=5.0, stop_faults_at=2.0)
    kinds = ["partition", "partition", "lossy", "skew"] + (["disk_full"] if disks_available() else [])
    plan = ChaosPlan(seed=2, window_s=50.0, counts={k: kinds.count(k) for k in kinds},
                     durations_s={"partition": (10.0, 10.5), "lossy": (5.0, 6.0), "disk_full": (4.0, 5.0),
                                  "skew": (12.5, 13.0)})
    via = ("netns", "hook") if netns.available() else ("hook", "hook")
    # a run of fixed length (240 steps) ended during the first partition on a faster machine: the
    # run is stopped like a soak instead, so that every fault lands whatever the machine's speed
    options = ChaosOptions(plan, timeout_s=300, max_down=1, skews_s=SKEWS, bystanders={AHEAD: 60.0, BEHIND: -400.0},
                           stop_when_done=True,
                           partition_via=via, lossy={"drop": 0.1, "delay_s": 0.03, "jitter_s": 0.03},
                           # peers forgive a node's failed calls after announce_ttl_s (60 s by default): 12 s here,
                           # so that a node back from a partition is believed again within the run
                           env={"SWARMTRAIN_TIMEOUT_ANNOUNCE_TTL_S": "12"})
    result = ChaosSwarm(tmp_path_factory.mktemp("chaos-faults"), mode, options).run()
    return result, zo_nothing_lost(result, None)


def faults_of(result, kind: str):
    return [e for e in result.events if e.kind == kind]


def ended(result, event):
    return next(e for e in result.events if e.kind == f"end-{event.kind}" and e.node == event.node and e.at > event.at)


def test_nothing_is_lost_through_every_fault(run):
    result, checks = run
    assert result.stopped and result.drained and not result.skipped, (result.skipped, result.events[-5:])
    assert not failures(checks), describe(checks)
    assert result.faults.get("partition") == 2 and result.faults.get("lossy") == 1, (result.faults, result.skipped)
    assert result.faults.get("skew") == 1 and result.faults.get("disk_full", 0) == int(disks_available())


def real_at(name: str, line) -> float:
    """When a node logged a line, on the harness's clock: the nodes run a second fast or slow all along
    (SKEWS), and their log records carry their own clock."""
    return line.at - SKEWS.get(name, 0.0)


def steps_between(result, name: str, start: float, end: float) -> list[int]:
    """Steps whose weight hash ``name`` logged between ``start`` and ``end``."""
    return [int(m[1]) for p in result.procs if p.name == name for line in p.messages()
            if start <= real_at(name, line) <= end
            and (m := re.fullmatch(r"zo step (\d+) weights [0-9a-f]{16}", line.message))]


def check_cut_off_and_back(result, cut) -> None:
    end = ended(result, cut)
    others = [n for n in result.specs if n != cut.node]
    # the rest of the swarm went on committing while the node was cut off (a majority is left) ...
    assert max(len(steps_between(result, n, cut.at + 1, end.at)) for n in others) >= 1
    # ... they saw it go, and come back once healed; it caught up (the nothing-lost checks hold)
    assert any(f"event: dead {cut.node}" in result.final(n).text() or any(
        f"event: dead {cut.node}" in p.text() for p in result.lives(n)) for n in others)
    assert steps_between(result, cut.node, end.at, float("inf")), "it did not go on after the partition healed"


@pytest.mark.skipif(not netns.available(), reason="network namespaces need root and ip netns")
def test_a_network_namespace_partition_cuts_everything_and_heals(run):
    result, _ = run
    [cut] = [e for e in faults_of(result, "partition") if "network namespace" in e.detail]
    assert result.netns
    check_cut_off_and_back(result, cut)
    # the DHT was cut too, not only RPC: its heartbeats reached nobody
    victim = [p for p in result.lives(cut.node) if p.started_at < cut.at][-1]
    cut_lines = [line.message for line in victim.messages()
                 if cut.at < real_at(cut.node, line) < ended(result, cut).at + 2]
    assert any("not stored by any peer" in m or "timed out" in m for m in cut_lines), cut_lines[-20:]


def test_a_transport_hook_partition_refuses_rpc_links(run):
    result, _ = run
    [cut] = [e for e in faults_of(result, "partition") if "transport hook" in e.detail][:1]
    check_cut_off_and_back(result, cut)
    window = lambda p: [line.message for line in p.messages()  # noqa: E731
                        if cut.at < real_at(p.name, line) < ended(result, cut).at]
    logs = [m for name in result.specs for p in result.lives(name) for m in window(p)]
    assert any("LinkRefused" in m or "cuts the link" in m for m in logs), "no RPC was refused by the hook"
    # peers judged it dead by its failed calls (the DHT still carried its heartbeats)
    assert any(re.search(rf"event: dead {cut.node}: \d+ RPCs in a row failed", m) for m in logs)


def test_a_lossy_link_drops_and_delays_messages_and_loses_nothing(run):
    result, checks = run
    [lossy] = faults_of(result, "lossy")
    life = [p for p in result.lives(lossy.node) if p.started_at < lossy.at][-1]
    during = [line.message for line in life.messages()
              if lossy.at < real_at(lossy.node, line) < ended(result, lossy).at + 1]
    assert any("LinkDropped" in m for m in during), during[-20:]
    assert "drop 0.1, delay 0.03 s" in life.text()  # the node read the rules at run time
    # the swarm went on committing meanwhile, and the node on the lossy link kept up (it finished)
    assert any(steps_between(result, n, lossy.at, ended(result, lossy).at) for n in result.specs if n != lossy.node)
    assert not failures(checks)


@pytest.mark.skipif(not disks_available(), reason="a small tmpfs needs root")
def test_a_full_disk_stops_a_zo_node_cleanly_and_it_resumes_from_its_log(run):
    result, checks = run
    [full] = faults_of(result, "disk_full")
    lives = result.lives(full.node)
    [stopped] = [p for p in lives if p.started_at < full.at and p.state == "exited" and p.popen.returncode != 0]
    lines = [line.message for line in stopped.messages()]
    # one clear line, no traceback, and nothing half-written (the files check in `checks`)
    assert re.fullmatch(r"swarmtrain node: error: cannot append step \d+ to the commit log: No space left on device: "
                        r".*commits\.log", lines[-1]), lines[-5:]
    assert not any("Traceback" in m for m in lines)
    after = lives[lives.index(stopped) + 1]
    assert "resumed from the local log" in after.text() and after.popen.returncode == 0
    assert not failures(checks), describe(checks)


def test_clock_skew_within_a_few_seconds_works(run):
    result, checks = run
    from protocol.runspec import load_spec, run_id
    from trainer.zo.log import CommitLog

    rid = run_id(load_spec(result.workdir / "run.toml"))
    log, _ = CommitLog.read(result.home("zo-0") / "data" / "zo" / rid.hex() / "commits.log", rid)
    contributors = {c.sender.hex() for step in range(log.start, log.head_step) for c in log.get(step).contributions}
    ids = {p.name: re.search(r"node id ([0-9a-f]{64}) \(public key\)", p.text())[1] for p in result.procs}
    # a second and a half off: the nodes train with the others, and their clock checks stay quiet
    assert ids["zo-2"] in contributors and ids["zo-3"] in contributors
    [jumped] = faults_of(result, "skew")
    for name in SKEWS:
        if name != jumped.node:
            assert not any("clock check" in p.text() for p in result.lives(name)), name
    assert not failures(checks)


def test_a_clock_beyond_the_window_is_refused_at_start_with_one_clear_line(run):
    result, _ = run
    for proc in result.bystanders:  # 60 s ahead, 400 s behind: hivemind's bootstrap ping compares clocks
        lines = [line.message for line in proc.messages()]
        assert proc.popen.returncode == 1 and not any("Traceback" in m for m in lines), lines[-5:]
        # the last line of ours (hivemind's DHT child may still print a RuntimeWarning as it exits)
        errors = [m for m in lines if m.startswith("swarmtrain node: error:")]
        assert len(errors) == 1 and re.fullmatch(
            r"swarmtrain node: error: this node's clock differs from its peers' by more than hivemind allows "
            r"\(.*local time must be within 3 seconds.*\); set the clock right \(NTP\) and start again",
            errors[0]), lines[-3:]


def test_a_running_clock_moved_beyond_the_window_is_refused_and_says_so(run):
    result, checks = run
    [jumped] = faults_of(result, "skew")
    end = ended(result, jumped)
    life = [p for p in result.lives(jumped.node) if p.started_at < jumped.at][-1]
    # its peers refuse what it signs now, and say why ...
    window = lambda p: [line.message for line in p.messages() if jumped.at < real_at(p.name, line) < end.at + 2]  # noqa: E731
    refusals = [m for n in result.specs if n != jumped.node for p in result.lives(n) for m in window(p)
                if re.search(r"Expired: message is 6\d\.\ds in the future, limit 30\.0s \(check the clock\)", m)]
    assert refusals, "no peer said why it refused the node's messages"
    # ... the node itself says its clock is off ...
    mine = [line.message for line in life.messages() if jumped.at < line.at - 60 < end.at + 2]  # its clock is ahead
    assert any(re.search(r"clock check: this node's clock seems (59|60|61) s ahead", m) for m in mine), mine[-20:]
    # ... and once the clock is right again it goes on with the others, losing nothing
    assert steps_between(result, jumped.node, end.at + 1, float("inf"))
    assert not failures(checks), describe(checks)
