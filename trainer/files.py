"""Files that are whole or absent: written under a temporary name in the same folder, fsynced, renamed
over the target, and the folder fsynced.

A crash (kill -9, power loss) or a full disk at any moment leaves the old file or the new one,
never a mix. A write that fails removes its temporary file and raises ``OSError`` naming the
target; only a process killed in the middle of a write leaves its temporary file behind, named
``.<name>.<pid>.tmp`` so that readers (which never open such names) and checks can tell it apart.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

_TEMPORARY = re.compile(r"\..+\.(\d+)\.tmp")


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def temporary_owner(name: str) -> int | None:
    """The pid that wrote a temporary file of this name (from ``temporary_name``), else None."""
    match = _TEMPORARY.fullmatch(name)
    return int(match[1]) if match else None


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the rename itself is still atomic
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on leaving, fsync it and rename it to ``path``. If the body
    or the fsync fails the temporary file is removed and the error raised; ``path`` is untouched."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(error, OSError) and error.filename in (None, str(tmp)):  # name what the caller wrote
            raise OSError(error.errno, error.strerror, str(path)) from None
        raise
    fsync_dir(path.parent)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | Path, body: object) -> None:
    write_bytes(path, json.dumps(body).encode())


def save_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors' ``save_file``, atomically; its I/O errors become ``OSError`` naming ``path``."""
    with atomic_path(path) as tmp:
        try:
            save_file({n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}, str(tmp), metadata=metadata)
        except SafetensorError as error:  # it reports a full disk as text: "... (os error 28)"
            raise _as_os_error(error, path) from None


def torch_save(path: str | Path, obj: object) -> None:
    """``torch.save`` of tensors (read back with ``weights_only=True``), atomically."""
    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as error:  # a full disk shows as "[enforce fail ...] unexpected pos"
            raise _as_os_error(error, path) from None


def _as_os_error(error: Exception, path: str | Path) -> OSError:
    text = str(error)
    try:
        full = f"os error {errno.ENOSPC}" in text or os.statvfs(Path(path).parent).f_bavail == 0
    except OSError:
        full = False
    code = errno.ENOSPC if full else errno.EIO
    return OSError(code, f"{os.strerror(code)} ({text[:160]})", str(path))
