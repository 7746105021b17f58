"""MQTT telemetry against a real mosquitto that the test starts on 127.0.0.1 (a free port, its own
config): two `swarmtrain node --mqtt` processes and a `swarmtrain status --serve --mqtt` server.

Each node's retained status and its metrics arrive and verify against the node's key; after
kill -9 the broker fires the node's last-will (OFFLINE, signed by the node) and the status server
marks the node dead long before its heartbeat (30 s here) would expire; a SIGTERM leaves a
retained LEAVING. The nodes wait for more nodes than ever join, so nothing trains.
"""
from __future__ import annotations

import signal
import threading
import time

import pytest

from node.mqtt_messages import OFFLINE, open_payload, parse_mqtt_url
from node.pipeline_demo import write_pipeline_spec
from protocol.errors import ProtocolError
from tests.harness import Cluster
from tests.status_harness import get_json, missing_mosquitto, mosquitto, status_url, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

TTL_S = 30.0  # long: a death seen within seconds can only have come from the last-will


class Listener:
    """A plain MQTT subscriber (paho, its own thread) that verifies every payload it gets."""

    def __init__(self, url: str) -> None:
        import paho.mqtt.client as mqtt

        broker = parse_mqtt_url(url)
        self.received: list[tuple[str, bool, object]] = []  # (topic, retained, Pushed or the ProtocolError)
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="status-test-listener")
        self.client.on_message = self._on_message
        self.client.on_connect = lambda client, *_: client.subscribe("swarmtrain/#", qos=1)
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()

    def _on_message(self, client, userdata, message) -> None:
        try:
            item: object = open_payload(message.topic, bytes(message.payload), time.time())
        except ProtocolError as error:
            item = error
        with self.lock:
            self.received.append((message.topic, bool(message.retain), item))

    def of(self, node_id: str, what: str) -> list:
        with self.lock:
            return [(retained, item) for topic, retained, item in self.received if topic.endswith(f"{node_id}/{what}")]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture(scope="module")
def telemetry(tmp_path_factory):
    reason = missing_mosquitto()
    if reason:
        pytest.skip(reason)
    workdir = tmp_path_factory.mktemp("status-mqtt")
    cluster = Cluster(workdir)
    try:
        with mosquitto(workdir) as broker:
            spec = write_pipeline_spec(workdir, 2, 1000, 10, name="mqtt-test", heartbeat_interval_s=1.0,
                                       heartbeat_ttl_s=TTL_S)
            _, bootstrap = cluster.bootstrap()
            nodes = {}
            for name, role in (("m0", ["--role", "data"]), ("m1", ["--stage", "1"])):
                nodes[name] = cluster.start(name, "node", "--run", str(spec), "--initial-peers", bootstrap, "--data-dir",
                                            f"d-{name}", "--public-name", name, "--host-maddrs", "/ip4/127.0.0.1/tcp/0",
                                            "--device", "cpu", "--mqtt", broker, *role)
            status = cluster.start("status", "status", "--initial-peers", bootstrap, "--serve", "0", "--mqtt", broker)
            url = status_url(status)

            def online():
                found = {n["public_name"]: n for n in get_json(url + "api/v1/swarm")["nodes"]}
                return found if {k: n["state"] for k, n in found.items()} == {"m0": "ONLINE", "m1": "ONLINE"} else None

            found = wait_for(online, 90, "both nodes ONLINE on the status server")
            yield {"broker": broker, "url": url, "nodes": nodes, "ids": {k: n["id"] for k, n in found.items()},
                   "status": status}
    finally:
        leftover = cluster.close()
        assert leftover == [], f"p2pd processes outlived their nodes: {leftover}"


def test_every_node_publishes_a_verified_status_and_metrics(telemetry):
    listener = Listener(telemetry["broker"])
    try:
        for name, node_id in telemetry["ids"].items():
            statuses = wait_for(lambda: listener.of(node_id, "status") or None, 30, f"{name}'s status")
            metrics = wait_for(lambda: listener.of(node_id, "metrics") or None, 30, f"{name}'s metrics")
            _, status = statuses[-1]
            assert not isinstance(status, ProtocolError), status
            assert status.sender.hex() == node_id and status.state == "ONLINE"
            assert status.announcement.public_name == name
            _, beat = metrics[-1]
            assert not isinstance(beat, ProtocolError), beat
            assert beat.heartbeat.state.value == "ONLINE"
    finally:
        listener.close()
    # once published, a status is the broker's retained copy: a subscriber that comes later gets it at once
    late = Listener(telemetry["broker"])
    try:
        for name, node_id in telemetry["ids"].items():
            retained = wait_for(lambda: [s for kept, s in late.of(node_id, "status") if kept] or None, 10,
                                f"{name}'s retained status")
            assert retained[0].sender.hex() == node_id and retained[0].state == "ONLINE"
    finally:
        late.close()


def test_kill_9_fires_the_last_will_and_the_status_server_merges_it(telemetry):
    listener = Listener(telemetry["broker"])
    victim = telemetry["ids"]["m1"]
    try:
        wait_for(lambda: listener.of(victim, "status") or None, 20, "the victim's retained status")
        telemetry["nodes"]["m1"].popen.send_signal(signal.SIGKILL)
        killed = time.monotonic()

        def will():
            return next((item for _, item in listener.of(victim, "status")
                         if not isinstance(item, ProtocolError) and item.state == OFFLINE), None)

        offline = wait_for(will, 15, "the victim's last-will", interval=0.1)
        assert offline.sender.hex() == victim and offline.reason == "connection lost"
        assert time.monotonic() - killed < 10

        def dead_on_server():
            node = next(n for n in get_json(telemetry["url"] + "api/v1/swarm")["nodes"] if n["id"] == victim)
            return node if node["state"] == "DEAD" else None

        node = wait_for(dead_on_server, 15, "the status server to mark the victim DEAD")
        assert "last will" in node["dead_reason"]
        assert time.monotonic() - killed < TTL_S - 5, "DEAD came from the heartbeat expiry, not the last-will"
    finally:
        listener.close()
    # a subscriber that arrives later still learns it: the will replaced the retained status
    late = Listener(telemetry["broker"])
    try:
        retained = wait_for(lambda: late.of(victim, "status") or None, 10, "the retained status")
        assert retained[0][0] is True and retained[0][1].state == OFFLINE
    finally:
        late.close()


def test_sigterm_leaves_a_retained_leaving(telemetry):
    leaver, node_id = telemetry["nodes"]["m0"], telemetry["ids"]["m0"]
    leaver.popen.send_signal(signal.SIGTERM)
    assert leaver.popen.wait(40) == 0, leaver.output()[-3000:]
    late = Listener(telemetry["broker"])
    try:
        retained = wait_for(lambda: late.of(node_id, "status") or None, 10, "the retained status")
        assert retained[0][1].state == "LEAVING", retained
    finally:
        late.close()
