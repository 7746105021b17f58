"""MQTT telemetry over aiomqtt: a node publishes its status and metrics (``swarmtrain node --mqtt``),
the status server subscribes (``swarmtrain status --serve P --mqtt``). Topics and payloads:
node/mqtt_messages.py and docs/status.md.

Telemetry is optional: a broker that is down or drops us costs a warning and a retry, never the node.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

import aiomqtt

from node.config import Timeouts
from node.mqtt_messages import (OFFLINE, SUBSCRIPTIONS, WILL_REFRESH_S, MqttUrl, PushedUpdates, metrics_topic,
                                open_payload, seal_metrics, seal_status, status_topic)
from node.runner import Node
from protocol.envelope import Sequencer
from protocol.errors import ProtocolError
from protocol.messages import Heartbeat, NodeState

logger = logging.getLogger(__name__)

MAX_RETRY_S = 30.0


def _keepalive(timeouts: Timeouts) -> int:
    """The broker gives up on a silent connection after 1.5 keepalives; a crash closes the socket at once."""
    return max(5, int(timeouts.heartbeat_ttl_s))


async def _wait(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep until ``stop`` or ``seconds``; True when stopped."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
        return True
    except TimeoutError:
        return False


async def publish_telemetry(node: Node, url: MqttUrl, stop: asyncio.Event) -> None:
    """Once the node is online: its status (retained) and heartbeat metrics every heartbeat interval,
    with a last-will saying OFFLINE; LEAVING (retained) and a clean disconnect when it stops."""
    timeouts = node.timeouts
    if not await _wait_online(node, stop):
        return
    topic_status, topic_metrics = status_topic(node.run_id, node.id), metrics_topic(node.run_id, node.id)
    seq = Sequencer()
    retry_s = timeouts.heartbeat_interval_s
    while not stop.is_set():
        session = time.time()
        will = aiomqtt.Will(topic_status, seal_status(node.key, node.run_id, node.announcement(node.state), OFFLINE,
                                                      seq.next(), session, "connection lost", timestamp=session),
                            qos=1, retain=True)
        try:
            async with aiomqtt.Client(url.host, url.port, username=url.username, password=url.password,
                                      identifier=f"swarmtrain-{node.id[:24]}", will=will,
                                      keepalive=_keepalive(timeouts), timeout=timeouts.mqtt_s) as client:
                logger.info("mqtt: publishing telemetry to %s", url)
                retry_s = timeouts.heartbeat_interval_s
                while not stop.is_set() and time.time() - session < WILL_REFRESH_S:
                    await client.publish(topic_status, seal_status(node.key, node.run_id, node.announcement(node.state),
                                                                   node.state.value, seq.next(), session),
                                         qos=1, retain=True)
                    beat = Heartbeat(state=node.state, step=node.step, metrics=dict(node.metrics),
                                     uptime_s=time.time() - node.started_at)
                    await client.publish(topic_metrics, seal_metrics(node.key, node.run_id, beat, seq.next()), qos=0)
                    await _wait(stop, timeouts.heartbeat_interval_s)
                if stop.is_set():  # a clean goodbye: the broker keeps LEAVING and drops the will
                    await client.publish(topic_status, seal_status(
                        node.key, node.run_id, node.announcement(NodeState.LEAVING), NodeState.LEAVING.value,
                        seq.next(), session, "the node stopped"), qos=1, retain=True)
        except aiomqtt.MqttError as error:
            logger.warning("mqtt: %s: %s; trying again in %.0f s", url, error, retry_s)
            if await _wait(stop, retry_s):
                return
            retry_s = min(MAX_RETRY_S, retry_s * 2)


async def _wait_online(node: Node, stop: asyncio.Event) -> bool:
    online = asyncio.ensure_future(node.online.wait())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait((online, stopped), return_when=asyncio.FIRST_COMPLETED)
    online.cancel()
    stopped.cancel()
    return node.online.is_set() and not stop.is_set()


async def subscribe_telemetry(url: MqttUrl, pushed: PushedUpdates, stop: asyncio.Event, timeouts: Timeouts,
                              changed: Callable[[], None] = lambda: None) -> None:
    """Receive every node's payloads into ``pushed`` until ``stop``; ``changed`` after each one that may
    change the report (e.g. a last-will: the page need not wait for the next DHT reading)."""
    retry_s = timeouts.heartbeat_interval_s
    while not stop.is_set():
        try:
            async with aiomqtt.Client(url.host, url.port, username=url.username, password=url.password,
                                      keepalive=_keepalive(timeouts), timeout=timeouts.mqtt_s,
                                      max_queued_incoming_messages=10_000) as client:
                for topic in SUBSCRIPTIONS:
                    await client.subscribe(topic, qos=1)
                logger.info("mqtt: subscribed to %s on %s", ", ".join(SUBSCRIPTIONS), url)
                retry_s = timeouts.heartbeat_interval_s
                receiving = asyncio.ensure_future(_receive(client, pushed, changed))
                stopped = asyncio.ensure_future(stop.wait())
                try:
                    await asyncio.wait((receiving, stopped), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stopped.cancel()
                    receiving.cancel()
                if receiving.done() and not receiving.cancelled() and receiving.exception() is not None:
                    raise receiving.exception()
        except aiomqtt.MqttError as error:
            logger.warning("mqtt: %s: %s; subscribing again in %.0f s", url, error, retry_s)
            if await _wait(stop, retry_s):
                return
            retry_s = min(MAX_RETRY_S, retry_s * 2)


async def _receive(client: aiomqtt.Client, pushed: PushedUpdates, changed: Callable[[], None]) -> None:
    async for message in client.messages:
        payload = message.payload
        if not isinstance(payload, (bytes, bytearray)):
            pushed.rejected += 1
            continue
        try:
            item = open_payload(str(message.topic), bytes(payload), time.time())
        except ProtocolError as error:
            pushed.rejected += 1
            logger.info("mqtt: dropped a payload on %.120s: %s: %s", message.topic, type(error).__name__, error)
            continue
        if pushed.take(item, time.time()):
            changed()
