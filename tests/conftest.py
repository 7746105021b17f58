"""Test settings shared by the whole suite."""
import pytest
from hypothesis import HealthCheck, settings

from tests.harness import Cluster

# CI runs on 2 shared cores: judge properties by examples, not by wall-clock deadlines.
settings.register_profile("swarmtrain", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("swarmtrain")


# The long multi-process swarm tests (marked slow) run real DHTs, p2pd daemons and training on 2
# shared cores, where a stall of the machine can break a timing they depend on. Each gets one more
# try; a feature that is broken fails both. A test that needed it shows as "R" in the progress line
# and as "rerun" in the summary, so that a flaky test stays in sight.
SLOW_RERUNS = 1


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("slow") is not None and item.get_closest_marker("flaky") is None:
            item.add_marker(pytest.mark.flaky(reruns=SLOW_RERUNS, reruns_delay=2))


@pytest.fixture
def cluster(tmp_path):
    """Processes started in ``tmp_path``; at the end every one is stopped and no p2pd outlives them."""
    cluster = Cluster(tmp_path)
    try:
        yield cluster
    finally:
        leftover = cluster.close()
        assert leftover == [], f"p2pd processes outlived their nodes: {leftover}"
