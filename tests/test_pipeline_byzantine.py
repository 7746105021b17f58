"""A Byzantine stage replica across real node processes: 2 data nodes, 2 stages with 2 replicas
each; from iteration 2 on, replica s1a answers with garbage gradients (to the hop before it and to
its stage's reduce). It is refused, left out of the reduce and banned; training goes on."""
from __future__ import annotations

import json
import math

import pytest

from tests.harness import Cluster, wait_until
from tests.test_pipeline_swarm import spec_file, start_swarm

ITERATIONS = 10
HONEST = ("d0", "d1", "s1b", "s2a", "s2b")


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_replica_sending_garbage_gradients_is_excluded_and_banned_and_training_goes_on(tmp_path):
    cluster = Cluster(tmp_path)
    try:
        nodes = start_swarm(cluster, tmp_path, spec_file(tmp_path, iterations=ITERATIONS),
                            extra={"s1a": ["--fault", "garbage-gradients-from-2"]})
        wait_until(lambda: all(p.popen.poll() is not None for p in nodes.values()), 360, what="all nodes to finish")
        reports = {n: json.loads((tmp_path / f"{n}.json").read_text()) for n in nodes}
        logs = {n: p.output() for n, p in nodes.items()}
    finally:
        assert cluster.close() == []
    bad = reports["s1a"]["node"]
    # the honest nodes trained every iteration, and the loss fell
    assert all(reports[n]["iterations"] == ITERATIONS for n in HONEST)
    for name in ("d0", "d1"):
        losses = [loss for _, _, loss in reports[name]["losses"]]
        assert len(losses) == ITERATIONS and all(math.isfinite(x) for x in losses)
        assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2, losses
    # somebody caught it (a refused gradient or a reduce that left it out) and said so in an event;
    # every honest node banned it, in the end on its own evidence or on another's word
    seen = [(n, row) for n in HONEST for row in reports[n]["bans"] if row[1] == bad and row[3] == "seen"]
    assert seen, {n: reports[n]["bans"] for n in HONEST}
    assert any("event: banned" in logs[n] and f"node {bad} banned" in logs[n] for n, _ in seen)
    assert all(any(row[1] == bad for row in reports[n]["bans"]) for n in HONEST)
    assert all(row[1] == bad for n in HONEST for row in reports[n]["bans"])  # and nobody else
    # its gradients never reached a step: the honest replica's weights are finite, and its stage's
    # reduce left it out (or it refused the bad reducer's average)
    assert reports["s1b"]["weights_finite"] and all(reports[n]["weights_finite"] for n in HONEST)
    assert reports["s1b"]["excluded"] or any(row[1] == bad for row in reports["s1b"]["bans"])
    assert all(row[1] == bad and row[0] >= 2 for row in reports["s1b"]["excluded"])
    # no path was routed to it after the data node banned it, nor planned by a leader
    for name in ("d0", "d1"):
        since = min(row[0] for row in reports[name]["bans"] if row[1] == bad)
        late = [path for it, _, path in reports[name]["executed"] if it > since]
        assert late and all(node != bad for path in late for _, node in path)
        assert all(len(path) == 2 for path in late)  # stage 1 went to s1b, not skipped
    banned_at = max(min(row[0] for row in reports[n]["bans"] if row[1] == bad) for n in HONEST)
    published = [p for n in HONEST for p in reports[n]["published"]]
    assert published and all(bad not in p["nodes"] for p in published if p["at"] > _ban_time(reports, bad))
    assert banned_at < ITERATIONS - 2
    # the bad node found itself banned and stopped
    assert reports["s1a"]["banned"] and reports["s1a"]["iterations"] < ITERATIONS
    # the replicas of each stage still agree
    assert reports["d0"]["hashes"] == reports["d1"]["hashes"]
    assert reports["s2a"]["hashes"] == reports["s2b"]["hashes"]


def _ban_time(reports: dict, bad: str) -> float:
    """When the last honest node had banned it: the start of the iteration after its ban."""
    times = []
    for name in HONEST:
        since = min(row[0] for row in reports[name]["bans"] if row[1] == bad)
        starts = [start for it, start, _, _ in reports[name]["phases"] if it == since + 1]
        times.append(starts[0] if starts else math.inf)
    return max(times)
