"""The demo's and benchmarks' failure injector: which process a scheduled failure kills (pure logic:
processes stand in as logs and a kill switch)."""
from __future__ import annotations

from node.pipeline_demo import FailureInjector
from trainer.recovery.failures import Failure


class FakePopen:
    def __init__(self) -> None:
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode

    def kill(self) -> None:
        self.returncode = -9


class FakeProc:
    def __init__(self, name: str, log: str) -> None:
        self.name, self.log, self.popen = name, log, FakePopen()

    def text(self) -> str:
        return self.log


def test_a_second_failure_of_a_stage_kills_the_node_that_took_it_after_the_first():
    data = FakeProc("stage0-0", "role: data stage 0 — requested the data role\npipeline iteration 4 done, weights ab\n")
    first = FakeProc("stage2-2", "role: stage stage 2 — requested stage 2\n")
    spare = FakeProc("spare0", "role: spare — requested spare\n")
    injector = FailureInjector([Failure(5, 2), Failure(31, 2)], [data, first, spare])
    injector.poll()
    assert first.popen.poll() == -9 and [k["node"] for k in injector.kills] == ["stage2-2"]
    # the spare rebuilt stage 2; the run reaches iteration 31
    spare.log += "role: stage stage 2 — took lost stage 2 by checkfree\n"
    data.log += "pipeline iteration 30 done, weights cd\n"
    injector.poll()
    assert spare.popen.poll() == -9
    assert [(k["stage"], k["node"]) for k in injector.kills] == [(2, "stage2-2"), (2, "spare0")]
    assert not injector.pending


def test_a_failure_with_no_live_replica_to_kill_is_noted_not_skipped_silently():
    data = FakeProc("stage0-0", "role: data stage 0 — requested the data role\npipeline iteration 9 done, weights ab\n")
    only = FakeProc("stage1-1", "role: stage stage 1 — requested stage 1\n")
    only.popen.kill()  # it died before the schedule reached it
    injector = FailureInjector([Failure(3, 1)], [data, only])
    injector.poll()
    [kill] = injector.kills
    assert kill["node"] is None and "no replica 0 of stage 1" in kill["note"]


def test_failures_due_at_once_name_the_replicas_as_they_were():
    data = FakeProc("stage0-0", "role: data stage 0 — requested the data role\npipeline iteration 4 done, weights ab\n")
    first = FakeProc("stage1-1", "role: stage stage 1 — requested stage 1\n")
    second = FakeProc("stage1-4", "role: stage stage 1 — requested stage 1\n")
    injector = FailureInjector([Failure(4, 1, 0), Failure(4, 1, 1)], [data, first, second])
    injector.poll()
    assert first.popen.poll() == -9 and second.popen.poll() == -9
    assert [k["node"] for k in injector.kills] == ["stage1-1", "stage1-4"]


def test_the_demo_summary_names_the_stage_whose_replicas_ended_apart():
    from node.pipeline_demo import summarize_pipeline

    def report(process, stage, hashes):
        return {"process": process, "stage": stage, "hashes": hashes, "iterations": len(hashes), "rerouted": 0,
                "losses": [[0, 0.0, 5.0], [1, 1.0, 4.0]] if stage == 0 else [], "tokens": 10, "seconds": 1.0}

    same = [[0, "aa" * 32], [1, "bb" * 32]]
    reports = [report("node0", 0, same), report("node3", 0, same), report("node1", 1, same),
               report("node4", 1, [[0, "aa" * 32], [1, "cc" * 32]]), report("node2", 2, same)]
    summary = summarize_pipeline(reports, 3)
    assert not summary["replicas_identical"]
    assert summary["replicas_differ"] == {"1": {"node1": [1, "bb" * 8], "node4": [1, "cc" * 8]}}
    reports[3]["hashes"] = same
    summary = summarize_pipeline(reports, 3)
    assert summary["replicas_identical"] and summary["replicas_differ"] == {}
