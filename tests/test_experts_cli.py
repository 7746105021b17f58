"""`swarmtrain ensemble plan / eval / generate / fetch` and `run init --mode experts` as a user meets
them: the plan in the spec, every row and column of the table, one-line errors."""
from __future__ import annotations

import json
import math

import pytest
import torch

from ensemble.checkpoint import CheckpointStore
from ensemble.data import batch_seed, init_seed, job_batches, three_way_split
from ensemble.jobs import jobs_from_spec
from ensemble.train import ExpertTrainer
from node.cli import main
from node.identity import write_private_key
from protocol.keys import generate_private_key
from protocol.runspec import load_spec, make_spec, dumps_spec, verify_spec

DOMAINS = ["python", "prose", "arithmetic"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A planned run (3 domains, both ensembles, the dense model) and a folder with every job's
    checkpoint after a few steps."""
    root = tmp_path_factory.mktemp("experts-cli")
    key = root / "owner.key"
    write_private_key(key, generate_private_key())
    spec_path = root / "run.toml"
    assert main(["ensemble", "plan", "--key", str(key), "--out", str(spec_path), "--steps", "4", "--seed-steps", "0",
                 "--checkpoint-every", "2"]) == 0
    spec = load_spec(spec_path)
    torch.set_num_threads(1)
    store = CheckpointStore(root / "checkpoints")
    splits = {d: three_way_split(d, spec.data.val_fraction, spec.experts.prior_fraction, 0) for d in DOMAINS}
    for job in jobs_from_spec(spec):
        trainer = ExpertTrainer(job, seed=init_seed(0, job.data_key))
        trainer.train_steps(job.steps, job_batches([splits[d].train for d in job.domains], 4, spec.model.seq_len,
                                                   batch_seed(0, job.data_key)))
        store.put(trainer.state())
    return root, spec_path, spec


def test_plan_writes_both_allocations_and_prints_them(trained, capsys):
    _, spec_path, spec = trained
    verify_spec(spec)
    assert spec.run.mode == "experts" and spec.data.domains == DOMAINS
    assert [e.domain for e in spec.experts.heterogeneous] == DOMAINS == [e.domain for e in spec.experts.homogeneous]
    assert spec.experts.difficulty_source == "zlib" and len(spec.experts.difficulty) == 3
    assert spec.experts.budget > 0 and len(spec.experts.dense) == 1


def test_eval_prints_every_row_and_column(trained, capsys):
    root, spec_path, spec = trained
    args = ["ensemble", "eval", "--run", str(spec_path), "--checkpoints", str(root / "checkpoints"),
            "--max-tokens", "512", "--prior-tokens", "256", "--device", "cpu"]
    assert main(args) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("model"))
    assert header.split() == ["model", "params", *DOMAINS, "mean"]
    rows = ["het.python", "het.prose", "het.arithmetic", "hom.python", "hom.prose", "hom.arithmetic",
            "heterogeneous (uniform)", "heterogeneous (posterior)", "homogeneous (uniform)",
            "homogeneous (posterior)", "dense"]
    found = {}
    for name in rows:
        line = next((line for line in lines if line.startswith(name + " ")), None)
        assert line is not None, f"no row {name!r} in:\n{out}"
        cells = line[len(name):].split()
        assert len(cells) == 1 + len(DOMAINS) + 1  # params, one perplexity per domain, the mean
        found[name] = [float(c) for c in cells[1:]]
        assert all(math.isfinite(v) and v > 1 for v in found[name])
    assert "heterogeneous below homogeneous on" in out

    assert main([*args, "--json"]) == 0
    table = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert table["domains"] == DOMAINS and [r["name"] for r in table["rows"]] == [
        *rows[:6], "heterogeneous (uniform)", "heterogeneous (posterior)", "homogeneous (uniform)",
        "homogeneous (posterior)", "dense"]
    by_name = {r["name"]: r for r in table["rows"]}
    for name, values in found.items():  # the text shows the JSON's numbers
        assert [round(by_name[name]["perplexity"][d], 3) for d in DOMAINS] == pytest.approx(values[:3], abs=1.5e-3)
    assert by_name["het.python"]["steps_done"] == by_name["het.python"]["steps"]
    # the posterior rule's prior is estimated per domain and favours that domain's own expert
    prior = table["priors"]["homogeneous"]["arithmetic"]
    assert len(prior) == 3 and abs(sum(prior) - 1) < 1e-5
    assert set(table["heterogeneous_wins"]) == {"posterior", "uniform"}


def test_generate_samples_from_an_ensemble(trained, capsys):
    root, spec_path, _ = trained
    for rule in ("posterior", "uniform"):
        assert main(["ensemble", "generate", "--run", str(spec_path), "--checkpoints", str(root / "checkpoints"),
                     "--prompt", "12 + ", "--tokens", "20", "--rule", rule, "--device", "cpu"]) == 0
        text = capsys.readouterr().out
        assert text.startswith("12 + ") and len(text.rstrip("\n").encode()) >= 5 + 10


def test_fetch_copies_and_eval_reads_a_store(trained, capsys, tmp_path):
    root, spec_path, _ = trained
    assert main(["ensemble", "fetch", "--run", str(spec_path), "--checkpoints", str(root / "checkpoints"),
                 "--out", str(tmp_path / "copy")]) == 0
    assert "wrote 7 checkpoints" in capsys.readouterr().out
    assert len(CheckpointStore(tmp_path / "copy").digests()) == 7


def test_errors_are_one_line(trained, capsys, tmp_path):
    root, spec_path, spec = trained
    cases = [
        (["ensemble", "eval", "--run", str(spec_path), "--checkpoints", str(tmp_path / "none")], "is not a folder"),
        (["ensemble", "eval", "--run", str(spec_path), "--checkpoints", str(tmp_path)], "no checkpoint of het.python"),
        (["ensemble", "eval", "--run", str(spec_path), "--checkpoints", str(root), "--max-tokens", "0"],
         "--max-tokens must be at least 1"),
        (["ensemble", "generate", "--run", str(spec_path), "--checkpoints", str(root), "--prompt", ""],
         "--prompt is empty"),
        (["ensemble", "plan", "--key", str(root / "owner.key"), "--out", str(spec_path)], "already exists"),
        (["ensemble", "plan", "--key", str(root / "owner.key"), "--out", str(tmp_path / "r.toml"), "--preset",
          "huge"], "unknown model preset"),
    ]
    zo = tmp_path / "zo.toml"
    zo.write_text(dumps_spec(make_spec("zo", "tiny", generate_private_key())))
    cases.append((["ensemble", "eval", "--run", str(zo), "--checkpoints", str(root)], "not an experts run"))
    for args, message in cases:
        assert main(args) != 0, args
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (args, err)


def test_run_init_experts_writes_a_plan(tmp_path, capsys):
    key = tmp_path / "owner.key"
    write_private_key(key, generate_private_key())
    out = tmp_path / "run.toml"
    assert main(["run", "init", "--mode", "experts", "--key", str(key), "--out", str(out), "--steps", "30",
                 "--domains", "prose", "arithmetic"]) == 0
    spec = load_spec(out)
    assert [e.steps for e in spec.experts.homogeneous] == [30, 30]
    assert len(jobs_from_spec(spec)) == 5 and spec.experts.difficulty_source == "zlib"
