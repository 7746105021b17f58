"""Training data: a byte tokenizer, text domains, train/validation splits, shards, batches.

Three domains ship with every Python install, so a run needs no downloads:
`python` (standard-library source), `prose` (the English reference text of pydoc topics) and
`arithmetic` (generated sums and products). The first two follow the Python version's own
files, so nodes that must see identical bytes should run the same Python minor version.
Users add domains from a text file, a directory of text files, or JSONL. Everything is
deterministic and nothing is cached on disk.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import struct
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

VOCAB_SIZE = 256
DEFAULT_MAX_BYTES = 1 << 20  # per embedded domain
EMBEDDED_DOMAINS = ("python", "prose", "arithmetic")


class DomainError(ValueError):
    """A domain's source exists but cannot be used (empty, not text, malformed, too small)."""


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode(tokens: Sequence[int] | torch.Tensor) -> str:
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.tolist()
    return bytes(tokens).decode("utf-8", errors="replace")


@dataclass(frozen=True)
class Domain:
    """A named body of text, kept as UTF-8 bytes (= byte tokens)."""

    name: str
    data: bytes
    source: str  # where the bytes came from, for logs and errors

    def tokens(self) -> torch.Tensor:
        return torch.frombuffer(bytearray(self.data), dtype=torch.uint8)


def _capped(parts: Iterator[bytes], max_bytes: int | None) -> bytes:
    out, size = [], 0
    for part in parts:
        if max_bytes is not None and size + len(part) > max_bytes:
            out.append(part[: max_bytes - size])
            break
        out.append(part)
        size += len(part)
    return b"".join(out)


# --- embedded domains --------------------------------------------------------------------------


def _stdlib_sources(root: Path) -> Iterator[bytes]:
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]  # prune: site-packages can be huge
        paths += [Path(dirpath, f).relative_to(root).as_posix() for f in filenames if f.endswith(".py")]
    for rel in sorted(paths):
        data = (root / rel).read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        yield data + b"\n"


def python_domain(max_bytes: int | None = DEFAULT_MAX_BYTES) -> Domain:
    """Standard-library .py files in sorted path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    data = _capped(_stdlib_sources(root), max_bytes)
    if not data:
        raise DomainError(f"no Python sources found under the standard library at {root}")
    return Domain("python", data, f"stdlib:{root}")


def prose_domain(max_bytes: int | None = DEFAULT_MAX_BYTES) -> Domain:
    """The English reference text that pydoc shows for `help('topic')`."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # some distributions strip pydoc_data
        raise DomainError("this Python install lacks pydoc_data, the source of the prose domain") from e
    parts = (topics[key].encode("utf-8") + b"\n\n" for key in sorted(topics))
    return Domain("prose", _capped(parts, max_bytes), "pydoc_data.topics")


def arithmetic_domain(max_bytes: int | None = DEFAULT_MAX_BYTES, seed: int = 0) -> Domain:
    """Generated lines like `417 + 82 = 499`: a tiny alphabet and an exact rule per line."""
    rng = random.Random(seed)  # randrange over Mersenne Twister: one stream on every platform
    limit = max_bytes if max_bytes is not None else DEFAULT_MAX_BYTES  # the stream is endless

    def lines() -> Iterator[bytes]:
        while True:
            a, b = rng.randrange(1000), rng.randrange(1000)
            op = "+-*"[rng.randrange(3)]
            result = a + b if op == "+" else a - b if op == "-" else a * b
            yield f"{a} {op} {b} = {result}\n".encode()

    return Domain("arithmetic", _capped(lines(), limit), f"generated:seed={seed}")


def embedded_domain(name: str, max_bytes: int | None = DEFAULT_MAX_BYTES) -> Domain:
    builders = {"python": python_domain, "prose": prose_domain, "arithmetic": arithmetic_domain}
    if name not in builders:
        raise ValueError(f"unknown embedded domain {name!r}; choose one of {', '.join(EMBEDDED_DOMAINS)}")
    domain = builders[name](max_bytes)
    log.debug("embedded domain %s: %d bytes from %s", name, len(domain.data), domain.source)
    return domain


# --- user domains ------------------------------------------------------------------------------


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise DomainError(f"cannot read {path}: {e.strerror or e}") from e


def _require_text(data: bytes, path: Path) -> None:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DomainError(f"{path} is not UTF-8 text (byte {e.start})") from e


def _require_path(path: Path, what: str) -> None:
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, f"{what} not found", str(path))


def _finish(name: str, data: bytes, source: Path, max_bytes: int | None) -> Domain:
    if max_bytes is not None:
        data = data[:max_bytes]
    if not data.strip():
        raise DomainError(f"domain {name!r} from {source} is empty")
    log.info("domain %s: %d bytes from %s", name, len(data), source)
    return Domain(name, data, str(source))


def domain_from_file(path: str | Path, name: str | None = None, max_bytes: int | None = None) -> Domain:
    path = Path(path)
    _require_path(path, "text file")
    if not path.is_file():
        raise DomainError(f"{path} is not a file")
    data = _read(path)
    _require_text(data, path)
    return _finish(name or path.stem, data, path, max_bytes)


def domain_from_dir(
    path: str | Path, pattern: str = "*.txt", name: str | None = None, max_bytes: int | None = None
) -> Domain:
    """All files under `path` (recursively) matching `pattern`, in sorted relative-path order."""
    path = Path(path)
    _require_path(path, "directory")
    if not path.is_dir():
        raise DomainError(f"{path} is not a directory")
    files = sorted((p for p in path.rglob(pattern) if p.is_file()), key=lambda p: p.relative_to(path).as_posix())
    if not files:
        raise DomainError(f"no files match {pattern!r} under {path}")
    parts = []
    for file in files:
        data = _read(file)
        _require_text(data, file)
        parts.append(data if data.endswith(b"\n") else data + b"\n")
    return _finish(name or path.name, b"".join(parts), path, max_bytes)


def domain_from_jsonl(
    path: str | Path, field: str = "text", name: str | None = None, max_bytes: int | None = None
) -> Domain:
    """One JSON object per line; the string in `field` is one document."""
    path = Path(path)
    _require_path(path, "JSONL file")
    raw = _read(path)
    _require_text(raw, path)
    docs = []
    # split on "\n" only: str.splitlines also breaks at U+2028 and friends, legal inside JSON strings
    for lineno, line in enumerate(raw.decode("utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DomainError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise DomainError(f"{path}:{lineno}: expected an object with a string field {field!r}")
        docs.append(record[field].encode("utf-8") + b"\n\n")
    return _finish(name or path.stem, b"".join(docs), path, max_bytes)


def load_domain(source: str | Path, name: str | None = None, max_bytes: int | None = None) -> Domain:
    """An embedded domain by name, or a user domain from a directory, a .jsonl file or a text file."""
    if str(source) in EMBEDDED_DOMAINS:
        return embedded_domain(str(source), DEFAULT_MAX_BYTES if max_bytes is None else max_bytes)
    path = Path(source)
    if not path.exists():
        embedded = ", ".join(EMBEDDED_DOMAINS)
        raise FileNotFoundError(errno.ENOENT, f"domain source not found (embedded domains: {embedded})", str(path))
    if path.is_dir():
        return domain_from_dir(path, name=name, max_bytes=max_bytes)
    if path.suffix == ".jsonl":
        return domain_from_jsonl(path, name=name, max_bytes=max_bytes)
    return domain_from_file(path, name=name, max_bytes=max_bytes)


# --- splits, shards, batches -------------------------------------------------------------------


def _unit_hash(seed: int, index: int) -> float:
    digest = hashlib.blake2b(struct.pack("<qq", seed, index), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def split_chunk_ids(num_chunks: int, val_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Assign each chunk to train or validation by a hash of its index.

    A hash rather than "the last 10%" keeps validation spread over the whole domain, and an
    index's side never changes when the domain grows.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if num_chunks < 2:
        raise ValueError(f"need at least 2 chunks for a train/validation split, got {num_chunks}")
    scores = [_unit_hash(seed, i) for i in range(num_chunks)]
    val = {i for i, h in enumerate(scores) if h < val_fraction}
    if not val:  # small domains: still validate on something
        val = {min(range(num_chunks), key=scores.__getitem__)}
    if len(val) == num_chunks:
        val.remove(max(range(num_chunks), key=scores.__getitem__))
    train = [i for i in range(num_chunks) if i not in val]
    return train, sorted(val)


def shard_ids(ids: Sequence[int], index: int, count: int) -> list[int]:
    """Shard `index` of `count`: round-robin, so shards are disjoint, covering and balanced."""
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} is outside 0..{count - 1}")
    return list(ids[index::count])


def gather_chunks(tokens: torch.Tensor, ids: Sequence[int], chunk_size: int) -> torch.Tensor:
    if not ids:
        return tokens[:0]
    return torch.cat([tokens[i * chunk_size : (i + 1) * chunk_size] for i in ids])


@dataclass(frozen=True)
class DomainSplit:
    name: str
    train: torch.Tensor  # uint8 byte tokens (this node's shard only)
    val: torch.Tensor
    train_chunks: list[int]
    val_chunks: list[int]


def split_domain(
    domain: Domain,
    val_fraction: float = 0.05,
    chunk_size: int = 4096,
    seed: int = 0,
    shard: int = 0,
    num_shards: int = 1,
) -> DomainSplit:
    """Train/validation split by contiguous chunks, with the training chunks sharded by node."""
    tokens = domain.tokens()
    num_chunks = -(-len(tokens) // chunk_size)
    if num_chunks < 2:
        raise DomainError(
            f"domain {domain.name!r} ({domain.source}) has {len(tokens)} bytes; a split needs more "
            f"than chunk_size={chunk_size}: add text or lower chunk_size"
        )
    train_ids, val_ids = split_chunk_ids(num_chunks, val_fraction, seed)
    train_ids = shard_ids(train_ids, shard, num_shards)
    return DomainSplit(
        domain.name,
        gather_chunks(tokens, train_ids, chunk_size),
        gather_chunks(tokens, val_ids, chunk_size),
        train_ids,
        val_ids,
    )


def batches(data: torch.Tensor, batch_size: int, seq_len: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless random windows of `data`: inputs and next-byte targets, int64 (batch, seq_len)."""
    if data.dim() != 1 or len(data) < seq_len + 1:
        raise ValueError(f"need a 1-D token tensor of at least {seq_len + 1} tokens, got shape {tuple(data.shape)}")
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.arange(seq_len + 1)
    while True:
        starts = torch.randint(0, len(data) - seq_len, (batch_size,), generator=gen)
        windows = data[starts[:, None] + offsets].long()
        yield windows[:, :-1], windows[:, 1:]
