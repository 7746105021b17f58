"""Fused update: reference vs Triton bit for bit, perturb/restore, the bit-to-sign mapping, Rademacher stats."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from kernels import apply_update, backend_for, flat_layout, rademacher
from kernels.philox import philox4x32_scalar
from kernels.rademacher import GROUP
from kernels.reference import apply_update_reference

REPO = Path(__file__).resolve().parents[1]
N = 3001  # not a multiple of the kernel's tile (one group of 16384 elements)

# Runs in a subprocess so TRITON_INTERPRET=1 is set before triton is first imported.
_INTERPRETED_CHECK = textwrap.dedent(
    """
    import sys, torch
    from kernels.reference import apply_update_reference
    from kernels.triton_update import apply_update_triton

    K, offset, steps, n = (int(a) for a in sys.argv[1:5])
    g = torch.Generator().manual_seed(K)
    a = torch.randn(n, generator=g)
    b = a.clone()
    for step in range(steps):
        seeds = [(step * 1000 + k) * 0x9E3779B97F4A7C15 % 2**64 for k in range(K)]
        coeffs = (torch.randn(K, generator=g) * 1e-3).tolist()
        apply_update_reference(a, offset, seeds, coeffs, next_seed=step + 7, eps=2**-10)
        apply_update_triton(b, offset, seeds, coeffs, next_seed=step + 7, eps=2**-10)
    diff = int((a.view(torch.int32) != b.view(torch.int32)).sum())
    print("DIFF", diff)
    """
)


def _run_interpreted(k: int, offset: int, steps: int, n: int) -> str:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-c", _INTERPRETED_CHECK, str(k), str(offset), str(steps), str(n)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("k", [1, 4, 16])
def test_interpreted_triton_matches_reference_bit_for_bit(k):
    assert "DIFF 0" in _run_interpreted(k, 2**33 + 3, 50, N)


def test_interpreted_triton_whole_and_partial_groups():
    # Starts 3 elements before a group boundary and ends 5 after the next-but-one: two masked
    # edge groups around two unmasked ones.
    assert "DIFF 0" in _run_interpreted(3, 7 * GROUP - 3, 4, 2 * GROUP + 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_triton_on_gpu_matches_reference_bit_for_bit():
    pytest.importorskip("triton")
    for k, n, offset in [(1, N, 2**33 + 3), (4, 100_003, 16_381), (16, 70_000, 0)]:
        g = torch.Generator().manual_seed(k)
        cpu = torch.randn(n, generator=g)
        gpu = cpu.cuda()
        for step in range(50):
            seeds = [(step * 1000 + j) * 0x9E3779B97F4A7C15 % 2**64 for j in range(k)]
            coeffs = (torch.randn(k, generator=g) * 1e-3).tolist()
            apply_update_reference(cpu, offset, seeds, coeffs, next_seed=step + 7, eps=2**-10)
            apply_update(gpu, offset, seeds, coeffs, next_seed=step + 7, eps=2**-10)
        assert torch.equal(cpu.view(torch.int32), gpu.cpu().view(torch.int32)), (k, n, offset)


def _z_by_the_documented_rule(seed: int, i: int) -> float:
    """docs/kernels.md, spelled out with the plain-Python Philox."""
    g, r, t, e = i >> 14, (i >> 9) & 31, (i >> 2) & 127, i & 3
    q = 128 * g + t
    word = philox4x32_scalar((q & 0xFFFFFFFF, q >> 32, 0, 0), (seed & 0xFFFFFFFF, seed >> 32))[r >> 3]
    return 1.0 if (word >> (4 * (r & 7) + e)) & 1 else -1.0


@pytest.mark.parametrize("offset", [0, 16_380, 2**40 + 2**33 + 7])
def test_rademacher_follows_the_documented_mapping(offset):
    seed = 0xA4093822299F31D0
    z = rademacher(seed, offset, 2 * GROUP)
    for j in [0, 1, 3, 4, 511, 512, 4095, 4096, 12_288, 16_383, 16_384, 20_000, 32_767]:
        assert float(z[j]) == _z_by_the_documented_rule(seed, offset + j), j


def test_reference_matches_materialised_z():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(N, generator=g)
    seeds, coeffs = [11, 2**64 - 1, 5], [0.25, -1e-3, 3e-7]
    expected = w.clone()
    for s, c in zip(seeds, coeffs):
        expected = expected + torch.tensor(c, dtype=torch.float32) * rademacher(s, 17, N)
    expected = expected + 2**-8 * rademacher(99, 17, N)
    got = apply_update_reference(w.clone(), 17, seeds, coeffs, next_seed=99, eps=2**-8, chunk=1000)
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))


def test_chunking_and_offset_split_do_not_change_bits():
    w = torch.randn(N, generator=torch.Generator().manual_seed(2))
    whole = apply_update_reference(w.clone(), 5, [3, 4], [0.1, 0.2], chunk=N)
    parts = w.clone()
    apply_update_reference(parts[:1234], 5, [3, 4], [0.1, 0.2], chunk=100)
    apply_update_reference(parts[1234:], 5 + 1234, [3, 4], [0.1, 0.2], chunk=7)
    assert torch.equal(whole.view(torch.int32), parts.view(torch.int32))


def test_perturb_then_restore_is_exact_in_safe_range():
    # |w| in [1, 1.5), eps = 2^-10: w + eps stays in [1, 2) and w - eps only moves to a
    # finer binade, so both adds are exact and restoring gives back the same bits.
    g = torch.Generator().manual_seed(3)
    w0 = (1 + 0.5 * torch.rand(N, generator=g)) * torch.where(torch.rand(N, generator=g) < 0.5, -1.0, 1.0)
    w = apply_update_reference(w0.clone(), 0, [], [], next_seed=42, eps=2**-10)
    assert not torch.equal(w, w0)
    apply_update_reference(w, 0, [42], [-(2**-10)])
    assert torch.equal(w.view(torch.int32), w0.view(torch.int32))


def test_restore_exact_wherever_perturbed_value_is_representable():
    # Restore is exact whenever w + eps*z is an fp32 value (docs/kernels.md).
    g = torch.Generator().manual_seed(4)
    w0 = torch.randn(N, generator=g) * torch.exp2(torch.randint(-12, 4, (N,), generator=g).float())
    eps = 2**-10
    z = rademacher(8, 0, N).double()
    exact_sum = w0.double() + eps * z
    representable = exact_sum.float().double() == exact_sum
    w = apply_update_reference(w0.clone(), 0, [8], [eps])
    apply_update_reference(w, 0, [8], [-eps])
    restored = w.view(torch.int32) == w0.view(torch.int32)
    assert bool(restored[representable].all())
    assert not bool(representable.all())  # the rule is not vacuous: small |w| do round


def test_rademacher_balance_and_seed_dependence():
    n = 8 * GROUP + 1000
    z = rademacher(123, 0, n)
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(z.mean())) < 4 / np.sqrt(n)  # 4 sigma
    # Every one of the 128 bits of a Philox output (bit b of word j signs row 8 j + b // 4,
    # column b % 4 of each quad) is balanced too.
    per_bit = z[: n - n % GROUP].reshape(-1, 4, 8, 128, 4).permute(1, 2, 4, 0, 3).reshape(128, -1)
    assert float(per_bit.mean(dim=1).abs().max()) < 4.5 / np.sqrt(per_bit.shape[1])
    other = rademacher(124, 0, n)
    agree = float((z == other).float().mean())
    assert abs(agree - 0.5) < 4 * 0.5 / np.sqrt(n)
    high_half = rademacher(123 + 2**32, 0, n)  # the key's high word matters too
    assert not torch.equal(z, high_half)


def test_rademacher_window_is_a_slice_of_the_global_stream():
    full = rademacher(7, 0, 1000)
    assert torch.equal(rademacher(7, 333, 500), full[333:833])


def test_flat_layout_sorted_by_name():
    params = [("b.weight", torch.zeros(3, 2)), ("a.bias", torch.zeros(4)), ("c", torch.zeros(1))]
    layout = flat_layout(params)
    assert [(p.name, p.offset, p.numel) for p in layout] == [("a.bias", 0, 4), ("b.weight", 4, 6), ("c", 10, 1)]
    assert flat_layout(reversed(params)) == layout


def test_dispatcher_uses_reference_on_cpu():
    w = torch.zeros(10)
    assert backend_for(w) == "reference"
    apply_update(w, 0, [1], [0.5])
    assert set(w.abs().tolist()) == {0.5}


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        apply_update(torch.zeros(4, dtype=torch.float64), 0, [1], [1.0])
    with pytest.raises(ValueError):
        apply_update(torch.zeros(4), 0, [1, 2], [1.0])
    with pytest.raises(ValueError):
        apply_update(torch.zeros(4), 0, [2**64], [1.0])
