"""One fuzz target per decoder of what peers send, run by atheris (libFuzzer) or fed by hypothesis.

A target takes the fuzzer's bytes and feeds them to one decoder. It passes when the decoder
returns or raises one of the target's documented refusals (a ProtocolError, mostly); anything
else is a crash. Every input is also bounded in time (libFuzzer's -timeout) and in Python
memory (tracemalloc: MAX_INPUT_ALLOC_BYTES above what was allocated before it).

    python -m tests.fuzz_targets --runs 2000 [TARGET ...]      # every target by default
    python -m tests.fuzz_targets --seconds 60 envelope rpc.frame
    python -m tests.fuzz_targets --runs 2000 --runs-for rpc.frame=400
    python -m tests.fuzz_targets rpc.frame --input crash-1234   # reproduce one input

Each target runs in a forked child (the parent imports and instruments the code once), with a
corpus seeded from valid messages, and prints one JSON line: target, runs, seconds, crashes.
A decoder added later (issue 7/8's records, say) gets a target here: a function and its seeds.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import struct
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MAX_INPUT_ALLOC_BYTES = 32 << 20  # Python allocations one input may cause (inputs are at most 64 KiB)
PER_INPUT_TIMEOUT_S = 5
MAX_LEN = 1 << 16
NOW = 1_700_000_000.0


class MemoryBoundExceeded(Exception):
    """One input made a decoder allocate more than MAX_INPUT_ALLOC_BYTES."""


@dataclass(frozen=True)
class Target:
    name: str
    run: Callable[[bytes], None]
    allowed: tuple[type[BaseException], ...]
    seeds: tuple[bytes, ...]


def load_targets() -> dict[str, Target]:
    """Import the code under test (under atheris' instrumentation when the caller set it up) and build the targets."""
    import asyncio

    import msgpack
    import torch
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from hivemind.dht.validation import DHTRecord

    from node.config import RateLimits, Timeouts
    from node.rpc import REQUEST_KIND, RpcLimits
    from protocol import wire
    from protocol.access import AccessPolicy, issue_token, token_from_text, token_to_text, verify_token
    from protocol.envelope import ENVELOPE_DOMAIN, VERSION, Limits, ReplayGuard, open_envelope, seal
    from protocol.errors import ProtocolError
    from protocol.keys import public_key_bytes, sign
    from protocol.messages import MESSAGE_TYPES
    from protocol.records import RECORD_NAMES, SwarmRecordValidator, dht_key, key_id, seal_record
    from protocol.runspec import dumps_spec, loads_spec, make_spec, run_id, verify_spec
    from protocol.tensors import TensorLimits, decode_tensor, decode_tensor_parts, encode_tensor
    from protocol.zo import CONTRIB_KIND, COMMIT_KIND, GENESIS, open_commit, open_contribution, seal_commit, \
        seal_contribution
    from tests.rpc_memory import frame, memory_endpoint, peer_id, serve_bytes
    from trainer.pipeline.leader import paths_from_schedule
    from trainer.pipeline.state import StateTransferError, decode_part, encode_part, fetch_state
    from trainer.recovery.jobs import claim_winner, jobs_from_record, moves_from_record, rollback_from_record
    from trainer.zo.worker import majority_mismatch, unpack_blobs

    torch.set_num_threads(1)
    owner = Ed25519PrivateKey.from_private_bytes(b"\x31" * 32)
    client = Ed25519PrivateKey.from_private_bytes(b"\x32" * 32)
    server = Ed25519PrivateKey.from_private_bytes(b"\x33" * 32)
    owner_pub, client_pub, server_pub = public_key_bytes(owner), public_key_bytes(client), public_key_bytes(server)
    spec = make_spec("zo", "tiny", owner, access="private", name="fuzz", created="2025-01-01T00:00:00+00:00")
    rid = run_id(spec)
    token = issue_token(owner, rid, client_pub, 4e9)
    access = AccessPolicy(True, owner_pub, rid)
    tensor_limits = TensorLimits(max_bytes=1 << 20)
    guard = ReplayGuard(max_entries=1000, max_per_sender=100)  # kept across inputs: its memory must stay bounded
    loop = None

    def run_async(coroutine):
        nonlocal loop
        if loop is None:  # made in the (forked) child that runs the target
            loop = asyncio.new_event_loop()
        return loop.run_until_complete(asyncio.wait_for(coroutine, PER_INPUT_TIMEOUT_S))

    def unpacked(data: bytes):
        return wire.unpack(data, MAX_LEN)

    def signed_with_body(packed_body: bytes, kind: str, key=client, timestamp: float | None = None) -> bytes:
        """A validly signed envelope whose body is ``packed_body`` verbatim: the fuzz bytes get past
        the signature and reach the body decoders."""
        head = [VERSION, kind, rid, public_key_bytes(key), 1, time.time() if timestamp is None else timestamp,
                hashlib.blake2b(packed_body, digest_size=16).digest()]
        payload = b"\x98" + b"".join(msgpack.packb(item, use_bin_type=True) for item in head) + packed_body
        return wire.pack([payload, sign(key, ENVELOPE_DOMAIN, payload)])

    # ---- envelopes and messages ---------------------------------------------------------------

    def envelope(data: bytes) -> None:
        open_envelope(data, None, Limits(), run_id=None, replay_guard=guard, now=NOW)
        assert len(guard) <= guard.max_entries

    def envelope_body(data: bytes) -> None:
        open_envelope(signed_with_body(data, "heartbeat", timestamp=NOW), None, Limits(), run_id=rid, now=NOW)

    def message(cls) -> Callable[[bytes], None]:
        def run(data: bytes) -> None:
            body = unpacked(data)
            if type(body) is dict:
                cls.from_body(body).to_body()
        return run

    sample_bodies = {
        "announce": {"peer_id": "12D3KooWPeer", "public_name": "n", "role": "stage", "stage": 1, "expert": None,
                     "device": "cpu", "throughput": 1.0, "version": "1", "state": "ONLINE", "maddrs": ["/ip4/1.2.3.4"]},
        "heartbeat": {"state": "ONLINE", "step": 1, "metrics": {"loss": 1.0}, "uptime_s": 1.0},
        "event": {"event": "join", "subject": client_pub, "detail": "d", "at": 1.0},
        "tensor": {"name": "t", "tensor": encode_tensor(torch.arange(6, dtype=torch.float32).reshape(2, 3))},
        "rpc.request": {"method": "m", "args": {"a": [1]}, "tensors": [], "token": token, "to": "12D3KooWPeer"},
        "rpc.reply": {"ok": False, "result": {}, "error": "Busy: x", "tensors": []},
    }

    # ---- tensors, specs, tokens ----------------------------------------------------------------

    def tensor(data: bytes) -> None:
        decode_tensor(unpacked(data), tensor_limits)

    def tensor_parts(data: bytes) -> None:
        n = data[0] if data else 0
        header, rest = unpacked(data[1 : 1 + n]), data[1 + n :]
        out = decode_tensor_parts(header, rest, tensor_limits)
        assert out.numel() * out.element_size() == len(rest)

    def runspec(data: bytes) -> None:
        verify_spec(loads_spec(data.decode("utf-8", "replace")))

    def join_token(data: bytes) -> None:
        verify_token(data, owner_public=owner_pub, run_id=rid, node_public=client_pub, now=NOW)
        access.check(client_pub, data, NOW)

    def join_token_text(data: bytes) -> None:
        verify_token(token_from_text(data.decode("latin-1")), owner_public=owner_pub, run_id=rid,
                     node_public=client_pub, now=NOW)

    # ---- DHT records -------------------------------------------------------------------------

    validator = SwarmRecordValidator(rid, access, clock=lambda: NOW, managed_names=RECORD_NAMES)
    nodes_key = dht_key(rid, "nodes")

    def record_validator(data: bytes) -> None:
        """Every field of the DHT record from the fuzzer: key id, subkey, expiration, value."""
        key, rest = data[:20], data[20:]
        n = rest[0] if rest else 0
        subkey, rest = rest[1 : 1 + n], rest[1 + n :]
        expiration = struct.unpack("<d", rest[:8])[0] if len(rest) >= 8 else NOW + 10
        validator.check(DHTRecord(key, subkey, rest[8:], expiration))
        assert isinstance(validator.validate(DHTRecord(key, subkey, rest[8:], expiration)), bool)

    def record_body(data: bytes) -> None:
        """A correctly signed record under its own key and subkey whose body is the fuzz bytes."""
        value = msgpack.packb(signed_with_body(data, "announce", timestamp=NOW), use_bin_type=True)
        validator.check(DHTRecord(key_id(nodes_key), msgpack.packb(client_pub, use_bin_type=True), value, NOW + 10))

    def record_value(data: bytes) -> None:
        """The stored value is the fuzz bytes themselves, under a managed key and a real subkey."""
        validator.check(DHTRecord(key_id(nodes_key), msgpack.packb(client_pub, use_bin_type=True), data, NOW + 10))

    # ---- RPC -----------------------------------------------------------------------------------

    endpoint = memory_endpoint(server, rid, access, Timeouts(rpc_s=1.0, min_transfer_bytes_s=1e9),
                               limits=RpcLimits(max_tensor_bytes=1 << 20, max_inflight_bytes=4 << 20),
                               rate_limits=RateLimits(calls_per_s=1e9, burst=1e9))
    my_peer = str(endpoint.p2p.peer_id)

    async def echo(context, args, tensors):
        return {"n": len(tensors)}, tensors

    endpoint.register("echo", echo)

    def check_reply(reply) -> None:
        if reply.kind == "InternalError":  # a handler or the endpoint failed on this input: a bug
            raise AssertionError(f"the endpoint answered InternalError: {reply.result}")
        assert endpoint._inflight_bytes == 0 and endpoint._total_active == 0 and not endpoint._active

    def rpc_frame(data: bytes) -> None:
        check_reply(run_async(serve_bytes(endpoint, peer_id(1), data)))

    def rpc_request_body(data: bytes) -> None:
        """A signed request whose body is fuzz bytes (the first two bytes: its length), the rest as tensor bytes."""
        n = int.from_bytes(data[:2], "big") if len(data) >= 2 else 0
        body, tail = data[2 : 2 + n], data[2 + n :]
        check_reply(run_async(serve_bytes(endpoint, peer_id(2), frame(signed_with_body(body, REQUEST_KIND)) + tail)))

    # ---- zo ------------------------------------------------------------------------------------

    contribution_raw = seal_contribution(client, rid, 3, 0, 200)
    commit_raw = seal_commit(server, rid, 3, GENESIS, [open_contribution(contribution_raw, rid)])

    def zo_contribution(data: bytes) -> None:
        open_contribution(data, rid)

    def zo_contribution_body(data: bytes) -> None:
        open_contribution(signed_with_body(data, CONTRIB_KIND), rid)

    def zo_commit(data: bytes) -> None:
        open_commit(data, rid, 4)

    def zo_commit_body(data: bytes) -> None:
        open_commit(signed_with_body(data, COMMIT_KIND, key=server), rid, 4)

    def zo_blobs(data: bytes) -> None:
        n = data[0] if data else 0
        lengths = unpacked(data[1 : 1 + n])
        blob = torch.frombuffer(bytearray(data[1 + n :]), dtype=torch.uint8) if len(data) > 1 + n else \
            torch.zeros(0, dtype=torch.uint8)
        raws = unpack_blobs(lengths, {"blobs": blob}, 256)
        for raw in raws:
            open_commit(raw, rid, 4)

    def zo_hash_records(data: bytes) -> None:
        majority_mismatch(client_pub, {1: bytes(32), 2: b"\x01" * 32},
                          {owner_pub: unpacked(data), server_pub: {"hashes": [[2, bytes(32)]]}})

    # ---- pipeline ------------------------------------------------------------------------------

    state = {"w/a": torch.arange(4, dtype=torch.float32), "w/b": torch.ones(2, 2, dtype=torch.bfloat16)}
    part_sha, part_blob = encode_part(state, ["w/a", "w/b"])

    def pipeline_state_part(data: bytes) -> None:
        """A pp.state answer whose safetensors blob is the fuzz bytes (with their right SHA-256)."""
        blob = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
        decode_part({"sha256": hashlib.sha256(data).digest()}, {"safetensors": blob})

    def pipeline_fetch_state(data: bytes) -> None:
        """fetch_state against a peer whose first answer's fields are the fuzz bytes."""
        result = unpacked(data)
        if type(result) is not dict:
            return

        async def call(args):
            return {**result, "sha256": part_sha}, {"safetensors": part_blob}

        run_async(fetch_state(call, attempts=2))

    me = client_pub
    replicas = {0: [me], 1: [owner_pub], 2: [server_pub]}

    def pipeline_schedule(data: bytes) -> None:
        paths_from_schedule(unpacked(data), me, replicas, 2)

    def recovery_records(data: bytes) -> None:
        body = unpacked(data)
        jobs_from_record(body)
        moves_from_record(body)
        rollback_from_record(body)
        claim_winner({me: body, owner_pub: {"stage": 1, "until": NOW + 5}}, 1, NOW, {me, owner_pub})

    schedule_seed = wire.pack({"version": 3, "nodes": [me, owner_pub, server_pub],
                               "paths": [[0, [[1, 2], [2]]]]})
    protocol_errors = (ProtocolError,)
    targets = [
        Target("envelope", envelope, protocol_errors, (seal(client, kind="heartbeat", run_id=rid, body={"x": 1}, seq=1,
                                                            timestamp=NOW),)),
        Target("envelope.body", envelope_body, protocol_errors, (wire.pack(sample_bodies["heartbeat"]),)),
        *(Target(f"message.{kind}", message(cls), protocol_errors, (wire.pack(sample_bodies[kind]),))
          for kind, cls in MESSAGE_TYPES.items()),
        Target("tensor", tensor, protocol_errors, (wire.pack(sample_bodies["tensor"]["tensor"]),)),
        Target("tensor.parts", tensor_parts, protocol_errors,
               (bytes([len(h := wire.pack({"dtype": "int16", "shape": [2, 2]}))]) + h + bytes(8),)),
        Target("runspec", runspec, protocol_errors, (dumps_spec(spec).encode(),)),
        Target("token", join_token, protocol_errors, (token,)),
        Target("token.text", join_token_text, protocol_errors, (token_to_text(token).encode(),)),
        Target("record.validator", record_validator, protocol_errors,
               (key_id(nodes_key) + bytes([33]) + msgpack.packb(client_pub, use_bin_type=True)
                + struct.pack("<d", NOW + 10) + msgpack.packb(seal_record(client, run_id=rid, key=nodes_key,
                                                                          kind="announce", body={}, seq=1,
                                                                          token=token, timestamp=NOW),
                                                              use_bin_type=True),)),
        Target("record.body", record_body, protocol_errors,
               (wire.pack({"key": nodes_key, "msg": sample_bodies["announce"], "token": token, "expires": NOW + 5}),)),
        Target("record.value", record_value, protocol_errors,
               (msgpack.packb(seal_record(client, run_id=rid, key=nodes_key, kind="announce", body={}, seq=1,
                                          token=token, timestamp=NOW), use_bin_type=True),)),
        Target("rpc.frame", rpc_frame, (), (frame(seal(client, kind=REQUEST_KIND, run_id=rid, seq=1, body={
            "method": "echo", "args": {}, "tensors": [], "token": token, "to": my_peer})),)),
        Target("rpc.request_body", rpc_request_body, (), (
            (n := len(b := wire.pack({"method": "echo", "args": {}, "token": token, "to": my_peer, "tensors": [
                {"name": "t", "dtype": "uint8", "shape": [3], "nbytes": 3, "digest": hashlib.sha256(b"abc").digest()}
            ]}))).to_bytes(2, "big") + b + b"abc",)),
        Target("zo.contribution", zo_contribution, protocol_errors, (contribution_raw,)),
        Target("zo.contribution.body", zo_contribution_body, protocol_errors, (wire.pack({"step": 1, "sample": 0,
                                                                                           "q": 7}),)),
        Target("zo.commit", zo_commit, protocol_errors, (commit_raw,)),
        Target("zo.commit.body", zo_commit_body, protocol_errors,
               (wire.pack({"step": 3, "prev": GENESIS, "contribs": [contribution_raw]}),)),
        Target("zo.commit_list", zo_blobs, protocol_errors,
               (bytes([len(h := wire.pack([len(commit_raw)]))]) + h + commit_raw,)),
        Target("zo.hash_records", zo_hash_records, protocol_errors, (wire.pack({"hashes": [[1, bytes(32)], [2, bytes(32)]]}),)),
        Target("pipeline.state_part", pipeline_state_part, (StateTransferError,), (part_blob.numpy().tobytes(),)),
        Target("pipeline.fetch_state", pipeline_fetch_state, (StateTransferError, ProtocolError),
               (wire.pack({"parts": 1, "version": 2, "iteration": 5, "digest": bytes(32), "lr": 0.001,
                           "grad_norm": 1.0}),)),
        Target("pipeline.schedule", pipeline_schedule, protocol_errors, (schedule_seed,)),
        Target("recovery.records", recovery_records, protocol_errors,
               (wire.pack({"jobs": [[1, NOW]], "moves": [[me, 1]], "rollback": [1, 3], "stage": 1,
                           "until": NOW + 9}),)),
    ]
    return {t.name: t for t in targets}


def bounded(target: Target, artifacts: Path | None = None) -> Callable[[bytes], None]:
    """``target.run`` that lets its refusals through and fails past the per-input memory bound;
    an input that fails is saved in ``artifacts`` as crash-<sha1>."""
    if not tracemalloc.is_tracing():
        tracemalloc.start()

    def run(data: bytes) -> None:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        try:
            try:
                target.run(bytes(data))
            except target.allowed:
                pass
            grown = tracemalloc.get_traced_memory()[1] - before
            if grown > MAX_INPUT_ALLOC_BYTES:
                raise MemoryBoundExceeded(f"{target.name}: one input of {len(data)} bytes allocated {grown} bytes")
        except BaseException:
            if artifacts is not None:
                (artifacts / f"crash-{hashlib.sha1(data).hexdigest()}").write_bytes(bytes(data))
            raise

    return run


# ---- the atheris runner --------------------------------------------------------------------------

_DONE = re.compile(r"Done (\d+) runs in (\d+) second")
_STATUS = re.compile(r"^#(\d+)\s", re.MULTILINE)


def _child(target: Target, runs: int, seconds: int, workdir: Path) -> None:
    import atheris

    corpus = workdir / "corpus"
    corpus.mkdir()
    for index, seed in enumerate(target.seeds):
        (corpus / f"seed{index}").write_bytes(seed)
    args = [sys.argv[0], f"-runs={runs}", f"-timeout={PER_INPUT_TIMEOUT_S}", f"-max_len={MAX_LEN}",
            "-rss_limit_mb=3072", f"-artifact_prefix={workdir}/", "-print_final_stats=1", "-seed=1", str(corpus)]
    if seconds:
        args.insert(1, f"-max_total_time={seconds}")
    atheris.Setup(args, bounded(target, workdir))
    atheris.Fuzz()


def fuzz(target: Target, runs: int, seconds: int) -> dict:
    """Run one target in a forked child under atheris; what it reported."""
    workdir = Path(tempfile.mkdtemp(prefix=f"fuzz-{target.name}-"))
    log = workdir / "log.txt"
    began = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: its stderr (libFuzzer's report) goes to the log
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(fd, 2)
            os.dup2(fd, 1)
            _child(target, runs, seconds, workdir)
        finally:
            os._exit(70)
    _, status = os.waitpid(pid, 0)
    text = log.read_text(errors="replace")
    done = _DONE.search(text)
    statuses = _STATUS.findall(text)
    rc = os.waitstatus_to_exitcode(status)
    crashes = sorted(p.name for p in workdir.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-", "leak-")))
    return {"target": target.name, "runs": int(done.group(1)) if done else int(statuses[-1]) if statuses else 0,
            "seconds": round(time.monotonic() - began, 1), "rc": rc, "crashes": len(crashes) or int(rc != 0),
            "artifacts": [str(workdir / c) for c in crashes], "log": str(log) if rc else "",
            "tail": text[-2500:] if rc else ""}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", help="target names (default: all)")
    parser.add_argument("--runs", type=int, default=2000, help="inputs per target (-1: until --seconds)")
    parser.add_argument("--runs-for", action="append", default=[], metavar="TARGET=N",
                        help="inputs for one target, instead of --runs")
    parser.add_argument("--seconds", type=int, default=0, help="time per target (0: no limit)")
    parser.add_argument("--list", action="store_true", help="print the target names and exit")
    parser.add_argument("--input", default=None, metavar="FILE",
                        help="run the (one) target on this file once, e.g. a crash-* file, and show what it raises")
    args = parser.parse_args(argv)
    import atheris

    with atheris.instrument_imports(include=["protocol", "node", "trainer", "msgpack", "safetensors"]):
        targets = load_targets()
    if args.list:
        print("\n".join(targets))
        return 0
    unknown = sorted(set(args.targets) - set(targets))
    if unknown:
        print(f"error: unknown targets {unknown}; known: {sorted(targets)}", file=sys.stderr)
        return 2
    if args.input:
        if len(args.targets) != 1:
            print("error: --input takes exactly one target", file=sys.stderr)
            return 2
        bounded(targets[args.targets[0]])(Path(args.input).read_bytes())
        print("no crash")
        return 0
    runs_for = {name: int(n) for name, _, n in (item.partition("=") for item in args.runs_for)}
    failed = 0
    for name in args.targets or list(targets):
        result = fuzz(targets[name], runs_for.get(name, args.runs), args.seconds)
        failed += result["crashes"] > 0
        print(json.dumps(result), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
