"""Real OS processes on 127.0.0.1 for integration tests, always cleaned up (p2pd included)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

SWARMTRAIN = [sys.executable, "-m", "node.cli"]
REPO = Path(__file__).resolve().parent.parent


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    env.update(extra)
    return env


def p2pd_pids() -> set[int]:
    """pids of every running p2pd (hivemind's libp2p daemon)."""
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0]
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if cmdline.endswith(b"p2pd") and ") Z " not in stat:
            pids.add(int(entry))
    return pids


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return ") Z " not in stat


def wait_until(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last value: {last!r}")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_for_output(self, text: str, timeout: float) -> str:
        def found():
            if self.popen.poll() is not None and text not in self.output():
                raise AssertionError(f"{self.name} exited with {self.popen.returncode}:\n{self.output()[-3000:]}")
            return text in self.output()

        wait_until(found, timeout, 0.2, f"{text!r} from {self.name}")
        return self.output()


@dataclass
class Cluster:
    """Starts processes in their own sessions and kills every one of them (and their p2pd) at the end."""

    workdir: Path
    procs: list[Proc] = field(default_factory=list)
    p2pd_before: set[int] = field(default_factory=p2pd_pids)

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> Proc:
        log = self.workdir / f"{name}.log"
        handle = open(log, "wb")
        popen = subprocess.Popen(
            [*SWARMTRAIN, *args],
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.workdir,
            env=env or child_env(),
            start_new_session=True,
        )
        handle.close()
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*SWARMTRAIN, *args], capture_output=True, text=True, timeout=timeout, cwd=self.workdir, env=child_env()
        )

    def bootstrap(self) -> tuple[Proc, str]:
        proc = self.start("bootstrap", "bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0")
        out = proc.wait_for_output("/p2p/", 60)
        maddr = next(line.strip() for line in out.splitlines() if line.strip().startswith("/ip4/127.0.0.1"))
        return proc, maddr

    def status(self, initial_peer: str, *extra: str) -> dict:
        result = self.run("status", "--initial-peers", initial_peer, "--json", *extra)
        if result.returncode != 0:
            raise AssertionError(f"status failed: {result.stderr[-2000:]}")
        return json.loads(result.stdout)

    def close(self) -> list[int]:
        """Stop everything the way a user would (SIGTERM to each process), then make sure.

        Returns the p2pd pids that outlived their node after the polite stop; they are killed anyway.
        """
        groups = {proc.pid for proc in self.procs}
        for proc in self.procs:
            if proc.popen.poll() is None:
                try:  # a frozen (SIGSTOP) process group cannot stop
                    os.killpg(proc.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
                proc.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs:
            try:
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass

        def ours() -> set[int]:
            found = set()
            for pid in p2pd_pids() - self.p2pd_before:
                try:
                    if os.getpgid(pid) in groups:
                        found.add(pid)
                except ProcessLookupError:
                    pass
            return found

        leftover_deadline = time.monotonic() + 10
        while time.monotonic() < leftover_deadline and ours():
            time.sleep(0.2)
        leftover = sorted(ours())
        for pgid in groups:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self.procs:
            if proc.popen.poll() is None:
                proc.popen.wait(5)
        return leftover
