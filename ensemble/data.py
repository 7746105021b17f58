"""Three disjoint splits of every domain: train, prior (to estimate the ensemble's domain prior) and eval.

The eval split is exactly the validation split of ``trainer.data.split_domain`` (same chunks, same
hash), so expert perplexities compare with ``swarmtrain eval``. The prior split is carved out of the
remaining chunks by a second hash: evaluation never sees it, training never sees it.
"""
from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from trainer.data import DomainError, gather_chunks, load_domain, split_chunk_ids

CHUNK_SIZE = 4096
_PRIOR_SEED_OFFSET = 0x5052  # "PR": the prior split's hash differs from the validation split's


@dataclass(frozen=True)
class DomainSplits:
    source: str
    train: torch.Tensor  # uint8 byte tokens
    prior: torch.Tensor
    eval: torch.Tensor


def three_way_split(source: str, val_fraction: float, prior_fraction: float, seed: int,
                    chunk_size: int = CHUNK_SIZE) -> DomainSplits:
    tokens = load_domain(source).tokens()
    num_chunks = -(-len(tokens) // chunk_size)
    if num_chunks < 3:
        raise DomainError(f"domain {source!r} has {len(tokens)} bytes; three splits need more than "
                          f"{2 * chunk_size}")
    rest, eval_ids = split_chunk_ids(num_chunks, val_fraction, seed)
    keep, prior_pos = split_chunk_ids(len(rest), min(0.99, prior_fraction / (1.0 - val_fraction)),
                                      seed + _PRIOR_SEED_OFFSET)
    train_ids = [rest[i] for i in keep]
    prior_ids = [rest[i] for i in prior_pos]
    return DomainSplits(source, gather_chunks(tokens, train_ids, chunk_size),
                        gather_chunks(tokens, prior_ids, chunk_size), gather_chunks(tokens, eval_ids, chunk_size))


def windows(tokens: torch.Tensor, seq_len: int, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping (input, target) windows, int64 (N, seq_len), over at most ``max_tokens`` targets."""
    data = tokens[: max_tokens + 1].long()
    count = (len(data) - 1) // seq_len
    if count == 0:
        raise DomainError(f"a split of {len(tokens)} bytes is shorter than one window of {seq_len} + 1")
    return data[: count * seq_len].view(count, seq_len), data[1 : count * seq_len + 1].view(count, seq_len)


def stream_seed(*parts: int | bytes | str) -> int:
    """A 63-bit seed from parts of any kind, without string-concatenation collisions."""
    h = hashlib.blake2b(digest_size=8, person=b"swarmtrain/ex-d")
    for part in parts:
        raw = part if isinstance(part, bytes) else part.encode() if isinstance(part, str) else struct.pack("<q", part)
        h.update(struct.pack("<I", len(raw)) + raw)
    return int.from_bytes(h.digest(), "little") >> 1


def init_seed(run_seed: int, data_key: str) -> int:
    return stream_seed(run_seed, "init", data_key)


def batch_seed(run_seed: int, data_key: str, node: bytes = b"", start: int = 0) -> int:
    """The batches from step ``start`` on, for the node that trains them."""
    return stream_seed(run_seed, "batches", data_key, node, start)


def job_batches(trains: Sequence[torch.Tensor], batch_size: int, seq_len: int,
                seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless random windows; with several domains (the dense model) the sequences of a batch take
    the domains in turn, so a large domain does not crowd out a small one."""
    for data in trains:
        if data.dim() != 1 or len(data) < seq_len + 1:
            raise DomainError(f"a training split of {len(data)} bytes is shorter than one window of {seq_len} + 1")
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.arange(seq_len + 1)
    turn = 0
    while True:
        rows = []
        for i in range(batch_size):
            data = trains[(turn + i) % len(trains)]
            start = int(torch.randint(0, len(data) - seq_len, (1,), generator=gen))
            rows.append(data[start + offsets])
        turn += batch_size
        batch = torch.stack(rows).long()
        yield batch[:, :-1], batch[:, 1:]
