"""Planning half of the skip pipeline: scenarios, schedules, the iteration simulator, baselines,
the scheduler and timeline charts."""
from trainer.pipeline.baselines import full_pipeline_schedule, random_skip_schedule
from trainer.pipeline.scenario import (
    Link,
    Node,
    Scenario,
    ScenarioError,
    generate_scenario,
    load_scenario,
    shipped_scenario,
)
from trainer.pipeline.scheduler import PlanResult, SchedulerConfig, plan_schedule
from trainer.pipeline.schedule import MicrobatchPath, Schedule, ScheduleError, validate_schedule
from trainer.pipeline.simulator import SimulationError, SimulationResult, TimelineEntry, simulate
from trainer.pipeline.timeline import timeline_svg

__all__ = [
    "Link", "Node", "Scenario", "ScenarioError", "generate_scenario", "load_scenario",
    "shipped_scenario", "MicrobatchPath", "Schedule", "ScheduleError", "validate_schedule",
    "SimulationError", "SimulationResult", "TimelineEntry", "simulate",
    "full_pipeline_schedule", "random_skip_schedule", "PlanResult", "SchedulerConfig", "plan_schedule",
    "timeline_svg",
]
