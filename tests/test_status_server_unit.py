"""The status server's HTTP side in one process, over a reader of constructed records: routes, the
schema, the live stream, Prometheus text, staleness, hostile requests; and the MQTT payloads and
merge rules (node/mqtt_messages.py). The real swarm, browser and broker: test_status_page.py and
test_status_mqtt.py."""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp
import jsonschema
import pytest
from prometheus_client.parser import text_string_to_metric_families

from node.config import ConfigError, Timeouts, load_node_config
from node.membership import derive_members
from node.mqtt_messages import (OFFLINE, MqttUrl, MqttUrlError, PushedUpdates, metrics_topic, open_payload,
                                parse_mqtt_url, seal_metrics, seal_status, status_topic)
from node.status_server import StatusServer, StatusServerError, StatusSettings
from node.swarm_report import RunReading
from protocol.errors import ProtocolError
from protocol.keys import generate_private_key, public_key_bytes
from protocol.messages import Heartbeat, NodeAnnouncement, NodeState, Role
from protocol.runspec import make_spec, run_id

SCHEMA = json.loads((Path(__file__).resolve().parent.parent / "node/status_page/swarm.schema.json").read_text())
SPEC = make_spec("pipeline", "tiny", generate_private_key(), name="unit", stages=2, path_length=2, swap="none")
RUN = run_id(SPEC)
KEYS = [generate_private_key() for _ in range(3)]


def announcement(i: int, stage: int) -> NodeAnnouncement:
    return NodeAnnouncement(peer_id=f"peer{i}", public_name=f"n{i}", role=Role.DATA if stage == 0 else Role.STAGE,
                            stage=stage, expert=None, device="cpu", throughput=10.0, version="0.1.0",
                            state=NodeState.ONLINE, maddrs=["/ip4/127.0.0.1/tcp/1"])


class FakeSwarm:
    """Three nodes heartbeating now; ``silent_s[i]``: node i's heartbeat is that old."""

    def __init__(self) -> None:
        self.started = time.time()
        self.silent_s = {i: 0.0 for i in range(3)}
        self.fail = False

    async def read(self) -> list[RunReading]:
        if self.fail:
            raise OSError("the DHT is gone")
        now = time.time()
        announcements = {public_key_bytes(k): (self.started, announcement(i, min(i, 1))) for i, k in enumerate(KEYS)}
        heartbeats = {public_key_bytes(k): (now - self.silent_s[i], Heartbeat(NodeState.ONLINE, 3, {"iteration": 3.0, "loss": 2.0}))
                      for i, k in enumerate(KEYS)}
        return [RunReading(RUN, SPEC, derive_members(announcements, heartbeats, now, 2.0))]


def settings(port: int = 0) -> StatusSettings:
    return StatusSettings("127.0.0.1", port, 0.2, Timeouts(heartbeat_interval_s=0.2, heartbeat_ttl_s=0.5, rpc_s=2.0))


async def with_server(body, fake: FakeSwarm | None = None) -> None:
    fake = fake or FakeSwarm()
    server = StatusServer(fake.read, settings())
    url = await server.start()
    stop = asyncio.Event()
    running = asyncio.create_task(server.run(stop))
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            await body(server, url, http, fake)
    finally:
        stop.set()
        await asyncio.wait_for(running, 10)


async def until(predicate, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError("timed out")


def test_routes_schema_metrics_and_health():
    async def body(server, url, http, fake):
        async def ready():
            async with http.get(url + "healthz") as r:
                return r.status == 200
        await until(ready)
        async with http.get(url + "api/v1/swarm") as r:
            assert r.status == 200 and r.headers["Cache-Control"] == "no-store"
            report = await r.json()
        jsonschema.validate(report, SCHEMA)
        assert sorted(n["public_name"] for n in report["nodes"]) == ["n0", "n1", "n2"]
        assert report["headline"]["state"] == "healthy"
        async with http.get(url + "metrics") as r:
            families = {f.name: f for f in text_string_to_metric_families(await r.text())}
        online = [s for s in families["swarmtrain_nodes"].samples if s.labels["state"] == "ONLINE"]
        assert [s.value for s in online] == [3.0]
        assert {s.labels["stage"]: s.value for s in families["swarmtrain_stage_replicas"].samples
                if s.labels["state"] == "online"} == {"0": 1.0, "1": 2.0}
        async with http.get(url) as r:
            page = await r.text()
            assert "default-src 'self'" in r.headers["Content-Security-Policy"]
        for script in ("/static/app.js", "/static/charts.js", "/static/style.css"):
            assert script in page
            async with http.get(url + script.lstrip("/")) as r:
                assert r.status == 200
        # nothing on the page comes from elsewhere
        for name in ("index.html", "app.js", "charts.js", "style.css"):
            text = (Path(__file__).resolve().parent.parent / "node/status_page" / name).read_text()
            assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text
        for bad in ("static/..%2Fstatus.py", "static/index.html.bak", "static/..%2F..%2Fetc%2Fpasswd", "api/v2/swarm"):
            async with http.get(url + bad) as r:
                assert r.status == 404, bad
        async with http.post(url + "api/v1/swarm", data=b"x" * 4096) as r:
            assert r.status in (405, 413)

    asyncio.run(with_server(body))


def test_live_stream_sends_the_report_then_a_membership_change():
    async def body(server, url, http, fake):
        async with http.get(url + "api/v1/events") as stream:
            assert stream.headers["Content-Type"].startswith("text/event-stream")
            seen = []

            async def next_event():
                name = None
                async for raw in stream.content:
                    line = raw.decode().rstrip("\n")
                    if line.startswith("event: "):
                        name = line[7:]
                    elif line.startswith("data: "):
                        return name, json.loads(line[6:])

            name, first = await asyncio.wait_for(next_event(), 5)
            assert name == "swarm" and "series" in first
            # let two readings pass with everyone alive, then stop node 2's heartbeats
            await asyncio.sleep(0.5)
            fake.silent_s[2] = 10.0

            async def dead():
                while True:
                    name, data = await next_event()
                    seen.append(name)
                    if name == "membership":
                        return data
            change = await asyncio.wait_for(dead(), 5)
            assert change["event"] == "dead" and change["subject"] == public_key_bytes(KEYS[2]).hex()
            assert "tick" in seen or "swarm" in seen

    asyncio.run(with_server(body))


def test_stale_when_the_swarm_stops_answering_and_the_stream_ends_on_stop():
    async def body(server, url, http, fake):
        async def ready():
            async with http.get(url + "healthz") as r:
                return r.status == 200
        await until(ready)
        fake.fail = True

        async def unhealthy():
            async with http.get(url + "healthz") as r:
                return (await r.json()) if r.status == 503 else None
        health = await until(unhealthy)
        assert health["stale"] is True and "the DHT is gone" in health["read_error"]
        async with http.get(url + "api/v1/swarm") as r:
            report = await r.json()
        assert report["stale"] is True and [n["public_name"] for n in report["nodes"]]  # the last good data stays

    asyncio.run(with_server(body))


def test_a_taken_port_is_a_clear_error():
    async def body(server, url, http, fake):
        other = StatusServer(FakeSwarm().read, settings(int(url.rsplit(":", 1)[1].strip("/"))))
        with pytest.raises(StatusServerError, match="cannot listen on 127.0.0.1"):
            await other.start()

    asyncio.run(with_server(body))


# ---- MQTT payloads and merging --------------------------------------------------------------


def test_mqtt_urls():
    assert parse_mqtt_url("mqtt://127.0.0.1:1884") == MqttUrl("127.0.0.1", 1884)
    assert parse_mqtt_url("mqtt://broker") == MqttUrl("broker", 1883)
    url = parse_mqtt_url("mqtt://me:s%40cret@broker:1")
    assert (url.username, url.password) == ("me", "s@cret") and "s@cret" not in str(url)
    for bad in ("http://x:1", "mqtt://", "mqtt://h:99999", "mqtt://h:1/path", "mqtts://h", "mqtt://h:0", "h:1"):
        with pytest.raises(MqttUrlError):
            parse_mqtt_url(bad)
    with pytest.raises(ConfigError, match="--mqtt"):
        load_node_config({"mqtt": "tcp://x"}, env={})
    with pytest.raises(ConfigError, match="--status-port"):
        load_node_config({"status_port": 70000}, env={})


def test_payloads_verify_against_their_topic():
    key, node = KEYS[0], public_key_bytes(KEYS[0]).hex()
    now = time.time()
    status = seal_status(key, RUN, announcement(0, 0), "ONLINE", 1, session=now - 5)
    item = open_payload(status_topic(RUN, node), status, now)
    assert (item.state, item.session, item.announcement.public_name) == ("ONLINE", now - 5, "n0")
    beat = seal_metrics(key, RUN, Heartbeat(NodeState.ONLINE, 7, {"loss": 1.5}), 2)
    assert open_payload(metrics_topic(RUN, node), beat, now).heartbeat.metrics == {"loss": 1.5}
    other = public_key_bytes(KEYS[1]).hex()
    for topic, payload in ((status_topic(RUN, other), status),  # signed by another node than the topic names
                           (metrics_topic(RUN, node), status),  # a status on the metrics topic
                           (status_topic(bytes(16), node), status),  # another run
                           (status_topic(RUN, node), status[:-1] + bytes([status[-1] ^ 1])),  # tampered
                           ("swarmtrain/x/y/status", status), (status_topic(RUN, node), b"\x00" * 10)):
        with pytest.raises(ProtocolError):
            open_payload(topic, payload, now)


def test_pushed_heartbeats_merge_only_when_newer_and_a_will_marks_dead():
    pushed = PushedUpdates()
    me = public_key_bytes(KEYS[0])
    t = time.time()
    session = t - 100

    def take(state=None, at=t, beat=None, sess=session, received=None):
        payload = (seal_metrics(KEYS[0], RUN, beat, 1, timestamp=at) if beat is not None else
                   seal_status(KEYS[0], RUN, announcement(0, 0), state, 1, session=sess, timestamp=at))
        topic = (metrics_topic if beat is not None else status_topic)(RUN, me.hex())
        return pushed.take(open_payload(topic, payload, t), received or at)

    assert take(beat=Heartbeat(NodeState.ONLINE, 5, {"loss": 1.0}), at=t - 1)
    assert not take(beat=Heartbeat(NodeState.ONLINE, 4, {}), at=t - 2)  # older: ignored
    dht = {me: (t - 3, Heartbeat(NodeState.ONLINE, 3, {}))}
    assert pushed.merge_heartbeats(RUN, dht)[me][1].step == 5
    assert pushed.merge_heartbeats(RUN, {me: (t, Heartbeat(NodeState.ONLINE, 9, {}))})[me][1].step == 9
    assert take("ONLINE", at=t - 1)
    # the will was signed when the connection began; it still counts for that connection
    assert take(OFFLINE, at=session, received=t)
    announcements = {me: (t - 50, announcement(0, 0))}
    members = derive_members(announcements, {me: (t - 1, Heartbeat(NodeState.ONLINE, 5, {}))}, t, 60.0)
    merged = pushed.apply_offline(RUN, members)
    assert merged[me].state == "DEAD" and "last will" in merged[me].dead_reason
    # a newer signed record (the node came back) wins over the will
    later = derive_members(announcements, {me: (t + 1, Heartbeat(NodeState.ONLINE, 6, {}))}, t + 1, 60.0)
    assert pushed.apply_offline(RUN, later)[me].state == "ONLINE"
    # an older connection's will, replayed, does not count
    assert take("ONLINE", at=t + 2, sess=t + 1)
    assert not take(OFFLINE, at=session, sess=session, received=t + 3)


@pytest.mark.parametrize("args, says", [
    (("status", "--initial-peers", "/ip4/127.0.0.1/tcp/1", "--serve", "70000"), "--serve 70000 is outside 0..65535"),
    (("status", "--initial-peers", "/ip4/127.0.0.1/tcp/1", "--serve", "0", "--json"), "choose one"),
    (("status", "--initial-peers", "/ip4/127.0.0.1/tcp/1", "--mqtt", "mqtt://h:1"), "--mqtt applies to --serve"),
    (("status", "--initial-peers", "/ip4/127.0.0.1/tcp/1", "--serve", "0", "--mqtt", "http://h"), "scheme must be mqtt"),
    (("status", "--serve", "0"), "--initial-peers"),
    (("node", "--run", "missing.toml", "--status-port", "70000"), "--status-port 70000 is outside"),
    (("node", "--run", "missing.toml", "--mqtt", "mqtt://"), "names no host"),
    (("node", "--run", "missing.toml", "--status-host", " "), "--status-host is empty"),
])
def test_bad_status_flags_are_one_line_errors(args, says, capsys, monkeypatch, tmp_path):
    from node.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(list(args)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err, err
