"""Neighbour recovery across real node processes: stages lost to kill -9 are rebuilt and served again."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from node.pipeline_demo import run_pipeline_swarm, write_pipeline_spec
from trainer.pipeline.runtime import state_hash
from trainer.recovery.failures import Failure


def blake_of(weights: dict[str, torch.Tensor]) -> str:
    return state_hash(weights).hex()


def by_process(reports: list[dict]) -> dict[str, dict]:
    return {r["process"]: r for r in reports}


FAST = dict(heartbeat_interval_s=0.5, heartbeat_ttl_s=4.0)  # a dead node is noticed within ~4 s


def mean(xs) -> float:
    return sum(xs) / len(xs)


def losses_of(report: dict) -> list[float]:
    return [loss for _, _, loss in report["losses"]]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_lost_middle_stage_is_rebuilt_from_its_neighbours_by_a_spare(tmp_path):
    """4 stages of one block, one node each, and a spare; stage 2's only node is killed at iteration 3."""
    iterations = 40
    spec = write_pipeline_spec(tmp_path, 4, iterations, 4, swap="none", blocks_per_stage=[1, 1, 1, 1],
                               path_length=4, move_after_s=600.0, **FAST)
    keep = tmp_path / "inputs"
    reports, kills = run_pipeline_swarm(tmp_path, spec, 4, 4, 360, spares=1, failures=[Failure(3, 2)],
                                        extra_args={4: ["--keep-recovery-inputs", str(keep)]})
    assert [k["node"] for k in kills] == ["node2"]
    nodes = by_process(reports)
    spare = nodes["node4"]
    assert spare["stage"] == 2 and spare["iterations"] == iterations
    [record] = spare["recoveries"]
    assert record["method"] == "checkfree" and record["sources"] == [3, 1]
    assert record["lr"] == pytest.approx(1.1 * 3e-3)
    # exactly the formula over the neighbours' weights and gradient norms it fetched
    w3 = load_file(str(keep / "stage2-from3.safetensors"))
    w1 = load_file(str(keep / "stage2-from1.safetensors"))
    rebuilt = load_file(str(keep / "stage2-rebuilt.safetensors"))
    a, b = record["norms"]["3"] + 1e-4, record["norms"]["1"] + 1e-4
    assert set(rebuilt) == set(w3) == set(w1)
    for name in rebuilt:
        assert torch.equal(rebuilt[name], (a * w3[name] + b * w1[name]) / (a + b)), name
    assert blake_of(rebuilt) == record["weights"]
    # ... and those were the neighbours' real weights and norms at one moment of the run: the
    # weights after a step, and the norm of the gradient of that step
    for stage, weights, norm in ((3, w3, record["norms"]["3"]), (1, w1, record["norms"]["1"])):
        [neighbour] = [r for r in reports if r["stage"] == stage]
        ks = [k for k, h in neighbour["hashes"] if h == blake_of(weights)]
        assert ks and max(ks) == record["source_iterations"][str(stage)] - 1, (ks, record)
        assert [n for k, n in neighbour["grad_norms"] if k <= max(ks)][-1] == norm
    # the stage served again, and training went on with the loss falling
    assert spare["served"] and all(it >= record["iteration"] for it, _, _ in spare["served"])
    losses = losses_of(nodes["node0"])
    assert len(losses) == iterations and mean(losses[-3:]) < mean(losses[:3]) - 0.2, losses
    # the leader saw the stage go and come back
    log = [e for r in reports for e in r.get("stage_log", []) if e["stage"] == 2]
    assert any("lost_at" in e for e in log) and any("back_at" in e for e in log)
    assert 0 < record["serving_at"] - kills[0]["at"] < 120


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_checkfree_plus_edge_stages_are_copied_from_their_swap_partners(tmp_path):
    """Swaps on: stage 1 is killed, later stage 3 (= S-1); spares copy stage 2 into each."""
    iterations = 60
    spec = write_pipeline_spec(tmp_path, 4, iterations, 4, swap="checkfree_plus", blocks_per_stage=[1, 1, 1, 1],
                               path_length=4, move_after_s=600.0, **FAST)
    keep = {4: tmp_path / "in4", 5: tmp_path / "in5"}
    reports, kills = run_pipeline_swarm(tmp_path, spec, 4, 4, 420, spares=2,
                                        failures=[Failure(3, 1), Failure(25, 3)],
                                        extra_args={i: ["--keep-recovery-inputs", str(d)] for i, d in keep.items()})
    assert sorted(k["node"] for k in kills) == ["node1", "node3"]
    nodes = by_process(reports)
    records = {r["stage"]: (proc, r) for proc in ("node4", "node5") if proc in nodes for r in nodes[proc]["recoveries"]}
    assert set(records) == {1, 3}
    for stage, (proc, record) in records.items():
        assert record["method"] == "swap-copy" and record["sources"] == [2], record
        folder = keep[int(proc[4:])]
        partner = load_file(str(folder / f"stage{stage}-from2.safetensors"))
        rebuilt = load_file(str(folder / f"stage{stage}-rebuilt.safetensors"))
        assert all(torch.equal(rebuilt[n], partner[n]) for n in rebuilt) and set(rebuilt) == set(partner)
        assert nodes[proc]["stage"] == stage and nodes[proc]["iterations"] == iterations
    losses = losses_of(nodes["node0"])
    assert mean(losses[-3:]) < mean(losses[:3]) - 0.2, losses


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_newcomer_copies_the_surviving_replica_and_joins_the_least_replicated_stage(tmp_path):
    """3 stages: two data nodes, two replicas of stage 1, one of stage 2. One stage-1 replica is
    killed; a node started afterwards with --role auto takes stage 1 (now the fewest replicas,
    lowest index) and copies the survivor's weights and optimizer state."""
    iterations = 45
    spec = write_pipeline_spec(tmp_path, 3, iterations, 5, swap="none", move_after_s=600.0, **FAST)
    reports, kills = run_pipeline_swarm(tmp_path, spec, 5, 3, 360, failures=[Failure(3, 1, 0)],
                                        joins=[(12, ["--role", "auto"])])
    assert [k["node"] for k in kills] == ["node1"]
    nodes = by_process(reports)
    joiner = nodes["node5"]
    assert joiner["stage"] == 1 and joiner["iterations"] == iterations and joiner["first_iteration"] >= 12
    [record] = joiner["recoveries"]
    assert record["method"] == "replica" and record["from"] == [nodes["node4"]["node"]]
    # the copy was exact (optimizer state included): from then on the two replicas step identically
    survivor = dict((k, h) for k, h in nodes["node4"]["hashes"])
    assert all(survivor[k] == h for k, h in joiner["hashes"]), "the newcomer's weights differ from the survivor's"
    assert joiner["served"]
    assert "fewest live replicas" in (tmp_path / "node5.log").read_text()


@pytest.mark.slow
@pytest.mark.timeout(560)
def test_two_quick_failures_and_a_failure_during_recovery_end_with_every_stage_served(tmp_path):
    """4 stages; stages 1 and 2 are killed at the same iteration; of the two spares one dies in the
    middle of its restore. Nobody is left to claim that stage, so the leader moves a node from the
    most replicated stage (a second data node) there."""
    iterations = 80
    spec = write_pipeline_spec(tmp_path, 4, iterations, 5, swap="none", blocks_per_stage=[1, 1, 1, 1],
                               path_length=4, move_after_s=4.0, **FAST)
    reports, kills = run_pipeline_swarm(tmp_path, spec, 5, 4, 500, spares=2,
                                        failures=[Failure(3, 1), Failure(3, 2)],
                                        extra_args={5: ["--fault", "kill-during-restore"]}, may_die={"node5"})
    assert sorted(k["node"] for k in kills) == ["node1", "node2"]
    nodes = by_process(reports)
    assert "node5" not in nodes  # it died restoring
    finished = [r for r in reports if r["iterations"] == iterations]
    assert {r["stage"] for r in finished} == {0, 1, 2, 3}, [(r["process"], r["stage"]) for r in reports]
    methods = sorted((r["stage"], r["method"]) for rep in reports for r in rep["recoveries"])
    assert [m for _, m in methods] == ["checkfree", "checkfree"] and sorted(s for s, _ in methods) == [1, 2]
    [moved] = [r for r in reports if r["moves"]]
    assert moved["process"] in ("node0", "node4") and moved["moves"] == [[0, moved["stage"]]]
    assert moved["stage"] in (1, 2) and moved["recoveries"]
    logs = "".join(path.read_text() for path in tmp_path.glob("node*.log"))
    assert "moves there from stage 0" in logs
    assert "SIGKILL in the middle of a restore" in (tmp_path / "node5.log").read_text()
    assert all("serving_at" in r for rep in reports for r in rep["recoveries"])


@pytest.mark.slow
@pytest.mark.timeout(620)
def test_demo_fail_reports_each_recovery(tmp_path):
    """The demo's 6 nodes hold every stage twice: both stage-1 nodes are killed, the spare rebuilds it
    from its swap partner (3 stages, CheckFree+), and the summary says how and how fast."""
    import subprocess

    from tests.harness import SWARMTRAIN, child_env

    done = subprocess.run([*SWARMTRAIN, "demo", "--mode", "pipeline", "--iterations", "40", "--stages", "3", "--json",
                           "--fail", "stage=1@iter=4,stage=1@iter=4@replica=1"], cwd=tmp_path,
                          env=child_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stderr[-3000:], done.stdout[-1500:])
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert [k["stage"] for k in result["kills"]] == [1, 1] and all(k["node"] for k in result["kills"])
    [recovery] = result["recoveries"]
    assert recovery["stage"] == 1 and recovery["method"] == "swap-copy"
    assert 0 < recovery["detection_s"] < recovery["mttr_s"] < 120
    assert result["loss_end"] < result["loss_start"] and result["iterations"] == 40


def test_demo_fail_spec_errors_are_clear(tmp_path):
    import subprocess

    from tests.harness import SWARMTRAIN, child_env

    for args, message in ((["--fail", "stage=9@iter=2"], "does not exist"),
                          (["--fail", "stage=1"], "no iter="),
                          (["--fail", "stage=1@iter=50", "--iterations", "10"], "below --iterations"),
                          (["--spares", "99", "--fail", "stage=1@iter=2"], "--spares")):
        done = subprocess.run([*SWARMTRAIN, "demo", "--mode", "pipeline", *args], cwd=tmp_path, env=child_env(),
                              capture_output=True, text=True, timeout=60)
        assert done.returncode != 0 and message in done.stderr, (args, done.stderr[-500:])


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_checkpoint_baseline_rolls_everyone_back_and_the_spare_loads_the_checkpoint(tmp_path):
    iterations = 40
    spec = write_pipeline_spec(tmp_path, 4, iterations, 4, swap="none", blocks_per_stage=[1, 1, 1, 1],
                               path_length=4, move_after_s=600.0, recovery="checkpoint", checkpoint_every=5,
                               restart_delay_s=1.0, **FAST)
    folder = tmp_path / "checkpoints"
    reports, kills = run_pipeline_swarm(tmp_path, spec, 4, 4, 360, spares=1, failures=[Failure(12, 2)],
                                        extra_args={i: ["--checkpoint-dir", str(folder)] for i in range(5)})
    assert [k["node"] for k in kills] == ["node2"]
    nodes = by_process(reports)
    spare = nodes["node4"]
    [record] = spare["recoveries"]
    to = record["iteration"]
    assert record["method"] == "checkpoint" and to % 5 == 0 and 5 <= to <= kills[0]["iteration"]
    assert blake_of({n[2:]: t for n, t in load_file(str(folder / "stage2" / f"it{to:08d}.safetensors")).items()
                     if n.startswith("w/")}) == record["weights"]
    for name in ("node0", "node1", "node3"):  # everyone else went back to that checkpoint once
        assert [r[:2] for r in nodes[name]["rollbacks"]] == [[1, to]], (name, nodes[name]["rollbacks"])
        assert nodes[name]["iterations"] == iterations
    # the data node trained the iterations after the checkpoint twice
    done = [k for k, _, _ in nodes["node0"]["losses"]]
    assert done.count(to) == 2 and len(done) > iterations
    assert spare["iterations"] == iterations and spare["served"]


def test_the_checkpoint_baseline_needs_a_shared_folder(tmp_path):
    import subprocess

    from tests.harness import SWARMTRAIN, child_env

    spec = write_pipeline_spec(tmp_path, 3, 5, 3, recovery="checkpoint")
    done = subprocess.run([*SWARMTRAIN, "node", "--run", str(spec), "--data-dir", str(tmp_path / "n"),
                           "--host-maddrs", "/ip4/127.0.0.1/tcp/0"], cwd=tmp_path, env=child_env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "--checkpoint-dir" in done.stderr, done.stderr[-800:]
