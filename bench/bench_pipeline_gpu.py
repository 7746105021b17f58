"""Tokens/s of a pipeline of node processes on one GPU, against single-GPU training of the same model.

1. Baseline: the whole model in this process on the device, fp32, AdamW, microbatches of the same
   size and sequence length, one optimizer step per ``--microbatches`` microbatches (what one
   pipeline iteration does); tokens/s over ``--baseline-steps`` steps after ``--warmup-steps``.
2. Pipeline: a bootstrap peer and node processes on 127.0.0.1, every one on the same device (data
   nodes hold stage 0; the others stages 1..S-1), each microbatch visiting every stage. Tokens/s
   in steady state comes from the data nodes' per-iteration timestamps (the first iteration,
   with its start-up, is left out); the whole-run figure from their reports is printed too.
   Once per activation dtype in ``--dtypes``.

Run on a GPU machine: ``python bench/bench_pipeline_gpu.py``. A CPU smoke test:
``OMP_NUM_THREADS=1 python bench/bench_pipeline_gpu.py --preset tiny --device cpu --iterations 3``.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import record  # noqa: E402
from node.pipeline_demo import run_pipeline_swarm, summarize_pipeline, write_pipeline_spec  # noqa: E402
from node.zo_demo import DemoError  # noqa: E402
from trainer.data import EMBEDDED_DOMAINS, batches, load_domain, split_domain  # noqa: E402
from trainer.model import LM, ModelConfig, stage_block_ranges  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def baseline(args: argparse.Namespace, device: torch.device) -> dict:
    """Single-process training of the whole model: tokens/s after warm-up, and the losses."""
    cfg = ModelConfig.from_preset(args.preset)
    train = torch.cat([split_domain(load_domain(d), 0.05, seed=0).train for d in EMBEDDED_DOMAINS])
    stream = batches(train, args.microbatch_size, args.seq_len, seed=1)
    model = LM(cfg, seed=0).to(device)
    # as in the pipeline's stages: plain AdamW, no decay, no clipping, fp32
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> float:
        total = 0.0
        for _ in range(args.microbatches):
            x, y = next(stream)
            _, loss = model(x.to(device), y.to(device))
            (loss / args.microbatches).backward()
            total += loss.detach()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(total) / args.microbatches

    first = [step() for _ in range(args.warmup_steps)]
    synchronize(device)
    began = time.perf_counter()
    losses = [step() for _ in range(args.baseline_steps)]
    synchronize(device)
    seconds = time.perf_counter() - began
    tokens = args.baseline_steps * args.microbatches * args.microbatch_size * args.seq_len
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"params": cfg.param_count(), "tokens_per_s": tokens / seconds, "step_s": seconds / args.baseline_steps,
            "loss_start": (first or losses)[0], "loss_end": losses[-1], "peak_bytes": peak}


def steady_tokens_per_s(reports: list[dict], tokens_per_iteration: int) -> tuple[float | None, float | None]:
    """Sum over data nodes of tokens/s between their first and last iteration timestamps, and the
    mean time of an iteration there (the first iteration, with its start-up, left out)."""
    rates, times = [], []
    for r in reports:
        if r["stage"] != 0 or len(r["losses"]) < 2:
            continue
        span = r["losses"][-1][1] - r["losses"][0][1]
        n = len(r["losses"]) - 1
        rates.append(n * tokens_per_iteration / span)
        times.append(span / n)
    if not rates:
        return None, None
    return sum(rates), sum(times) / len(times)


def pipeline(args: argparse.Namespace, dtype: str, workdir: Path) -> dict:
    # node i takes stage i % stages: one node per stage, then a second data node when asked for
    nodes = args.data_nodes + args.stages - 1
    spec = write_pipeline_spec(
        workdir, args.stages, args.iterations, nodes, preset=args.preset, path_length=args.stages, swap="none",
        microbatches=args.microbatches, microbatch_size=args.microbatch_size, seq_len=args.seq_len,
        memory=args.memory, lr=args.lr, planner=args.planner, activation_dtype=dtype, name="bench-pipeline-gpu")
    began = time.monotonic()
    try:
        reports, _ = run_pipeline_swarm(workdir, spec, nodes, args.stages, args.timeout, device=args.device)
    except DemoError as error:
        for log in sorted(workdir.glob("*.log")):
            print(f"---- {log.name} (tail) ----\n{log.read_text(errors='replace')[-4000:]}", flush=True)
        raise SystemExit(f"pipeline with activation dtype {dtype} failed: {error}") from None
    wall = time.monotonic() - began
    summary = summarize_pipeline(reports, args.stages)
    tokens_per_iteration = args.microbatches * args.microbatch_size * args.seq_len
    steady, iteration_s = steady_tokens_per_s(reports, tokens_per_iteration)
    stage_nodes = [r for r in reports if r["stage"] != 0]
    summary.update(steady_tokens_per_s=steady, steady_iteration_s=iteration_s, wall_s=wall,
                   skipped=sum(r["skipped"] for r in reports),
                   data_compute_s=sum(r["compute_s"] for r in reports if r["stage"] == 0),
                   stage_compute_s=[round(r["compute_s"], 2) for r in stage_nodes],
                   bytes_sent=sum(r["bytes_sent"] for r in reports))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="124m")
    parser.add_argument("--device", default="cuda", help="cuda or cpu (a smoke test)")
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--data-nodes", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--microbatch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--memory", type=int, default=8, help="microbatches in flight per node")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--planner", default="local", choices=("local", "leader"))
    parser.add_argument("--dtypes", default="float32,bfloat16", help="activation dtypes between stages")
    parser.add_argument("--baseline-steps", type=int, default=20)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=480.0, help="seconds for each swarm run")
    parser.add_argument("--keep", type=Path, default=None, help="keep the swarms' logs and reports here")
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = parser.parse_args()
    if args.data_nodes not in (1, 2):
        sys.exit("--data-nodes must be 1 or 2 (node i of the swarm takes stage i % stages)")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU is visible; use --device cpu for a smoke test")
    if device.type == "cpu":
        torch.set_num_threads(1)  # as each node process does
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none (CPU)"
    cfg = ModelConfig.from_preset(args.preset)
    ranges = stage_block_ranges(cfg.n_layers, args.stages)

    base = baseline(args, device)
    print(f"baseline: {base['tokens_per_s']:,.0f} tokens/s, {1000 * base['step_s']:.1f} ms per step, "
          f"loss {base['loss_start']:.3f} -> {base['loss_end']:.3f}", flush=True)
    runs = {}
    for dtype in args.dtypes.split(","):
        if args.keep is not None:
            workdir = args.keep / dtype
            shutil.rmtree(workdir, ignore_errors=True)
            workdir.mkdir(parents=True)
            runs[dtype] = pipeline(args, dtype, workdir)
        else:
            with tempfile.TemporaryDirectory(prefix="bench-pipeline-gpu-") as tmp:
                runs[dtype] = pipeline(args, dtype, Path(tmp))
        print(f"pipeline {dtype}: {runs[dtype]}", flush=True)

    tokens_per_iteration = args.microbatches * args.microbatch_size * args.seq_len
    lines = [
        f"GPU: {gpu}, torch {torch.__version__}; fp32 compute everywhere (torch's default matmul precision)",
        f"{args.preset} preset, {base['params']:,} parameters; microbatches of {args.microbatch_size} x "
        f"{args.seq_len} tokens, {args.microbatches} per optimizer step of the baseline and per data node per pipeline "
        f"iteration ({tokens_per_iteration:,} tokens), AdamW lr {args.lr}",
        f"single-process baseline on the same device (whole model, gradients accumulated over the "
        f"{args.microbatches} microbatches): **{base['tokens_per_s']:,.0f} tokens/s** "
        f"({1000 * base['step_s']:.1f} ms per step, {args.baseline_steps} steps after {args.warmup_steps} of warm-up; "
        f"loss {base['loss_start']:.3f} -> {base['loss_end']:.3f}"
        + (f"; peak GPU memory {base['peak_bytes'] / 2**30:.1f} GiB)" if base["peak_bytes"] else ")"),
        f"pipeline: {args.data_nodes} data node(s) + {args.stages - 1} stage nodes + 1 bootstrap on 127.0.0.1, all on "
        f"device {args.device}; {args.stages} stages of {[len(r) for r in ranges]} blocks (stage 0 also embedding, "
        f"head and loss); path_length {args.stages} (every microbatch visits every stage), swap none, planner "
        f"{args.planner}, memory {args.memory}; {args.iterations} iterations; activations go device -> host -> "
        "RPC over p2pd -> host -> device at every hop, stage to stage along the path",
    ]
    for dtype, s in runs.items():
        steady = s["steady_tokens_per_s"]
        lines.append(
            f"pipeline, activations {dtype}: steady state (iterations 2..{s['iterations']}) "
            + (f"**{steady:,.0f} tokens/s = {steady / base['tokens_per_s']:.1%} of the baseline**, "
               f"{s['steady_iteration_s']:.2f} s per iteration; " if steady else "n/a; ")
            + f"whole run from the reports {s['tokens_per_s']:,.0f} tokens/s "
            f"({s['tokens_per_s'] / base['tokens_per_s']:.1%}); loss {s['loss_start']:.3f} -> {s['loss_end']:.3f}; "
            f"skipped hops {s['skipped']}, rerouted {s['rerouted']}; compute time of the stages' modules: data node "
            f"{s['data_compute_s']:.1f} s, stage nodes {s['stage_compute_s']} s; {s['bytes_sent'] / 2**20:,.0f} MiB sent "
            f"over RPC in all; swarm wall-clock {s['wall_s']:.0f} s with start-up")
    if args.no_record:
        print("\n".join("- " + line for line in lines))
    else:
        record(f"Pipeline of node processes on one GPU vs. single-GPU training, {args.preset}", lines)


if __name__ == "__main__":
    main()
