"""Checkpoints addressed by their content: a safetensors file per checkpoint, named by its digest.

The address is ``trainer.pipeline.state.state_digest`` of the checkpoint's tensors (names, dtypes,
shapes and bytes), and checkpoints move between nodes exactly as a pipeline stage's state does
(``trainer/pipeline/state.py``: safetensors parts, each with its SHA-256, plus the whole state's
digest). A fetched checkpoint is kept only when what arrived hashes to the address that was asked
for, so a peer that changes one weight is caught even if it fixes up the parts' own hashes.
"""
from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ensemble.board import Checkpoint, Held
from ensemble.jobs import ExpertJob
from ensemble.train import CheckpointMismatch, checkpoint_meta
from trainer.files import save_safetensors
from trainer.pipeline.state import (STATE_PART_BYTES, StateTransferError, encode_part, fetch_state, split_parts,
                                    state_digest)

logger = logging.getLogger(__name__)

DIGEST_BYTES = 32
CACHED = 4  # checkpoints kept in memory for serving their parts


class CheckpointError(RuntimeError):
    """A checkpoint that is not in the store, or is damaged there."""


class CheckpointRejected(ValueError):
    """A fetched checkpoint that does not hash to its address, or does not say what it is."""


def digest_hex(digest: bytes) -> str:
    return digest.hex()


@dataclass(frozen=True)
class Stored:
    """What a stored checkpoint's file header says of it (not verified: ``get`` verifies)."""

    digest: bytes
    job: str
    step: int
    samples: int
    maker: bytes | None  # the node that trained it, when this node did; None for a copy
    loss: float


def recall(stored: Sequence[Stored], jobs: Sequence[ExpertJob], me: bytes
           ) -> tuple[dict[int, Checkpoint], dict[int, Held], list[Stored]]:
    """From a store's catalog: the latest checkpoint ``me`` made of each job, the latest copy of
    each it keeps for others, and the rest (superseded: to remove). Files of unknown jobs, or past
    a job's steps, are left alone."""
    by_name = {job.name: job for job in jobs}
    own: dict[int, Checkpoint] = {}
    copies: dict[int, Held] = {}
    found = sorted((c for c in stored if c.job in by_name and c.step <= by_name[c.job].steps),
                   key=lambda c: (c.step, c.digest))
    for c in found:
        job = by_name[c.job]
        done = c.step == job.steps
        if c.maker == me:
            own[job.index] = Checkpoint(job.index, c.step, c.digest, done, c.loss, c.samples, me)
        else:
            copies[job.index] = Held(job.index, c.step, c.digest, done)
    copies = {j: h for j, h in copies.items() if j not in own or own[j].step < h.step}
    kept = {c.digest for c in own.values()} | {h.digest for h in copies.values()}
    return own, copies, [c for c in found if c.digest not in kept]


class CheckpointStore:
    """A folder of ``<digest hex>.safetensors`` files; every read checks the file against its name."""

    def __init__(self, root: Path, part_bytes: int = STATE_PART_BYTES):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.part_bytes = part_bytes
        self._cache: OrderedDict[bytes, tuple[dict, list[list[str]]]] = OrderedDict()

    def path(self, digest: bytes) -> Path:
        return self.root / f"{digest.hex()}.safetensors"

    def put(self, state: dict[str, torch.Tensor], maker: bytes | None = None, loss: float = math.nan) -> bytes:
        """Write ``state`` (atomically) and return its address. ``maker`` and ``loss`` go into the
        file's header (not its address), so a node restarted on this folder knows what it made."""
        digest = state_digest(state)
        path = self.path(digest)
        if not path.exists():
            job, step, samples = checkpoint_meta(state)
            metadata = {"job": job, "step": str(step), "samples": str(samples), "loss": repr(float(loss))}
            if maker is not None:
                metadata["maker"] = maker.hex()
            save_safetensors(path, state, metadata=metadata)
        return digest

    def catalog(self) -> list[Stored]:
        """Every checkpoint file's header, read without loading the tensors; a file whose header
        is unreadable or says nothing is left out (and logged)."""
        out = []
        for digest in self.digests():
            path = self.path(digest)
            try:
                with safe_open(str(path), "pt") as handle:
                    meta = handle.metadata() or {}
                maker = meta.get("maker")
                out.append(Stored(digest, meta["job"], int(meta["step"]), int(meta.get("samples", "0")),
                                  bytes.fromhex(maker) if maker else None, float(meta.get("loss", "nan"))))
            except (OSError, SafetensorError, KeyError, ValueError) as error:
                logger.warning("%s: an unreadable checkpoint header (%s); left out", path, error)
        return out

    def has(self, digest: bytes) -> bool:
        return digest in self._cache or self.path(digest).is_file()

    def get(self, digest: bytes) -> dict[str, torch.Tensor]:
        cached = self._cache.get(digest)
        if cached is not None:
            self._cache.move_to_end(digest)
            return cached[0]
        path = self.path(digest)
        try:
            state = load_file(str(path))
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {digest.hex()[:16]} is not in the store {self.root}") from None
        except (OSError, SafetensorError, ValueError) as error:
            raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None
        if state_digest(state) != digest:
            raise CheckpointError(f"{path} does not hash to its name: the file was changed or damaged")
        self._cache[digest] = (state, split_parts(state, self.part_bytes))
        while len(self._cache) > CACHED:
            self._cache.popitem(last=False)
        return state

    def delete(self, digest: bytes) -> None:
        self._cache.pop(digest, None)
        self.path(digest).unlink(missing_ok=True)

    def digests(self) -> list[bytes]:
        out = []
        for path in sorted(self.root.glob("*.safetensors")):
            try:
                raw = bytes.fromhex(path.stem)
            except ValueError:
                continue
            if len(raw) == DIGEST_BYTES:
                out.append(raw)
        return out

    def answer(self, digest: bytes, part: int, tamper: bool = False) -> tuple[dict, dict[str, torch.Tensor]]:
        """One part of a stored checkpoint, in the format ``trainer.pipeline.state.fetch_state`` reads.

        ``tamper`` (fault injection for tests) adds 1 to a weight of every part that holds one and
        re-hashes the part, as a peer forging a checkpoint would; only the whole state's digest gives
        it away."""
        state = self.get(digest)
        parts = self._cache[digest][1]
        if not 0 <= part < len(parts):
            raise CheckpointError(f"part must be in 0..{len(parts) - 1}")
        _, step, _ = checkpoint_meta(state)
        weight = next((n for n in parts[part] if n.startswith("w/") and state[n].is_floating_point()), None)
        if tamper and weight is not None:
            name = weight
            forged = dict(state)
            forged[name] = state[name].clone()
            forged[name].view(-1)[0] += 1.0
            sha, blob = encode_part(forged, parts[part])
        else:
            sha, blob = encode_part(state, parts[part])
        return ({"iteration": step, "version": 0, "part": part, "parts": len(parts), "digest": digest, "sha256": sha},
                {"safetensors": blob})


async def fetch_checkpoint(call: Callable[[dict], Awaitable[tuple[dict, dict]]], digest: bytes,
                           job: str | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint at ``digest`` from one peer (``call(args)`` asks it for one part); raises
    CheckpointRejected unless it hashes to ``digest`` (and, given ``job``, is that job's)."""

    async def part(args: dict) -> tuple[dict, dict]:
        return await call({"hash": digest, "part": args["part"]})

    try:
        remote = await fetch_state(part)
    except StateTransferError as error:
        raise CheckpointRejected(f"checkpoint {digest.hex()[:16]}: {error}") from None
    if state_digest(remote.state) != digest:
        raise CheckpointRejected(f"checkpoint {digest.hex()[:16]}: what arrived hashes to "
                                 f"{state_digest(remote.state).hex()[:16]}, not to the address asked for")
    try:
        name, _, _ = checkpoint_meta(remote.state)
    except CheckpointMismatch as error:
        raise CheckpointRejected(f"checkpoint {digest.hex()[:16]}: {error}") from None
    if job is not None and name != job:
        raise CheckpointRejected(f"checkpoint {digest.hex()[:16]} is of job {name!r}, not {job!r}")
    return remote.state
