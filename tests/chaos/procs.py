"""The node processes of a chaos run: start, kill -9, freeze and thaw whole process groups (the node,
its DHT child and its p2pd), read their JSON logs incrementally, sample their memory from /proc."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from node.zo_demo import stop_processes

SWARMTRAIN = [sys.executable, "-m", "node.cli"]
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


@dataclass
class LogLine:
    at: float  # the node's own clock (unix time), or the time the harness read it for a plain line
    level: str
    message: str
    whole: bool  # a JSON log record, or one of the CLI's own printed lines


# what the CLI prints besides its JSON log records (node/cli.py, node/console.py): the multiaddr
# banner, each role the node takes, the status page's address and errors
_PLAIN = ("this node's multiaddrs", "  /ip4/", "  /ip6/", "role: ", "status page: ", "swarmtrain node: error:",
          "share one of these", "swarmtrain bootstrap: error:")


def parse_line(raw: str, now: float) -> LogLine:
    try:
        record = json.loads(raw)
    except ValueError:
        record = None
    if isinstance(record, dict) and isinstance(record.get("message"), str):
        text = record["message"] + ("\n" + record["exception"] if record.get("exception") else "")
        return LogLine(float(record.get("time", now)), str(record.get("level", "")), text, True)
    return LogLine(now, "", raw, raw.startswith(_PLAIN))


class LogTail:
    """The lines of a growing log file, read from where the last read stopped (whole lines only)."""

    def __init__(self, path: Path):
        self.path = path
        self.lines: list[LogLine] = []
        self._offset = 0
        self._partial = b""

    def read(self) -> list[LogLine]:
        """Lines added since the last call."""
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self._offset)
                chunk = handle.read()
        except FileNotFoundError:
            return []
        self._offset += len(chunk)
        data = self._partial + chunk
        *complete, self._partial = data.split(b"\n")
        now = time.time()
        new = [parse_line(raw.decode(errors="replace"), now) for raw in complete]
        self.lines.extend(new)
        return new

    def torn_tail(self) -> bool:
        """Whether the file ends in the middle of a line."""
        self.read()
        return bool(self._partial)


@dataclass
class NodeProc:
    """One life of a node: a process started with ``args``; a restart from the same data dir is a new
    NodeProc with the same ``name`` and the next ``life``."""

    name: str
    life: int
    args: list[str]
    data_dir: Path
    log_path: Path
    popen: subprocess.Popen
    started_at: float
    env: dict[str, str] = field(default_factory=dict)
    state: str = "running"  # running, frozen, killed, exited
    ended_at: float | None = None
    killed_pids: set[int] = field(default_factory=set)  # every process of its group at its kill
    tail: LogTail | None = None

    def __post_init__(self) -> None:
        self.tail = LogTail(self.log_path)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def live(self) -> bool:
        """Running or frozen: the process exists (a frozen node is judged dead by its peers)."""
        return self.state in ("running", "frozen")

    def poll(self) -> None:
        if self.state in ("running", "frozen") and self.popen.poll() is not None:
            self.state, self.ended_at = "exited", time.time()

    def messages(self) -> list[LogLine]:
        assert self.tail is not None
        self.tail.read()
        return self.tail.lines

    def text(self) -> str:
        return "\n".join(line.message for line in self.messages())


def start_process(name: str, life: int, args: list[str], data_dir: Path, log_path: Path, cwd: Path,
                  env: dict[str, str], wrap: list[str] | None = None) -> NodeProc:
    """``wrap``: a prefix such as ``ip netns exec NS`` (which execs: the pid stays the node's)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as handle:
        popen = subprocess.Popen([*(wrap or []), *SWARMTRAIN, *args], stdout=handle, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, cwd=cwd, env=env, start_new_session=True)
    return NodeProc(name, life, args, data_dir, log_path, popen, time.time(), env)


def group_pids(pgid: int) -> list[int]:
    """The live (non-zombie) processes of a process group."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            found.append(int(entry))
    return found


def signal_group(proc: NodeProc, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def kill_node(proc: NodeProc) -> None:
    """kill -9 of the whole node (its process group), as a crash of its machine would."""
    proc.killed_pids = set(group_pids(proc.pid))
    signal_group(proc, signal.SIGKILL)
    try:
        proc.popen.wait(10)
    except subprocess.TimeoutExpired:
        pass
    proc.state, proc.ended_at = "killed", time.time()


def freeze_node(proc: NodeProc) -> None:
    signal_group(proc, signal.SIGSTOP)
    proc.state = "frozen"


def thaw_node(proc: NodeProc) -> None:
    signal_group(proc, signal.SIGCONT)
    if proc.state == "frozen":
        proc.state = "running"


def stop_all(procs: list[NodeProc], grace_s: float = 20.0) -> None:
    """SIGCONT (a frozen node cannot stop), then the demo's SIGTERM and SIGKILL of every process group."""
    for proc in procs:
        if proc.popen.poll() is None:
            signal_group(proc, signal.SIGCONT)
    stop_processes(procs, grace_s)
    for proc in procs:
        proc.poll()


# ---- memory ----------------------------------------------------------------------------------


def rss_of_group(pgid: int) -> tuple[float, float]:
    """(MiB resident in the node's Python processes, MiB resident in its p2pd) of a process group."""
    node = p2pd = 0.0
    for pid in group_pids(pgid):
        try:
            pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
            exe = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        except (OSError, IndexError, ValueError):
            continue
        mib = pages * PAGE_KB / 1024
        if exe.endswith(b"p2pd"):
            p2pd += mib
        else:
            node += mib
    return node, p2pd


@dataclass
class MemorySample:
    at: float
    node: str
    life: int
    node_mib: float
    p2pd_mib: float


def slope_mib_per_hour(samples: list[MemorySample], attr: str = "node_mib", skip_s: float = 60.0) -> float | None:
    """Least-squares slope of one node life's RSS over time, after its first ``skip_s`` seconds
    (start-up allocations are not a leak); None with fewer than 3 samples left."""
    if not samples:
        return None
    first = min(s.at for s in samples)
    points = [(s.at, getattr(s, attr)) for s in samples if s.at - first >= skip_s]
    if len(points) < 3:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return None
    return 3600.0 * sum((t - mean_t) * (y - mean_y) for t, y in points) / var
