"""``swarmtrain demo --mode zo``: a local swarm of node processes fine-tunes the tiny preset with SPSA.

1. Pretrain base weights with backprop on the embedded prose for a few steps (one process).
2. Sign a zo run spec recording their hash; start a bootstrap peer and N node processes.
3. Wait for every node's report; print loss, weight hashes and bytes on the wire.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

PROGRESS_EVERY_S = 5.0
_PR_SET_PDEATHSIG = 1


class DemoError(RuntimeError):
    """The local swarm did not come up or finish."""


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _die_with_demo() -> None:
    """In the child, before exec: SIGTERM when the demo dies, even by SIGKILL (node.dht.die_with_parent)."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _start(workdir: Path, name: str, args: list[str]) -> _Proc:
    """A node process in its own session: Ctrl-C reaches only the demo, which stops it in order
    (stop_processes); if the demo is killed outright, the kernel tells the node to leave."""
    log = workdir / f"{name}.log"
    with open(log, "wb") as handle:
        popen = subprocess.Popen([sys.executable, "-m", "node.cli", *args], stdout=handle, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, cwd=workdir, env=_env(), start_new_session=True,
                                 preexec_fn=_die_with_demo)
    return _Proc(name, popen, log)


def _first_maddr(proc: _Proc, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in proc.text().splitlines():
            if line.strip().startswith("/ip4/127.0.0.1/") and "/p2p/" in line:
                return line.strip()
        if proc.popen.poll() is not None:
            raise DemoError(f"{proc.name} exited early:\n{proc.text()[-2000:]}")
        time.sleep(0.2)
    raise DemoError(f"{proc.name} printed no address within {timeout_s:.0f} s")


def pretrain_base(path: Path, steps: int, preset: str = "tiny") -> float:
    """Backprop on the embedded prose: the model the zo run fine-tunes. Returns its final val loss."""
    from trainer.train import TrainConfig, train_single_process

    result = train_single_process(TrainConfig(preset=preset, steps=steps, domains=("prose",), num_threads=1,
                                              eval_every=max(steps, 1)))
    torch.save({name: t.detach().clone() for name, t in result.model.state_dict().items()}, path)
    return result.final_val_loss


def write_spec(workdir: Path, base: Path, nodes: int, steps: int, owner=None, preset: str = "tiny",
               **zo: object) -> Path:
    """A signed zo run spec for a local swarm of ``nodes`` nodes (``owner``: the signing key, a
    new one by default; with the same owner and a fixed ``created``, two specs are one run id)."""
    from node.zo_node import build_replica
    from protocol.keys import generate_private_key
    from protocol.runspec import dumps_spec, make_spec

    owner = owner or generate_private_key()
    draft = make_spec("zo", preset, owner, steps=steps)
    base_hash = build_replica(draft, str(base))[1].hex()
    settings = dict(name="zo-demo", steps=steps, min_nodes=nodes, base_hash=base_hash, step_timeout_s=5.0,
                    hash_every=5, heartbeat_interval_s=1.0, heartbeat_ttl_s=6.0)
    spec = make_spec("zo", preset, owner, **{**settings, **zo})
    path = workdir / "run.toml"
    path.write_text(dumps_spec(spec))
    return path


def place_node_keys(workdir: Path, nodes: int, seed: int) -> list[bytes]:
    """Identity keys derived from ``seed`` in node i's data dir (``workdir/node{i}``, as
    run_local_swarm names them), so that runs compared with each other have the same nodes, hence
    the same probe seeds and data; returns the node ids (public keys) in node order."""
    import hashlib

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from node.identity import KEY_FILENAME, write_private_key
    from protocol.keys import public_key_bytes

    ids = []
    for i in range(nodes):
        raw = hashlib.blake2b(f"{seed}/{i}".encode(), digest_size=32, person=b"swarmtrain/keys").digest()
        key = Ed25519PrivateKey.from_private_bytes(raw)
        folder = workdir / f"node{i}"
        folder.mkdir(parents=True, exist_ok=True)
        write_private_key(folder / KEY_FILENAME, key, overwrite=True)
        ids.append(public_key_bytes(key))
    return ids


def run_local_swarm(workdir: Path, spec: Path, base: Path, nodes: int, timeout_s: float,
                    progress=None, extra_args: dict[int, list[str]] | None = None,
                    device: str = "cpu") -> list[dict]:
    """Start a bootstrap and ``nodes`` node processes on ``device`` (node i gets ``extra_args[i]``
    too); wait for their reports; always clean up."""
    procs: list[_Proc] = []
    try:
        boot = _start(workdir, "bootstrap", ["bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0"])
        procs.append(boot)
        peer = _first_maddr(boot, 60)
        reports = [workdir / f"node{i}.json" for i in range(nodes)]
        for i in range(nodes):
            procs.append(_start(workdir, f"node{i}", [
                "node", "--run", str(spec), "--data-dir", str(workdir / f"node{i}"), "--initial-peers", peer,
                "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--base-weights", str(base), "--device", device,
                "--zo-report", str(reports[i]), "--public-name", f"zo-{i}", *(extra_args or {}).get(i, [])]))
        deadline = time.monotonic() + timeout_s
        last_progress = time.monotonic()
        while time.monotonic() < deadline:
            if all(p.popen.poll() is not None for p in procs[1:]):
                break
            if progress is not None and time.monotonic() - last_progress > PROGRESS_EVERY_S:
                last_progress = time.monotonic()
                progress(procs[1:])
            time.sleep(0.5)
        else:
            raise DemoError(f"the swarm did not finish within {timeout_s:.0f} s; logs are in {workdir}")
        return read_reports(procs[1:], reports)
    finally:
        stop_processes(procs)


def read_reports(procs: list[_Proc], paths: list[Path]) -> list[dict]:
    """Each node's JSON report; a node that left none is an error that shows its log's tail."""
    found = []
    for proc, path in zip(procs, paths):
        if not path.exists():
            raise DemoError(f"{proc.name} exited with {proc.popen.returncode} and no report:\n{proc.text()[-3000:]}")
        found.append(json.loads(path.read_text()))
    return found


def stop_processes(procs: list[_Proc], grace_s: float = 15.0) -> None:
    """SIGTERM every process, then SIGKILL its whole session (p2pd and DHT children included).
    A second Ctrl-C (or SIGTERM) while this runs is ignored: it would leave the rest running."""
    main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        for proc in procs:
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in procs:
            try:
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in procs:
            if proc.popen.poll() is None:
                proc.popen.wait(5)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def summarize(reports: list[dict], nodes: int) -> dict:
    """The demo's JSON: loss, agreement of the replicas, bytes on the wire against an all-reduce."""
    finals = {r["weights_hash"] for r in reports}
    steps = max(r["steps"] for r in reports)
    start_losses = [r["losses"][0][2] for r in reports if r["losses"] and r["losses"][0][0] == 0]
    end_losses = [r["losses"][-1][2] for r in reports if r["losses"] and r["losses"][-1][0] == steps]
    wire = [(r["rpc_sent"] + r["rpc_received"]) / max(1, r["steps_applied"]) for r in reports]
    sent = [r["rpc_sent"] / max(1, r["steps_applied"]) for r in reports]
    params = reports[0]["num_params"]
    return {
        "nodes": nodes,
        "steps": steps,
        "loss_start": start_losses[0] if start_losses else None,
        "loss_end": end_losses[0] if end_losses else None,
        "weights_identical": len(finals) == 1 and all(r["steps"] == steps for r in reports),
        "payload_bytes_per_sample": 1,
        "wire_bytes_per_node_step": round(sum(wire) / len(wire), 1),
        "wire_sent_bytes_per_node_step": round(sum(sent) / len(sent), 1),
        "allreduce_bytes_per_node_step": 2 * 4 * params,
        "params": params,
        "trained_params": reports[0]["num_trained"],
        "seconds": round(max(r["seconds"] for r in reports), 1),
        "resyncs": sum(r["resyncs"] for r in reports),
    }


def run_demo(nodes: int, steps: int, base_steps: int, as_json: bool, timeout_s: float = 1800.0) -> dict:
    say = (lambda *a, **k: print(*a, **k, file=sys.stderr)) if as_json else print
    with tempfile.TemporaryDirectory(prefix="swarmtrain-zo-demo-") as tmp:
        workdir = Path(tmp)
        base = workdir / "base.pt"
        say(f"pretraining base weights: tiny preset, {base_steps} backprop steps on the embedded prose", flush=True)
        pretrain_base(base, base_steps)
        spec = write_spec(workdir, base, nodes, steps)
        say(f"starting {nodes} zo nodes; they fine-tune on the embedded arithmetic with one byte per probe",
            flush=True)

        def progress(procs: list[_Proc]) -> None:
            done = []
            for p in procs:
                lines = [line for line in p.text().splitlines() if "zo committer" in line or "ONLINE" in line]
                done.append(lines[-1].split(" - ")[-1][:60] if lines else "starting")
            say("  " + " | ".join(done), flush=True)

        reports = run_local_swarm(workdir, spec, base, nodes, timeout_s, progress if not as_json else None)
    return summarize(reports, nodes)
