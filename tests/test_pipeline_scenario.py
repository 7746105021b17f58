"""Scenario loading, link costs, and the synthetic generator."""
import copy
import json

import pytest

from trainer.pipeline import ScenarioError, generate_scenario, load_scenario, shipped_scenario
from trainer.pipeline.scenario import SCENARIO_DIR, scenario_from_dict, scenario_to_dict


@pytest.fixture(scope="module")
def raw():
    return json.loads((SCENARIO_DIR / "skippipe_gcp20.json").read_text())


def test_shipped_scenario_loads():
    s = shipped_scenario()
    assert s.name == "skippipe-gcp20"
    assert len(s.nodes) == 20 and s.stage_sizes == (5, 3, 3, 3, 3, 3)
    assert s.path_length == 4 and s.memory_microbatches_per_node == 3
    assert s.forward_s(0) == pytest.approx(0.055 * 1 * 8)
    assert s.anchor_results_seconds_per_iteration["full_pipeline_baseline_DT-FM*"] == pytest.approx(79.9397, abs=1e-3)


def test_link_cost():
    s = shipped_scenario()
    # Belgium (0) - Canada (1): 41 ms + 32 MiB / (0.0198974609375 GiB/s) + 0.35 s, either direction.
    expected = 0.041 + (8 * 4194304) / (0.0198974609375 * 2**30) + 0.35
    assert s.link_cost_s(0, 1) == pytest.approx(expected)
    assert s.link_cost_s(1, 0) == pytest.approx(expected)
    # Nodes 0 and 12 are both in Belgium: the same-location link (1 ms, 2 GiB/s).
    assert s.link_cost_s(0, 12) == pytest.approx(0.001 + (8 * 4194304) / (2.0 * 2**30) + 0.35)


def test_round_trip(raw):
    assert scenario_from_dict(scenario_to_dict(scenario_from_dict(raw))) == scenario_from_dict(raw)


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda d: d.pop("path_length"), "'path_length'"),
        (lambda d: d.update(stage_sizes="5,3"), "'stage_sizes'"),
        (lambda d: d.update(stage_sizes=[5, 3, 3, 3, 3, 4]), "'stage_sizes'"),
        (lambda d: d.update(memory_microbatches_per_node=2.5), "'memory_microbatches_per_node'"),
        (lambda d: d.update(backward_factor="1.5"), "'backward_factor'"),
        (lambda d: d["nodes"][3].pop("sec_per_layer_sample"), "nodes[3]: missing field 'sec_per_layer_sample'"),
        (lambda d: d["nodes"][2].update(speed=0), "nodes[2]: field 'speed'"),
        (lambda d: d["links"].pop("Belgium-Canada"), "'Belgium' and 'Canada'"),
        (lambda d: d["links"]["Japan-LA"].pop("bandwidth_GiBps"), "links['Japan-LA']: missing field 'bandwidth_GiBps'"),
        (lambda d: d.update(path_length=7), "'path_length'"),
    ],
)
def test_bad_field_names_the_field(raw, mutate, field):
    d = copy.deepcopy(raw)
    mutate(d)
    with pytest.raises(ScenarioError) as e:
        scenario_from_dict(d)
    assert field in str(e.value)


def test_unreadable_file(tmp_path):
    with pytest.raises(ScenarioError, match="cannot read"):
        load_scenario(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ScenarioError, match="not valid JSON"):
        load_scenario(tmp_path / "bad.json")


@pytest.mark.parametrize("n, sizes", [(20, (5, 3, 3, 3, 3, 3)), (50, (15, 7, 7, 7, 7, 7)), (100, (25,) + (15,) * 5)])
def test_generator(n, sizes):
    a = generate_scenario(n, speed_spread=4.0, seed=7)
    assert a == generate_scenario(n, speed_spread=4.0, seed=7)
    assert a != generate_scenario(n, speed_spread=4.0, seed=8)
    assert a.stage_sizes == sizes and len(a.nodes) == n
    assert all(1.0 <= node.speed <= 4.0 for node in a.nodes)
    assert max(node.speed for node in a.nodes) / min(node.speed for node in a.nodes) > 2.0
    # It is a valid scenario file too.
    assert scenario_from_dict(scenario_to_dict(a)) == a
