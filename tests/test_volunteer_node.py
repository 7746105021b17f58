"""The image's command lines, run outside a container against real local processes: the README's
`docker run` one-liner becomes ENTRYPOINT + its arguments with the image's environment, the
HEALTHCHECK command judges the node, and a person sees addresses, role and progress (a rich display
on a terminal, JSON lines through a pipe)."""
from __future__ import annotations

import json
import os
import pty
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from protocol.keys import generate_private_key
from protocol.runspec import dumps_spec, make_spec
from tests.harness import REPO, Cluster, child_env, wait_until
from tests.test_docker import DOCKERFILES, last, stages

IMAGE = "swarmtrain"  # the tag README's commands build and run
INIT = ["/usr/bin/tini", "--"]


def image_config(dockerfile: Path) -> dict:
    final = stages(dockerfile)[-1]
    env = {}
    for word, rest in final:
        if word == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(rest))
    return {"entrypoint": json.loads(last(final, "ENTRYPOINT")), "cmd": json.loads(last(final, "CMD")),
            "healthcheck": json.loads(last(final, "HEALTHCHECK").partition("CMD ")[2]), "env": env,
            "expose": last(final, "EXPOSE").split()}


def readme_one_liner() -> list[str]:
    text = (REPO / "README.md").read_text()
    found = [line.strip() for line in text.splitlines() if line.strip().startswith("docker run --gpus all")]
    assert found, "README.md has no `docker run --gpus all ...` line for volunteers"
    return shlex.split(found[0])


def host_command(image: dict, argv: list[str]) -> list[str]:
    """What the container runs, on this machine: tini is PID 1 in front of the console script."""
    assert argv[:len(INIT)] == INIT and argv[len(INIT)] == "swarmtrain", argv
    return [sys.executable, "-m", "node.cli", *argv[len(INIT) + 1:]]


def mapped(value: str, mounts: dict[str, Path]) -> str:
    for inside, outside in mounts.items():
        if value == inside or value.startswith(inside + "/"):
            return str(outside) + value[len(inside):]
    return value


class PtyReader:
    """The node's terminal: what it printed, as a person running `docker run -it` would see it."""

    def __init__(self) -> None:
        self.master, self.slave = pty.openpty()
        self.chunks: list[bytes] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 4096)
            except OSError:
                return
            if not data:
                return
            self.chunks.append(data)

    def text(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_readme_docker_run_joins_and_the_healthcheck_judges_it(tmp_path):
    image = image_config(DOCKERFILES[0])
    assert image == image_config(DOCKERFILES[1])  # the CPU variant runs the same way
    words = readme_one_liner()
    at = words.index(IMAGE)
    options, args = words[2:at], words[at + 1:]
    assert args[0] == "node" and "--gpus" in options
    # -v NAME:/data (the volume) and -v HOST:CONTAINER files, -p HOST:CONTAINER ports
    mounts, published = {}, []
    for flag, value in zip(options, options[1:]):
        if flag == "-v":
            source, target = value.split(":")[:2]
            mounts[target] = tmp_path / ("data" if target == "/data" else Path(target).name)
        if flag == "-p":
            published.append(value.split(":")[-1])
    assert "/data" in mounts and all(f"{port}/tcp" in image["expose"] for port in published) and published
    owner = generate_private_key()
    spec = make_spec("zo", "tiny", owner, name="image-test", steps=100000, min_nodes=1, step_timeout_s=5.0,
                     heartbeat_interval_s=1.0, heartbeat_ttl_s=6.0)
    run_file = next(path for inside, path in mounts.items() if inside != "/data")
    run_file.write_text(dumps_spec(spec))
    env = child_env(**{k: mapped(v, mounts) for k, v in image["env"].items() if k.startswith("SWARMTRAIN_")},
                    TERM="xterm-256color", COLUMNS="120")
    assert env["SWARMTRAIN_DATA_DIR"] == str(tmp_path / "data")

    # `docker run IMAGE` alone: the help
    done = subprocess.run(host_command(image, image["entrypoint"] + image["cmd"]), env=env, capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.startswith("usage: swarmtrain"), done.stderr

    cluster = Cluster(tmp_path)
    terminal = PtyReader()
    health = host_command(image, INIT + image["healthcheck"])
    try:
        # the organiser's bootstrap, as README runs it in the image: its data dir is the volume, so
        # it keeps its keys and a restarted bootstrap has the same multiaddr, peer id included
        boot_env = dict(env, SWARMTRAIN_DATA_DIR=str(tmp_path / "boot"))
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        # announced by name, as docker/compose.yaml announces /dns4/bootstrap/...
        boot_args = ["bootstrap", "--host-maddrs", f"/ip4/127.0.0.1/tcp/{port}", "--announce-maddrs",
                     f"/dns4/localhost/tcp/{port}"]
        maddrs_file = tmp_path / "boot" / "maddrs.txt"
        addresses = []
        for attempt in ("boot1", "boot2"):
            maddrs_file.unlink(missing_ok=True)
            boot = cluster.start(attempt, *boot_args, env=boot_env)
            wait_until(lambda: maddrs_file.exists() and subprocess.run(health, env=boot_env, capture_output=True,
                                                                       timeout=30).returncode == 0,
                       90, 0.5, f"{attempt}'s address file and health")
            addresses.append(maddrs_file.read_text().split())
            if attempt == "boot1":
                boot.popen.send_signal(signal.SIGTERM)
                assert boot.popen.wait(30) == 0
        assert addresses[0] == addresses[1] and addresses[0][0].startswith(f"/dns4/localhost/tcp/{port}/p2p/"), addresses
        peer = addresses[1][0]
        args[args.index("--initial-peers") + 1] = peer
        # A container has its own network namespace; on this machine the node listens on loopback
        # (a flag, which beats the image's SWARMTRAIN_PORT).
        argv = [mapped(a, mounts) for a in args] + ["--host-maddrs", "/ip4/127.0.0.1/tcp/0"]
        popen = subprocess.Popen(host_command(image, image["entrypoint"] + argv), env=env, cwd=tmp_path,
                                 stdin=subprocess.DEVNULL, stdout=terminal.slave, stderr=terminal.slave,
                                 start_new_session=True)
        os.close(terminal.slave)
        from tests.harness import Proc

        cluster.procs.append(Proc("volunteer", popen, tmp_path / "volunteer.none"))
        # a second node as a pipe would see it, with JSON logs
        piped = cluster.start("piped", "node", "--run", str(run_file), "--initial-peers", peer, "--data-dir",
                              str(tmp_path / "piped"), "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--device", "cpu",
                              "--log-format", "json")

        def healthy() -> bool:
            return subprocess.run(health, env=env, capture_output=True, timeout=30, cwd=tmp_path).returncode == 0

        wait_until(healthy, 150, 1.0, "the HEALTHCHECK command to pass")
        screen = terminal.text()
        assert "this node's multiaddrs" in screen and "/ip4/127.0.0.1/tcp/" in screen
        assert "role: zo — mode zo: every node holds a full replica" in screen
        # the rich progress display: the role, steps done of the run's, loss, live nodes
        wait_until(lambda: re.search(r"zo .*\d+/100000 .*loss \d+\.\d+ .*live", re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "",
                                                                                          terminal.text())),
                   60, 1.0, "the progress display")
        assert "\x1b[" in terminal.text()  # drawn with terminal escapes, not log lines

        def json_progress():
            entries = [json.loads(line) for line in piped.output().splitlines() if line.startswith("{")]
            return [e for e in entries if e["message"].startswith("progress: zo, step ")]

        [first, *_] = wait_until(json_progress, 60, 1.0, "a JSON progress line from the piped node")
        assert first["level"] == "INFO" and "live nodes" in first["message"]
        assert "role: zo" in piped.output()  # on its stdout, beside the JSON logs on stderr
        verdict = subprocess.run([*health[:3], "health", "--data-dir", str(tmp_path / "piped"), "--json"], env=env,
                                 capture_output=True, text=True, timeout=30, cwd=tmp_path)
        report = json.loads(verdict.stdout)
        assert verdict.returncode == 0 and report["healthy"] and report["serving"] and report["peers"] >= 1

        # `docker stop`: SIGTERM through tini; the node leaves and the health check says so
        popen.send_signal(signal.SIGTERM)
        assert popen.wait(30) == 0
        after = subprocess.run(health, env=env, capture_output=True, text=True, timeout=30, cwd=tmp_path)
        assert after.returncode == 1 and "unhealthy" in after.stderr and "not running" in after.stderr, after.stderr
    finally:
        leftover = cluster.close()
        os.close(terminal.master)
    assert leftover == []
