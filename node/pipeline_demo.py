"""``swarmtrain demo --mode pipeline``: a local swarm of node processes trains the tiny preset as a
skip pipeline (stage i % S for node i; stage 0 nodes are the data nodes)."""
from __future__ import annotations

import json
import re
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from node.config import format_size

from node.zo_demo import DemoError, _first_maddr, _start, read_reports, stop_processes

PROGRESS_EVERY_S = 5.0
_ROLE_LINE = re.compile(r"role: (\w+)(?: stage (\d+))? —")


def write_pipeline_spec(workdir: Path, stages: int, iterations: int, nodes: int, preset: str = "tiny",
                        **overrides) -> Path:
    from protocol.keys import generate_private_key
    from protocol.runspec import dumps_spec, make_spec

    settings = dict(name="pipeline-demo", stages=stages, path_length=max(2, stages - 1) if stages > 3 else stages,
                    microbatches=4, microbatch_size=4, seq_len=64, memory=2, steps=iterations, lr=3e-3,
                    swap="checkfree_plus" if stages >= 3 else "none", heartbeat_interval_s=1.0, heartbeat_ttl_s=6.0, min_nodes=nodes)
    settings.update(overrides)
    spec = make_spec("pipeline", preset, generate_private_key(), **settings)
    path = workdir / "run.toml"
    path.write_text(dumps_spec(spec))
    return path


def _last_int_after(text: str, marker: str) -> int | None:
    """The integer after the last ``marker`` in ``text``."""
    at = text.rfind(marker)
    if at < 0:
        return None
    digits = ""
    for ch in text[at + len(marker):]:
        if not ch.isdigit():
            break
        digits += ch
    return int(digits) if digits else None


class FailureInjector:
    """Kills (SIGKILL) the node processes that the failure list names, when the run reaches each
    failure's iteration (read from the data nodes' logs). Which process serves which stage comes from
    the role lines in their logs, so nodes that took a lost stage or moved count where they are now."""

    def __init__(self, failures, procs) -> None:
        self.pending = sorted(failures)
        self.procs = procs
        self.kills: list[dict] = []  # {stage, iteration, node, at}

    def iteration(self) -> int:
        """The iteration the run is in: one past the last any node finished."""
        return max((_last_int_after(p.text(), "pipeline iteration ") or -1) + 1 for p in self.procs)

    def poll(self) -> None:
        if not self.pending:
            return
        iteration = self.iteration()
        # replica R: the R-th process (in start order) serving the stage that lived when this look
        # began: failures due at once name the replicas as they were, and a stage's later failure
        # kills the node that took it after an earlier one
        alive = [p for p in self.procs if p.popen.poll() is None]
        while self.pending and self.pending[0].iteration <= iteration:
            failure = self.pending.pop(0)
            serving = [p for p in alive if _role_stage(p.text()) == failure.stage]
            if len(serving) <= failure.replica:
                self.kills.append({"stage": failure.stage, "iteration": iteration, "node": None, "at": time.time(),
                                   "note": f"no replica {failure.replica} of stage {failure.stage} was running"})
                continue
            victim = serving[failure.replica]
            victim.popen.kill()  # SIGKILL: no goodbye, like a crash
            self.kills.append({"stage": failure.stage, "iteration": iteration, "node": victim.name, "at": time.time()})


def _role_stage(log: str) -> int | None:
    """The stage in the node's last 'role: ... stage N' log line (None for a spare)."""
    found = _ROLE_LINE.findall(log)
    return int(found[-1][1]) if found and found[-1][1] else None


def run_pipeline_swarm(workdir: Path, spec: Path, nodes: int, stages: int, timeout_s: float,
                       progress=None, device: str = "cpu", spares: int = 0, failures=(),
                       extra_args: dict[int, list[str]] | None = None,
                       joins: list[tuple[int, list[str]]] = (),
                       roles: dict[int, list[str]] | None = None,
                       may_die: set[str] = frozenset(),
                       on_bootstrap: Callable[[str], None] | None = None) -> tuple[list[dict], list[dict]]:
    """Node i serves stage i % stages (stage 0: data nodes); then ``spares`` spare nodes; ``joins``:
    (iteration, role arguments) of nodes started when the run reaches that iteration. Returns the
    reports of the nodes that finished (each with its ``process`` name) and the kills of
    ``failures`` (see FailureInjector). ``extra_args``: more arguments for node i; ``roles``: role
    arguments for node i instead of the default; ``may_die``: processes (node{i}) that are allowed
    to end without a report (a test's fault injection); ``on_bootstrap``: called with the bootstrap's
    multiaddr once it listens. ``progress`` is called every PROGRESS_EVERY_S with the node processes
    and the kills so far."""
    procs = []
    try:
        boot = _start(workdir, "bootstrap", ["bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0"])
        procs.append(boot)
        peer = _first_maddr(boot, 60)
        if on_bootstrap is not None:
            on_bootstrap(peer)
        def start(i: int, name: str, role: list[str]) -> None:
            procs.append(_start(workdir, f"node{i}", [
                "node", "--run", str(spec), "--data-dir", str(workdir / f"node{i}"), "--initial-peers", peer,
                "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--device", device, "--report", str(workdir / f"node{i}.json"),
                "--public-name", name, *role, *(extra_args or {}).get(i, [])]))

        for i in range(nodes + spares):
            stage = i % stages
            role = ["--role", "spare"] if i >= nodes else ["--role", "data"] if stage == 0 else ["--stage", str(stage)]
            role = (roles or {}).get(i, role)
            start(i, f"spare{i - nodes}" if i >= nodes else f"stage{stage}-{i}", role)
        injector = FailureInjector(failures, procs[1:])
        waiting = sorted(joins, key=lambda j: j[0])
        deadline = time.monotonic() + timeout_s
        last = time.monotonic()
        while not all(p.popen.poll() is not None for p in procs[1:]):
            if time.monotonic() > deadline:
                raise DemoError(f"the swarm did not finish within {timeout_s:.0f} s; logs are in {workdir}")
            injector.poll()
            while waiting and waiting[0][0] <= injector.iteration():
                start(len(procs) - 1, f"joiner{len(procs) - 1}", waiting.pop(0)[1])
                injector.procs = procs[1:]
            if progress is not None and time.monotonic() - last > PROGRESS_EVERY_S:
                last = time.monotonic()
                progress(procs[1:], injector.kills)
            time.sleep(0.25)
        killed = {k["node"] for k in injector.kills}
        left = [(p, workdir / f"node{i}.json") for i, p in enumerate(procs[1:]) if p.name not in killed
                and not (p.name in may_die and not (workdir / f"node{i}.json").exists())]
        reports = read_reports([p for p, _ in left], [path for _, path in left])
        for (p, _), report in zip(left, reports):
            report["process"] = p.name
        return reports, injector.kills
    finally:
        stop_processes(procs)


def recoveries_of(reports: list[dict], kills: list[dict]) -> list[dict]:
    """Each rebuild or copy of a lost stage: method, and the time from the kill to the stage serving
    again (mttr_s), split into detection (kill -> the leader saw it lost) and restore."""
    out = []
    for report in reports:
        for r in report.get("recoveries", []):
            before = [k for k in kills if k["stage"] == r["stage"] and k["node"] and k["at"] <= r["serving_at"]]
            kill = max(before, key=lambda k: k["at"]) if before else None
            item = {"stage": r["stage"], "method": r["method"], "node": report.get("process"),
                    "iteration": r["iteration"], "restore_s": round(r["seconds"], 3)}
            if kill is not None:
                item["mttr_s"] = round(r["serving_at"] - kill["at"], 3)
                if r.get("lost_at"):
                    item["detection_s"] = round(r["lost_at"] - kill["at"], 3)
                    if r.get("claimed_at"):  # lost -> a spare (or mover) won the job
                        item["claim_s"] = round(r["claimed_at"] - r["lost_at"], 3)
            out.append(item)
    return sorted(out, key=lambda r: (r.get("mttr_s") is None, r["stage"]))


def summarize_pipeline(reports: list[dict], stages: int) -> dict:
    data = [r for r in reports if r["stage"] == 0 and r["losses"]]
    first = [r["losses"][0][2] for r in data]
    last = [r["losses"][-1][2] for r in data]
    times = [(r["losses"][-1][1] - r["losses"][0][1]) / max(1, len(r["losses"]) - 1) for r in data]
    def differing(pick) -> list[int]:  # stages whose replicas do not report the same thing
        return [s for s in range(stages) if len({json.dumps(pick(r)) for r in reports if r["stage"] == s}) > 1]

    def agree(pick) -> bool:
        return not differing(pick)

    def at_end(r):  # (iteration, weights hash) at the end
        return r["hashes"][-1] if r["hashes"] else None

    identical = agree(at_end)
    return {
        "nodes": len(reports),
        "stages": stages,
        "iterations": min(r["iterations"] for r in reports),
        "loss_start": sum(first) / len(first) if first else None,
        "loss_end": sum(last) / len(last) if last else None,
        "replicas_identical": identical,
        # where they are not: each replica's last (iteration, weights hash), by process
        "replicas_differ": {str(stage): {r.get("process", "?"): at_end(r) and [at_end(r)[0], at_end(r)[1][:16]]
                                         for r in reports if r["stage"] == stage}
                            for stage in differing(at_end)},
        "replicas_identical_every_iteration": agree(lambda r: r["hashes"]),
        "mean_iteration_s": round(sum(times) / len(times), 3) if times else None,
        "rerouted": sum(r["rerouted"] for r in reports),
        "bytes_sent": sum(r.get("bytes_sent", 0) for r in reports),  # RPC bytes, headers included
        "tokens_per_s": round(sum(r["tokens"] for r in data) / max(1e-9, max(r["seconds"] for r in data)), 1)
        if data else None,
    }


@dataclass(frozen=True)
class DemoPlan:
    """One demo run: ``swarmtrain demo`` (make demo) or its reduced form ``--quick`` (CI)."""

    nodes: int
    stages: int
    iterations: int
    failures: tuple = ()
    spares: int = 0
    recovery: str = "checkfree"


# 4 stages of one block each: stage 2 has neighbours on both sides, so its loss shows the CheckFree
# rebuild from them (stages 1 and 3 are swap partners of 2 under CheckFree+). Node i serves stage
# i % 4, so the full demo holds stages 0 and 1 twice and the quick one stage 0 twice.
FULL = dict(nodes=6, stages=4, iterations=40, fail_at=8)
QUICK = dict(nodes=5, stages=4, iterations=16, fail_at=3)
DEMO_SPEC = dict(heartbeat_interval_s=0.5, heartbeat_ttl_s=4.0, move_after_s=600.0)  # a kill is noticed in ~4 s


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_demo(plan: DemoPlan, as_json: bool, timeout_s: float = 1800.0) -> dict:
    say = (lambda *a, **k: print(*a, **k, file=sys.stderr)) if as_json else print
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="swarmtrain-pipeline-demo-") as tmp:
        workdir = Path(tmp)
        spec = write_pipeline_spec(workdir, plan.stages, plan.iterations, plan.nodes, recovery=plan.recovery,
                                   **DEMO_SPEC)
        say(f"starting {plan.nodes} node processes: a {plan.stages}-stage skip pipeline of the tiny preset on the "
            f"embedded data, {plan.iterations} iterations", flush=True)
        if plan.failures:
            say(f"with {plan.spares} spare node(s) and failures: "
                + ", ".join(f"stage {f.stage} killed at iteration {f.iteration}" for f in plan.failures), flush=True)
        shown: set[str] = set()

        def progress(procs, kills) -> None:
            for kill in kills:
                key = f"kill {kill['stage']} {kill['iteration']}"
                if key not in shown:
                    shown.add(key)
                    say(f"  killed {kill['node'] or 'nobody'} (stage {kill['stage']}) with SIGKILL at iteration "
                        f"{kill['iteration']}", flush=True)
            for p in procs:
                for line in p.text().splitlines():
                    if "took lost stage" in line and "role:" in line:
                        took = f"  {p.name}: {line.split(' — ', 1)[-1]}"
                        if took not in shown:
                            shown.add(took)
                            say(took, flush=True)
            losses = [line.split(": ", 1)[-1] for p in procs for line in p.text().splitlines() if "mean loss" in line]
            if losses and losses[-1] not in shown:
                shown.add(losses[-1])
                say("  " + losses[-1], flush=True)

        # the first data node serves the run's status page (node/status_server.py) while the demo runs
        status_port = free_port()

        def announce_status_page(peer: str) -> None:
            say(f"status page (while the demo runs): http://127.0.0.1:{status_port}/", flush=True)

        checkpoints = ["--checkpoint-dir", str(workdir / "checkpoints")] if plan.recovery == "checkpoint" else []
        extra = {i: list(checkpoints) for i in range(plan.nodes + plan.spares)}
        extra[0] += ["--status-port", str(status_port)]
        reports, kills = run_pipeline_swarm(workdir, spec, plan.nodes, plan.stages, timeout_s,
                                            None if as_json else progress, spares=plan.spares,
                                            failures=plan.failures,
                                            extra_args=extra, on_bootstrap=announce_status_page)
        summary = summarize_pipeline([r for r in reports if r["stage"] is not None], plan.stages)
        if not summary["replicas_identical"]:  # keep what explains it: the nodes' logs and reports
            kept = Path.cwd() / f"swarmtrain-demo-logs-{time.strftime('%Y%m%d-%H%M%S')}"
            kept.mkdir(parents=True, exist_ok=True)
            for path in [*workdir.glob("*.log"), *workdir.glob("*.json")]:
                shutil.copy2(path, kept / path.name)
            summary["logs"] = str(kept)
    summary["seconds"] = round(time.monotonic() - started, 1)
    if plan.failures:
        summary["kills"] = [{k: v for k, v in kill.items() if k != "at"} for kill in kills]
        summary["recoveries"] = recoveries_of(reports, kills)
    return summary


def format_summary(result: dict) -> list[str]:
    """The demo's closing lines for a person."""
    lines = [f"{result['nodes']} nodes, {result['stages']} stages, {result['iterations']} iterations in "
             f"{result['seconds']} s ({result['mean_iteration_s']} s each)",
             f"training loss {result['loss_start']:.3f} -> {result['loss_end']:.3f}"]
    for r in result.get("recoveries", []):
        timing = (f"serving again {r['mttr_s']:.1f} s after the kill (noticed after {r['detection_s']:.1f} s, "
                  f"restored in {r['restore_s']:.1f} s)" if "mttr_s" in r and "detection_s" in r
                  else f"serving again {r['mttr_s']:.1f} s after the kill" if "mttr_s" in r else "(no kill matched)")
        lines.append(f"stage {r['stage']} lost, rebuilt by {r['method']} on {r['node']} at iteration "
                     f"{r['iteration']}, {timing}")
    if "recoveries" in result and not result["recoveries"]:
        lines.append("no stage was rebuilt before the run ended")
    lines.append(f"replicas of every stage identical: {'yes' if result['replicas_identical'] else 'NO'}; "
                 f"{result['tokens_per_s']:,} tokens/s over the data nodes; "
                 f"{format_size(result['bytes_sent'])} sent over the RPC by all nodes")
    return lines
