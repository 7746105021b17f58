"""Time until N node processes on one machine all see each other (default 16).

Starts a bootstrap peer and N `swarmtrain node` processes at once, and reads each node's JSON log
for the moment its own membership view first holds N live nodes. Reports when the last node got
there, counted from the moment the processes were started (JOINING nodes count as live), and when
the last node was ONLINE.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import record  # noqa: E402
from tests.harness import Cluster, wait_until  # noqa: E402


def first_time(log: str, text: str) -> float | None:
    """Time of the first JSON log line whose message contains ``text``."""
    for line in log.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and text in entry.get("message", ""):
            return entry["time"]
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        cluster = Cluster(workdir)
        try:
            assert cluster.run("keygen", "--out", "owner.key").returncode == 0
            assert cluster.run("run", "init", "--mode", "pipeline", "--preset", "tiny", "--key", "owner.key",
                               "--out", "run.toml").returncode == 0
            _, bootstrap = cluster.bootstrap()
            started = time.time()
            nodes = [
                cluster.start(f"n{i}", "node", "--run", "run.toml", "--initial-peers", bootstrap, "--data-dir", f"d{i}",
                              "--public-name", f"n{i}", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--device", "cpu",
                              "--log-format", "json")
                for i in range(args.nodes)
            ]

            def all_full():
                times = [first_time(node.output(), f"membership: {args.nodes} live") for node in nodes]
                online = [first_time(node.output(), " is ONLINE in run ") for node in nodes]
                done = all(t is not None for t in times + online)
                return (times, online) if done else None

            times, online = wait_until(all_full, args.timeout, 1.0, f"{args.nodes} nodes to see each other")
        finally:
            cluster.close()
    first, last = min(times) - started, max(times) - started
    record(
        f"Swarm formation, {args.nodes} node processes on one machine",
        [
            f"every node sees all {args.nodes} live: {last:.1f} s after start (first node: {first:.1f} s)",
            f"last node ONLINE at {max(online) - started:.1f} s (after its JOINING re-check of the stage choice)",
            "includes process start, torch + hivemind import, p2pd start and DHT bootstrap of every node, "
            "all sharing the machine's cores",
        ],
    )


if __name__ == "__main__":
    main()
