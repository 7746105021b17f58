"""Test settings shared by the whole suite."""
from hypothesis import HealthCheck, settings

# CI runs on 2 shared cores: judge properties by examples, not by wall-clock deadlines.
settings.register_profile("swarmtrain", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("swarmtrain")
