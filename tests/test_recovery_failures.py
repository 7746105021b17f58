"""Failure injection: --fail specs, schedule files, hourly-rate sampling (pure, no processes)."""
import json

import pytest

from trainer.recovery.failures import (
    Failure,
    FailureSpecError,
    due,
    failure_probability,
    load_failure_schedule,
    parse_fail_spec,
    sample_failures,
    scaled_iteration_s,
)

# --- --fail specs ----------------------------------------------------------------------------


def test_parse_one_item():
    assert parse_fail_spec("stage=2@iter=5") == [Failure(iteration=5, stage=2, replica=0)]


def test_parse_several_items_sorted_by_iteration_stage_replica():
    text = "stage=3@iter=3@replica=1, stage=1@iter=3 ; stage=0@iter=7,stage=3@iter=3"
    assert parse_fail_spec(text) == [Failure(3, 1), Failure(3, 3, 0), Failure(3, 3, 1), Failure(7, 0)]


def test_parse_free_key_order_alias_and_spaces():
    assert parse_fail_spec(" iteration = 4 @ replica=2 @stage=1 ") == [Failure(4, 1, 2)]
    assert parse_fail_spec("replica=1@iter=0@stage=0") == [Failure(0, 0, 1)]


def test_parse_stage_within_num_stages():
    assert parse_fail_spec("stage=3@iter=1", num_stages=4) == [Failure(1, 3)]


@pytest.mark.parametrize("text, expected", [
    ("iter=5", "'iter=5': no stage="),
    ("stage=2", "'stage=2': no iter="),
    ("stage=2@iter=5@stage=3", "'stage=2@iter=5@stage=3': stage given twice"),
    ("stage=2@iter=5@iteration=6", "iteration given twice"),
    ("stage=2@iter=5@node=1", "'stage=2@iter=5@node=1': unknown key 'node'"),
    ("stage=2@iter=5@", "unknown key ''"),
    ("stage=-1@iter=5", "stage must be a non-negative integer, not '-1'"),
    ("stage=1@iter=2.5", "iter must be a non-negative integer, not '2.5'"),
    ("stage=1@iter=x", "not 'x'"),
    ("stage=+1@iter=2", "not '+1'"),
    ("stage=1@iter=", "not ''"),
    ("stage=\u0663@iter=2", "stage must be a non-negative integer"),  # an Arabic-Indic 3
    ("stage=1@iter=2@replica=-1", "replica must be a non-negative integer"),
])
def test_parse_rejects_bad_item(text, expected):
    with pytest.raises(FailureSpecError) as caught:
        parse_fail_spec(text)
    assert expected in str(caught.value)


def test_parse_rejects_stage_past_the_last():
    with pytest.raises(FailureSpecError) as caught:
        parse_fail_spec("stage=1@iter=2,stage=4@iter=3", num_stages=4)
    assert "'stage=4@iter=3': stage 4 does not exist (stages 0..3)" in str(caught.value)


def test_parse_rejects_duplicate_items_also_through_the_alias():
    with pytest.raises(FailureSpecError) as caught:
        parse_fail_spec("stage=1@iter=2, iteration=2@stage=1")
    assert "'iteration=2@stage=1': the same failure is listed twice" in str(caught.value)


@pytest.mark.parametrize("text", ["", "   ", ",", " ; "])
def test_parse_rejects_empty_spec(text):
    with pytest.raises(FailureSpecError, match="empty failure spec; expected stage=S@iter=K"):
        parse_fail_spec(text)


def test_parse_rejects_empty_item_between_separators():
    with pytest.raises(FailureSpecError, match="empty item"):
        parse_fail_spec("stage=1@iter=2,,stage=2@iter=3")


def test_spec_error_is_a_value_error():
    assert issubclass(FailureSpecError, ValueError)


# --- schedule files --------------------------------------------------------------------------


def write(tmp_path, content) -> str:
    path = tmp_path / "failures.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def test_schedule_as_a_list(tmp_path):
    path = write(tmp_path, [{"stage": 2, "iteration": 5}, {"stage": 1, "iteration": 3, "replica": 1}])
    assert load_failure_schedule(path, num_stages=3) == [Failure(3, 1, 1), Failure(5, 2)]


def test_schedule_as_an_object(tmp_path):
    path = write(tmp_path, {"failures": [{"iteration": 4, "stage": 0}]})
    assert load_failure_schedule(path) == [Failure(4, 0)]


def test_schedule_may_be_empty(tmp_path):
    assert load_failure_schedule(write(tmp_path, {"failures": []})) == []


def test_schedule_missing_file(tmp_path):
    with pytest.raises(FailureSpecError, match="nope.json: cannot read the failure schedule"):
        load_failure_schedule(tmp_path / "nope.json")


def test_schedule_bad_json(tmp_path):
    with pytest.raises(FailureSpecError, match="failures.json: not valid JSON"):
        load_failure_schedule(write(tmp_path, "[{stage: 1}"))


@pytest.mark.parametrize("entries, expected", [
    ([{"stage": 1, "iteration": 2}, {"stage": True, "iteration": 3}],
     "failure 1: stage, iteration and replica are non-negative integers, but 'stage' is True"),
    ([{"stage": 1, "iteration": 2.0}], "failure 0: stage, iteration and replica are non-negative integers, "
                                        "but 'iteration' is 2.0"),
    ([{"stage": 1, "iteration": "2"}], "but 'iteration' is '2'"),
    ([{"stage": 1, "iteration": 2, "replica": -1}], "but 'replica' is -1"),
    ([{"stage": 1, "iteration": 2, "node": 3}], "failure 0: unknown key(s) 'node'"),
    ([{"stage": 1, "iter": 2}], "failure 0: unknown key(s) 'iter'"),
    ([{"stage": 1, "iteration": 2}, {"iteration": 2}], "failure 1: no 'stage'"),
    ([{"stage": 1}], "failure 0: no 'iteration'"),
    ([[1, 2]], "failure 0: expected an object"),
    ([{"stage": 1, "iteration": 2}, {"stage": 1, "iteration": 2, "replica": 0}],
     "failure 1: the same failure is listed twice"),
    ([{"stage": 3, "iteration": 2}], "failure 0: stage 3 does not exist (stages 0..2)"),
    ({"failures": [], "seed": 1}, "not an object with the keys 'failures', 'seed'"),
    ({"failures": {"stage": 1}}, "expected a list of failures"),
    (7, "expected a list of failures"),
])
def test_schedule_rejects_bad_entries(tmp_path, entries, expected):
    path = write(tmp_path, entries)
    with pytest.raises(FailureSpecError) as caught:
        load_failure_schedule(path, num_stages=3)
    message = str(caught.value)
    assert message.startswith(path)
    assert expected in message


# --- hourly rates ----------------------------------------------------------------------------


def test_probability_of_a_one_hour_iteration_is_the_hourly_rate():
    assert failure_probability(0.1, 3600) == pytest.approx(0.1)


def test_probability_of_a_short_iteration():
    assert failure_probability(0.1, 36) == pytest.approx(1 - 0.9 ** 0.01)
    assert failure_probability(0.1, 36) == pytest.approx(0.0010531, rel=1e-4)


def test_probability_bounds():
    assert failure_probability(0.0, 10) == 0.0
    assert 0 < failure_probability(0.999, 1) < failure_probability(0.999, 3600) < 1


@pytest.mark.parametrize("rate, seconds", [
    (-0.1, 10), (1.0, 10), (1.5, 10), (float("nan"), 10), (0.1, 0), (0.1, -5), (0.1, float("inf")), (0.1, float("nan")),
])
def test_probability_rejects_out_of_range(rate, seconds):
    with pytest.raises(FailureSpecError):
        failure_probability(rate, seconds)


def test_scaled_iteration_matches_the_docstring_example():
    real = scaled_iteration_s(2.0, 0.05)
    assert real == pytest.approx(40.0)
    assert failure_probability(0.1, real) == pytest.approx(1 - 0.9 ** (40 / 3600))
    assert scaled_iteration_s(3.0, 1.0) == 3.0


@pytest.mark.parametrize("demo_s, scale", [(2.0, 0.0), (2.0, 1.5), (2.0, -0.1), (0.0, 0.5), (-1.0, 0.5)])
def test_scaled_iteration_rejects_out_of_range(demo_s, scale):
    with pytest.raises(FailureSpecError):
        scaled_iteration_s(demo_s, scale)


# --- sampling --------------------------------------------------------------------------------


def test_sampling_is_reproducible_from_the_seed():
    first = sample_failures(0.5, 3600, num_stages=4, iterations=60, seed=7)
    assert first == sample_failures(0.5, 3600, num_stages=4, iterations=60, seed=7)
    assert first != sample_failures(0.5, 3600, num_stages=4, iterations=60, seed=8)
    assert first == sorted(first) and first


def test_sampled_rate_is_close_to_p():
    iterations = 5000
    failures = sample_failures(0.2, 3600, num_stages=3, iterations=iterations, seed=1)
    for stage in (1, 2):
        rate = sum(f.stage == stage for f in failures) / (iterations - 1)
        assert rate == pytest.approx(0.2, abs=0.02)  # ~3.5 standard deviations


def test_sampling_leaves_out_stage_0_and_iteration_0_by_default():
    failures = sample_failures(0.9, 3600, num_stages=4, iterations=200, seed=3)
    assert {f.stage for f in failures} == {1, 2, 3}
    assert min(f.iteration for f in failures) >= 1
    assert max(f.iteration for f in failures) <= 199
    assert {f.replica for f in failures} == {0}


def test_sampling_only_the_stages_asked_for():
    failures = sample_failures(0.9, 3600, num_stages=4, iterations=100, seed=3, stages=[0, 2])
    assert {f.stage for f in failures} == {0, 2}


def test_sampling_rejects_a_stage_that_does_not_exist():
    with pytest.raises(FailureSpecError, match=r"stages \[1, 4\]: each must be in 0..3"):
        sample_failures(0.1, 60, num_stages=4, iterations=10, seed=0, stages=[1, 4])


def test_sampling_honours_min_gap_without_moving_other_draws():
    free = sample_failures(0.5, 3600, num_stages=4, iterations=300, seed=5)
    gapped = sample_failures(0.5, 3600, num_stages=4, iterations=300, seed=5, min_gap=3)
    assert set(gapped) < set(free)
    for stage in (1, 2, 3):
        iterations = [f.iteration for f in gapped if f.stage == stage]
        gaps = [b - a for a, b in zip(iterations, iterations[1:])]
        assert min(gaps) == 4  # blocked for 3 iterations after each failure, then free again
    with pytest.raises(FailureSpecError, match="min_gap"):
        sample_failures(0.5, 3600, num_stages=4, iterations=300, seed=5, min_gap=-1)


def test_sampling_at_rate_zero_or_without_iterations_gives_nothing():
    assert sample_failures(0.0, 3600, num_stages=4, iterations=1000, seed=0) == []
    assert sample_failures(0.9, 3600, num_stages=4, iterations=1, seed=0) == []


# --- due -------------------------------------------------------------------------------------


def test_due_returns_reached_failures_not_done_sorted():
    failures = [Failure(5, 2), Failure(3, 1), Failure(3, 0, 1), Failure(9, 1)]
    assert due(failures, 2, set()) == []
    assert due(failures, 3, set()) == [Failure(3, 0, 1), Failure(3, 1)]
    assert due(failures, 6, {Failure(3, 1)}) == [Failure(3, 0, 1), Failure(5, 2)]
    assert due(failures, 100, set(failures)) == []
