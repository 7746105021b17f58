"""The chaos harness's pure parts: the seeded fault schedule, memory slopes, log line parsing."""
from __future__ import annotations

import json

import pytest

from tests.chaos.procs import LogTail, MemorySample, parse_line, slope_mib_per_hour
from tests.chaos.schedule import ChaosPlan, counts_of, make_schedule


def test_the_schedule_has_every_fault_asked_for_spread_over_the_window():
    plan = ChaosPlan(seed=7, window_s=100.0, warmup_s=10.0, counts={"kill": 3, "freeze": 1, "lossy": 2},
                     durations_s={"freeze": (4.0, 6.0), "lossy": (2.0, 3.0)})
    faults = make_schedule(plan)
    assert counts_of(faults) == {"kill": 3, "freeze": 1, "lossy": 2}
    times = [f.at_s for f in faults]
    assert times == sorted(times) and 10.0 < times[0] and times[-1] < 110.0
    # one fault per slot of 100/6 s, each in the middle of its slot: never two on top of each other
    assert all(b - a > 100.0 / 6 * 0.6 - 1e-9 for a, b in zip(times, times[1:]))
    for f in faults:
        lo, hi = plan.durations_s.get(f.kind, (0.0, 0.0))
        assert (f.duration_s == 0.0) if f.kind == "kill" else lo <= f.duration_s <= hi


def test_the_same_seed_gives_the_same_schedule_and_another_seed_another():
    plan = ChaosPlan(seed=3, window_s=60.0, counts={"kill": 4, "freeze": 2})
    assert make_schedule(plan) == make_schedule(plan)
    assert make_schedule(plan) != make_schedule(ChaosPlan(seed=4, window_s=60.0, counts={"kill": 4, "freeze": 2}))


def test_victims_are_picked_among_the_nodes_eligible_then():
    [fault] = make_schedule(ChaosPlan(seed=1, window_s=10.0, counts={"kill": 1}))
    assert fault.victim([]) is None
    assert fault.victim(["a", "b", "c"]) == ["a", "b", "c"][fault.pick % 3]


def test_a_soak_plan_turns_rates_into_counts():
    plan = ChaosPlan.per_minute(seed=0, minutes=30, rates={"kill": 0.5, "freeze": 0.2}, warmup_s=60.0)
    assert plan.window_s == 30 * 60 - 60
    assert plan.counts == {"kill": 14, "freeze": 6}


@pytest.mark.parametrize("bad", [dict(counts={"meteor": 1}), dict(counts={"kill": -1}), dict(window_s=0),
                                 dict(durations_s={"freeze": (5.0, 1.0)})])
def test_bad_plans_are_refused(bad):
    with pytest.raises(ValueError):
        ChaosPlan(**bad)


def test_memory_slope_is_the_least_squares_fit_after_the_warmup():
    samples = [MemorySample(1000.0 + t, "n", 0, 300.0 + 0.01 * t, 50.0) for t in range(0, 600, 10)]
    assert slope_mib_per_hour(samples, skip_s=60.0) == pytest.approx(36.0)  # 0.01 MiB/s
    assert slope_mib_per_hour(samples, "p2pd_mib") == pytest.approx(0.0)
    assert slope_mib_per_hour(samples[:3], skip_s=60.0) is None


def test_log_lines_are_json_records_or_the_clis_own_lines(tmp_path):
    record = json.dumps({"time": 5.0, "level": "INFO", "logger": "x", "message": "zo step 5 weights ab"})
    assert parse_line(record, 0.0).whole and parse_line(record, 0.0).message == "zo step 5 weights ab"
    assert parse_line("  /ip4/127.0.0.1/tcp/1/p2p/Qm", 0.0).whole
    assert not parse_line('{"time": 5.0, "level": "IN', 0.0).whole  # a torn record
    log = tmp_path / "n.log"
    log.write_text(record + "\n" + record[:20])
    tail = LogTail(log)
    assert [line.message for line in tail.read()] == ["zo step 5 weights ab"] and tail.torn_tail()
    with open(log, "a") as handle:  # the rest of the line arrives: it is read whole, once
        handle.write(record[20:] + "\n")
    assert [line.whole for line in tail.read()] == [True] and not tail.torn_tail()
