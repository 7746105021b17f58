"""A local swarm of real node processes under a seeded schedule of faults.

``ChaosSwarm(workdir, mode, options).run()`` starts a bootstrap peer and the mode's nodes, waits
until the run is under way, then injects the schedule's faults one at a time (a fault waits until
the previous one ended and every node is back at work): kill -9 of a node (restarted from its data
dir after ``restart_delay_s``), SIGSTOP/SIGCONT freezes longer than the heartbeat TTL, partitions
(network namespaces where ``netns.available()``, else the RPC transport hook), lossy links (the
hook), a full disk (a tmpfs per node, filled and freed) and clock skew (nodes started with their
wall clock off, or a running node's clock moved ahead for a while). It samples every node's memory, then stops everything, also on failure, and
returns what happened for the mode's "nothing lost" checks (tests/chaos/checks.py).

A mode (tests/chaos/modes.py) is a small adapter: its run spec and node arguments, how a killed
node comes back, how far the run is, which nodes may be hit now, and its own checks.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from tests.chaos import disk as disks
from tests.chaos import netns as namespaces
from tests.chaos.procs import (MemorySample, NodeProc, freeze_node, kill_node, rss_of_group, start_process,
                               stop_all, thaw_node)
from tests.chaos.schedule import ChaosPlan, Fault, make_schedule
from trainer.files import write_json

REPO = Path(__file__).resolve().parents[2]
CLOCK_SHIM = Path(__file__).resolve().parent / "clock"
TICK_S = 0.25


class ChaosError(RuntimeError):
    """The swarm did not come up or did not finish in time; the message says where the logs are."""


@dataclass
class NodeSpec:
    """What a mode asks for: one node, its arguments (without the network flags the harness adds)."""

    name: str
    args: list[str]
    home: Path  # the node's folder: data dir, report, snapshots (a small disk of its own, with disks on)
    data_dir: Path
    report: Path


@dataclass
class Event:
    at: float
    kind: str  # a fault kind, or start, restart, end-<kind>, exit, skipped
    node: str
    detail: str = ""


@dataclass
class ChaosOptions:
    plan: ChaosPlan
    timeout_s: float = 600.0
    netns: bool | None = None  # None: real namespaces where available; partitions use the hook otherwise
    disks: bool | None = None  # a small tmpfs per node (None: where available; needed by disk_full)
    disk_mib: int = 16
    restart_delay_s: float | None = None  # kill -> restart; default: heartbeat TTL + 1 s
    memory_every_s: float = 10.0
    skews_s: dict[str, float] = field(default_factory=dict)  # node name -> wall clock skew for the whole run
    # extra nodes (name -> clock skew) started with the run: never hit, not waited for, not checked
    bystanders: dict[str, float] = field(default_factory=dict)
    partition_via: tuple[str, ...] = ()  # "netns" or "hook" for the k-th partition, cycled (default: netns if any)
    env: dict[str, str] = field(default_factory=dict)  # more environment for every node (SWARMTRAIN_* settings)
    lossy: dict = field(default_factory=lambda: {"drop": 0.05, "delay_s": 0.02, "jitter_s": 0.03})
    skew_jump_s: float = 60.0  # a "skew" fault moves the victim's running clock this far ahead
    start_timeout_s: float = 240.0
    fault_retry_s: float = 60.0  # how long a fault may wait for an eligible victim before it is skipped
    max_down: int = 1  # nodes that may be down (killed, frozen, cut off, restarting) at once
    min_gap_s: float = 3.0  # between two injections
    # a soak: this long after the window opened, stop injecting, end every fault, wait until every
    # node is back at work (at most drain_s), let it run settle_s more, then stop the nodes (SIGTERM:
    # they write their reports) instead of waiting for the run's last step
    stop_after_s: float | None = None
    # a short chaos run that does not depend on the machine's speed: a run of many steps, stopped
    # like a soak once every fault of the schedule was injected (or skipped) and has ended
    stop_when_done: bool = False
    drain_s: float = 180.0
    settle_s: float = 15.0


class Mode(Protocol):
    name: str
    heartbeat_ttl_s: float

    def prepare(self, workdir: Path) -> None: ...
    def initial_nodes(self, workdir: Path) -> list[NodeSpec]: ...
    def node(self, workdir: Path, name: str) -> NodeSpec: ...
    def restart(self, proc: NodeProc, spec: NodeSpec) -> NodeSpec: ...
    def progress(self, swarm: "ChaosSwarm") -> int: ...
    def ready(self, proc: NodeProc) -> bool: ...
    def work_of(self, proc: NodeProc) -> int | None: ...  # how far this life got (None: not counted)
    def eligible(self, swarm: "ChaosSwarm", kind: str) -> list[NodeProc]: ...
    def may_inject(self, swarm: "ChaosSwarm") -> bool: ...
    def finished(self, swarm: "ChaosSwarm") -> bool: ...  # the run is over though its nodes keep running
    def recoveries(self, swarm: "ChaosSwarm") -> list[dict]: ...


@dataclass
class ChaosResult:
    workdir: Path
    mode: str
    procs: list[NodeProc]
    specs: dict[str, NodeSpec]
    events: list[Event]
    faults: dict[str, int]  # injected, by kind
    skipped: list[Fault]
    progress: int
    seconds: float
    memory: list[MemorySample]
    recoveries: list[dict]
    netns: bool
    disks: bool
    copies: dict[str, Path]  # node -> where its small disk's files were copied before unmounting
    bystanders: list[NodeProc] = field(default_factory=list)
    stopped: bool = False  # the harness stopped the nodes (a soak) rather than the run ending
    drained: bool = False  # stopped once every node was back at work and had got further since the drain began

    def lives(self, name: str) -> list[NodeProc]:
        return [p for p in self.procs if p.name == name]

    def final(self, name: str) -> NodeProc:
        return self.lives(name)[-1]

    def home(self, name: str) -> Path:
        """Where the node's files are now (a copy of its small disk, with disks on)."""
        return self.copies.get(name, self.specs[name].home)

    def killed_pids(self) -> set[int]:
        return {pid for p in self.procs for pid in p.killed_pids}


class ChaosSwarm:
    def __init__(self, workdir: Path, mode: Mode, options: ChaosOptions, say: Callable[[str], None] | None = None):
        self.workdir = Path(workdir)
        self.mode = mode
        self.options = options
        self.say = say or (lambda text: None)
        self.procs: list[NodeProc] = []
        self.specs: dict[str, NodeSpec] = {}
        self.events: list[Event] = []
        self.memory: list[MemorySample] = []
        self.faults_file = self.workdir / "link-faults.json"
        self.net: namespaces.Netns | None = None
        self.disks: dict[str, disks.SmallDisk] = {}
        self.peer = ""
        self.boot: NodeProc | None = None
        self._restarts: list[tuple[float, str]] = []  # (when, node)
        self._endings: list[tuple[float, str, str]] = []  # (when, kind, node)
        self._link_rules: dict = {"seed": options.plan.seed}
        self._partitioned: list[str] = []
        self._partitions = 0
        self._disk_freed: dict[str, float] = {}  # node -> when its full disk was freed
        self.bystanders: list[NodeProc] = []

    # ---- bookkeeping -------------------------------------------------------------------------

    def record(self, kind: str, node: str, detail: str = "") -> None:
        self.events.append(Event(time.time(), kind, node, detail))
        self.say(f"[chaos {time.strftime('%H:%M:%S')}] {kind} {node} {detail}".rstrip())

    def current(self) -> list[NodeProc]:
        """The latest life of every node."""
        latest: dict[str, NodeProc] = {}
        for proc in self.procs:
            latest[proc.name] = proc
        return list(latest.values())

    def life_of(self, name: str) -> NodeProc:
        return [p for p in self.procs if p.name == name][-1]

    def down(self) -> set[str]:
        """Nodes that are not at work now: killed and not yet back, under a fault that lasts, or
        started and not yet serving."""
        out = {name for _, name in self._restarts} | {name for _, _, name in self._endings}
        out |= {p.name for p in self.current() if p.state != "running" or not self.mode.ready(p)}
        return out

    def eligible(self) -> list[NodeProc]:
        """Nodes at work, when fewer than ``max_down`` are down: the mode picks among these."""
        down = self.down()
        if len(down) >= self.options.max_down:
            return []
        return [p for p in self.current() if p.name not in down]

    # ---- starting nodes ----------------------------------------------------------------------

    def _start(self, spec: NodeSpec, life: int, bystander: bool = False) -> NodeProc:
        if not bystander:
            self.specs[spec.name] = spec
        address = self.net.add(spec.name) if self.net is not None else "127.0.0.1"
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO),
                   **self.options.env)
        skew = self.options.bystanders.get(spec.name, 0.0) if bystander else self.options.skews_s.get(spec.name, 0.0)
        if skew or self.options.plan.counts.get("skew"):
            clock = self.workdir / "clocks" / spec.name
            clock.parent.mkdir(exist_ok=True)
            write_json(clock, skew)  # a number: what the clock hook reads (a "skew" fault rewrites it)
            env.update(PYTHONPATH=f"{REPO}{os.pathsep}{CLOCK_SHIM}", SWARMTRAIN_CHAOS_CLOCK_FILE=str(clock))
        args = [*spec.args, "--public-name", spec.name, "--initial-peers", self.peer,
                "--host-maddrs", f"/ip4/{address}/tcp/0", "--log-format", "json", "--link-faults", str(self.faults_file)]
        wrap = self.net.wrap(spec.name, []) if self.net is not None else None
        proc = start_process(spec.name, life, args, spec.data_dir, self.workdir / "logs" / f"{spec.name}.{life}.log",
                             self.workdir, env, wrap)
        (self.bystanders if bystander else self.procs).append(proc)
        self.record("bystander" if bystander else "start" if life == 0 else "restart", spec.name,
                    f"pid {proc.pid}" + (f", clock {skew:+g} s" if skew else ""))
        return proc

    def _bootstrap(self) -> None:
        host = self.net.host_address if self.net is not None else "127.0.0.1"
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        self.boot = start_process("bootstrap", 0, ["bootstrap", "--host-maddrs", f"/ip4/{host}/tcp/0", "--log-format",
                                                   "json"], self.workdir, self.workdir / "logs" / "bootstrap.log",
                                  self.workdir, env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for line in self.boot.messages():
                if line.message.strip().startswith(f"/ip4/{host}/") and "/p2p/" in line.message:
                    self.peer = line.message.strip()
                    return
            if self.boot.popen.poll() is not None:
                raise ChaosError(f"the bootstrap peer exited:\n{self.boot.text()[-2000:]}")
            time.sleep(0.2)
        raise ChaosError("the bootstrap peer printed no address within 60 s")

    def _setup(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        write_json(self.faults_file, self._link_rules)
        use_netns = namespaces.available() if self.options.netns is None else self.options.netns
        if use_netns:
            self.net = namespaces.Netns()
        use_disks = disks.available() if self.options.disks is None else self.options.disks
        self.mode.prepare(self.workdir)
        specs = self.mode.initial_nodes(self.workdir)
        for spec in specs:
            if use_disks:
                small = disks.SmallDisk(spec.home, self.options.disk_mib)
                small.mount()
                self.disks[spec.name] = small
            spec.home.mkdir(parents=True, exist_ok=True)
        self._initial = specs

    # ---- faults ------------------------------------------------------------------------------

    def _write_link_rules(self) -> None:
        write_json(self.faults_file, self._link_rules)

    def _inject(self, fault: Fault) -> bool:
        """Inject ``fault`` now; False if nobody may suffer it yet."""
        if fault.kind == "partition" and (self._partitioned or any(k == "partition" for _, k, _ in self._endings)):
            return False  # one partition at a time
        victim = fault.victim(self.mode.eligible(self, fault.kind))
        if not isinstance(victim, NodeProc):
            return False
        name, ttl = victim.name, self.mode.heartbeat_ttl_s
        if fault.kind == "kill":
            kill_node(victim)
            self.record("kill", name, f"pid {victim.pid}")
            self._restarts.append((time.time() + self.restart_delay_s(), name))
        elif fault.kind == "freeze":
            freeze_node(victim)
            seconds = max(fault.duration_s, ttl + 1.0)
            self.record("freeze", name, f"for {seconds:.1f} s (heartbeat TTL {ttl:g} s)")
            self._endings.append((time.time() + seconds, "freeze", name))
        elif fault.kind == "partition":
            seconds = max(fault.duration_s, ttl + 1.0)
            self._partitioned = [name]
            via = self.options.partition_via
            via = via[self._partitions % len(via)] if via else "netns" if self.net is not None else "hook"
            self._partitions += 1
            if via == "netns" and self.net is not None:
                self.net.isolate([name])
                how = "network namespace"
            else:
                self._link_rules["partition"] = [[name]]
                self._write_link_rules()
                how = "transport hook"
            self.record("partition", name, f"cut off for {seconds:.1f} s ({how})")
            self._endings.append((time.time() + seconds, "partition", name))
        elif fault.kind == "lossy":
            seconds = max(fault.duration_s, 1.0)
            self._link_rules.setdefault("nodes", {})[name] = dict(self.options.lossy)
            self._write_link_rules()
            self.record("lossy", name, f"{json.dumps(self.options.lossy)} for {seconds:.1f} s")
            self._endings.append((time.time() + seconds, "lossy", name))
        elif fault.kind == "disk_full":
            small = self.disks.get(name)
            if small is None:
                return False
            taken = small.fill()
            seconds = max(fault.duration_s, 1.0)
            self.record("disk_full", name, f"{small.size_mib} MiB disk filled ({taken} bytes) for {seconds:.1f} s")
            self._endings.append((time.time() + seconds, "disk_full", name))
        elif fault.kind == "skew":
            seconds = max(fault.duration_s, 1.0)
            write_json(self.workdir / "clocks" / name, self.options.skews_s.get(name, 0.0) + self.options.skew_jump_s)
            self.record("skew", name, f"clock {self.options.skew_jump_s:+g} s for {seconds:.1f} s")
            self._endings.append((time.time() + seconds, "skew", name))
        else:
            raise ValueError(f"unknown fault kind {fault.kind!r}")
        return True

    def _end(self, kind: str, name: str) -> None:
        proc = self.life_of(name)
        if kind == "freeze":
            thaw_node(proc)
        elif kind == "partition":
            if self.net is not None:
                self.net.heal()
            self._link_rules.pop("partition", None)
            self._write_link_rules()
            self._partitioned = []
        elif kind == "lossy":
            self._link_rules.get("nodes", {}).pop(name, None)
            self._write_link_rules()
        elif kind == "skew":
            write_json(self.workdir / "clocks" / name, self.options.skews_s.get(name, 0.0))
        elif kind == "disk_full":
            self.disks[name].free()
            self._disk_freed[name] = time.time()
            proc.poll()
            if proc.state == "exited":  # it stopped cleanly on the full disk: it comes back like a killed node
                self._restarts.append((time.time() + 1.0, name))
        self.record(f"end-{kind}", name)

    def restart_delay_s(self) -> float:
        if self.options.restart_delay_s is not None:
            return self.options.restart_delay_s
        return self.mode.heartbeat_ttl_s + 1.0

    def _sample_memory(self) -> None:
        now = time.time()
        for proc in self.current():
            if proc.live:
                node, p2pd = rss_of_group(proc.pid)
                if node or p2pd:
                    self.memory.append(MemorySample(now, proc.name, proc.life, round(node, 1), round(p2pd, 1)))

    # ---- the run -----------------------------------------------------------------------------

    def run(self) -> ChaosResult:
        began = time.time()
        stopped = False
        schedule: list[Fault] = []
        skipped: list[Fault] = []
        injected: dict[str, int] = {}
        try:
            self._setup()
            self._bootstrap()
            for spec in self._initial:
                self._start(spec, 0)
            for name in self.options.bystanders:
                spec = self.mode.node(self.workdir, name)
                spec.home.mkdir(parents=True, exist_ok=True)
                self._start(spec, 0, bystander=True)
            deadline = time.monotonic() + self.options.start_timeout_s
            while self.mode.progress(self) <= 0:
                self._check_alive()
                if time.monotonic() > deadline:
                    raise ChaosError(f"the run did not start within {self.options.start_timeout_s:.0f} s; logs in "
                                     f"{self.workdir / 'logs'}")
                time.sleep(TICK_S)
            opened = time.time()
            self.record("chaos", "-", f"window opens at progress {self.mode.progress(self)}")
            schedule = make_schedule(self.options.plan)
            pending = list(schedule)
            deadline = time.monotonic() + self.options.timeout_s
            next_sample = last_injection = 0.0
            draining_since: float | None = None
            stopped = drained = False
            work_at_drain: dict[tuple[str, int], int] = {}
            while True:
                now = time.time()
                done = self.options.stop_when_done and not pending and not self._endings and not self._restarts
                if draining_since is None and (done or (self.options.stop_after_s is not None
                                                        and now - opened >= self.options.stop_after_s)):
                    draining_since = now
                    skipped.extend(pending)
                    pending = []
                    for item in list(self._endings):
                        self._endings.remove(item)
                        self._end(item[1], item[2])
                    self.record("drain", "-", "no more faults; waiting until every node is back at work")
                    work_at_drain = {(p.name, p.life): self.mode.work_of(p) or 0 for p in self.current()}
                if draining_since is not None and not stopped:
                    # at work, and further than when the drain began: a node that was "at work" once
                    # in this life may have been stuck since its fault
                    back = not self._restarts and all(
                        p.state == "running" and self.mode.ready(p)
                        and (self.mode.work_of(p) is None or self.mode.work_of(p) > work_at_drain.get((p.name, p.life), 0))
                        for p in self.current())
                    if (back and now - draining_since >= self.options.settle_s) or \
                            now - draining_since > self.options.drain_s:
                        self.record("stop", "-", "every node back at work" if back else
                                    "drain timed out: " + ", ".join(self._not_back(work_at_drain)))
                        drained = back
                        stop_all(self.current(), grace_s=60.0)
                        stopped = True
                        continue
                if not stopped and not self._restarts and not self._endings and self.mode.finished(self):
                    self.record("stop", "-", "the run is done; its nodes would go on serving")
                    stop_all(self.current(), grace_s=60.0)
                    stopped = True
                    continue
                for proc in self.current():
                    before = proc.state
                    proc.poll()
                    if before != proc.state and proc.state == "exited":
                        self.record("exit", proc.name, f"code {proc.popen.returncode}")
                        # it stopped on the full disk just freed (it was shutting down then): it comes back
                        freed = self._disk_freed.get(proc.name)
                        if proc.popen.returncode != 0 and freed is not None and now - freed < 30.0:
                            self._restarts.append((now + 1.0, proc.name))
                for item in [e for e in self._endings if e[0] <= now]:
                    self._endings.remove(item)
                    self._end(item[1], item[2])
                for item in [r for r in self._restarts if r[0] <= now]:
                    self._restarts.remove(item)
                    old = self.life_of(item[1])
                    self._start(self.mode.restart(old, self.specs[item[1]]), old.life + 1)
                if pending and pending[0].at_s <= now - opened:
                    fault = pending[0]
                    late = now - opened - fault.at_s
                    if not self.mode.may_inject(self) or late > self.options.fault_retry_s:
                        pending.pop(0)
                        skipped.append(fault)
                        self.record("skipped", "-", f"{fault.kind}: the swarm was not quiet in time or the run is ending")
                    elif now - last_injection >= self.options.min_gap_s and self._inject(fault):
                        pending.pop(0)
                        injected[fault.kind] = injected.get(fault.kind, 0) + 1
                        last_injection = now
                if now >= next_sample:
                    next_sample = now + self.options.memory_every_s
                    self._sample_memory()
                if not self._endings and not self._restarts and not any(p.live for p in self.current()):
                    break
                if time.monotonic() > deadline:
                    raise ChaosError(f"the run did not finish within {self.options.timeout_s:.0f} s (progress "
                                     f"{self.mode.progress(self)}); logs in {self.workdir / 'logs'}")
                time.sleep(TICK_S)
            skipped.extend(pending)
            progress = self.mode.progress(self)
            stopped = draining_since is not None
            recoveries = self.mode.recoveries(self)
        finally:
            copies = self._teardown()
        return ChaosResult(self.workdir, self.mode.name, list(self.procs), dict(self.specs), list(self.events),
                           injected, skipped, progress, time.time() - began, list(self.memory), recoveries,
                           self.net is not None, bool(self.disks), copies, list(self.bystanders), stopped, drained)

    def _not_back(self, work_at_drain: dict[tuple[str, int], int]) -> list[str]:
        """The nodes that are not back at work, and why (for the stop event)."""
        out = []
        for p in self.current():
            work = self.mode.work_of(p)
            if p.state != "running" or not self.mode.ready(p):
                out.append(f"{p.name} {p.state}{'' if self.mode.ready(p) else ', not at work'}")
            elif work is not None and work <= work_at_drain.get((p.name, p.life), 0):
                out.append(f"{p.name} no further than {work}")
        return out or ["a restart pending"]

    def _check_alive(self) -> None:
        for proc in self.current():
            proc.poll()
            if proc.state == "exited":
                raise ChaosError(f"{proc.name} exited with {proc.popen.returncode} before the run started:\n"
                                 f"{proc.text()[-3000:]}")

    def _teardown(self) -> dict[str, Path]:
        """Stop every process (frozen ones are thawed first), heal the network, copy each small disk's
        files (the checks read them) and unmount it, remove the namespaces. Never raises."""
        for when, kind, name in list(self._endings):
            try:
                self._end(kind, name)
            except Exception:  # noqa: BLE001 - the teardown goes on whatever one step did
                pass
        self._endings.clear()
        stop_all(self.procs + self.bystanders + ([self.boot] if self.boot else []))
        copies = {}
        for name, small in self.disks.items():
            small.free()
            target = self.workdir / "disk-copies" / name
            try:
                shutil.copytree(small.path, target, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns(disks.FILLER))
                copies[name] = target
            except OSError:
                pass
            small.unmount()
        if self.net is not None:
            self.net.close()
        try:
            write_json(self.workdir / "events.json", [e.__dict__ for e in self.events])
        except OSError:
            pass
        return copies
