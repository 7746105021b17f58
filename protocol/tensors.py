"""Tensor codec: raw little-endian bytes + dtype name + shape. Never pickle."""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from protocol.errors import MalformedMessage, MessageTooLarge, TensorShapeMismatch

if sys.byteorder != "little":  # the wire format is little-endian; no supported platform is big-endian
    raise ImportError("swarmtrain's tensor codec requires a little-endian machine")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
# numpy has no bfloat16: its bytes travel through numpy as int16 of the same size.
_VIEW_AS: dict[torch.dtype, torch.dtype] = {torch.bfloat16: torch.int16}


@dataclass(frozen=True)
class TensorLimits:
    max_bytes: int = 1 << 30
    max_dims: int = 8
    max_elements: int = 1 << 31


def _dtype_name(t: torch.Tensor) -> str:
    try:
        return DTYPE_NAMES[t.dtype]
    except KeyError:
        raise MalformedMessage(f"dtype {t.dtype} cannot be sent; supported: {sorted(DTYPES)}") from None


def tensor_header(t: torch.Tensor) -> dict:
    return {"dtype": _dtype_name(t), "shape": list(t.shape), "nbytes": t.numel() * t.element_size()}


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes; zero-copy for a contiguous CPU tensor, otherwise of a contiguous CPU copy."""
    _dtype_name(t)
    t = t.detach()
    if t.device.type != "cpu" or not t.is_contiguous() or t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg().to("cpu").contiguous()
    t = t.view(_VIEW_AS.get(t.dtype, t.dtype))
    return memoryview(t.numpy().reshape(-1).view(np.uint8))


def encode_tensor(t: torch.Tensor) -> dict:
    header = tensor_header(t)
    return {"dtype": header["dtype"], "shape": header["shape"], "data": bytes(tensor_bytes(t))}


def _check_header(header: Any, limits: TensorLimits) -> tuple[torch.dtype, list[int], int]:
    if type(header) is not dict:
        raise MalformedMessage(f"tensor header must be a map, got {type(header).__name__}")
    name, shape = header.get("dtype"), header.get("shape")
    if type(name) is not str or name not in DTYPES:
        raise MalformedMessage(f"unknown tensor dtype {name!r}; supported: {sorted(DTYPES)}")
    if type(shape) is not list or any(type(d) is not int or d < 0 for d in shape):
        raise MalformedMessage("tensor shape must be a list of non-negative integers")
    if len(shape) > limits.max_dims:
        raise MessageTooLarge(f"tensor has {len(shape)} dimensions, limit {limits.max_dims}")
    if any(d > limits.max_elements for d in shape):  # also guards empty tensors with absurd dims
        raise MessageTooLarge(f"tensor dimension {max(shape)} exceeds {limits.max_elements}")
    # An empty tensor's strides are still products of its other dims: bound them so torch cannot overflow.
    if math.prod(max(d, 1) for d in shape) > limits.max_elements:
        raise MessageTooLarge(f"tensor shape {shape} spans more than {limits.max_elements} elements")
    dtype = DTYPES[name]
    numel = math.prod(shape)
    if numel > limits.max_elements:
        raise MessageTooLarge(f"tensor has {numel} elements, limit {limits.max_elements}")
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if nbytes > limits.max_bytes:
        raise MessageTooLarge(f"tensor is {nbytes} bytes, limit {limits.max_bytes}")
    declared = header.get("nbytes", nbytes)
    if type(declared) is not int or declared != nbytes:
        raise TensorShapeMismatch(f"header nbytes {declared!r} != {nbytes} implied by {name}{shape}")
    return dtype, shape, nbytes


def decode_tensor_parts(header: dict, data: bytes | bytearray | memoryview, limits: TensorLimits = TensorLimits()) -> torch.Tensor:
    """Build a tensor that owns writable memory from a header and its raw bytes."""
    dtype, shape, nbytes = _check_header(header, limits)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MalformedMessage(f"tensor data must be bytes, got {type(data).__name__}")
    source = np.frombuffer(data, dtype=np.uint8) if len(data) else np.empty(0, dtype=np.uint8)
    if source.size != nbytes:
        raise TensorShapeMismatch(f"tensor data is {source.size} bytes, {header['dtype']}{shape} needs {nbytes}")
    if dtype is torch.bool and source.size and source.max() > 1:
        raise MalformedMessage("bool tensor bytes must be 0 or 1")
    raw = torch.empty(nbytes, dtype=torch.uint8)
    raw.numpy()[:] = source
    return raw.view(dtype).reshape(shape)


def decode_tensor(obj: dict, limits: TensorLimits = TensorLimits()) -> torch.Tensor:
    if type(obj) is not dict:
        raise MalformedMessage(f"encoded tensor must be a map, got {type(obj).__name__}")
    data = obj.get("data")
    if type(data) is not bytes:
        raise MalformedMessage("encoded tensor needs a 'data' field of bytes")
    return decode_tensor_parts(obj, data, limits)
