"""A node frozen (SIGSTOP of its process group: the node, its DHT child and p2pd) for longer than
a DHT request's timeout comes back into the swarm once thawed: its peers read its heartbeats
again, and it reads theirs. hivemind drops a peer from its routing table on every unanswered
request and bootstraps only at start, so without node/dht.py's ``rejoin`` the thawed node stayed
cut off for good (seen in the pipeline chaos run on a 16-core machine: the frozen stage replica
saw a swarm of itself until the run ended)."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from protocol.keys import generate_private_key
from protocol.runspec import dumps_spec, make_spec
from tests.harness import Cluster, wait_until

pytestmark = pytest.mark.slow

NODES = 4
TTL_S = 3.0  # the chaos runs' timing: a heartbeat every 0.5 s, so that DHT requests are always in flight
FROZEN_S = 10.0  # > the heartbeat TTL and > a DHT request's timeout (Timeouts.dht_request_s, 5 s)


def _live_seen_by(data_dir, since: float) -> int | None:
    try:
        health = json.loads((data_dir / "health.json").read_text())
    except (OSError, ValueError):
        return None
    return health["live_members"] if health["updated_at"] > since else None


def test_a_node_thawed_after_a_long_freeze_sees_its_peers_and_they_see_it(cluster: Cluster, tmp_path):
    spec = make_spec("pipeline", "tiny", generate_private_key(), name="freeze-test", heartbeat_interval_s=0.5,
                     heartbeat_ttl_s=TTL_S)
    (tmp_path / "run.toml").write_text(dumps_spec(spec))
    ttl = spec.swarm.heartbeat_ttl_s
    _, bootstrap = cluster.bootstrap()
    nodes = [cluster.start(f"n{i}", "node", "--run", "run.toml", "--initial-peers", bootstrap, "--data-dir", f"d{i}",
                           "--public-name", f"n{i}", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--device", "cpu")
             for i in range(NODES)]

    def states() -> dict[str, str]:
        return {n["public_name"]: n["state"] for n in cluster.status(bootstrap)["nodes"]}

    wait_until(lambda: states() == {f"n{i}": "ONLINE" for i in range(NODES)}, 60, 0.5, "3 ONLINE nodes")
    frozen = nodes[-1]
    os.killpg(frozen.pid, signal.SIGSTOP)
    time.sleep(FROZEN_S)
    assert states().get(f"n{NODES - 1}") == "DEAD"
    os.killpg(frozen.pid, signal.SIGCONT)
    thawed = time.time()
    # its heartbeats reach its peers again, and it reads theirs (its view counts the others live)
    wait_until(lambda: states().get(f"n{NODES - 1}") == "ONLINE", ttl + 30, 1.0, "the thawed node ONLINE again")
    wait_until(lambda: _live_seen_by(tmp_path / f"d{NODES - 1}", thawed) == NODES - 1, ttl + 30, 0.5,
               "the thawed node to see its peers live")
    # it came back by a ping of the peers missing from a routing table (the thawed node's, or a
    # peer's that had dropped it)
    assert any("back in its routing table" in node.output() for node in nodes)
