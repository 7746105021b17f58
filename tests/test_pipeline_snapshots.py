"""Weight snapshots for evaluating a run afterwards: round trip, and which stages make up the model."""
import torch

from trainer.pipeline.snapshots import list_snapshots, load_snapshot, models_over_time, save_snapshot


def test_snapshots_round_trip_and_keep_an_iteration_trained_twice(tmp_path):
    w = {"blocks.0.weight": torch.arange(6, dtype=torch.float32).view(2, 3)}
    save_snapshot(tmp_path, 1, 4, w, 100.0)
    save_snapshot(tmp_path, 1, 4, {"blocks.0.weight": w["blocks.0.weight"] + 1}, 130.5)
    (tmp_path / "stage1" / ".it00000004-1.safetensors.9.tmp").write_bytes(b"half written")
    found = list_snapshots(tmp_path)
    assert [(s.stage, s.iteration, s.at) for s in found] == [(1, 4, 100.0), (1, 4, 130.5)]
    assert torch.equal(load_snapshot(found[1])["blocks.0.weight"], w["blocks.0.weight"] + 1)


def test_the_model_at_each_data_node_snapshot_leaves_out_a_stage_that_did_not_step(tmp_path):
    w = {"x": torch.zeros(1)}
    for stage in (0, 1, 2, 3):
        save_snapshot(tmp_path, stage, 4, w, 10.0 + stage / 10)
    for stage in (0, 1, 3):  # stage 2 was lost during iterations 5..9
        save_snapshot(tmp_path, stage, 9, w, 20.0 + stage / 10)
    save_snapshot(tmp_path, 2, 4, w, 25.0)  # a stale stage-2 snapshot must not pass for iteration 9
    models = models_over_time(list_snapshots(tmp_path), 4, slack_s=5.0)
    assert [(head.iteration, sorted(parts)) for head, parts in models] == [(4, [1, 2, 3]), (9, [1, 3])]
    assert models[0][1][2].at == 10.2  # of the two stage-2 snapshots of iteration 4, the one beside the head


def test_after_a_rollback_each_pass_over_an_iteration_pairs_with_its_own_stages(tmp_path):
    w = {"x": torch.zeros(1)}
    for at in (10.0, 40.0):  # iteration 7 trained before and after a rollback
        save_snapshot(tmp_path, 0, 7, w, at)
        save_snapshot(tmp_path, 1, 7, w, at + 0.3)
    models = models_over_time(list_snapshots(tmp_path), 2, slack_s=20.0)
    assert [(head.at, parts[1].at) for head, parts in models] == [(10.0, 10.3), (40.0, 40.3)]
