"""What the status server keeps between readings: the latest report, loss curves, liveness changes
it saw itself, and the queues of the live (server-sent events) subscribers.

No I/O here: the server hands each reading in (``update``) and streams what comes out.
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

from node.membership import Member, diff_events
from node.runner import event_identity
from node.swarm_report import MAX_EVENTS, RunReading, build_report, structured_events
from protocol.messages import Event

logger = logging.getLogger(__name__)

MAX_POINTS = 600  # per curve
MAX_SERIES = 64
MAX_SUBSCRIBERS = 64
QUEUE_MESSAGES = 32  # a subscriber that falls this far behind is dropped (its browser reconnects)
OBSERVED_EVENTS = 256
SEEN_EVENTS = 4096
KEPT_EVENTS = 512  # per run: the published events this server read once and keeps showing
DUPLICATE_WINDOW_S = 30.0  # an observed change and a node's published event of it: one event


@dataclass
class Series:
    key: str
    run_id: str
    kind: str  # pipeline (a data node's training loss), expert (an expert's loss) or zo (validation loss)
    label: str
    points: deque = field(default_factory=lambda: deque(maxlen=MAX_POINTS))  # [time, step, value]

    def to_json(self, points: Sequence | None = None) -> dict:
        return {"key": self.key, "run_id": self.run_id, "kind": self.kind, "label": self.label,
                "points": [list(p) for p in (self.points if points is None else points)]}


def curve_points(reading: RunReading) -> list[tuple[str, str, str, tuple[float, int, float]]]:
    """(key, kind, label, (time, step, value)) for every loss a heartbeat of the run carries now."""
    run = reading.run_id.hex()
    out = []
    for member in reading.members.values():
        hb, a = member.heartbeat, member.announcement
        if hb is None:
            continue
        m = hb.metrics
        if a.role.value == "data" and "loss" in m and "iteration" in m:
            out.append((f"pipeline/{run}/{member.id}", "pipeline", a.public_name or member.id[:12],
                        (member.last_seen, int(m["iteration"]), m["loss"])))
        elif a.role.value == "expert" and a.expert and "loss" in m and "expert_step" in m:
            out.append((f"expert/{run}/{a.expert}", "expert", a.expert,
                        (member.last_seen, int(m["expert_step"]), m["loss"])))
        elif a.role.value == "zo" and "val_loss" in m and "zo_step" in m:
            out.append((f"zo/{run}/{member.id}", "zo", a.public_name or member.id[:12],
                        (member.last_seen, int(m["zo_step"]), m["val_loss"])))
    return out


def sse_message(event: str, body: dict) -> bytes:
    """One server-sent event; JSON has no raw newlines, so one data line carries it."""
    return f"event: {event}\ndata: {json.dumps(body, separators=(',', ':'))}\n\n".encode()


class StatusFeed:
    def __init__(self, refresh_s: float, stale_after_s: float) -> None:
        self.refresh_s = refresh_s
        self.stale_after_s = stale_after_s
        self.report: dict | None = None
        self.last_ok: float | None = None
        self.read_error: str | None = None
        self.read_s: float | None = None  # how long the last good reading took
        self.series: dict[str, Series] = {}
        self.observed: deque = deque(maxlen=OBSERVED_EVENTS)
        self._members: dict[bytes, Mapping[bytes, Member]] = {}  # by run id: the previous reading's
        self._seen_events: dict[tuple, None] = {}  # insertion-ordered, the oldest forgotten first
        self._kept: dict[bytes, dict[tuple, Event]] = {}  # by run id: the published events read, oldest first
        self.subscribers: set[asyncio.Queue] = set()
        self.event_counts: Counter[tuple[str, str]] = Counter()  # (run id, event) seen since the start
        self._had_report = False  # events already in the first reading are history, not news

    # ---- readings ---------------------------------------------------------------------------

    def update(self, readings: Sequence[RunReading], now: float, read_s: float | None = None) -> dict:
        """Take a reading (that took ``read_s``): new curve points, liveness changes and the new report,
        pushed to subscribers."""
        appended: dict[str, list] = {}
        for reading in readings:
            for key, kind, label, point in curve_points(reading):
                series = self.series.get(key)
                if series is None:
                    if len(self.series) >= MAX_SERIES:
                        continue
                    series = self.series[key] = Series(key, reading.run_id.hex(), kind, label)
                if series.points and series.points[-1][1] == point[1]:
                    continue  # the same step again: the heartbeat did not move on
                series.points.append(list(point))
                appended.setdefault(key, []).append(list(point))
        readings = [self._with_kept_events(r) for r in readings]
        changes = []
        for reading in readings:
            previous = self._members.get(reading.run_id)
            if previous is not None:
                for event in diff_events(previous, reading.members, now):
                    item = structured_events(reading.run_id, [event], {**previous, **reading.members})[0]
                    item["observer"] = True
                    changes.append(item)
            self._members[reading.run_id] = dict(reading.members)
        self.observed.extend(changes)
        report = build_report(readings, now)
        published = [e for e in report["events"] if _event_key(e) not in self._seen_events]
        for event in published:
            self._seen_events[_event_key(event)] = None
        while len(self._seen_events) > SEEN_EVENTS:
            del self._seen_events[next(iter(self._seen_events))]
        report["events"] = merge_events(report["events"], list(self.observed))
        self.event_counts.update((e["run_id"], e["event"]) for e in published + changes)
        self.report, self.last_ok, self.read_error, self.read_s = report, now, None, read_s
        for change in changes:
            self.publish(sse_message("membership", change))
        if self._had_report:
            for event in published:
                self.publish(sse_message("event", event))
        self._had_report = True
        self.publish(sse_message("swarm", self.snapshot(now, appended)))
        return report

    def _with_kept_events(self, reading: RunReading) -> RunReading:
        """The reading with every event read before added: a signed event is a fact once verified,
        and one DHT read can miss a node's events record (or it expired with its dead node). Without
        this a recovery's method flickered off the page when a reading missed its restorer's events."""
        kept = self._kept[reading.run_id] = self._kept.pop(reading.run_id, {})  # the last read run goes last
        while len(self._kept) > MAX_SERIES:  # so the runs not read for longest are forgotten first
            del self._kept[next(iter(self._kept))]
        for event in reading.events:
            kept.setdefault(event_identity(event), event)
        while len(kept) > KEPT_EVENTS:
            del kept[next(iter(kept))]
        return replace(reading, events=sorted(kept.values(), key=lambda e: e.at))

    def failed(self, error: str) -> None:
        self.read_error = error
        logger.warning("status: reading the swarm failed: %s", error)

    # ---- what is served ---------------------------------------------------------------------

    def freshness(self, now: float) -> dict:
        age = None if self.last_ok is None else max(0.0, now - self.last_ok)
        return {"now": now, "data_time": self.last_ok, "data_age_s": age,
                "stale": age is None or age > self.stale_after_s, "read_error": self.read_error, "read_s": self.read_s,
                "refresh_s": self.refresh_s, "stale_after_s": self.stale_after_s}

    def snapshot(self, now: float, appended: Mapping[str, list] | None = None) -> dict:
        """The report with freshness; ``appended``: only these new points instead of whole curves."""
        base = self.report or build_report([], now)
        out = dict(base, **self.freshness(now))
        if appended is None:
            out["series"] = [s.to_json() for s in self.series.values()]
        else:
            out["series"] = [self.series[key].to_json(points) for key, points in appended.items()]
            out["series_partial"] = True
        return out

    # ---- subscribers ------------------------------------------------------------------------

    def subscribe(self) -> asyncio.Queue | None:
        if len(self.subscribers) >= MAX_SUBSCRIBERS:
            return None
        queue: asyncio.Queue = asyncio.Queue(QUEUE_MESSAGES)
        self.subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        self.subscribers.discard(queue)

    def publish(self, message: bytes) -> None:
        for queue in list(self.subscribers):
            try:
                queue.put_nowait(message)
            except asyncio.QueueFull:
                logger.info("status: dropping a subscriber that stopped reading")
                self.subscribers.discard(queue)
                _end(queue)

    def close(self) -> None:
        """End every subscriber's stream."""
        for queue in list(self.subscribers):
            _end(queue)
        self.subscribers.clear()


def _end(queue: asyncio.Queue) -> None:
    """Replace what the queue holds by the end mark (None)."""
    while not queue.empty():
        queue.get_nowait()
    queue.put_nowait(None)


def _event_key(event: dict) -> tuple:
    return (event["run_id"], event["event"], event["subject"], round(event["at"], 3))


def merge_events(published: list[dict], observed: list[dict]) -> list[dict]:
    """The nodes' published events plus the liveness changes this server saw that no node reported
    within DUPLICATE_WINDOW_S, in time order."""
    out = list(published)
    for item in observed:
        if not any(e["run_id"] == item["run_id"] and e["event"] == item["event"] and e["subject"] == item["subject"]
                   and abs(e["at"] - item["at"]) <= DUPLICATE_WINDOW_S for e in published):
            out.append(item)
    return sorted(out, key=lambda e: e["at"])[-MAX_EVENTS:]
