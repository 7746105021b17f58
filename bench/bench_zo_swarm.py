"""Mode zo end to end on this machine, all in one run:

1. bytes on the wire per node per step (payload and total at the RPC transport, headers included)
   against a data-parallel fp32 gradient ring all-reduce of the same model (2 x 4 x parameters);
2. steps per second of the swarm against single-process SPSA doing the same probes per step;
3. validation loss against wall-clock for the swarm, single-process SPSA and backprop AdamW, all
   fine-tuning the same base weights on the same data.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import record  # noqa: E402
from node.zo_demo import pretrain_base, run_local_swarm, summarize, write_spec  # noqa: E402
from node.zo_node import build_replica, node_data  # noqa: E402
from protocol.runspec import load_spec, run_id  # noqa: E402
from trainer.zo.spsa import ZOSettings, evaluate, train_local  # noqa: E402


def loss_at(curve: list[tuple[float, float]], seconds: float) -> float:
    """The last loss measured at or before ``seconds`` on a (seconds, loss) curve."""
    return [loss for t, loss in curve if t <= seconds + 1e-9][-1]


def adamw_curve(spec, base: Path, seconds: float, lr: float) -> tuple[list[tuple[float, float]], int]:
    """Backprop AdamW from the same base weights on the same data, for ``seconds`` of wall-clock."""
    replica, _ = build_replica(spec, str(base))
    model = replica.model
    for p in model.parameters():
        p.requires_grad_(True)
    data, val = node_data(spec, b"adamw")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    curve = [(0.0, evaluate(model, val))]
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        x, y = next(data)
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
        if steps % 10 == 0:
            curve.append((time.perf_counter() - start, evaluate(model, val)))
    curve.append((time.perf_counter() - start, evaluate(model, val)))
    return curve, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--base-steps", type=int, default=60)
    parser.add_argument("--adamw-lr", type=float, default=1e-3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        base = workdir / "base.pt"
        pretrain_base(base, args.base_steps)
        spec_path = write_spec(workdir, base, args.nodes, args.steps)
        spec = load_spec(spec_path)
        reports = run_local_swarm(workdir, spec_path, base, args.nodes, timeout_s=1800)
        summary = summarize(reports, args.nodes)
        # the swarm's clock: from the first evaluation at step 0 to the last, on a node that started at 0
        first = next(r for r in reports if r["start_step"] == 0 and r["losses"][0][0] == 0)
        t0 = first["losses"][0][1]
        swarm_curve = [(t - t0, loss) for _, t, loss in first["losses"]]
        swarm_s = swarm_curve[-1][0]

        # single-process SPSA: the same probes per step (one per node), one process, one thread
        settings = ZOSettings.from_spec(spec)
        replica, _ = build_replica(spec, str(base))
        node_ids = [bytes([i + 1]) * 32 for i in range(args.nodes)]
        streams = [node_data(spec, n)[0] for n in node_ids]
        val = node_data(spec, node_ids[0])[1]
        local = train_local(replica, settings, run_id(spec), node_ids, streams, val, eval_every=10)
        local_curve = [(t, loss) for _, t, loss in local.losses]
        adamw, adamw_steps = adamw_curve(spec, base, swarm_s, args.adamw_lr)

    params, trained = summary["params"], summary["trained_params"]
    allreduce = summary["allreduce_bytes_per_node_step"]
    lines = [
        f"tiny preset, {params:,} parameters ({trained:,} trained by SPSA: {', '.join(spec.zo.params) or 'all'}); "
        f"base: {args.base_steps} AdamW steps on prose; fine-tuning on {', '.join(spec.data.domains)}; "
        f"{args.nodes} node processes + 1 bootstrap on 127.0.0.1, {args.steps} steps, 1 probe per node per step",
        f"payload: {summary['payload_bytes_per_sample']} byte per probe, {args.nodes} bytes per step in all",
        f"wire (RPC streams, envelopes, signatures, frame headers; sent + received): "
        f"{summary['wire_bytes_per_node_step']:,.0f} bytes per node per step "
        f"({summary['wire_sent_bytes_per_node_step']:,.0f} sent); DHT heartbeats and announcements not counted",
        f"fp32 ring all-reduce of the same model: 2 x 4 x {params:,} = {allreduce:,} bytes sent per node per step "
        f"-> {allreduce / summary['wire_sent_bytes_per_node_step']:,.0f}x more than the swarm sends; an all-reduce "
        f"of only the {trained:,} trained parameters: {8 * trained:,} bytes "
        f"({8 * trained / summary['wire_sent_bytes_per_node_step']:,.0f}x). The swarm's bytes per step do not grow "
        "with the model; they grow with the number of probes (about 200 bytes each in a commit)",
        f"replicas bit-identical at the end: {'yes' if summary['weights_identical'] else 'NO'}",
        f"swarm: {args.steps} steps in {swarm_s:.1f} s = {args.steps / swarm_s:.2f} steps/s "
        f"(validation loss {swarm_curve[0][1]:.3f} -> {swarm_curve[-1][1]:.3f})",
        f"single-process SPSA, same {args.nodes} probes per step: {local.steps_per_s:.2f} steps/s "
        f"(loss {local_curve[0][1]:.3f} -> {local_curve[-1][1]:.3f} in {local_curve[-1][0]:.1f} s); "
        f"the swarm runs at {args.steps / swarm_s / local.steps_per_s:.2f}x its speed on this {__import__('os').cpu_count()}-core "
        "machine (the swarm's processes probe in parallel; its overhead is the commit round trip)",
        f"loss at the swarm's wall-clock {swarm_s:.1f} s: swarm {swarm_curve[-1][1]:.3f}, single-process SPSA "
        f"{loss_at(local_curve, swarm_s):.3f}, backprop AdamW (lr {args.adamw_lr}, all parameters, one process) "
        f"{loss_at(adamw, swarm_s):.3f} after {adamw_steps} steps",
    ]
    record("Shared-randomness (zo) swarm: wire bytes, speed, loss against wall-clock", lines)


if __name__ == "__main__":
    main()
