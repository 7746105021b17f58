"""`swarmtrain schedule` (node/schedule_cli.py) on the shipped scenario and on bad input."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from node.schedule_cli import main
from trainer.pipeline import MicrobatchPath, Schedule, shipped_scenario, validate_schedule
from trainer.pipeline.scenario import SCENARIO_DIR

REPO = Path(__file__).resolve().parent.parent
SHIPPED = str(SCENARIO_DIR / "skippipe_gcp20.json")
RUN = "import sys; from node.schedule_cli import main; sys.exit(main(sys.argv[1:]))"


def schedule_from_report(report):
    son = {int(n): s for n, s in report["stage_of_node"].items()}
    paths = tuple(
        MicrobatchPath(p["microbatch"], p["data_node"], tuple((son[n], n) for n in p["nodes"][1:-1]))
        for p in report["paths"]
    )
    return Schedule(son, paths)


def test_json_report_on_the_shipped_scenario(tmp_path, capsys):
    svg = tmp_path / "timeline.svg"
    assert main(["schedule", "--scenario", SHIPPED, "--json", "--timeline", str(svg), "--max-evaluations", "400"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("baseline_s", "random_skip_s", "scheduled_s", "ratio_to_baseline", "paths", "stage_of_node"):
        assert key in report
    assert report["ratio_to_baseline"] == pytest.approx(report["scheduled_s"] / report["baseline_s"])
    assert report["ratio_to_baseline"] <= 0.40
    assert all(p["nodes"][0] == p["nodes"][-1] == p["data_node"] for p in report["paths"])
    validate_schedule(shipped_scenario(), schedule_from_report(report))
    assert svg.read_text().startswith("<svg")


def test_subprocess_returns_within_its_time_budget():
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", RUN, "schedule", "--scenario", SHIPPED, "--json", "--time-budget", "8"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - start
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["scheduler"]["wall_s"] <= 8.5
    assert elapsed < 8 + 10  # the baselines and the interpreter start come on top of the search
    validate_schedule(shipped_scenario(), schedule_from_report(report))


@pytest.mark.parametrize("content, args, fragment", [
    (None, [], "cannot read the scenario file"),
    ("{not json", [], "not valid JSON"),
    ('{"name": "x", "nodes": []}', [], "field 'nodes'"),
    ("SHIPPED", ["--time-budget", "0"], "--time-budget must be positive"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, content, args, fragment):
    path = tmp_path / "scenario.json"
    if content == "SHIPPED":
        path = Path(SHIPPED)
    elif content is not None:
        path.write_text(content)
    assert main(["schedule", "--scenario", str(path), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("swarmtrain schedule: error:") and fragment in err


def test_unwritable_timeline_is_exit_1(tmp_path, capsys):
    code = main(["schedule", "--scenario", SHIPPED, "--timeline", str(tmp_path), "--max-evaluations", "5"])
    assert code == 1
    assert "cannot write --timeline" in capsys.readouterr().err
