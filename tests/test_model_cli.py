"""`swarmtrain export`, `generate` and `eval`: stage weights -> one model file -> text and perplexity."""
from __future__ import annotations

import argparse
import json
import math
import re
from types import SimpleNamespace

import pytest
import torch

from node.model_cli import (add_model_parsers, assemble_state, check_stage_state, cmd_eval, cmd_export, cmd_generate,
                            evaluate, expected_stage_state, load_model, replicas_by_stage, save_model, skip_orders,
                            stage_to_lm_names, stage_weights, validation_windows)
from protocol.keys import generate_private_key
from protocol.runspec import dumps_spec, make_spec
from tests.harness import Cluster, wait_until
from trainer.model import LM, ModelConfig, build_stage, split_model, stage_block_ranges


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="swarmtrain")
    add_model_parsers(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def stage_states(model: LM, num_stages: int, blocks_per_stage=None) -> dict[int, dict]:
    """What each stage's node would answer to pp.state: the stage module's own (local) names."""
    return {s: stage.state_dict() for s, stage in enumerate(split_model(model, num_stages, blocks_per_stage))}


# ---- pure: names ------------------------------------------------------------------------------


@pytest.mark.parametrize("stages, blocks, tie", [(3, None, True), (4, [0, 1, 1, 2], True), (2, [2, 2], False)])
def test_assembled_stages_equal_the_whole_model_bit_for_bit(stages, blocks, tie):
    cfg = ModelConfig.from_preset("tiny", tie_embeddings=tie)
    model = LM(cfg, seed=3)
    with torch.no_grad():  # trained-looking weights: not what any seed would give
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    ranges = stage_block_ranges(cfg.n_layers, stages, blocks)
    states = stage_states(model, stages, blocks)
    local = {int(k.split(".")[1]) for k in states[stages - 1] if k.startswith("blocks.")}
    assert local == set(range(len(ranges[-1])))  # stages number their blocks from 0
    for s, r in enumerate(ranges):
        check_stage_state(expected_stage_state(cfg, s, r), states[s])
    assembled = assemble_state(ranges, states)
    reference = model.state_dict()
    assert sorted(assembled) == sorted(reference)
    for name, tensor in reference.items():
        assert torch.equal(assembled[name], tensor), name


def test_stages_built_alone_assemble_into_the_model_of_the_same_seed():
    cfg = ModelConfig.from_preset("tiny")
    ranges = stage_block_ranges(cfg.n_layers, 3)
    states = {s: build_stage(cfg, s, r, seed=11).state_dict() for s, r in enumerate(ranges)}
    assembled = assemble_state(ranges, states)
    for name, tensor in LM(cfg, seed=11).state_dict().items():
        assert torch.equal(assembled[name], tensor), name


def test_pp_state_answers_with_or_without_optimizer_state():
    weights = {"blocks.0.mlp.up.weight": torch.ones(2)}
    assert stage_weights(weights) == weights
    full = {"w/blocks.0.mlp.up.weight": torch.ones(2), "o/blocks.0.mlp.up.weight/exp_avg": torch.zeros(2),
            "o/blocks.0.mlp.up.weight/step": torch.tensor(3.0)}
    assert list(stage_weights(full)) == ["blocks.0.mlp.up.weight"]


def test_foreign_or_missing_stage_weights_are_refused():
    cfg = ModelConfig.from_preset("tiny")
    ranges = stage_block_ranges(cfg.n_layers, 3)
    states = stage_states(LM(cfg, seed=0), 3)
    with pytest.raises(ValueError, match="stage 1: unexpected tensor tok_emb.weight"):
        stage_to_lm_names(1, {"tok_emb.weight": torch.zeros(1)}, ranges[1])
    with pytest.raises(ValueError, match="not one of its 1 blocks"):
        stage_to_lm_names(1, {"blocks.1.attn.qkv.weight": torch.zeros(1)}, ranges[1])
    with pytest.raises(ValueError, match="no weights for stage 2"):
        assemble_state(ranges, {0: states[0], 1: states[1]})
    expected = expected_stage_state(cfg, 2, ranges[2])
    with pytest.raises(ValueError, match="missing"):
        check_stage_state(expected, states[1])  # stage 1's weights offered as stage 2's
    wrong = dict(states[2], **{"blocks.0.attn_norm.weight": torch.ones(3)})
    with pytest.raises(ValueError, match="expected"):
        check_stage_state(expected, wrong)


def test_export_picks_a_live_replica_of_every_stage():
    def member(id_: str, stage, state="ONLINE", role="stage", seen=0.0):
        announcement = SimpleNamespace(stage=stage, role=SimpleNamespace(value=role))
        return SimpleNamespace(id=id_, announcement=announcement, state=state, last_seen=seen)

    members = {m.id: m for m in (member("d", 0, role="data"), member("a", 1, "JOINING", seen=9.0),
                                 member("b", 1, seen=1.0), member("c", 2, "DEAD"), member("x", None, role="expert"))}
    found = replicas_by_stage(members, 3)
    assert [m.id for m in found[0]] == ["d"]
    assert [m.id for m in found[1]] == ["b", "a"]  # ONLINE first
    assert found[2] == []  # export names this stage as missing


# ---- pure: evaluation -------------------------------------------------------------------------


def test_skip_orders_are_every_or_a_seeded_sample():
    assert skip_orders(4, 2, 8, seed=0) == [[1], [2], [3]]
    assert skip_orders(4, 3, 8, seed=0) == [[1, 2], [1, 3], [2, 3]]
    sample = skip_orders(9, 5, 4, seed=1)
    assert len(sample) == 4 and sample == skip_orders(9, 5, 4, seed=1)
    assert all(len(o) == 4 and o == sorted(o) and 0 not in o for o in sample)


def test_eval_of_an_untrained_model_is_near_uniform_and_the_full_path_matches_the_lm():
    model = LM(ModelConfig.from_preset("tiny"), seed=0).eval()
    inputs, targets = validation_windows(["arithmetic"], 0.1, 0, seq_len=32, max_tokens=2048)
    report = evaluate(model, inputs, targets, 3, None, path_length=2, max_paths=8, seed=0, batch_size=16)
    with torch.no_grad():
        _, loss = model(inputs, targets)
    assert report["full_path"]["order"] == [0, 1, 2]
    assert report["full_path"]["loss"] == pytest.approx(float(loss), rel=1e-5)
    assert 200 < report["full_path"]["perplexity"] < 320  # 256 bytes, about uniform
    assert [p["order"] for p in report["skip_paths"]] == [[0, 1], [0, 2]]
    assert math.isfinite(report["skip"]["perplexity"])


# ---- the model file: round trip and bad input -------------------------------------------------


def write_model(path, model: LM, **metadata: str) -> None:
    save_model(path, model.state_dict(), {"preset": "tiny", "stages": "3", "domains": '["arithmetic"]',
                                          "seq_len": "64", **metadata})


def test_model_file_round_trip(tmp_path):
    model = LM(ModelConfig.from_preset("tiny"), seed=5)
    write_model(tmp_path / "m.safetensors", model, run_id="ab" * 16)
    loaded, metadata = load_model(tmp_path / "m.safetensors")
    assert metadata["run_id"] == "ab" * 16
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_generate_continues_the_prompt_reproducibly(tmp_path, capsys):
    write_model(tmp_path / "m.safetensors", LM(ModelConfig.from_preset("tiny"), seed=5))
    args = parse("generate", "--model", str(tmp_path / "m.safetensors"), "--prompt", "12 + 7 = ", "--tokens", "30")
    assert cmd_generate(args) == 0
    first = capsys.readouterr().out
    assert first.startswith("12 + 7 = ") and len(first.encode()) > len("12 + 7 = ") + 1
    assert cmd_generate(args) == 0
    assert capsys.readouterr().out == first  # the same seed, the same text


def test_eval_json_reports_full_and_skip_paths(tmp_path, capsys):
    write_model(tmp_path / "m.safetensors", LM(ModelConfig.from_preset("tiny"), seed=5))
    assert cmd_eval(parse("eval", "--model", str(tmp_path / "m.safetensors"), "--json", "--max-tokens", "4096",
                          "--stages", "4", "--path-length", "3")) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["stages"] == 4 and report["path_length"] == 3 and report["domains"] == ["arithmetic"]
    assert [p["order"] for p in report["skip_paths"]] == [[0, 1, 2], [0, 1, 3], [0, 2, 3]]
    assert math.isfinite(report["full_path"]["perplexity"]) and math.isfinite(report["skip"]["perplexity"])


def _not_safetensors(path):
    path.write_text("this is not a safetensors file\n")


def _unknown_preset(path):
    save_model(path, LM(ModelConfig.from_preset("tiny"), seed=0).state_dict(), {"preset": "galactic"})


def _no_preset(path):
    save_model(path, LM(ModelConfig.from_preset("tiny"), seed=0).state_dict(), {})


def _wrong_tensors(path):
    state = LM(ModelConfig.from_preset("tiny"), seed=0).state_dict()
    del state["norm.weight"]
    save_model(path, state, {"preset": "tiny"})


@pytest.mark.parametrize("command", ["generate", "eval"])
@pytest.mark.parametrize("make, fragment", [
    (None, "does not exist"),
    (_not_safetensors, "is not a safetensors model file"),
    (_unknown_preset, "unknown model preset 'galactic'"),
    (_no_preset, "names no model preset"),
    (_wrong_tensors, "does not hold a tiny model"),
])
def test_bad_model_files_are_one_line_errors(tmp_path, capsys, command, make, fragment):
    path = tmp_path / "model.safetensors"
    if make is not None:
        make(path)
    argv = [command, "--model", str(path)] + (["--prompt", "x"] if command == "generate" else [])
    handler = cmd_generate if command == "generate" else cmd_eval
    assert handler(parse(*argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"swarmtrain {command}: error: ") and fragment in err and err.count("\n") == 1, err


@pytest.mark.parametrize("argv, fragment", [
    (["eval", "--path-length", "3"], "--path-length must be in 1..2"),
    (["eval", "--stages", "9"], "--stages 9"),
    (["eval", "--domains", "/no/such/dir"], "cannot load the validation data"),
    (["generate", "--prompt", ""], "--prompt is empty"),
])
def test_bad_flags_are_one_line_errors(tmp_path, capsys, argv, fragment):
    write_model(tmp_path / "m.safetensors", LM(ModelConfig.from_preset("tiny"), seed=0))
    argv = [argv[0], "--model", str(tmp_path / "m.safetensors"), *argv[1:]]
    if argv[0] == "generate" and "--prompt" not in argv:
        argv += ["--prompt", "x"]
    handler = cmd_generate if argv[0] == "generate" else cmd_eval
    assert handler(parse(*argv)) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1, err


def test_export_refuses_bad_requests_before_touching_the_network(tmp_path, capsys):
    from node.identity import write_private_key
    from protocol.access import issue_token, token_to_text
    from protocol.keys import public_key_bytes
    from protocol.runspec import run_id

    owner = generate_private_key()
    public = tmp_path / "public.toml"
    public.write_text(dumps_spec(make_spec("pipeline", "tiny", owner, name="pub", stages=3)))
    private_spec = make_spec("pipeline", "tiny", owner, access="private", name="priv", stages=3)
    private = tmp_path / "private.toml"
    private.write_text(dumps_spec(private_spec))
    node_key, stranger = generate_private_key(), generate_private_key()
    write_private_key(tmp_path / "node.key", node_key)
    write_private_key(tmp_path / "stranger.key", stranger)
    token = token_to_text(issue_token(owner, run_id(private_spec), public_key_bytes(node_key), 4e9))
    (tmp_path / "exists.safetensors").write_bytes(b"")
    peer = ["--initial-peers", "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWSehcLyHNWmju2JSF8so414J7oSuaqG9Xh6epCS9jCWhi"]
    out = str(tmp_path / "m.safetensors")
    cases = [
        (["--run", str(public), "--out", str(tmp_path / "exists.safetensors"), *peer], "already exists; pass --force"),
        (["--run", str(public), "--out", str(tmp_path / "no" / "m.safetensors"), *peer], "does not exist"),
        (["--run", str(public), "--out", out], "needs --initial-peers"),
        (["--run", str(public), "--out", out, "--token", token, *peer], "public; drop --token"),
        (["--run", str(private), "--out", out, *peer], "'priv' is private: pass --key"),
        (["--run", str(private), "--out", out, "--key", str(tmp_path / "stranger.key"),
          "--token", token, *peer], "would refuse this key"),
    ]
    for argv, fragment in cases:
        assert cmd_export(parse("export", *argv)) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("swarmtrain export: error: ") and fragment in err and err.count("\n") == 1, err


# ---- real processes ---------------------------------------------------------------------------


def pipeline_spec(tmp_path, name: str = "export-test"):
    # steps far beyond the test's length: the nodes keep training while export reads them
    spec = make_spec("pipeline", "tiny", generate_private_key(), name=name, stages=3, path_length=3,
                     microbatches=4, microbatch_size=8, seq_len=64, memory=2, steps=1000, lr=1e-2,
                     domains=["arithmetic"], swap="none", heartbeat_interval_s=1.0, heartbeat_ttl_s=6.0)
    path = tmp_path / f"{name}.toml"
    path.write_text(dumps_spec(spec))
    return spec, path


def iterations_done(proc) -> int:
    return len(re.findall(r"pipeline iteration \d+ done", proc.output()))


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_export_generate_eval_against_a_live_pipeline(tmp_path):
    spec, spec_path = pipeline_spec(tmp_path)
    _, lonely_path = pipeline_spec(tmp_path, "no-nodes")
    cluster = Cluster(tmp_path)
    try:
        _, peer = cluster.bootstrap()
        # a data node, two replicas of stage 1 (export takes one), one of stage 2: the CPU is shared
        roles = {"d0": ["--role", "data"], "s1a": ["--stage", "1"], "s1b": ["--stage", "1"], "s2": ["--stage", "2"]}
        nodes = {name: cluster.start(name, "node", "--run", str(spec_path), "--data-dir", str(tmp_path / name),
                                     "--initial-peers", peer, "--host-maddrs", "/ip4/127.0.0.1/tcp/0",
                                     "--device", "cpu", *args)
                 for name, args in roles.items()}
        # while they start: a run without nodes has no stage to export
        lonely = cluster.run("export", "--run", str(lonely_path), "--initial-peers", peer,
                             "--out", str(tmp_path / "none.safetensors"))
        assert lonely.returncode == 1, lonely.stderr  # the request was fine; the swarm cannot serve it
        assert "stages 0, 1, 2 have no live replica in run 'no-nodes'" in lonely.stderr
        assert lonely.stderr.count("\n") == 1 and not (tmp_path / "none.safetensors").exists()

        wait_until(lambda: iterations_done(nodes["d0"]) >= 5, 150, what="5 iterations")
        out = tmp_path / "model.safetensors"
        export = cluster.run("export", "--run", str(spec_path), "--initial-peers", peer, "--out", str(out))
        assert export.returncode == 0, export.stderr
        assert "tiny model, 229,952 parameters" in export.stdout
    finally:
        assert cluster.close() == []

    model, metadata = load_model(out)
    iterations = json.loads(metadata["iterations"])
    assert sorted(iterations) == ["0", "1", "2"] and min(iterations.values()) >= 5
    assert metadata["preset"] == "tiny" and metadata["stages"] == "3"

    prompt = "417 + 82 = "
    generate = cluster.run("generate", "--model", str(out), "--prompt", prompt, "--tokens", "40")
    assert generate.returncode == 0, generate.stderr
    assert generate.stdout.startswith(prompt) and len(generate.stdout) > len(prompt) + 20

    evaluated = cluster.run("eval", "--model", str(out), "--json", "--max-tokens", "8192")
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads(evaluated.stdout.strip().splitlines()[-1])
    full, skips = report["full_path"], report["skip_paths"]
    assert full["order"] == [0, 1, 2] and [p["order"] for p in skips] == [[0, 1], [0, 2]]
    assert all(math.isfinite(p["perplexity"]) for p in [full, *skips])
    # the run's own initial weights, on the same validation windows
    untrained = LM(ModelConfig.from_preset("tiny"), seed=spec.train.seed).eval()
    inputs, targets = validation_windows(["arithmetic"], spec.data.val_fraction, spec.train.seed, 64, 8192)
    baseline = evaluate(untrained, inputs, targets, 3, None, 2, 8, 0, 16)
    assert full["perplexity"] < baseline["full_path"]["perplexity"] * 0.5, (full, baseline["full_path"])
