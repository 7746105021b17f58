"""1 bootstrap + 5 `swarmtrain node` processes on 127.0.0.1: joins, a kill -9, a SIGTERM, no orphans."""
from __future__ import annotations

import signal
import time

import pytest

from protocol.runspec import load_spec
from tests.harness import Cluster, alive, p2pd_pids, wait_until

pytestmark = pytest.mark.slow

NODES = 5


def _states(report: dict) -> dict[str, str]:
    return {node["public_name"]: node["state"] for node in report["nodes"]}


def test_five_nodes_join_die_and_leave(cluster: Cluster, tmp_path):
    assert cluster.run("keygen", "--out", "owner.key").returncode == 0
    made = cluster.run("run", "init", "--mode", "pipeline", "--preset", "tiny", "--key", "owner.key",
                       "--out", "run.toml", "--name", "membership-test")
    assert made.returncode == 0, made.stderr
    ttl = load_spec(tmp_path / "run.toml").swarm.heartbeat_ttl_s
    _, bootstrap = cluster.bootstrap()

    started = time.monotonic()
    nodes = [
        cluster.start(f"n{i}", "node", "--run", "run.toml", "--initial-peers", bootstrap, "--data-dir", f"d{i}",
                      "--public-name", f"n{i}", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--device", "cpu")
        for i in range(NODES)
    ]
    expected = [(f"n{i}", "ONLINE") for i in range(NODES)]

    def all_online():
        asked = time.monotonic()
        report = cluster.status(bootstrap)
        return (asked, report) if sorted(_states(report).items()) == expected else None

    # a status call takes seconds on 2 loaded cores: what counts is when the successful one was asked
    asked, report = wait_until(all_online, timeout=45, interval=0.5, what="5 ONLINE nodes")
    assert asked - started <= 30, f"all 5 ONLINE only {asked - started:.1f} s after start"
    node = report["nodes"][0]
    for field in ("id", "peer_id", "role", "state", "last_seen_s", "version"):
        assert field in node
    assert {n["run_id"] for n in report["nodes"]} == {report["runs"][0]["run_id"]}
    # --role auto: nodes that started together spread out, so no stage of the 4 is left unserved
    assert sorted({n["stage"] for n in report["nodes"]}) == [0, 1, 2, 3], report["nodes"]

    # kill -9: reported DEAD within the heartbeat expiry + 10 s, and its p2pd does not outlive it
    victim = nodes[0]
    victim_daemons = {pid for pid in p2pd_pids() if _in_group(pid, victim.pid)}
    assert victim_daemons, "could not find the victim's p2pd"
    victim.popen.send_signal(signal.SIGKILL)
    killed = time.monotonic()

    def reported_dead():
        asked = time.monotonic()
        return asked if _states(cluster.status(bootstrap)).get("n0") == "DEAD" else None

    asked = wait_until(reported_dead, ttl + 25, 0.5, "n0 DEAD")
    assert asked - killed <= ttl + 10, f"DEAD reported only {asked - killed:.1f} s after the kill"
    wait_until(lambda: not any(alive(pid) for pid in victim_daemons), 10, 0.2, "the killed node's p2pd to exit")

    # SIGTERM: LEAVING (or gone), and the process exits by itself with status 0
    leaver = nodes[1]
    leaver.popen.send_signal(signal.SIGTERM)
    assert leaver.popen.wait(30) == 0, leaver.output()[-3000:]
    assert "leaving the swarm" in leaver.output()
    states = _states(cluster.status(bootstrap))
    assert states.get("n1", "LEAVING") == "LEAVING"
    assert [states[f"n{i}"] for i in range(2, NODES)] == ["ONLINE"] * (NODES - 2)

    # the survivors saw the death and recorded it as an event
    wait_until(lambda: any(e["event"] == "dead" and "n0" in e["detail"] for e in cluster.status(bootstrap)["events"]),
               20, 1.0, "a dead event for n0")


def _in_group(pid: int, pgid: int) -> bool:
    import os

    try:
        return os.getpgid(pid) == pgid
    except ProcessLookupError:
        return False
