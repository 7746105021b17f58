"""Fused shared-randomness update on a GPU: bandwidth against a device-to-device copy, and the naive MeZO path.

For K seeded contributions on N fp32 parameters the fused kernel reads and writes the buffer once
(8 bytes per parameter). Its "bandwidth" is 8 N / time, compared with torch's copy of the same
buffer (also 8 bytes per parameter) in the same run. The naive MeZO path materialises z with
``torch.normal`` from a seeded generator and calls ``add_`` once per contribution.
Needs CUDA and triton.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import record  # noqa: E402
from kernels.reference import apply_update_reference  # noqa: E402
from kernels.triton_update import apply_update_triton  # noqa: E402


def timed_ms(fn, repeats: int) -> float:
    """Median of ``repeats`` CUDA-event timings after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def bit_identical_to_reference() -> bool:
    """50 steps of K = 1, 4, 16 on the GPU and on the CPU reference, sizes and offsets off the tile grid."""
    for k, n, offset in [(1, 3001, 2**33 + 3), (4, 100_003, 16_381), (16, 70_000, 0), (16, 50_000, 2**40 + 32)]:
        g = torch.Generator().manual_seed(k)
        cpu = torch.randn(n, generator=g)
        gpu = cpu.cuda()
        for step in range(50):
            seeds = [(step * 1000 + j) * 0x9E3779B97F4A7C15 % 2**64 for j in range(k)]
            coeffs = (torch.randn(k, generator=g) * 1e-3).tolist()
            apply_update_reference(cpu, offset, seeds, coeffs, next_seed=step + 7, eps=2**-10)
            apply_update_triton(gpu, offset, seeds, coeffs, next_seed=step + 7, eps=2**-10)
        if not torch.equal(cpu.view(torch.int32), gpu.cpu().view(torch.int32)):
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--log2-params", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ks", default="1,4,16,64")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive MeZO path")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_zo_kernel.py needs a CUDA GPU")
    n = 1 << args.log2_params
    w = torch.randn(n, device="cuda")
    out = torch.empty_like(w)
    copy_ms = timed_ms(lambda: out.copy_(w), args.repeats)
    copy_gbs = 8 * n / copy_ms / 1e6
    del out
    lines = [f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}",
             f"{n:,} fp32 parameters; device-to-device copy: {copy_ms:.2f} ms ({copy_gbs:,.0f} GB/s read+write)",
             "Triton kernel bit-identical to the CPU reference after 50 steps of K = 1, 4, 16: "
             + ("yes" if bit_identical_to_reference() else "NO")]
    base_ms = None
    for k in (int(x) for x in args.ks.split(",")):
        seeds = [(0x9E3779B97F4A7C15 * (i + 1)) % (1 << 64) for i in range(k)]
        coeffs = [1e-3 * (i + 1) for i in range(k)]
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        ms = timed_ms(lambda: apply_update_triton(w, 0, seeds, coeffs), args.repeats)
        extra = torch.cuda.max_memory_allocated() - before
        base_ms = base_ms or ms
        gbs = 8 * n / ms / 1e6
        lines.append(f"fused kernel K={k}: {ms:.2f} ms, {gbs:,.0f} GB/s = {gbs / copy_gbs:.0%} of copy bandwidth, "
                     f"{ms / base_ms:.1f}x the time of K=1, extra GPU memory {extra / 2**20:.1f} MiB")

        def naive() -> None:
            for seed, c in zip(seeds, coeffs):
                generator = torch.Generator(device="cuda").manual_seed(seed % (1 << 63))
                w.add_(torch.normal(0.0, 1.0, size=(n,), device="cuda", generator=generator), alpha=c)

        if k <= 16 and not args.no_naive:
            torch.cuda.reset_peak_memory_stats()
            naive_ms = timed_ms(naive, max(1, args.repeats // 2))
            extra = torch.cuda.max_memory_allocated() - before
            lines.append(f"naive MeZO path K={k} (torch.normal + add_): {naive_ms:.2f} ms "
                         f"({naive_ms / ms:.1f}x the fused kernel), extra GPU memory {extra / 2**20:,.0f} MiB")
    record(f"Fused shared-randomness update, 2^{args.log2_params} parameters", lines)


if __name__ == "__main__":
    main()
