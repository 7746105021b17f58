"""The Gantt chart: a bar per task, where the simulator put it, coloured by kind."""
import xml.etree.ElementTree as ET

import pytest

from trainer.pipeline import MicrobatchPath, Schedule, random_skip_schedule, shipped_scenario, simulate
from trainer.pipeline.timeline import COLOURS, timeline_svg

from test_pipeline_simulator import tiny

NS = "{http://www.w3.org/2000/svg}"


def bars(svg):
    root = ET.fromstring(svg)
    return [r for r in root.iter(f"{NS}rect") if r.find(f"{NS}title") is not None]


def test_one_microbatch_bars_sit_at_the_simulated_times():
    s = tiny(["A", "B"], [1, 1])
    r = simulate(s, Schedule({0: 0, 1: 1}, (MicrobatchPath(0, 0, ((1, 1),)),)))
    svg = timeline_svg(r, stage_of_node={0: 0, 1: 1}, labels={0: "A", 1: "B"}, title="tiny")
    found = bars(svg)
    assert len(found) == 5  # node 0: forward, loss, backward; node 1: forward, backward
    scale = 1000 / 14.5  # the time axis is 1000 px for the 14.5 s iteration
    loss = [b for b in found if "loss" in b.find(f"{NS}title").text]
    assert len(loss) == 1 and loss[0].get("fill") == COLOURS["loss"]
    assert float(loss[0].get("x")) == pytest.approx(150 + 6.0 * scale, abs=0.01)
    assert float(loss[0].get("width")) == pytest.approx(0.5 * scale, abs=0.01)
    assert "node 1 · stage 1 · B" in svg and "14.50 s" in svg


def test_every_task_of_a_full_iteration_is_drawn_with_its_kind_colour():
    s = shipped_scenario()
    sched = random_skip_schedule(s, 0)
    r = simulate(s, sched)
    found = bars(timeline_svg(r, stage_of_node=sched.stage_of_node))
    assert len(found) == sum(len(t) for t in r.timelines.values())
    assert {b.get("fill") for b in found} == set(COLOURS.values())
    for b in found:
        kind = b.find(f"{NS}title").text.split()[2]
        assert b.get("fill") == COLOURS[kind]
