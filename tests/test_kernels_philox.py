"""Philox4x32-10 against the Random123 known answers, and the vectorised path against the scalar one."""

import numpy as np
import pytest

from kernels.philox import philox4x32, philox4x32_scalar

KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_known_answers(ctr, key, expected):
    assert tuple(int(x) for x in philox4x32(*ctr, *key)) == expected
    assert philox4x32_scalar(ctr, key) == expected


def test_vectorised_matches_scalar():
    rng = np.random.default_rng(0)
    ctrs = rng.integers(0, 2**32, size=(200, 4), dtype=np.uint64)
    key = (0x12345678, 0xFEDCBA98)
    out = np.stack(philox4x32(ctrs[:, 0], ctrs[:, 1], ctrs[:, 2], ctrs[:, 3], *key), axis=1)
    assert out.dtype == np.uint32
    for row, got in zip(ctrs, out):
        assert tuple(int(v) for v in got) == philox4x32_scalar(tuple(int(v) for v in row), key)
