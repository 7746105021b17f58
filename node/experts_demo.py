"""``swarmtrain demo --mode experts``: a local swarm trains heterogeneous and homogeneous expert ensembles
of equal compute (and a dense model of that compute) on the embedded domains, then compares them.

1. Plan: a small seed model judges each domain's difficulty; both allocations go into a signed spec.
2. Start a bootstrap peer and N node processes; they claim the jobs, checkpoint, keep each other's
   checkpoints, and average within a job's group when there are more nodes than open jobs.
3. Once every job is done, ``swarmtrain ensemble eval`` fetches the experts from the swarm (verified
   by digest) and prints the table; then the swarm is stopped.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from node.zo_demo import DemoError, _env, _first_maddr, _Proc, _start, stop_processes

PROGRESS_EVERY_S = 10.0
DEMO_SEED_STEPS = 40
EVAL_TOKENS = 8192  # per domain; bench/bench_experts.py evaluates on more


def write_spec(workdir: Path, steps: int, *, seed_steps: int = DEMO_SEED_STEPS, checkpoint_every: int = 25,
               domains: tuple[str, ...] | None = None, dense: bool = True, say=None, **overrides) -> Path:
    """A signed experts spec for a local swarm, with fast heartbeats."""
    from ensemble.plan import PlanSettings, plan, section_overrides
    from protocol.keys import generate_private_key
    from protocol.runspec import EMBEDDED_DOMAINS, dumps_spec, make_spec

    settings = PlanSettings(domains=tuple(domains or EMBEDDED_DOMAINS), base_steps=steps, seed_steps=seed_steps,
                            checkpoint_every=checkpoint_every, dense=dense, lease_s=20.0)
    section, _ = plan(settings, say)
    experts = section_overrides(section)
    experts.update(overrides.pop("experts", {}))
    spec = make_spec("experts", "tiny", generate_private_key(), name="experts-demo", domains=list(settings.domains),
                     heartbeat_interval_s=1.0, heartbeat_ttl_s=5.0, experts=experts, **overrides)
    path = workdir / "run.toml"
    path.write_text(dumps_spec(spec))
    return path


def node_args(workdir: Path, spec: Path, peer: str, name: str) -> list[str]:
    return ["node", "--run", str(spec), "--data-dir", str(workdir / name), "--initial-peers", peer,
            "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--device", "cpu", "--report", str(workdir / f"{name}.json"),
            "--public-name", name]


def read_report(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def run_eval(workdir: Path, spec: Path, peer: str, timeout_s: float = 600.0) -> dict:
    """``swarmtrain ensemble eval --json`` against the swarm, as a separate process."""
    result = subprocess.run([sys.executable, "-m", "node.cli", "ensemble", "eval", "--run", str(spec),
                             "--initial-peers", peer, "--max-tokens", str(EVAL_TOKENS), "--json"],
                            capture_output=True, text=True, cwd=workdir,
                            env=_env(), timeout=timeout_s)
    if result.returncode != 0:
        raise DemoError(f"ensemble eval failed ({result.returncode}): {result.stderr.strip()[-1500:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def summarize(table: dict, reports: list[dict], nodes: int, seconds: float) -> dict:
    from ensemble.evaluate import format_table, row_name

    rows = {r["name"]: r for r in table["rows"]}
    out = {"domains": table["domains"], "nodes": nodes, "seconds": round(seconds, 1), "budget": table["budget"],
           "table": format_table(table), "rows": table["rows"]}
    for ensemble in ("heterogeneous", "homogeneous"):
        for rule in ("posterior", "uniform"):
            key = ensemble if rule == "posterior" else f"{ensemble}_uniform"
            out[key] = rows[row_name(ensemble, rule)]["perplexity"]
    if "dense" in rows:
        out["dense"] = rows["dense"]["perplexity"]
    out["experts"] = {r["name"]: r["perplexity"] for r in table["rows"] if r["kind"] == "expert"}
    out["heterogeneous_wins"] = len(table["heterogeneous_wins"]["posterior"])
    out["averaged_rounds"] = sum(r.get("averaged", 0) for r in reports)
    out["resumed_jobs"] = sum(1 for r in reports for j in r.get("jobs", []) if j.get("resumed_from"))
    out["checkpoint_copies"] = sum(len(r.get("mirrored", [])) for r in reports)
    return out


def run_demo(nodes: int, steps: int, as_json: bool, timeout_s: float = 1800.0) -> dict:
    say = (lambda *a, **k: print(*a, **k, file=sys.stderr, flush=True)) if as_json else \
        (lambda *a, **k: print(*a, **k, flush=True))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="swarmtrain-experts-demo-") as tmp:
        workdir = Path(tmp)
        say(f"planning: a seed model ({DEMO_SEED_STEPS} steps on all domains) judges each domain; "
            f"homogeneous experts get {steps} steps each")
        spec = write_spec(workdir, steps, say=lambda line: None)
        from ensemble.jobs import domain_labels
        from node.ensemble_cli import allocation_lines
        from protocol.runspec import load_spec

        loaded = load_spec(spec)
        for line in allocation_lines(loaded.experts, domain_labels(loaded.data.domains)):
            say(line)
        procs: list[_Proc] = []
        try:
            boot = _start(workdir, "bootstrap", ["bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0"])
            procs.append(boot)
            peer = _first_maddr(boot, 60)
            names = [f"expert-{i}" for i in range(nodes)]
            for name in names:
                procs.append(_start(workdir, name, node_args(workdir, spec, peer, name)))
            say(f"started {nodes} expert nodes")
            deadline = time.monotonic() + timeout_s
            last = time.monotonic()
            while True:
                reports = [read_report(workdir / f"{name}.json") for name in names]
                if any(r is not None and r["all_done"] for r in reports):
                    break
                dead = [p for p in procs if p.popen.poll() is not None]
                if dead:
                    raise DemoError(f"{dead[0].name} exited with {dead[0].popen.returncode}:\n{dead[0].text()[-2000:]}")
                if time.monotonic() > deadline:
                    raise DemoError(f"the experts were not done within {timeout_s:.0f} s")
                if time.monotonic() - last > PROGRESS_EVERY_S:
                    last = time.monotonic()
                    done = sorted({name for r in reports if r for name, c in r["own"].items() if c["done"]})
                    say(f"  {len(done)} jobs done: {', '.join(done) or '-'}")
                time.sleep(1.0)
            say("every job is done; evaluating the ensembles with checkpoints fetched from the swarm")
            table = run_eval(workdir, spec, peer)
            reports = [r for r in (read_report(workdir / f"{name}.json") for name in names) if r]
        finally:
            stop_processes(procs)
    return summarize(table, reports, nodes, time.monotonic() - started)
