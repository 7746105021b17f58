"""Strict msgpack packing and bounded unpacking shared by every decoder."""
from __future__ import annotations

import math
from typing import Any

import msgpack

from protocol.errors import MalformedMessage

MAX_DEPTH = 32
# Every decoded array or map costs a Python object however small its bytes (1 byte for an empty
# list), so unpacking bounds their number and size too, not only the byte count.
MAX_CONTAINER_LEN = 16384  # entries in one array or map
MAX_CONTAINERS = 4096  # arrays and maps in one unpacked value, all together (protocol messages use < 200)
_INT_MIN, _INT_MAX = -(1 << 63), (1 << 64) - 1


def _no_ext(code: int, data: bytes) -> Any:
    raise MalformedMessage(f"msgpack ext type {code} is not allowed")


def check_native(obj: Any, *, depth: int = 0, path: str = "body") -> None:
    """Raise MalformedMessage unless ``obj`` is made only of msgpack-native values that round-trip
    unchanged, within the container bounds that ``unpack`` enforces on the receiver."""
    if _containers(obj, depth, path) > MAX_CONTAINERS:
        raise MalformedMessage(f"{path}: more than {MAX_CONTAINERS} arrays and maps")


def _containers(obj: Any, depth: int, path: str) -> int:
    """The number of arrays and maps in ``obj``, checking every value on the way."""
    if depth > MAX_DEPTH:
        raise MalformedMessage(f"{path}: nested deeper than {MAX_DEPTH}")
    kind = type(obj)
    if obj is None or kind in (bool, str, bytes, float):
        return 0
    if kind is int:
        if not _INT_MIN <= obj <= _INT_MAX:
            raise MalformedMessage(f"{path}: integer {obj} does not fit in 64 bits")
        return 0
    if kind in (list, dict) and len(obj) > MAX_CONTAINER_LEN:
        raise MalformedMessage(f"{path}: more than {MAX_CONTAINER_LEN} entries")
    if kind is list:
        return 1 + sum(_containers(item, depth + 1, f"{path}[{index}]") for index, item in enumerate(obj))
    if kind is dict:
        count = 1
        for key, value in obj.items():
            if type(key) not in (str, bytes):
                raise MalformedMessage(f"{path}: map keys must be str or bytes, got {type(key).__name__}")
            count += _containers(value, depth + 1, f"{path}.{key!r}")
        return count
    raise MalformedMessage(f"{path}: {kind.__name__} is not msgpack-native (use dict, list, str, bytes, int, float, bool, None)")


def pack(obj: Any) -> bytes:
    """Pack msgpack-native values; tuples, enums and other types raise MalformedMessage."""
    try:
        return msgpack.packb(obj, use_bin_type=True, strict_types=True)
    except (TypeError, ValueError, OverflowError) as error:
        raise MalformedMessage(f"cannot pack value: {error}") from None


def _container_budget(max_containers: int):
    """A list/object hook that refuses the value once more than ``max_containers`` arrays and maps were built."""
    left = max_containers

    def count(obj: Any) -> Any:
        nonlocal left
        left -= 1
        if left < 0:
            raise MalformedMessage(f"more than {max_containers} arrays and maps")
        return obj

    return count


def _unpacker_options(bound: int, max_len: int) -> dict:
    return dict(
        raw=False,
        use_list=True,
        strict_map_key=True,
        ext_hook=_no_ext,
        max_bin_len=bound,
        max_str_len=bound,
        max_array_len=min(bound, max_len),
        max_map_len=min(bound, max_len),
        max_ext_len=bound,
    )


def unpack(
    data: bytes | bytearray | memoryview,
    max_bytes: int,
    *,
    max_len: int = MAX_CONTAINER_LEN,
    max_containers: int = MAX_CONTAINERS,
) -> Any:
    """Unpack untrusted bytes; any failure is MalformedMessage.

    Bounds: every str/bin length by ``max_bytes``, every array/map by ``max_len`` entries, and the
    number of arrays and maps by ``max_containers``. msgpack itself refuses nesting past 1024.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MalformedMessage(f"expected bytes, got {type(data).__name__}")
    count = _container_budget(max_containers)
    try:
        return msgpack.unpackb(
            data, list_hook=count, object_hook=count, **_unpacker_options(max(int(max_bytes), 1), max_len)
        )
    except MalformedMessage:
        raise
    except Exception as error:  # msgpack raises many types (ExtraData, FormatError, StackError, UnicodeDecodeError...)
        raise MalformedMessage(f"not valid msgpack: {type(error).__name__}: {error}") from None


def unpack_head(data: bytes, length: int, max_head_bytes: int) -> tuple[list, memoryview]:
    """Split a msgpack array of exactly ``length`` items: the first ``length - 1`` unpacked, the last
    left packed (a view into ``data``).

    The leading items must be scalars within the first ``max_head_bytes`` bytes; anything else is
    MalformedMessage. Lets a caller check a signature over ``data`` before it pays for the last item.
    """
    if not isinstance(data, bytes):
        raise MalformedMessage(f"expected bytes, got {type(data).__name__}")
    unpacker = msgpack.Unpacker(max_buffer_size=max_head_bytes, **_unpacker_options(max_head_bytes, 0))
    try:
        unpacker.feed(data[:max_head_bytes])
        count = unpacker.read_array_header()
        if count != length:
            raise MalformedMessage(f"expected an array of {length} items, got {count}")
        head = [unpacker.unpack() for _ in range(length - 1)]
        offset = unpacker.tell()
    except msgpack.OutOfData:
        if len(data) < max_head_bytes:
            raise MalformedMessage("truncated msgpack array") from None
        raise MalformedMessage(f"the first {length - 1} items take more than {max_head_bytes} bytes") from None
    except MalformedMessage:
        raise
    except Exception as error:
        raise MalformedMessage(f"not valid msgpack: {type(error).__name__}: {error}") from None
    if any(type(item) in (list, dict) for item in head):
        raise MalformedMessage("array and map values are not allowed here")
    return head, memoryview(data)[offset:]


def require_type(value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    """Exact type check (bool is not accepted as int)."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if type(value) not in kinds:
        names = " or ".join(k.__name__ for k in kinds)
        raise MalformedMessage(f"{what}: expected {names}, got {type(value).__name__}")
    return value


def require_str(value: Any, what: str, max_len: int, *, allow_empty: bool = True, printable: bool = False) -> str:
    """A str of at most ``max_len`` characters; ``printable``: no control characters (newlines, ANSI escapes)."""
    require_type(value, str, what)
    if len(value) > max_len:
        raise MalformedMessage(f"{what}: longer than {max_len} characters")
    if not allow_empty and not value:
        raise MalformedMessage(f"{what}: must not be empty")
    if printable and not value.isprintable():
        raise MalformedMessage(f"{what}: must be printable (no newlines, control or escape characters): {value!r:.80}")
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
