"""`swarmtrain demo --quick`, as CI and a newcomer run it: real node processes train a skip pipeline,
one stage's only node is killed and rebuilt from its neighbours, and no process outlives the demo,
also when it is interrupted with Ctrl-C."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.harness import SWARMTRAIN, child_env, wait_until


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # fields from the state on (the name may hold spaces)


class Descendants:
    """Every process descended from ``root`` while it runs, by (pid, start time): the demo's node
    processes live in their own sessions, so a process group alone would not find them."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.seen: dict[tuple[int, str], str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            parents: dict[int, int] = {}
            starts: dict[int, str] = {}
            for entry in os.listdir("/proc"):
                if entry.isdigit() and (fields := _stat(int(entry))) and fields[0] != "Z":
                    parents[int(entry)], starts[int(entry)] = int(fields[1]), fields[19]
            for pid in parents:
                up = pid
                while up in parents and up != self.root and up > 1:
                    up = parents[up]
                if up == self.root and pid != self.root:
                    try:
                        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    except OSError:
                        continue
                    if cmdline or (pid, starts[pid]) not in self.seen:
                        # a process read between its fork and its exec shows its parent's command
                        # line, or none: the latest one read is the one it runs
                        self.seen[(pid, starts[pid])] = cmdline
            self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def alive(self, grace_s: float = 10.0) -> list[str]:
        """The processes seen that still run after ``grace_s``: torch's shared-memory manager, for
        one, leaves on its own a moment after its last client died."""
        deadline = time.monotonic() + grace_s
        while (found := self._alive()) and time.monotonic() < deadline:
            time.sleep(0.2)
        return found

    def _alive(self) -> list[str]:
        found = []
        for (pid, start), cmdline in self.seen.items():
            fields = _stat(pid)
            if fields and fields[0] != "Z" and fields[19] == start:
                found.append(f"{pid}: {cmdline[:120]}")
        return found

    def kill_all(self) -> None:
        for (pid, start), _ in self.seen.items():
            fields = _stat(pid)
            if fields and fields[19] == start:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def count(self, fragment: str) -> int:
        return sum(fragment in cmdline for cmdline in self.seen.values())


def _as_a_foreground_job() -> None:
    # A terminal's foreground job takes Ctrl-C; a job started in the background of a script inherits
    # SIGINT ignored (POSIX), as this test itself may have been.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_demo(tmp_path: Path, *args: str) -> subprocess.Popen:
    # its own process group, as a shell runs a foreground job: Ctrl-C is SIGINT to that group
    return subprocess.Popen([*SWARMTRAIN, "demo", "--quick", *args], cwd=tmp_path, env=child_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_as_a_foreground_job)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_demo_quick_json_trains_rebuilds_the_killed_stage_and_leaves_nothing_behind(tmp_path):
    demo = start_demo(tmp_path, "--json")
    tree = Descendants(demo.pid)
    try:
        out, err = demo.communicate(timeout=400)
        time.sleep(1.0)  # the watcher's last look
    finally:
        tree.stop()
        leftover = tree.alive()
        tree.kill_all()
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    # the training: 4 stages, 5 nodes and a spare; stage 0's two replicas agree at the end
    assert result["iterations"] == 16 and result["stages"] == 4
    assert result["nodes"] == 5  # the killed node left no report; the spare that took its stage did
    assert result["replicas_identical"] is True and result["loss_end"] < result["loss_start"]
    assert result["mean_iteration_s"] > 0 and result["bytes_sent"] > 0
    # the failure: stage 2's only node, and the neighbour rebuild by the spare
    assert [(k["stage"], k["node"]) for k in result["kills"]] == [(2, "node2")]
    [recovery] = result["recoveries"]
    assert recovery["stage"] == 2 and recovery["method"] == "checkfree" and recovery["node"] == "node5"
    assert 0 < recovery["detection_s"] < recovery["mttr_s"] < 120
    # nothing outlived it: 7 swarmtrain processes (bootstrap, 5 nodes, the spare) each with a DHT
    # child and a p2pd were seen, and none is alive
    assert tree.count("node.cli node") >= 6 and tree.count("p2pd") >= 7, sorted(tree.seen.values())
    assert leftover == [], leftover


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ctrl_c_stops_the_demo_and_every_process_it_started(tmp_path):
    before = {p.name for p in Path("/tmp").glob("swarmtrain-pipeline-demo-*")}
    demo = start_demo(tmp_path)
    tree = Descendants(demo.pid)
    try:
        # interrupt once the swarm is up: every node process and p2pd started
        wait_until(lambda: tree.count("node.cli node") >= 6 and tree.count("p2pd") >= 7, 180, 0.5,
                   "the demo's node processes and their p2pd")
        os.killpg(demo.pid, signal.SIGINT)
        out, err = demo.communicate(timeout=60)
        time.sleep(1.0)
    finally:
        tree.stop()
        leftover = tree.alive()
        tree.kill_all()
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert leftover == [], leftover
    after = {p.name for p in Path("/tmp").glob("swarmtrain-pipeline-demo-*")}
    assert after <= before, f"the demo left its working folder behind: {after - before}"
