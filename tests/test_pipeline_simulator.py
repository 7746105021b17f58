"""The iteration simulator on small cases whose times are derived by hand.

Every case uses round numbers: forward = 0.125 s/layer/sample * 1 layer * 8 samples = 1.0 s,
backward = 2.0 * forward = 2.0 s, loss = 0.5 * forward = 0.5 s. One microbatch's activations are
8 samples * 2**27 bytes = 1 GiB, so a link between locations A and B (500 ms, 1 GiB/s) costs
0.5 + 1.0 + 0.5 overhead = 2.0 s; within a location (0 ms, 2 GiB/s) it costs 0 + 0.5 + 0.5 = 1.0 s.
"""
import pytest

from trainer.pipeline import MicrobatchPath, Schedule, ScheduleError, SimulationError, TimelineEntry, simulate
from trainer.pipeline import validate_schedule
from trainer.pipeline.scenario import scenario_from_dict


def tiny(locations, stage_sizes, memory=3, path_length=None, speeds=None, per_data_node=1, secs=None):
    nodes = []
    for i, loc in enumerate(locations):
        node = {"id": i, "location": loc, "sec_per_layer_sample": secs[i] if secs else 0.125}
        if speeds and speeds[i] != 1.0:
            node["speed"] = speeds[i]
        nodes.append(node)
    return scenario_from_dict({
        "name": "tiny", "nodes": nodes,
        "links": {"A-B": {"latency_ms": 500, "bandwidth_GiBps": 1.0}},
        "same_location_link": {"latency_ms": 0, "bandwidth_GiBps": 2.0},
        "link_overhead_s": 0.5, "stage_sizes": stage_sizes, "layers_per_stage": 1,
        "microbatches_per_data_node": per_data_node, "samples_per_microbatch": 8,
        "activation_bytes_per_sample": 2**27, "memory_microbatches_per_node": memory,
        "path_length": path_length or len(stage_sizes), "backward_factor": 2.0, "loss_factor": 0.5,
    })


def test_one_microbatch_two_nodes():
    s = tiny(["A", "B"], [1, 1])
    sched = Schedule({0: 0, 1: 1}, (MicrobatchPath(0, 0, ((1, 1),)),))
    validate_schedule(s, sched)
    r = simulate(s, sched)
    # F@0 [0,1] -2s-> F@1 [3,4] -2s-> loss@0 [6,6.5] -2s-> B@1 [8.5,10.5] -2s-> B@0 [12.5,14.5]
    assert r.iteration_time == pytest.approx(14.5)
    assert r.timelines[0] == [
        TimelineEntry(0.0, 1.0, "forward", 0), TimelineEntry(6.0, 6.5, "loss", 0), TimelineEntry(12.5, 14.5, "backward", 0)
    ]
    assert r.timelines[1] == [TimelineEntry(3.0, 4.0, "forward", 0), TimelineEntry(8.5, 10.5, "backward", 0)]


def test_memory_limit_serialises_microbatches():
    # Memory 1: microbatch 1 cannot start its forward on node 0 until microbatch 0's backward
    # there ends at 14.5, then repeats the same 14.5 s: 29.0.
    s = tiny(["A", "B"], [1, 1], memory=1, per_data_node=2)
    paths = (MicrobatchPath(0, 0, ((1, 1),)), MicrobatchPath(1, 0, ((1, 1),)))
    r = simulate(s, Schedule({0: 0, 1: 1}, paths))
    assert r.iteration_time == pytest.approx(29.0)
    assert r.peak_memory == {0: 1, 1: 1}


def test_two_microbatches_queue_fifo():
    # Memory 2. mb0 F@0 [0,1], mb1 F@0 [1,2]; mb0 F@1 [3,4], mb1 arrives 4: F@1 [4,5];
    # loss@0: mb0 [6,6.5], mb1 [7,7.5]; B@1: mb0 arrives 8.5 [8.5,10.5], mb1 arrives 9.5 and
    # waits [10.5,12.5]; B@0: mb0 arrives 12.5 [12.5,14.5], mb1 arrives 14.5 [14.5,16.5].
    s = tiny(["A", "B"], [1, 1], memory=2, per_data_node=2)
    paths = (MicrobatchPath(0, 0, ((1, 1),)), MicrobatchPath(1, 0, ((1, 1),)))
    r = simulate(s, Schedule({0: 0, 1: 1}, paths))
    assert r.iteration_time == pytest.approx(16.5)
    assert [(e.start, e.microbatch) for e in r.timelines[1]] == [(3.0, 0), (4.0, 1), (8.5, 0), (10.5, 1)]


def test_speed_and_same_location_link():
    # Node 1 shares location A with data node 0 (link 1.0 s) and runs twice as fast
    # (forward 0.5, backward 1.0); node 2 is in B (links 2.0 s).
    # F@0 [0,1] -1-> F@1 [2,2.5] -2-> F@2 [4.5,5.5] -2-> loss@0 [7.5,8] -2-> B@2 [10,12]
    # -2-> B@1 [14,15] -1-> B@0 [16,18]
    s = tiny(["A", "A", "B"], [1, 1, 1], speeds=[1.0, 2.0, 1.0])
    sched = Schedule({0: 0, 1: 1, 2: 2}, (MicrobatchPath(0, 0, ((1, 1), (2, 2))),))
    validate_schedule(s, sched)
    assert simulate(s, sched).iteration_time == pytest.approx(18.0)


def test_node_serves_first_arrived_first():
    # Data nodes 0 and 1 (A), stage-1 node 2 (B), memory 3. mb0 (from 0) and mb1 (from 1) both
    # arrive at node 2 at 3.0: mb0 F [3,4], mb1 F [4,5]. mb0's gradient returns at
    # 4 -2-> loss@0 [6,6.5] -2-> 8.5; mb2 (node 0's second microbatch, F@0 [1,2]) arrives at
    # 2+2 = 4 and runs F [5,6]. Then node 2 is idle until 8.5: mb0 B [8.5,10.5]. mb1's gradient:
    # 5 -2-> loss@1 [7,7.5] -2-> 9.5; mb2's: 6 -2-> loss@0 [8,8.5] -2-> 10.5. At 10.5 mb1
    # (arrived 9.5) runs B [10.5,12.5] before mb2, then mb2 B [12.5,14.5] -2-> B@0 [16.5,18.5].
    s = tiny(["A", "A", "B"], [2, 1], per_data_node=2)
    paths = (
        MicrobatchPath(0, 0, ((1, 2),)), MicrobatchPath(1, 1, ((1, 2),)), MicrobatchPath(2, 0, ((1, 2),)),
    )
    r = simulate(s, Schedule({0: 0, 1: 0, 2: 1}, paths))
    kinds = [(e.start, e.kind, e.microbatch) for e in r.timelines[2]]
    assert kinds == [(3.0, "forward", 0), (4.0, "forward", 1), (5.0, "forward", 2),
                     (8.5, "backward", 0), (10.5, "backward", 1), (12.5, "backward", 2)]
    assert r.iteration_time == pytest.approx(18.5)


def test_backward_goes_before_forward_on_equal_arrival():
    # Data node 0 is slow (0.8125 s/layer/sample: forward 6.5, loss 3.25, backward 13.0).
    # mb1 (from fast node 1): F@1 [0,1] -2-> F@2 [3,4] -2-> loss@1 [6,6.5] -2-> gradient at node 2
    # at 8.5. mb0: F@0 [0,6.5] -2-> forward at node 2 also at 8.5. Backward first despite the
    # larger id: mb1 B@2 [8.5,10.5], mb0 F@2 [10.5,11.5] -2-> loss@0 [13.5,16.75] -2-> B@2
    # [18.75,20.75] -2-> B@0 [22.75,35.75].
    s = tiny(["A", "A", "B"], [2, 1], secs=[0.8125, 0.125, 0.125])
    paths = (MicrobatchPath(0, 0, ((1, 2),)), MicrobatchPath(1, 1, ((1, 2),)))
    r = simulate(s, Schedule({0: 0, 1: 0, 2: 1}, paths))
    assert [(e.start, e.kind, e.microbatch) for e in r.timelines[2]] == [
        (3.0, "forward", 1), (8.5, "backward", 1), (10.5, "forward", 0), (18.75, "backward", 0)
    ]
    assert r.iteration_time == pytest.approx(35.75)


def test_reordered_paths_deadlock_on_memory():
    # Memory 1: mb0 holds node 2 and wants node 3, mb1 (stages swapped) holds node 3 and wants 2.
    s = tiny(["A", "A", "B", "B"], [2, 1, 1], memory=1)
    paths = (MicrobatchPath(0, 0, ((1, 2), (2, 3))), MicrobatchPath(1, 1, ((2, 3), (1, 2))))
    sched = Schedule({0: 0, 1: 0, 2: 1, 3: 2}, paths)
    with pytest.raises(SimulationError, match="deadlock"):
        simulate(s, sched)
    with pytest.raises(ScheduleError, match="deadlock"):
        validate_schedule(s, sched)


def test_deterministic():
    s = tiny(["A", "A", "B", "B"], [2, 1, 1], memory=2, per_data_node=2)
    paths = tuple(MicrobatchPath(i, i % 2, ((1, 2), (2, 3))) for i in range(4))
    sched = Schedule({0: 0, 1: 0, 2: 1, 3: 2}, paths)
    assert simulate(s, sched) == simulate(s, sched)


def test_reordered_path_with_slow_data_node():
    # Data node 0 (A) runs at half speed (forward 2, loss 1, backward 4); stage-1 node 1 (B) at
    # 1; stage-2 node 2 (A) at 2 (forward 0.5, backward 1). The path swaps the stages: 0 -> 2 -> 1.
    # F@0 [0,2] -1-> F@2 [3,3.5] -2-> F@1 [5.5,6.5] -2-> loss@0 [8.5,9.5] -2-> B@1 [11.5,13.5]
    # -2-> B@2 [15.5,16.5] -1-> B@0 [17.5,21.5]
    s = tiny(["A", "B", "A"], [1, 1, 1], speeds=[0.5, 1.0, 2.0])
    sched = Schedule({0: 0, 1: 1, 2: 2}, (MicrobatchPath(0, 0, ((2, 2), (1, 1))),))
    validate_schedule(s, sched)
    r = simulate(s, sched)
    assert r.iteration_time == pytest.approx(21.5)
    assert [(e.start, e.end, e.kind) for e in r.timelines[2]] == [(3.0, 3.5, "forward"), (15.5, 16.5, "backward")]
