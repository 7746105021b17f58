"""Mode zo across real node processes: the loss falls, replicas stay bit-identical through a join,
the kill -9 of a worker and of the committer, and a restart from the node's own log."""
from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest

from node.zo_demo import pretrain_base, write_spec
from protocol.runspec import load_spec, run_id
from tests.harness import Cluster, alive, wait_until
from trainer.zo.log import CommitLog

STEPS = 300
NODES = 4
STEP_LINE = re.compile(r"zo step (\d+) weights ([0-9a-f]{16})")
COMMITTER_LINE = re.compile(r"zo committer for step (\d+): ([0-9a-f]{16}) \(this node\)")


def progress(proc) -> int:
    steps = [int(m.group(1)) for m in STEP_LINE.finditer(proc.output())]
    return max(steps, default=0)


def is_committer(proc) -> bool:
    """Whether the last committer this node logged was itself."""
    lines = re.findall(r"zo committer for step \d+: [0-9a-f]{16}( \(this node\))?", proc.output())
    return bool(lines) and lines[-1] != ""


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("zo-base") / "base.pt"
    pretrain_base(path, steps=30)
    return path


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_zo_swarm_join_kill_worker_kill_committer_restart(tmp_path, base):
    # batches of 16 sequences: slow enough that the swarm is still running when the last fault comes
    spec_path = write_spec(tmp_path, base, NODES, STEPS, batch_size=16)
    rid = run_id(load_spec(spec_path))
    cluster = Cluster(tmp_path)
    try:
        _, peer = cluster.bootstrap()

        def start(name: str, *extra: str):
            return cluster.start(name, "node", "--run", str(spec_path), "--data-dir", str(tmp_path / name),
                                 "--initial-peers", peer, "--host-maddrs", "/ip4/127.0.0.1/tcp/0",
                                 "--base-weights", str(base), "--device", "cpu",
                                 "--zo-report", str(tmp_path / f"{name}.json"), *extra)

        nodes = {f"n{i}": start(f"n{i}") for i in range(NODES)}
        wait_until(lambda: min(progress(p) for p in nodes.values()) >= 20, 180, what="20 steps on every node")

        # a fifth node joins mid-run; it has a fault: one of its weights changes silently at step 60
        nodes["joiner"] = start("joiner", "--zo-fault", "corrupt-at-60")
        wait_until(lambda: progress(nodes["joiner"]) >= progress(nodes["n0"]) - 5 > 0, 120, what="the joiner to catch up")

        committer = next(name for name, p in nodes.items() if is_committer(p))
        worker = next(name for name in nodes if name not in (committer, "joiner"))
        at = progress(nodes[worker])
        os.kill(nodes[worker].pid, signal.SIGKILL)
        wait_until(lambda: min(progress(p) for n, p in nodes.items() if n != worker) >= at + 10, 180,
                   what="the rest to go on after a worker died")

        # the dead worker comes back with its data dir: it resumes from its own log, then catches up
        nodes["restarted"] = start(worker, "--zo-join", "snapshot")
        wait_until(lambda: progress(nodes["restarted"]) >= progress(nodes[committer]) - 5 > at + 10, 120,
                   what="the restarted worker to catch up")
        assert progress(nodes[committer]) < STEPS - 40, "the swarm ran too fast for the scenario"

        at = progress(nodes[committer])
        os.kill(nodes[committer].pid, signal.SIGKILL)
        survivors = [n for n in nodes if n not in (worker, committer, "restarted")] + [worker]
        procs = {n: nodes["restarted" if n == worker else n] for n in survivors}
        wait_until(lambda: min(progress(p) for p in procs.values()) >= at + 20, 180,
                   what="a new committer to take over")
        new_committers = [n for n, p in procs.items() if is_committer(p)]
        assert len(new_committers) == 1, new_committers
        wait_until(lambda: all(p.popen.poll() is not None for p in procs.values()), 300,
                   what="every live node to finish")
        reports = {n: json.loads((tmp_path / f"{n}.json").read_text()) for n in survivors}
        joiner_log = nodes["joiner"].output()
    finally:
        leftover = cluster.close()
    assert not leftover, f"p2pd processes outlived their nodes: {leftover}"

    # every survivor did every step and ends with the same weights and the same log head
    assert {r["steps"] for r in reports.values()} == {STEPS}
    assert len({r["weights_hash"] for r in reports.values()}) == 1
    assert len({r["head"] for r in reports.values()}) == 1
    # ... and agreed at every check each of them made
    by_step: dict[int, set[str]] = {}
    for name, r in reports.items():
        for step, digest in r["hashes"]:
            if name != "joiner":
                by_step.setdefault(step, set()).add(digest)
    assert by_step and all(len(d) == 1 for d in by_step.values()), {s: d for s, d in by_step.items() if len(d) > 1}
    # the corrupted joiner noticed it was in the minority, took the majority's weights and said so
    assert reports["joiner"]["resyncs"] >= 1
    assert sum(r["resyncs"] for n, r in reports.items() if n != "joiner") == 0
    assert "event: resync" in joiner_log
    joiner_hashes = dict(reports["joiner"]["hashes"])
    assert any(joiner_hashes[s] not in by_step.get(s, {joiner_hashes[s]}) for s in joiner_hashes if s >= 60)
    # the loss fell (margin: 0.3 nats; runs reach about 1)
    first = reports[survivors[0]]
    assert first["losses"][-1][2] < first["losses"][0][2] - 0.3, first["losses"]
    assert reports["joiner"]["joined_by"] in ("replay", "snapshot") and reports["joiner"]["start_step"] >= 20
    assert reports[worker]["joined_by"] == "snapshot"

    # no step was applied by only some nodes: the dead committer's own log is a prefix of the survivors'
    final = CommitLog.load(tmp_path / survivors[0] / "zo" / rid.hex() / "commits.log", rid)
    dead = CommitLog.load(tmp_path / committer / "zo" / rid.hex() / "commits.log", rid)
    assert dead.head_step > 40
    for step in range(max(dead.start, final.start), dead.head_step):
        assert dead.get(step).hash == final.get(step).hash, f"step {step} differs"
    committers = {final.get(s).committer for s in range(final.start, final.head_step)}
    assert len(committers) >= 2  # the log shows the failover
    assert not alive(nodes[committer].pid)


# A malicious node against the robust aggregation, and the same attack against the mean: tests/test_zo_byzantine.py
