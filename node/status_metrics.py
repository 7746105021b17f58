"""``GET /metrics``: the status server's latest report as Prometheus text (prometheus-client).

A collector over the feed, in a registry of its own: each scrape shows the report of that moment,
and nothing is kept in the library's global registry.
"""
from __future__ import annotations

import time
from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from node.status_feed import StatusFeed
from node.swarm_report import DEGRADED, HEALTHY, RECOVERING

STATES = ("JOINING", "ONLINE", "LEAVING", "DEAD")
_NODE_LABELS = ["run", "node", "name", "role"]


def _gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"swarmtrain_{name}", doc, labels=labels)


class ReportCollector(Collector):
    def __init__(self, feed: StatusFeed, clock: Callable[[], float] = time.time) -> None:
        self.feed = feed
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        now = self.clock()
        report = self.feed.snapshot(now, appended={})
        fresh = self.feed.freshness(now)
        age = _gauge("status_data_age_seconds", "Seconds since the status server last read the swarm", [])
        age.add_metric([], fresh["data_age_s"] if fresh["data_age_s"] is not None else float("nan"))
        stale = _gauge("status_stale", "1 when the status server's data is older than it should be", [])
        stale.add_metric([], float(fresh["stale"]))
        swarm = _gauge("swarm_state", "1 for the swarm's current headline state", ["state"])
        for state in (HEALTHY, RECOVERING, DEGRADED):
            swarm.add_metric([state], float(report["headline"]["state"] == state))
        yield from (age, stale, swarm)

        runs = _gauge("runs", "Runs found in the swarm", [])
        runs.add_metric([], float(len(report["runs"])))
        nodes = _gauge("nodes", "Nodes of a run by state", ["run", "run_name", "state"])
        healthy = _gauge("run_healthy", "1 when the run is healthy, 0 when degraded or recovering", ["run", "run_name"])
        replicas = _gauge("stage_replicas", "Replicas of a pipeline stage", ["run", "stage", "state"])
        lost = _gauge("stages_lost", "Pipeline stages with no live replica", ["run"])
        iteration = _gauge("pipeline_iteration", "Newest pipeline iteration a data node reported", ["run"])
        expert_step = _gauge("expert_step", "Steps an expert has trained", ["run", "expert"])
        expert_progress = _gauge("expert_progress_ratio", "Fraction of an expert's steps done", ["run", "expert"])
        zo_step = _gauge("zo_step", "Head step of a zo run's replicas", ["run"])
        zo_bytes = _gauge("zo_bytes_per_step", "Bytes a zo node's RPCs send per step (mean of the live nodes)", ["run"])
        for run in report["runs"]:
            rid = run["run_id"]
            runs_labels = [rid, run["name"]]
            for state in STATES:
                nodes.add_metric([*runs_labels, state], float(run["states"].get(state, 0)))
            healthy.add_metric(runs_labels, float(run["health"]["state"] == HEALTHY))
            if run["coverage"] is not None:
                for stage in run["coverage"]["stages"]:
                    replicas.add_metric([rid, str(stage["stage"]), "online"], float(stage["online"]))
                    replicas.add_metric([rid, str(stage["stage"]), "joining"], float(stage["joining"]))
                lost.add_metric([rid], float(len(run["coverage"]["lost"])))
            if run["progress"] is not None and run["progress"]["iteration"] is not None:
                iteration.add_metric([rid], float(run["progress"]["iteration"]))
            for expert in run["experts"]:
                if expert["step"] is not None:
                    expert_step.add_metric([rid, expert["name"]], float(expert["step"]))
                if expert["progress"] is not None:
                    expert_progress.add_metric([rid, expert["name"]], float(expert["progress"]))
            if run["zo"] is not None:
                if run["zo"]["step"] is not None:
                    zo_step.add_metric([rid], float(run["zo"]["step"]))
                if run["zo"]["bytes_per_step"] is not None:
                    zo_bytes.add_metric([rid], float(run["zo"]["bytes_per_step"]))
        yield from (runs, nodes, healthy, replicas, lost, iteration, expert_step, expert_progress, zo_step, zo_bytes)

        up = _gauge("node_up", "1 while the node is JOINING or ONLINE", _NODE_LABELS)
        seen = _gauge("node_last_seen_seconds", "Seconds since the node's newest signed record", _NODE_LABELS)
        step = _gauge("node_step", "The step the node's heartbeat carries", _NODE_LABELS)
        loss = _gauge("node_loss", "The training loss the node's heartbeat carries", _NODE_LABELS)
        throughput = _gauge("node_throughput", "Throughput the node announces (tokens/s)", _NODE_LABELS)
        for node in report["nodes"]:
            labels = [node["run_id"], node["id"], node["public_name"], node["role"]]
            up.add_metric(labels, float(node["state"] in ("JOINING", "ONLINE")))
            seen.add_metric(labels, float(node["last_seen_s"]))
            throughput.add_metric(labels, float(node["throughput"]))
            if node["step"] is not None:
                step.add_metric(labels, float(node["step"]))
            value = node["metrics"].get("loss", node["metrics"].get("val_loss"))
            if value is not None:
                loss.add_metric(labels, float(value))
        yield from (up, seen, step, loss, throughput)

        events = CounterMetricFamily("swarmtrain_events", "Events the status server has seen, by kind",
                                     labels=["run", "event"])
        for (run_id, event), count in sorted(self.feed.event_counts.items()):
            events.add_metric([run_id, event], float(count))
        yield events


def metrics_registry(feed: StatusFeed) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ReportCollector(feed))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
