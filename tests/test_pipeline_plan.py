"""Paths a data node plans on its own (before the leader's schedule): valid, balanced, deterministic."""
from __future__ import annotations

from collections import Counter

from trainer.pipeline.plan import plan_paths, stage_sets, swapped

NODES = {s: [bytes([s, r]) * 16 for r in range(2)] for s in range(1, 6)}


def test_every_path_is_valid_and_visits_are_balanced():
    paths = plan_paths(3, b"d" * 32, 10, 6, 4, "none", NODES)
    assert len(paths) == 10
    visits = Counter()
    for path in paths:
        stages = [s for s, _ in path]
        assert stages == sorted(stages) and len(set(stages)) == 3  # path_length 4 = stage 0 + 3 others
        for stage, node in path:
            assert node in NODES[stage]
            visits[stage] += 1
    assert max(visits.values()) - min(visits.values()) <= 1


def test_plans_are_deterministic_and_differ_by_iteration():
    a = plan_paths(3, b"d" * 32, 8, 6, 4, "none", NODES)
    assert a == plan_paths(3, b"d" * 32, 8, 6, 4, "none", NODES)
    assert a != plan_paths(4, b"d" * 32, 8, 6, 4, "none", NODES) or a != plan_paths(3, b"e" * 32, 8, 6, 4, "none", NODES)


def test_checkfree_plus_swaps_odd_microbatches():
    paths = plan_paths(0, b"d" * 32, 4, 5, 5, "checkfree_plus", NODES)
    assert [s for s, _ in paths[0]] == [1, 2, 3, 4]
    assert [s for s, _ in paths[1]] == [2, 1, 4, 3]
    assert swapped([1, 3, 4], 5) == [1, 4, 3]  # (1, 2): 2 is not on the path


def test_stages_without_replicas_are_skipped():
    paths = plan_paths(0, b"d" * 32, 3, 4, 4, "none", {1: NODES[1], 3: NODES[3]})
    assert all([s for s, _ in p] == [1, 3] for p in paths)


def test_stage_sets_rotate():
    sets = stage_sets(6, 2, 5, 0)
    assert sets == [[1, 2], [3, 4], [1, 5], [2, 3], [4, 5]]
