"""The chaos harness's mode adapters: a run spec and the nodes of a mode, how a killed node comes
back, how far the run is, and who may be hit now. Each mode's "nothing lost" checks are in
tests/chaos/checks.py. (Another mode is one more class with these methods.)"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from tests.chaos.procs import NodeProc
from tests.chaos.swarm import ChaosSwarm, NodeSpec

ZO_STEP = re.compile(r"zo step (\d+) weights ([0-9a-f]{16})")
PP_ITERATION = re.compile(r"pipeline iteration (\d+) done, weights ([0-9a-f]{16})")
PP_ROLE = re.compile(r"role: (\w+)(?: stage (\d+))? —")


def _signed_spec(workdir: Path, mode: str, **settings) -> Path:
    from protocol.keys import generate_private_key
    from protocol.runspec import dumps_spec, make_spec

    path = workdir / "run.toml"
    path.write_text(dumps_spec(make_spec(mode, "tiny", generate_private_key(), **settings)))
    return path


def _home(workdir: Path, name: str) -> NodeSpec:
    home = workdir / "nodes" / name
    return NodeSpec(name, [], home, home / "data", home / "report.json")


class _OwnHomeNodes:
    """Nodes that all run one command and come back from their own data dir (a zo node resumes
    from its commit log, an experts node's store still holds its checkpoints). A mode sets
    ``nodes``, ``spec_path``, ``report_flag`` and ``prefix``."""

    report_flag: ClassVar[str] = "--report"
    prefix: ClassVar[str] = "node"

    def node(self, workdir: Path, name: str) -> NodeSpec:
        spec = _home(workdir, name)
        spec.args = ["node", "--run", str(self.spec_path), "--data-dir", str(spec.data_dir), "--device", "cpu",
                     self.report_flag, str(spec.report)]
        return spec

    def initial_nodes(self, workdir: Path) -> list[NodeSpec]:
        return [self.node(workdir, f"{self.prefix}-{i}") for i in range(self.nodes)]

    def restart(self, proc: NodeProc, spec: NodeSpec) -> NodeSpec:
        return spec


@dataclass
class ZoMode(_OwnHomeNodes):
    """``nodes`` zo nodes fine-tune the tiny preset from the run's seed; a killed node comes back
    from its data dir (its own commit log, then what it missed). At most one node is down at a
    time, so a majority of the last commit's contributors always lives (the quorum rule)."""

    nodes: int = 4
    steps: int = 120
    heartbeat_interval_s: float = 0.5
    heartbeat_ttl_s: float = 3.0
    step_timeout_s: float = 2.0
    hash_every: int = 5
    snapshot_every: int = 20
    batch_size: int = 8
    stop_faults_at: float = 0.8  # no new fault after this fraction of the steps
    name: str = "zo"
    spec_path: Path | None = None
    report_flag: ClassVar[str] = "--zo-report"
    prefix: ClassVar[str] = "zo"

    def prepare(self, workdir: Path) -> None:
        self.spec_path = _signed_spec(workdir, "zo", name="chaos-zo", steps=self.steps, min_nodes=self.nodes,
                                      step_timeout_s=self.step_timeout_s, hash_every=self.hash_every,
                                      snapshot_every=self.snapshot_every, batch_size=self.batch_size,
                                      heartbeat_interval_s=self.heartbeat_interval_s,
                                      heartbeat_ttl_s=self.heartbeat_ttl_s)

    @staticmethod
    def head_of(proc: NodeProc) -> int:
        found = ZO_STEP.findall(proc.text())
        return max((int(s) for s, _ in found), default=0)

    def progress(self, swarm: ChaosSwarm) -> int:
        return max((self.head_of(p) for p in swarm.procs), default=0)

    def ready(self, proc: NodeProc) -> bool:
        """The node applies commits: it logged a weight hash in this life."""
        return self.head_of(proc) > 0

    def work_of(self, proc: NodeProc) -> int:
        return self.head_of(proc)

    def may_inject(self, swarm: ChaosSwarm) -> bool:
        return self.progress(swarm) < self.stop_faults_at * self.steps

    def eligible(self, swarm: ChaosSwarm, kind: str) -> list[NodeProc]:
        return swarm.eligible()

    def finished(self, swarm: ChaosSwarm) -> bool:
        return False  # zo nodes exit after the run's last step

    def recoveries(self, swarm: ChaosSwarm) -> list[dict]:
        """Each node life after the first: how it caught up (from its log, a replay or a snapshot)."""
        out = []
        for proc in swarm.procs:
            if proc.life == 0:
                continue
            text = proc.text()
            how = "resume" if "resumed from the local log" in text else "snapshot" if "by snapshot" in text \
                else "replay" if "by replay" in text else "none"
            out.append({"node": proc.name, "life": proc.life, "by": how, "ready": self.ready(proc)})
        return out


@dataclass
class PipelineMode:
    """A skip pipeline of the tiny preset over ``stages`` stages; ``replicas[s]`` nodes serve stage
    s (stage 0: data nodes). A killed node comes back from its data dir with ``--role auto``: it
    takes the stage with the fewest live replicas (a lost one first) and restores it (replica copy,
    or a CheckFree / swap-copy rebuild from the neighbours). The last data node is never hit, and
    at most one node is down at a time."""

    stages: int = 3
    replicas: tuple[int, ...] = (2, 2, 1)
    iterations: int = 60
    heartbeat_interval_s: float = 0.5
    heartbeat_ttl_s: float = 3.0
    swap: str = "checkfree_plus"
    snapshot_every: int = 5
    stop_faults_at: float = 0.75
    name: str = "pipeline"
    spec_path: Path | None = None
    extra: dict = field(default_factory=dict)  # more run spec settings

    def prepare(self, workdir: Path) -> None:
        nodes = sum(self.replicas)
        settings = dict(name="chaos-pipeline", stages=self.stages, path_length=self.stages, microbatches=4,
                        microbatch_size=4, seq_len=64, memory=2, steps=self.iterations, lr=3e-3, swap=self.swap,
                        heartbeat_interval_s=self.heartbeat_interval_s, heartbeat_ttl_s=self.heartbeat_ttl_s,
                        min_nodes=nodes, move_after_s=600.0)
        settings.update(self.extra)
        self.spec_path = _signed_spec(workdir, "pipeline", **settings)

    def _args(self, spec: NodeSpec, role: list[str]) -> list[str]:
        return ["node", "--run", str(self.spec_path), "--data-dir", str(spec.data_dir), "--device", "cpu",
                "--report", str(spec.report), "--snapshot-dir", str(spec.home / "snapshots"),
                "--snapshot-every", str(self.snapshot_every), *role]

    def initial_nodes(self, workdir: Path) -> list[NodeSpec]:
        specs = []
        for stage, count in enumerate(self.replicas):
            for r in range(count):
                spec = _home(workdir, f"s{stage}-{r}")
                spec.args = self._args(spec, ["--role", "data"] if stage == 0 else ["--stage", str(stage)])
                specs.append(spec)
        return specs

    def node(self, workdir: Path, name: str) -> NodeSpec:
        spec = _home(workdir, name)
        spec.args = self._args(spec, ["--role", "auto"])
        return spec

    def restart(self, proc: NodeProc, spec: NodeSpec) -> NodeSpec:
        spec.args = self._args(spec, ["--role", "auto"])
        return spec

    @staticmethod
    def stage_of(proc: NodeProc) -> int | None:
        found = PP_ROLE.findall(proc.text())
        return int(found[-1][1]) if found and found[-1][1] else None

    def last_stage(self, swarm: ChaosSwarm, name: str) -> int | None:
        """The stage a node serves, or served in its last life that had one (a restart has none yet)."""
        for proc in reversed([p for p in swarm.procs if p.name == name]):
            stage = self.stage_of(proc)
            if stage is not None:
                return stage
        return None

    @staticmethod
    def iteration_of(proc: NodeProc) -> int:
        """One past the last iteration this life finished (0: none)."""
        found = PP_ITERATION.findall(proc.text())
        return max((int(k) + 1 for k, _ in found), default=0)

    def progress(self, swarm: ChaosSwarm) -> int:
        return max((self.iteration_of(p) for p in swarm.procs), default=0)

    def ready(self, proc: NodeProc) -> bool:
        """The node serves a stage: it finished an iteration since its last role line."""
        text = proc.text()
        role_at = max(text.rfind("role: data"), text.rfind("role: stage"))
        return role_at >= 0 and text.find("pipeline iteration", role_at) >= 0

    def work_of(self, proc: NodeProc) -> int:
        return self.iteration_of(proc)

    def may_inject(self, swarm: ChaosSwarm) -> bool:
        return self.progress(swarm) < self.stop_faults_at * self.iterations

    def eligible(self, swarm: ChaosSwarm, kind: str) -> list[NodeProc]:
        """At work, in a stage with no node down (so a stage loses at most one replica at a time),
        and never the last data node."""
        down = swarm.down()
        stage_down = {self.last_stage(swarm, name) for name in down}
        serving = [p for p in swarm.eligible() if self.stage_of(p) not in stage_down]
        data = [p for p in serving if self.stage_of(p) == 0]
        return [p for p in serving if self.stage_of(p) != 0 or len(data) > 1]

    def finished(self, swarm: ChaosSwarm) -> bool:
        return False  # pipeline nodes exit after the run's last iteration

    def recoveries(self, swarm: ChaosSwarm) -> list[dict]:
        """Every stage restore any node life logged (killed lives included)."""
        from tests.chaos.checks import pipeline_restores

        return [r.__dict__ for r in pipeline_restores(swarm.procs)]


EX_CHECKPOINT = re.compile(r"checkpoint of (\S+) at step (\d+): ([0-9a-f]{16})")
EX_DONE = re.compile(r"job (\S+) done at step (\d+): checkpoint ([0-9a-f]{16})")
EX_AT_WORK = ("training job ", "every expert job of the run is done", "not joining its group now")


@dataclass
class ExpertsMode(_OwnHomeNodes):
    """Mode experts: one heterogeneous expert per embedded domain (3 jobs of the tiny preset,
    ``steps`` each, checkpoints every ``checkpoint_every``) on ``nodes`` nodes, so that one node
    joins a job's group. A killed node comes back from its data dir: it publishes again the
    checkpoints its store holds, and a job it or another node takes up resumes from the most
    advanced checkpoint a live node keeps. Experts nodes do not exit when the jobs are done (they
    serve checkpoints): the run is over once every node says every job is done."""

    nodes: int = 4
    steps: tuple[int, ...] = (140, 115, 95)  # per domain: python, prose, arithmetic
    checkpoint_every: int = 10
    lease_s: float = 6.0
    replicas: int = 2
    batch_size: int = 8
    seq_len: int = 64
    heartbeat_interval_s: float = 0.5
    heartbeat_ttl_s: float = 3.0
    stop_faults_at: float = 0.7  # no new fault after this fraction of the run's steps
    name: str = "experts"
    spec_path: Path | None = None
    report_flag: ClassVar[str] = "--report"
    prefix: ClassVar[str] = "ex"
    # what a node process needs besides its spec: averaging that gives up quickly on 127.0.0.1
    env: dict = field(default_factory=lambda: {"SWARMTRAIN_TIMEOUT_AVERAGING_MATCHMAKING_S": "1.0",
                                               "SWARMTRAIN_TIMEOUT_AVERAGING_S": "10.0"})

    def prepare(self, workdir: Path) -> None:
        from protocol.runspec import EMBEDDED_DOMAINS

        domains = list(EMBEDDED_DOMAINS)
        experts = {"heterogeneous": [{"domain": d, "steps": n, "lr": 3e-3} for d, n in zip(domains, self.steps)],
                   "homogeneous": [], "dense": [], "checkpoint_every": self.checkpoint_every,
                   "lease_s": self.lease_s, "replicas": self.replicas}
        self.spec_path = _signed_spec(workdir, "experts", name="chaos-experts", domains=domains, experts=experts,
                                      batch_size=self.batch_size, seq_len=self.seq_len,
                                      heartbeat_interval_s=self.heartbeat_interval_s,
                                      heartbeat_ttl_s=self.heartbeat_ttl_s)

    @property
    def total_steps(self) -> int:
        return sum(self.steps)

    @staticmethod
    def checkpoints_of(proc: NodeProc) -> dict[str, int]:
        """Job -> the highest step this life checkpointed."""
        out: dict[str, int] = {}
        for job, step, _ in EX_CHECKPOINT.findall(proc.text()):
            out[job] = max(out.get(job, 0), int(step))
        return out

    def progress(self, swarm: ChaosSwarm) -> int:
        """Steps checkpointed, summed over the jobs (each job's most advanced checkpoint)."""
        best: dict[str, int] = {}
        for proc in swarm.procs:
            for job, step in self.checkpoints_of(proc).items():
                best[job] = max(best.get(job, 0), step)
        return sum(best.values())

    def ready(self, proc: NodeProc) -> bool:
        """At work in this life: it took a job (or found every job done, or a group it cannot join yet)."""
        text = proc.text()
        return any(marker in text for marker in EX_AT_WORK)

    def work_of(self, proc: NodeProc) -> None:
        return None  # a node may find every job done, or wait for a group: nothing to count

    def may_inject(self, swarm: ChaosSwarm) -> bool:
        return self.progress(swarm) < self.stop_faults_at * self.total_steps

    def eligible(self, swarm: ChaosSwarm, kind: str) -> list[NodeProc]:
        return swarm.eligible()

    def finished(self, swarm: ChaosSwarm) -> bool:
        """Every node's current life found every job done (they would serve checkpoints for ever)."""
        return all(p.state == "running" and "every expert job of the run is done" in p.text()
                   for p in swarm.current())

    def recoveries(self, swarm: ChaosSwarm) -> list[dict]:
        """Every stint any node life began on a job: where it started and from what."""
        from tests.chaos.checks import experts_stints

        return [s.__dict__ for s in experts_stints(swarm.procs)]
