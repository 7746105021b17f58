"""Tensor codec: bit-exact round trips, strict limits, no pickle."""
from __future__ import annotations

import pickle
import warnings

import pytest
import torch

from protocol.errors import MalformedMessage, MessageTooLarge, TensorShapeMismatch
from protocol.tensors import (
    DTYPES,
    TensorLimits,
    decode_tensor,
    decode_tensor_parts,
    encode_tensor,
    tensor_bytes,
    tensor_header,
)


def sample(dtype: torch.dtype, shape=(7, 13), seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        t = torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)
        t.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -0.0]).to(dtype)  # special values survive too
        return t
    if dtype is torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -(2**31)), min(info.max, 2**31 - 1), shape, generator=gen, dtype=torch.int64).to(dtype)


def bits(t: torch.Tensor) -> bytes:
    return bytes(tensor_bytes(t))


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_round_trip_bit_exact(name):
    t = sample(DTYPES[name])
    out = decode_tensor(encode_tensor(t))
    assert out.dtype == t.dtype and out.shape == t.shape
    assert bits(out) == bits(t)


def test_large_fp32_round_trip():
    t = torch.randn(4, 1 << 22, generator=torch.Generator().manual_seed(1))  # 64 MiB
    out = decode_tensor_parts(tensor_header(t), tensor_bytes(t))
    assert torch.equal(out.view(torch.int32), t.view(torch.int32))


def test_scalar_empty_and_non_contiguous():
    for t in (torch.tensor(2.5), torch.zeros(0, 3), torch.arange(12.0).reshape(3, 4).t()):
        assert torch.equal(decode_tensor(encode_tensor(t)), t)


def test_tensor_bytes_is_zero_copy_for_contiguous_cpu():
    t = torch.zeros(4, dtype=torch.float32)
    view = tensor_bytes(t)
    t[0] = 1.0
    assert bytes(view[:4]) == b"\x00\x00\x80\x3f"


def test_header_and_encoding_are_plain_data():
    t = sample(torch.bfloat16, (2, 3))
    assert tensor_header(t) == {"dtype": "bfloat16", "shape": [2, 3], "nbytes": 12}
    encoded = encode_tensor(t)
    assert set(encoded) == {"dtype", "shape", "data"} and type(encoded["data"]) is bytes and len(encoded["data"]) == 12


def test_decoded_tensor_owns_writable_memory():
    data = bytes(16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = decode_tensor_parts({"dtype": "float32", "shape": [4]}, data)
    out += 1
    assert data == bytes(16) and out.tolist() == [1.0] * 4


def test_never_unpickles(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    t = sample(torch.float16)
    assert bits(decode_tensor(encode_tensor(t))) == bits(t)
    with pytest.raises(MalformedMessage):
        decode_tensor({"dtype": "float32", "shape": [1], "data": pickle.dumps(1.0)[:3]})


@pytest.mark.parametrize(
    "header,data",
    [
        ({"dtype": "float32", "shape": [3]}, bytes(8)),
        ({"dtype": "float32", "shape": [2]}, bytes(12)),
        ({"dtype": "bfloat16", "shape": [2, 2]}, bytes(4)),
        ({"dtype": "float32", "shape": [2], "nbytes": 12}, bytes(8)),
    ],
)
def test_length_mismatch(header, data):
    with pytest.raises(TensorShapeMismatch):
        decode_tensor_parts(header, data)


@pytest.mark.parametrize(
    "header,limits",
    [
        ({"dtype": "float32", "shape": [1 << 20]}, TensorLimits(max_bytes=1 << 20)),
        ({"dtype": "uint8", "shape": [1] * 9}, TensorLimits()),
        ({"dtype": "uint8", "shape": [1 << 16, 1 << 16]}, TensorLimits()),
        ({"dtype": "int64", "shape": [1 << 40, 1 << 40, 1 << 40]}, TensorLimits()),
        ({"dtype": "int8", "shape": [0, (1 << 64) - 1]}, TensorLimits()),  # empty, but torch cannot hold the dim
    ],
)
def test_oversize_is_refused_before_reading_data(header, limits):
    with pytest.raises(MessageTooLarge):
        decode_tensor_parts(header, b"", limits)


@pytest.mark.parametrize(
    "obj",
    [
        {"dtype": "complex64", "shape": [1], "data": bytes(8)},
        {"dtype": 5, "shape": [1], "data": bytes(4)},
        {"dtype": "float32", "shape": [-1], "data": b""},
        {"dtype": "float32", "shape": [1.0], "data": bytes(4)},
        {"dtype": "float32", "shape": [True], "data": bytes(4)},
        {"dtype": "float32", "shape": "4", "data": bytes(16)},
        {"dtype": "float32", "shape": [1]},
        {"dtype": "bool", "shape": [2], "data": b"\x01\x02"},
        [1, 2],
    ],
)
def test_malformed(obj):
    with pytest.raises(MalformedMessage):
        decode_tensor(obj)


def test_empty_tensor_with_dims_whose_strides_overflow_is_refused():
    # found by hypothesis: torch raised "Stride calculation overflowed" on this header
    from protocol.errors import MessageTooLarge
    from protocol.tensors import decode_tensor_parts

    header = {"dtype": "bfloat16", "shape": [0, 2_147_483_648, 60989, 70422], "nbytes": 0}
    with pytest.raises(MessageTooLarge):
        decode_tensor_parts(header, b"")
