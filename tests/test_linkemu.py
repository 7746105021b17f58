"""Link emulation: the file, the link arithmetic and the queueing on one link."""
from __future__ import annotations

import json

import pytest

from node.config import ConfigError
from node.linkemu import LinkEmulationError, LinkShaper, emulation_from_dict, load_emulation
from trainer.pipeline.scenario import shipped_scenario

GCP = shipped_scenario()


def emulation(**overrides):
    raw = {"scenario": "skippipe_gcp20", "time_scale": 0.1, "bytes_scale": 0.01,
           "locations": {"a": "Belgium", "b": "Australia", "c": "Belgium"}}
    raw.update(overrides)
    return emulation_from_dict(raw)


def test_links_are_the_scenarios_scaled():
    e = emulation()
    link = e.link("Belgium", "Australia")
    source = GCP.link("Belgium", "Australia")
    assert link.latency_s == pytest.approx((source.latency_ms / 1000 + GCP.link_overhead_s) * 0.1)
    assert link.bytes_per_s == pytest.approx(source.bandwidth_GiBps * 2**30 * 0.01 / 0.1)
    # a local message of bytes_scale x N bytes takes time_scale x the scenario's time for N bytes
    n = GCP.activation_bytes_per_sample * GCP.samples_per_microbatch
    scenario_s = source.latency_ms / 1000 + n / (source.bandwidth_GiBps * 2**30) + GCP.link_overhead_s
    assert link.seconds(int(n * 0.01)) == pytest.approx(0.1 * scenario_s, rel=1e-6)
    same = e.link("Belgium", "Belgium")
    assert same.latency_s == pytest.approx((GCP.same_location_link.latency_ms / 1000 + GCP.link_overhead_s) * 0.1)


def test_messages_to_one_peer_queue_on_its_link():
    e = emulation()
    names = {"peer-b": "b", "peer-c": "c"}
    shaper = LinkShaper(e, "a", names.get)
    link = e.link("Belgium", "Australia")
    nbytes = int(link.bytes_per_s)  # one second on the wire
    first = shaper.hold_s("peer-b", nbytes, now=100.0)
    second = shaper.hold_s("peer-b", nbytes, now=100.0)  # sent at once: waits for the first to leave
    assert first == pytest.approx(1.0 + link.latency_s)
    assert second == pytest.approx(2.0 + link.latency_s)
    # another peer's link is free; a later message finds the link idle again
    assert shaper.hold_s("peer-c", 100, now=100.0) == pytest.approx(e.link("Belgium", "Belgium").seconds(100))
    assert shaper.hold_s("peer-b", nbytes, now=200.0) == pytest.approx(first)
    # strangers, and a node without a location, are not delayed
    assert shaper.hold_s("peer-x", nbytes, now=300.0) == 0.0
    assert LinkShaper(e, "unlisted", names.get).hold_s("peer-b", nbytes, now=0.0) == 0.0


@pytest.mark.parametrize("change, message", [
    ({"scenario": "nope"}, "scenario 'nope'"),
    ({"scenario": 3}, "scenario must name"),
    ({"time_scale": 0}, "time_scale must be a positive number"),
    ({"bytes_scale": float("nan")}, "bytes_scale must be a positive number"),
    ({"locations": {"a": "Atlantis"}}, "'Atlantis' is not a location"),
    ({"locations": ["a"]}, "locations must map"),
    ({"extra": 1}, "unknown field"),
])
def test_bad_files_are_refused_with_the_field_named(change, message):
    with pytest.raises(LinkEmulationError, match=message):
        emulation(**change)


def test_load_errors_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_emulation(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_emulation(tmp_path / "bad.json")
    (tmp_path / "ok.json").write_text(json.dumps({"scenario": "skippipe_gcp20", "locations": {"x": "Canada"}}))
    assert load_emulation(tmp_path / "ok.json").locations == {"x": "Canada"}


# ---- link faults (chaos tests) -----------------------------------------------------------------

import asyncio  # noqa: E402

from node.linkemu import LinkDropped, LinkFaults, LinkRefused, fault_rules_from_dict  # noqa: E402


def faults_file(tmp_path, body) -> "Path":
    path = tmp_path / "faults.json"
    path.write_text(json.dumps(body))
    return path


NAMES = {"peer-a": "a", "peer-b": "b", "peer-c": "c"}


def test_a_partition_cuts_links_between_groups_only(tmp_path):
    path = faults_file(tmp_path, {"partition": [["a", "b"]]})
    a = LinkFaults(path, "a", NAMES.get)
    c = LinkFaults(path, "c", NAMES.get)
    assert not a.refuses("peer-b") and a.refuses("peer-c")  # c is in the group of the unlisted
    assert c.refuses("peer-a") and not c.refuses("peer-unknown")
    with pytest.raises(LinkRefused):
        asyncio.run(a.before_send("peer-c"))


def test_the_file_is_reread_when_it_changes_and_a_bad_rewrite_keeps_the_rules(tmp_path):
    path = faults_file(tmp_path, {})
    a = LinkFaults(path, "a", NAMES.get)
    assert not a.refuses("peer-b")
    path.write_text(json.dumps({"partition": [["a"]], "seed": 1}))
    assert a.refuses("peer-b")
    path.write_text("{not json")
    assert a.refuses("peer-b")  # the previous rules stay
    path.unlink()  # no file: healed
    assert not a.refuses("peer-b")


def test_drops_follow_the_seeded_probability_and_delays_are_waited(tmp_path):
    path = faults_file(tmp_path, {"seed": 5, "nodes": {"a": {"drop": 0.3}, "b": {"delay_s": 0.05, "jitter_s": 0.02}}})

    async def send(faults, n):
        dropped = 0
        for _ in range(n):
            try:
                await faults.before_send("peer-c")
            except LinkDropped:
                dropped += 1
        return dropped

    a = LinkFaults(path, "a", NAMES.get)
    dropped = asyncio.run(send(a, 1000))
    assert 240 < dropped < 360 and a.dropped == dropped
    assert asyncio.run(send(LinkFaults(path, "a", NAMES.get), 1000)) == dropped  # the same seed, the same drops
    b = LinkFaults(path, "b", NAMES.get)
    began = asyncio.run(_timed(b))
    assert 0.05 * 5 <= began < 0.07 * 5 + 0.5 and asyncio.run(send(b, 50)) == 0


async def _timed(faults) -> float:
    loop = asyncio.get_running_loop()
    t = loop.time()
    for _ in range(5):
        await faults.before_send("peer-c")
    return loop.time() - t


@pytest.mark.parametrize("body, message", [
    ({"drop": 1.5}, "drop must be a number in"),
    ({"nodes": {"a": {"delay_s": -1}}}, "delay_s must be a number"),
    ({"partition": [["a"], ["a", "b"]]}, "more than one partition group"),
    ({"partition": "a"}, "partition must be a list"),
    ({"seed": "x"}, "seed must be an integer"),
    ({"nodes": {"a": {"lag": 1}}}, "unknown field"),
])
def test_bad_fault_files_are_refused_at_start(tmp_path, body, message):
    with pytest.raises(LinkEmulationError, match=message):
        fault_rules_from_dict(body)
    with pytest.raises(ConfigError, match=message):
        LinkFaults(faults_file(tmp_path, body), "a", NAMES.get)
