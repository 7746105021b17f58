"""Chaos harness: a local swarm of real node processes under seeded faults, and the checks that
nothing was lost (docs/chaos.md). Used by tests/test_chaos_*.py and bench/bench_soak.py."""
from tests.chaos.checks import (Check, describe, experts_nothing_lost, failures, files_whole, pipeline_nothing_lost,
                                zo_nothing_lost)
from tests.chaos.modes import ExpertsMode, PipelineMode, ZoMode
from tests.chaos.schedule import ChaosPlan, Fault, make_schedule
from tests.chaos.swarm import ChaosError, ChaosOptions, ChaosResult, ChaosSwarm

__all__ = ["Check", "ChaosError", "ChaosOptions", "ChaosPlan", "ChaosResult", "ChaosSwarm", "ExpertsMode", "Fault",
           "PipelineMode", "ZoMode", "describe", "experts_nothing_lost", "failures", "files_whole", "make_schedule",
           "pipeline_nothing_lost", "zo_nothing_lost"]
