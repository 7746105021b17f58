"""Strict msgpack packing and bounded unpacking shared by every decoder."""
from __future__ import annotations

import math
from typing import Any

import msgpack

from protocol.errors import MalformedMessage

MAX_DEPTH = 32
_INT_MIN, _INT_MAX = -(1 << 63), (1 << 64) - 1


def _no_ext(code: int, data: bytes) -> Any:
    raise MalformedMessage(f"msgpack ext type {code} is not allowed")


def check_native(obj: Any, *, depth: int = 0, path: str = "body") -> None:
    """Raise MalformedMessage unless ``obj`` is made only of msgpack-native values that round-trip unchanged."""
    if depth > MAX_DEPTH:
        raise MalformedMessage(f"{path}: nested deeper than {MAX_DEPTH}")
    kind = type(obj)
    if obj is None or kind in (bool, str, bytes, float):
        return
    if kind is int:
        if not _INT_MIN <= obj <= _INT_MAX:
            raise MalformedMessage(f"{path}: integer {obj} does not fit in 64 bits")
        return
    if kind is list:
        for index, item in enumerate(obj):
            check_native(item, depth=depth + 1, path=f"{path}[{index}]")
        return
    if kind is dict:
        for key, value in obj.items():
            if type(key) not in (str, bytes):
                raise MalformedMessage(f"{path}: map keys must be str or bytes, got {type(key).__name__}")
            check_native(value, depth=depth + 1, path=f"{path}.{key!r}")
        return
    raise MalformedMessage(f"{path}: {kind.__name__} is not msgpack-native (use dict, list, str, bytes, int, float, bool, None)")


def pack(obj: Any) -> bytes:
    """Pack msgpack-native values; tuples, enums and other types raise MalformedMessage."""
    try:
        return msgpack.packb(obj, use_bin_type=True, strict_types=True)
    except (TypeError, ValueError, OverflowError) as error:
        raise MalformedMessage(f"cannot pack value: {error}") from None


def unpack(data: bytes | bytearray | memoryview, max_bytes: int) -> Any:
    """Unpack untrusted bytes with every length bounded by ``max_bytes``; any failure is MalformedMessage."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MalformedMessage(f"expected bytes, got {type(data).__name__}")
    bound = max(int(max_bytes), 1)
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            ext_hook=_no_ext,
            max_bin_len=bound,
            max_str_len=bound,
            max_array_len=bound,
            max_map_len=bound,
            max_ext_len=bound,
        )
    except MalformedMessage:
        raise
    except Exception as error:  # msgpack raises many types (ExtraData, FormatError, StackError, UnicodeDecodeError...)
        raise MalformedMessage(f"not valid msgpack: {type(error).__name__}: {error}") from None


def require_type(value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    """Exact type check (bool is not accepted as int)."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if type(value) not in kinds:
        names = " or ".join(k.__name__ for k in kinds)
        raise MalformedMessage(f"{what}: expected {names}, got {type(value).__name__}")
    return value


def require_str(value: Any, what: str, max_len: int, *, allow_empty: bool = True) -> str:
    require_type(value, str, what)
    if len(value) > max_len:
        raise MalformedMessage(f"{what}: longer than {max_len} characters")
    if not allow_empty and not value:
        raise MalformedMessage(f"{what}: must not be empty")
    return value


def require_int(value: Any, what: str, lo: int | None = None, hi: int | None = None) -> int:
    require_type(value, int, what)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise MalformedMessage(f"{what}: {value} outside [{lo}, {hi}]")
    return value


def require_float(value: Any, what: str, lo: float | None = None, hi: float | None = None) -> float:
    """Accept a finite float (an int is widened) within the optional bounds."""
    if type(value) is int:
        value = float(value)
    require_type(value, float, what)
    if not math.isfinite(value):
        raise MalformedMessage(f"{what}: must be finite, got {value}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise MalformedMessage(f"{what}: {value} outside [{lo}, {hi}]")
    return value


def require_bytes(value: Any, what: str, *, length: int | None = None, max_len: int | None = None) -> bytes:
    require_type(value, bytes, what)
    if length is not None and len(value) != length:
        raise MalformedMessage(f"{what}: expected {length} bytes, got {len(value)}")
    if max_len is not None and len(value) > max_len:
        raise MalformedMessage(f"{what}: longer than {max_len} bytes")
    return value
