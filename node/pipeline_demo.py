"""``swarmtrain demo --mode pipeline``: a local swarm of node processes trains the tiny preset as a
skip pipeline (stage i % S for node i; stage 0 nodes are the data nodes)."""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from node.zo_demo import DemoError, _first_maddr, _start, read_reports, stop_processes

PROGRESS_EVERY_S = 5.0


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


def run_pipeline_swarm(workdir: Path, spec: Path, nodes: int, stages: int, timeout_s: float,
                       progress=None, device: str = "cpu") -> list[dict]:
    procs = []
    try:
        boot = _start(workdir, "bootstrap", ["bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0"])
        procs.append(boot)
        peer = _first_maddr(boot, 60)
        for i in range(nodes):
            stage = i % stages
            role = ["--role", "data"] if stage == 0 else ["--stage", str(stage)]
            procs.append(_start(workdir, f"node{i}", [
                "node", "--run", str(spec), "--data-dir", str(workdir / f"node{i}"), "--initial-peers", peer,
                "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--device", device, "--report", str(workdir / f"node{i}.json"),
                "--public-name", f"stage{stage}-{i}", *role]))
        deadline = time.monotonic() + timeout_s
        last = time.monotonic()
        while not all(p.popen.poll() is not None for p in procs[1:]):
            if time.monotonic() > deadline:
                raise DemoError(f"the swarm did not finish within {timeout_s:.0f} s; logs are in {workdir}")
            if progress is not None and time.monotonic() - last > PROGRESS_EVERY_S:
                last = time.monotonic()
                progress(procs[1:])
            time.sleep(0.5)
        return read_reports(procs[1:], [workdir / f"node{i}.json" for i in range(nodes)])
    finally:
        stop_processes(procs)


def summarize_pipeline(reports: list[dict], stages: int) -> dict:
    data = [r for r in reports if r["stage"] == 0 and r["losses"]]
    first = [r["losses"][0][2] for r in data]
    last = [r["losses"][-1][2] for r in data]
    times = [(r["losses"][-1][1] - r["losses"][0][1]) / max(1, len(r["losses"]) - 1) for r in data]
    def agree(pick) -> bool:  # every stage's replicas report the same thing
        return all(len({json.dumps(pick(r)) for r in reports if r["stage"] == s}) == 1 for s in range(stages))

    identical = agree(lambda r: r["hashes"][-1] if r["hashes"] else None)  # the weights at the end
    return {
        "nodes": len(reports),
        "stages": stages,
        "iterations": min(r["iterations"] for r in reports),
        "loss_start": sum(first) / len(first) if first else None,
        "loss_end": sum(last) / len(last) if last else None,
        "replicas_identical": identical,
        "replicas_identical_every_iteration": agree(lambda r: r["hashes"]),
        "mean_iteration_s": round(sum(times) / len(times), 3) if times else None,
        "rerouted": sum(r["rerouted"] for r in reports),
        "tokens_per_s": round(sum(r["tokens"] for r in data) / max(1e-9, max(r["seconds"] for r in data)), 1)
        if data else None,
    }


def run_demo(nodes: int, stages: int, iterations: int, as_json: bool, timeout_s: float = 1800.0) -> dict:
    say = (lambda *a, **k: print(*a, **k, file=sys.stderr)) if as_json else print
    with tempfile.TemporaryDirectory(prefix="swarmtrain-pipeline-demo-") as tmp:
        workdir = Path(tmp)
        spec = write_pipeline_spec(workdir, stages, iterations, nodes)
        say(f"starting {nodes} node processes: a {stages}-stage skip pipeline of the tiny preset on the embedded "
            f"data, {iterations} iterations", flush=True)

        def progress(procs) -> None:
            lines = []
            for p in procs:
                found = [line for line in p.text().splitlines() if "mean loss" in line]
                if found:
                    lines.append(found[-1].split(": ", 1)[-1])
            if lines:
                say("  " + lines[-1], flush=True)

        reports = run_pipeline_swarm(workdir, spec, nodes, stages, timeout_s, None if as_json else progress)
    return summarize_pipeline(reports, stages)
