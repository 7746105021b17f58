"""Shared-randomness (zo) fine-tuning at a real model size on one GPU: N replica processes share the
device, each holding the whole model in fp32 and applying commits with the fused Triton kernel.

1. Base weights: AdamW on the embedded prose for ``--base-steps`` steps, on the device, in this process.
2. A bootstrap and N ``swarmtrain node`` processes (``--device cuda``) fine-tune every parameter on the
   embedded arithmetic with SPSA (one probe, one byte per node per step) for ``--steps`` steps.
3. Figures: steps/s (one replica's evaluation timestamps, step 0 to the last step), bytes per node per
   step on the RPC streams, the device's memory in use (nvidia-smi, polled while the swarm runs), the
   validation loss, and every replica's final weight hash (blake2b-256 of all fp32 weights).

    python bench/bench_scale_zo.py                                    # GPU: 1.3b, 8 replicas
    OMP_NUM_THREADS=1 python bench/bench_scale_zo.py --preset tiny --device cpu --replicas 3 \\
        --steps 10 --base-steps 5 --no-record                          # CPU smoke test
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import record  # noqa: E402
from node.zo_demo import run_local_swarm, summarize, write_spec  # noqa: E402
from protocol.runspec import load_spec  # noqa: E402
from trainer.data import batches, load_domain, split_domain  # noqa: E402
from trainer.model import LM, ModelConfig  # noqa: E402


def pretrain_base(path: Path, preset: str, steps: int, device: torch.device, lr: float) -> tuple[float, float]:
    """AdamW on the embedded prose (batches of 8 x 128); saves the weights; returns (first, last) loss."""
    cfg = ModelConfig.from_preset(preset)
    model = LM(cfg, seed=0).to(device)
    train = split_domain(load_domain("prose"), 0.05, seed=0).train
    stream = batches(train, 8, 128, seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        x, y = next(stream)
        _, loss = model(x.to(device), y.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    torch.save({name: t.detach().to("cpu") for name, t in model.state_dict().items()}, path)
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return losses[0], losses[-1]


def gpu_memory_used_mib() -> int | None:
    """Memory in use on the first GPU, as nvidia-smi reports it (None without nvidia-smi)."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=20, check=True)
        return int(done.stdout.split()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="1.3b")
    parser.add_argument("--device", default="cuda", help="cuda or cpu (a smoke test)")
    parser.add_argument("--replicas", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--base-steps", type=int, default=30)
    parser.add_argument("--base-lr", type=float, default=3e-4)
    parser.add_argument("--lr", type=float, default=1e-6, help="SPSA step size (MeZO's range for full fine-tuning)")
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--step-timeout", type=float, default=20.0, help="zo.step_timeout_s")
    parser.add_argument("--timeout", type=float, default=480.0, help="seconds for the swarm")
    parser.add_argument("--keep", type=Path, default=None, help="work here (base weights, logs, reports) and keep it")
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU is visible; use --device cpu for a smoke test")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none (CPU)"
    memory: list[int] = []

    def poll(_procs) -> None:
        used = gpu_memory_used_mib() if device.type == "cuda" else None
        if used is not None:
            memory.append(used)

    with tempfile.TemporaryDirectory(prefix="bench-scale-zo-") as tmp:
        workdir = Path(tmp) if args.keep is None else args.keep
        workdir.mkdir(parents=True, exist_ok=True)
        base = workdir / "base.pt"
        began = time.monotonic()
        first, last = pretrain_base(base, args.preset, args.base_steps, device, args.base_lr)
        print(f"base: {args.base_steps} AdamW steps, loss {first:.3f} -> {last:.3f} "
              f"({time.monotonic() - began:.0f} s)", flush=True)
        # every parameter trained; one hash at the end (each hashes all fp32 weights on the CPU), no snapshot
        spec = write_spec(workdir, base, args.replicas, args.steps, preset=args.preset, params=[], lr=args.lr,
                          eps=args.eps, hash_every=args.steps, snapshot_every=args.steps + 1,
                          step_timeout_s=args.step_timeout, heartbeat_interval_s=1.0, heartbeat_ttl_s=10.0)
        shape = load_spec(spec)
        began = time.monotonic()
        reports = run_local_swarm(workdir, spec, base, args.replicas, args.timeout, progress=poll,
                                  device=args.device)
        wall = time.monotonic() - began
    summary = summarize(reports, args.replicas)
    timed = next(r for r in reports if r["start_step"] == 0 and r["losses"] and r["losses"][0][0] == 0)
    (s0, t0, loss0), (s1, t1, loss1) = timed["losses"][0], timed["losses"][-1]
    steps_per_s = (s1 - s0) / (t1 - t0)
    hashes = sorted({r["weights_hash"] for r in reports})
    print(f"summary: {summary}", flush=True)
    lines = [
        f"GPU: {gpu}, torch {torch.__version__}; every replica holds the whole model in fp32 (working copy + "
        f"master copy of the trained weights) and applies commits with the fused kernel "
        f"({'Triton' if device.type == 'cuda' else 'CPU reference'})",
        f"{args.preset} preset, {summary['params']:,} parameters, all {summary['trained_params']:,} trained by SPSA "
        f"(lr {args.lr}, eps {args.eps}, 1 probe per node per step, batches of {shape.train.batch_size} x {shape.model.seq_len} tokens); base: "
        f"{args.base_steps} AdamW steps on prose (loss {first:.3f} -> {last:.3f}); fine-tuning on arithmetic",
        f"{args.replicas} replica node processes + 1 bootstrap on 127.0.0.1, all on the one device; {args.steps} steps; "
        f"swarm wall-clock {wall:.0f} s with start-up",
        f"**{steps_per_s:.2f} steps/s** ({s1 - s0} steps in {t1 - t0:.1f} s on one replica, its evaluations "
        f"every 10 steps included) = {steps_per_s * args.replicas:.1f} probes/s over the swarm; validation loss "
        f"{loss0:.4f} -> {loss1:.4f}",
        f"bytes per node per step on the RPC streams (envelopes, signatures, frame headers): "
        f"**{summary['wire_bytes_per_node_step']:,.0f} sent + received** ({summary['wire_sent_bytes_per_node_step']:,.0f} "
        f"sent); payload 1 byte per probe; an fp32 ring all-reduce of the same model would send "
        f"{summary['allreduce_bytes_per_node_step']:,} bytes per node per step",
        f"replicas' final weight hashes: {len(hashes)} distinct over {len(reports)} replicas "
        f"({', '.join(h[:16] for h in hashes)}); **bit-identical: {'yes' if summary['weights_identical'] else 'NO'}**; "
        f"resyncs {summary['resyncs']}",
    ]
    if memory:
        lines.append(f"device memory in use while the swarm ran (nvidia-smi, every 5 s): up to {max(memory):,} MiB "
                     f"= {max(memory) / 1024 / args.replicas:.1f} GiB per replica")
    if args.no_record:
        print("\n".join("- " + line for line in lines))
    else:
        record(f"Shared-randomness (zo) replicas on one GPU, {args.preset}", lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
