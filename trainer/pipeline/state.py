"""A stage's state (weights, optimizer moments) moving between nodes: safetensors over the RPC.

``pp.state`` answers one part at a time: a safetensors blob of whole tensors, at most
STATE_PART_BYTES of them (a bigger tensor travels alone), sent as one uint8 tensor. Each answer
carries the blob's SHA-256, the part count, the sender's state ``version`` (it changes whenever
the state does) and a digest of the whole state, so the receiver can check every part, tell that
the parts belong together and verify what it assembled before it loads anything. The receiver asks
for parts after the first by version: the sender answers them from a snapshot of that moment
even after it stepped (a big stage over a slow link takes longer than an iteration to move).
"""
from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Mapping
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from trainer.swarm import SwarmCallError

VERSION_GONE = "is no longer held"  # in pp.state's refusal of a part of a version it dropped
STATE_PART_BYTES = 64 << 20  # per pp.state answer; the RPC takes up to 512 MiB of tensors
MAX_PARTS = 4096


class StateTransferError(ValueError):
    """A state answer that is malformed, damaged or inconsistent with its other parts."""


class RemoteState(NamedTuple):
    iteration: int  # the sender's iteration when it answered
    state: dict[str, torch.Tensor]
    lr: float | None  # the sender's learning rate, when it said
    grad_norm: float | None  # the norm of the sender's last averaged gradient, when it said


def state_digest(state: Mapping[str, torch.Tensor]) -> bytes:
    """Names, dtypes, shapes and bytes of every tensor, in name order."""
    h = hashlib.blake2b(digest_size=32, person=b"swarmtrain/pp-s")
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.digest()


def split_parts(state: Mapping[str, torch.Tensor], part_bytes: int = STATE_PART_BYTES) -> list[list[str]]:
    """Names in order, grouped so that each group holds at most ``part_bytes`` (or one tensor)."""
    parts: list[list[str]] = [[]]
    size = 0
    for name in sorted(state):
        nbytes = state[name].numel() * state[name].element_size()
        if parts[-1] and size + nbytes > part_bytes:
            parts.append([])
            size = 0
        parts[-1].append(name)
        size += nbytes
    return parts


def encode_part(state: Mapping[str, torch.Tensor], names: list[str]) -> tuple[bytes, torch.Tensor]:
    """(sha256, blob as a uint8 tensor) of one part."""
    blob = safetensors_save({name: state[name].detach().to("cpu").contiguous() for name in names})
    return hashlib.sha256(blob).digest(), torch.frombuffer(bytearray(blob), dtype=torch.uint8)


def decode_part(result: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    blob_tensor, sha = tensors.get("safetensors"), result.get("sha256")
    if set(tensors) != {"safetensors"} or blob_tensor is None or blob_tensor.dtype != torch.uint8 \
            or blob_tensor.dim() != 1 or not isinstance(sha, bytes):
        raise StateTransferError("a pp.state answer carries one uint8 'safetensors' tensor and its sha256")
    blob = blob_tensor.numpy().tobytes()
    if hashlib.sha256(blob).digest() != sha:
        raise StateTransferError("a pp.state part does not match its sha256")
    try:
        return safetensors_load(blob)
    except (SafetensorError, ValueError) as error:
        raise StateTransferError(f"a pp.state part is not valid safetensors: {error}") from None


async def fetch_state(call: Callable[[dict], Awaitable[tuple[dict, dict]]], weights_only: bool = False,
                      attempts: int = 3) -> RemoteState:
    """A node's state from its ``pp.state``, part by part; ``call(args)`` makes one call. When the
    node steps in between, the fetch begins again and reads the later parts by version; every
    part's hash and the whole state's digest are checked."""
    for attempt in range(attempts):
        first, tensors = await call({"part": 0, "weights_only": weights_only})
        parts, version, iteration = first.get("parts"), first.get("version"), first.get("iteration")
        digest, lr = first.get("digest"), first.get("lr")
        if type(parts) is not int or not 1 <= parts <= MAX_PARTS or type(version) is not int \
                or type(iteration) is not int or not isinstance(digest, bytes):
            raise StateTransferError("pp.state answered without integer parts, version, iteration and a digest")
        if lr is not None and (type(lr) is not float or not 0 < lr < 1e3):
            raise StateTransferError(f"pp.state answered with a bad learning rate {lr!r}")
        norm = first.get("grad_norm")
        if norm is not None and (type(norm) is not float or not 0 <= norm < float("inf")):
            raise StateTransferError(f"pp.state answered with a bad gradient norm {norm!r}")
        state = decode_part(first, tensors)
        for part in range(1, parts):
            # First the node's state as it is now (a replica that copies it wants the newest), then,
            # if the node stepped meanwhile, the snapshot of the version part 0 came from: the node
            # keeps it after it steps (trainer/pipeline/runtime.py), so a state that moves slower
            # than the node steps still arrives whole
            args = {"part": part, "weights_only": weights_only}
            try:
                result, more = await call(args if attempt == 0 else {**args, "version": version})
            except SwarmCallError as error:
                if VERSION_GONE in str(error):
                    break  # it stepped more than once meanwhile: begin again
                raise
            if result.get("version") != version or result.get("digest") != digest:
                break
            more = decode_part(result, more)
            if set(more) & set(state):
                raise StateTransferError("pp.state parts overlap")
            state.update(more)
        else:
            if state_digest(state) != digest:
                raise StateTransferError("the assembled state does not match the digest its sender gave")
            return RemoteState(iteration, state, lr, norm)
    raise StateTransferError(f"the state changed during each of {attempts} fetches")
