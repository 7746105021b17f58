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
