"""The status web server (aiohttp): the page ``/``, ``/api/v1/swarm``, ``/api/v1/events`` (server-sent
events), ``/metrics`` (Prometheus text) and ``/healthz``.

Served inside a node (``swarmtrain node --status-port P``: its own run, read through its own DHT
peer) or standalone (``swarmtrain status --serve P``: every run of the runs directory, read by a
client-mode DHT peer). Either way it reads the swarm on a clock (the runs' heartbeat interval), keeps
what node/status_feed.py keeps, and optionally merges MQTT pushes (node/mqtt.py).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable, Sequence

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from node.config import NodeConfig, Timeouts
from node.dht import DHTReadError, SwarmDHT
from node.mqtt_messages import PushedUpdates, parse_mqtt_url
from node.status import read_run, read_swarm
from node.status_feed import StatusFeed, sse_message
from node.status_metrics import metrics_registry, render
from node.swarm_report import RunReading
from protocol.errors import ProtocolError
from protocol.runspec import RunSpec

logger = logging.getLogger(__name__)

PAGE_DIR = Path(__file__).with_name("status_page")
STATIC_FILES = {"app.js": "text/javascript", "charts.js": "text/javascript", "style.css": "text/css",
                "swarm.schema.json": "application/schema+json"}
MIN_REFRESH_S = 1.0
STALE_REFRESHES = 3  # data older than this many refresh periods is marked stale

Reader = Callable[[], Awaitable[Sequence[RunReading]]]


class StatusServerError(RuntimeError):
    """The status server could not listen (the port is taken, the address is not this machine's)."""


@dataclass(frozen=True)
class StatusSettings:
    host: str
    port: int
    refresh_s: float
    timeouts: Timeouts

    @property
    def stale_after_s(self) -> float:
        return max(STALE_REFRESHES * self.refresh_s, self.timeouts.heartbeat_ttl_s)


def refresh_period(specs: Sequence[RunSpec], timeouts: Timeouts) -> float:
    """As often as the fastest run heartbeats: a death shows as soon as it can be judged."""
    periods = [s.swarm.heartbeat_interval_s for s in specs] or [timeouts.heartbeat_interval_s]
    return max(MIN_REFRESH_S, min(periods))


class StatusServer:
    def __init__(self, reader: Reader, settings: StatusSettings, pushed: PushedUpdates | None = None) -> None:
        self.reader = reader
        self.settings = settings
        self.pushed = pushed
        self.feed = StatusFeed(settings.refresh_s, settings.stale_after_s)
        self.registry = metrics_registry(self.feed)
        self.wake = asyncio.Event()  # an MQTT push that may change the report: read again now
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._pages = {name: (PAGE_DIR / name).read_bytes() for name in ("index.html", *STATIC_FILES)}

    # ---- lifecycle ---------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024)  # it takes no uploads
        app.add_routes([
            web.get("/", self._index),
            web.get("/static/{name}", self._static),
            web.get("/api/v1/swarm", self._swarm),
            web.get("/api/v1/schema", self._schema),
            web.get("/api/v1/events", self._events),
            web.get("/metrics", self._metrics),
            web.get("/healthz", self._healthz),
        ])
        return app

    async def start(self) -> str:
        """Listen; returns the page's URL. Raises StatusServerError when the address cannot be used."""
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=self.settings.timeouts.leave_grace_s)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.host, self.settings.port)
        try:
            await site.start()
        except OSError as error:
            await self._runner.cleanup()
            raise StatusServerError(f"the status page cannot listen on {self.settings.host}:{self.settings.port}: "
                                    f"{error.strerror or error}; pick another --status-port/--serve port or "
                                    "--status-host") from None
        host = self.settings.host if self.settings.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
        self.url = f"http://{host if ':' not in host else f'[{host}]'}:{site.port}/"
        logger.info("status page at %s", self.url)
        return self.url

    async def run(self, stop: asyncio.Event) -> None:
        """Read the swarm and tick the live subscribers until ``stop``; then close."""
        try:
            await asyncio.gather(self._refresh_loop(stop), self._tick_loop(stop))
        finally:
            self.feed.close()
            if self._runner is not None:
                await self._runner.cleanup()

    async def refresh(self) -> None:
        limit = self.settings.timeouts.dht_s * 2
        started = time.monotonic()
        try:
            readings = await asyncio.wait_for(self.reader(), limit)
        except TimeoutError:
            self.feed.failed(f"the swarm did not answer within {limit:.0f} s")
            return
        except (DHTReadError, ProtocolError, OSError) as error:
            self.feed.failed(str(error))
            return
        if self.pushed is not None:
            readings = [self._merge_offline(r) for r in readings]
        self.feed.update(readings, time.time(), read_s=time.monotonic() - started)

    def _merge_offline(self, reading: RunReading) -> RunReading:
        assert self.pushed is not None
        members = self.pushed.apply_offline(reading.run_id, reading.members)
        return RunReading(reading.run_id, reading.spec, members, reading.events, reading.board, reading.claims)

    async def _refresh_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                await self.refresh()
            except Exception:  # one failed reading must not end the page's updates
                logger.exception("status: reading the swarm failed")
            self.wake.clear()
            delay = self.settings.refresh_s - (time.monotonic() - started)
            if delay > 0:
                await _first(stop.wait(), self.wake.wait(), timeout=delay)

    async def _tick_loop(self, stop: asyncio.Event) -> None:
        """Freshness for the page's stale mark, also while a reading hangs."""
        while not stop.is_set():
            self.feed.publish(sse_message("tick", self.feed.freshness(time.time())))
            await _first(stop.wait(), timeout=self.settings.refresh_s)

    # ---- handlers ----------------------------------------------------------------------------

    def _file(self, name: str) -> web.Response:
        content_type = STATIC_FILES.get(name, "text/html")
        return web.Response(body=self._pages[name], content_type=content_type, charset="utf-8",
                            headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})

    async def _index(self, request: web.Request) -> web.Response:
        response = self._file("index.html")
        # everything the page needs comes from here: no CDN, no inline script
        response.headers["Content-Security-Policy"] = ("default-src 'self'; img-src 'self' data:; "
                                                       "style-src 'self'; script-src 'self'; connect-src 'self'")
        return response

    async def _static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC_FILES:
            raise web.HTTPNotFound(text=f"no such file: {name[:80]}")
        return self._file(name)

    async def _schema(self, request: web.Request) -> web.Response:
        return self._file("swarm.schema.json")

    async def _swarm(self, request: web.Request) -> web.Response:
        return _json(self.feed.snapshot(time.time()))

    async def _metrics(self, request: web.Request) -> web.Response:
        # on the loop, not a thread: the collector reads the feed, which only the loop changes
        return web.Response(body=render(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        """200 while the server has fresh data, 503 when it has none or only stale data."""
        fresh = self.feed.freshness(time.time())
        body = {"ok": not fresh["stale"], **fresh}
        return _json(body, status=200 if body["ok"] else 503)

    async def _events(self, request: web.Request) -> web.StreamResponse:
        queue = self.feed.subscribe()
        if queue is None:
            raise web.HTTPServiceUnavailable(text="too many live subscribers; poll /api/v1/swarm instead")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no"})
        write_s = self.settings.timeouts.rpc_s  # a client that stops reading is let go after this
        try:
            await response.prepare(request)
            first = b"retry: 2000\n\n" + sse_message("swarm", self.feed.snapshot(time.time()))
            await asyncio.wait_for(response.write(first), write_s)
            while True:
                message = await queue.get()
                if message is None:
                    break
                await asyncio.wait_for(response.write(message), write_s)
        except (ConnectionError, TimeoutError):
            pass
        finally:
            self.feed.unsubscribe(queue)
        return response


def _json(body: dict, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(body, separators=(",", ":")), status=status, content_type="application/json",
                        headers={"Cache-Control": "no-store"})


async def _first(*waits: Awaitable, timeout: float | None = None) -> None:
    """Until the first of ``waits`` is done (or ``timeout``); the others are cancelled."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


# ---- the two ways to serve it ----------------------------------------------------------------


def node_server(node) -> StatusServer:
    """A node's own page (``--status-port``): its run, read through its own DHT peer."""
    config: NodeConfig = node.config
    settings = StatusSettings(config.status_host, config.status_port, refresh_period([node.spec], node.timeouts),
                              node.timeouts)
    async def read() -> Sequence[RunReading]:
        # the node refreshes its membership view every heartbeat interval: no need to read it twice
        return [await read_run(node.swarm, config, node.run_id, node.spec, members=dict(node.view.members))]

    return StatusServer(read, settings)


async def run_for_node(node, server: StatusServer, stop: asyncio.Event) -> None:
    """Serve (already started) from when the node is online until ``stop``."""
    await _first(node.online.wait(), stop.wait())
    await server.run(stop)


def standalone_server(swarm: SwarmDHT, config: NodeConfig, spec: RunSpec | None, port: int) -> StatusServer:
    """``swarmtrain status --serve PORT``: every run of the runs directory (or only ``spec``'s), with
    the nodes' MQTT pushes merged in when ``config.mqtt`` names a broker."""
    pushed = PushedUpdates() if config.mqtt else None
    merge = pushed.merge_heartbeats if pushed is not None else None

    async def read() -> Sequence[RunReading]:
        return await read_swarm(swarm, config, spec, merge=merge)

    settings = StatusSettings(config.status_host, port, refresh_period([spec] if spec else [], config.timeouts),
                              config.timeouts)
    return StatusServer(read, settings, pushed)


async def run_standalone(server: StatusServer, config: NodeConfig, stop: asyncio.Event) -> None:
    """Serve (already started) and, with ``--mqtt``, subscribe, until ``stop``."""
    tasks = [server.run(stop)]
    if server.pushed is not None:
        from node.mqtt import subscribe_telemetry

        tasks.append(subscribe_telemetry(parse_mqtt_url(config.mqtt), server.pushed, stop, config.timeouts,
                                         server.wake.set))
    await asyncio.gather(*tasks)
