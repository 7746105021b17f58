"""The zo command line: run init --mode zo, node flag errors, and the demo's JSON contract."""
from __future__ import annotations

import json
import subprocess

import pytest
import torch

from protocol.runspec import load_spec, verify_spec
from tests.harness import SWARMTRAIN, child_env
from trainer.model import LM, ModelConfig
from trainer.zo.worker import majority_mismatch, pack_blobs, unpack_blobs


def swarmtrain(*args: str, cwd, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*SWARMTRAIN, *args], capture_output=True, text=True, cwd=cwd, env=child_env(),
                          timeout=timeout)


def test_run_init_zo_records_the_base_hash_and_refuses_bad_input(tmp_path):
    assert swarmtrain("keygen", "--out", "owner.key", cwd=tmp_path).returncode == 0
    base = tmp_path / "base.pt"
    torch.save(LM(ModelConfig.from_preset("tiny"), seed=3).state_dict(), base)
    done = swarmtrain("run", "init", "--mode", "zo", "--key", "owner.key", "--out", "zo.toml", "--min-nodes", "3",
                      "--steps", "40", "--aggregation", "clip", "--base-weights", str(base), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    spec = load_spec(tmp_path / "zo.toml")
    verify_spec(spec)
    assert spec.run.mode == "zo" and spec.zo.min_nodes == 3 and spec.zo.aggregation == "clip"
    assert spec.train.steps == 40 and len(spec.zo.base_hash) == 64 and spec.zo.params == ["tok_emb.weight"]

    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    for args, expected in (
        (["--base-weights", "missing.pt"], "does not exist"),
        (["--base-weights", "junk.pt"], "cannot read base weights"),
        (["--min-nodes", "0"], "zo.min_nodes"),
        (["--probes", "1000"], "zo.probes"),
    ):
        bad = swarmtrain("run", "init", "--mode", "zo", "--key", "owner.key", "--out", "bad.toml", *args, cwd=tmp_path)
        assert bad.returncode != 0 and expected in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    other = swarmtrain("run", "init", "--mode", "pipeline", "--key", "owner.key", "--out", "p.toml", "--probes", "2",
                       cwd=tmp_path)
    assert other.returncode != 0 and "--mode zo only" in other.stderr

    wrong = swarmtrain("node", "--run", "zo.toml", "--base-weights", "junk.pt", "--data-dir", "d", cwd=tmp_path)
    assert wrong.returncode != 0 and "cannot read base weights" in wrong.stderr
    assert len(wrong.stderr.strip().splitlines()) == 1, wrong.stderr


@pytest.mark.slow
def test_demo_zo_json(tmp_path):
    done = swarmtrain("demo", "--mode", "zo", "--nodes", "3", "--steps", "15", "--base-steps", "20", "--json",
                      cwd=tmp_path, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["nodes"] == 3 and result["steps"] == 15 and result["weights_identical"] is True
    assert result["loss_end"] < result["loss_start"]
    # one probe per node per step: about a kilobyte of envelopes and frames, not megabytes
    assert result["wire_sent_bytes_per_node_step"] < 4096
    assert 0 < result["wire_bytes_per_node_step"] < result["allreduce_bytes_per_node_step"] / 100


def test_commit_lists_pack_and_refuse_malformed():
    blobs = [b"a" * 5, b"", b"xyz"]
    lengths, tensors = pack_blobs(blobs)
    assert unpack_blobs(lengths, tensors, 8) == blobs
    from protocol.errors import ProtocolError

    for bad_lengths, bad_tensors in (([9], tensors), ([-1, 9], tensors), ("5", tensors), (lengths, {}),
                                     (lengths, {"blobs": tensors["blobs"].float()}), ([1] * 9, tensors)):
        with pytest.raises(ProtocolError):
            unpack_blobs(bad_lengths, bad_tensors, 8)


def test_majority_mismatch():
    me, a, b, c = (bytes([i]) * 32 for i in range(4))
    good, bad = b"\x01" * 32, b"\x02" * 32
    agree = {a: {"hashes": [[10, good]]}, b: {"hashes": [[10, good]]}}
    assert majority_mismatch(me, {10: good}, agree) is None
    assert majority_mismatch(me, {10: bad}, agree) == (10, a)
    # a tie is not a majority; nobody else reporting is not a mismatch
    assert majority_mismatch(me, {10: bad}, {a: {"hashes": [[10, good]]}}) is None
    assert majority_mismatch(me, {20: bad}, agree) is None
    # the latest step with reports decides; malformed records are ignored
    records = {**agree, c: {"hashes": [[15, good], "junk", [16, b"short"]]}, b"x" * 32: {"hashes": 7}}
    assert majority_mismatch(me, {10: bad, 15: good}, records) is None
