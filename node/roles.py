"""Which role a joining node takes: pure logic, so the choice and its reason are testable and logged."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from node.membership import Member, count_by_stage
from protocol.messages import Role


class RoleError(ValueError):
    """The requested role does not fit the run."""


@dataclass(frozen=True)
class RoleChoice:
    role: Role
    stage: int | None
    reason: str


def choose_role(
    mode: str, num_stages: int, members: Mapping[bytes, Member], requested: str = "auto", stage: int | None = None
) -> RoleChoice:
    """Pipeline: ``auto`` takes the stage with the fewest live replicas (ties: lowest index); stage 0 is
    the data role. Other modes have one role for every node."""
    if mode == "zo":
        return RoleChoice(Role.ZO, None, "mode zo: every node holds a full replica")
    if mode == "experts":
        return RoleChoice(Role.EXPERT, None, "mode experts: the node claims expert jobs")
    if requested not in ("auto", "data", "stage", "spare"):
        raise RoleError(f"role {requested!r} is not one of auto, data, stage, spare for a pipeline run")
    if requested == "spare":
        if stage is not None:
            raise RoleError("a spare serves no stage until one is lost; drop --stage or --role spare")
        return RoleChoice(Role.SPARE, None, "requested spare: takes the first lost stage")
    if stage is not None and not 0 <= stage < num_stages:
        raise RoleError(f"stage {stage} does not exist: the run has stages 0..{num_stages - 1}")
    if requested == "data" and stage not in (None, 0):
        raise RoleError(f"--role data serves stage 0, not stage {stage}; drop one of --role data and --stage")
    if requested == "stage" and stage == 0:
        raise RoleError("stage 0 is the data role: use --role data (or --stage 1..) instead of --role stage --stage 0")
    if requested == "data":
        return RoleChoice(Role.DATA, 0, "requested the data role (stage 0)")
    if stage is not None:
        return RoleChoice(Role.DATA if stage == 0 else Role.STAGE, stage, f"requested stage {stage}")
    counts = count_by_stage(members)
    candidates = range(1, num_stages) if requested == "stage" and num_stages > 1 else range(num_stages)
    chosen = min(candidates, key=lambda s: (counts.get(s, 0), s))
    live = ", ".join(f"{s}:{counts.get(s, 0)}" for s in range(num_stages))
    reason = f"stage {chosen} has the fewest live replicas ({counts.get(chosen, 0)}; by stage {live})"
    return RoleChoice(Role.DATA if chosen == 0 else Role.STAGE, chosen, reason)


def reconsider_stage(
    me: bytes,
    current: RoleChoice,
    mode: str,
    num_stages: int,
    members: Mapping[bytes, Member],
    requested: str = "auto",
) -> RoleChoice | None:
    """After announcing JOINING: nodes that joined at the same moment may have picked the same stage.

    Of the JOINING nodes sharing a stage, the one with the smallest id stays (ONLINE nodes always stay);
    the others move when a stage with fewer replicas exists. Returns the new choice, or None to stay.
    """
    if mode != "pipeline" or requested == "data" or current.stage is None:
        return None
    rivals = [
        key for key, m in members.items()
        if key != me and m.announcement.stage == current.stage and m.state in ("ONLINE", "JOINING")
        and (m.state == "ONLINE" or key < me)
    ]
    if not rivals:
        return None
    others = {key: m for key, m in members.items() if key != me}
    better = choose_role(mode, num_stages, others, requested)
    counts = count_by_stage(others)
    if counts.get(better.stage, 0) >= counts.get(current.stage, 0):
        return None
    return RoleChoice(better.role, better.stage, f"{better.reason}; moved from stage {current.stage}, "
                                                 "which a node joining at the same time also took")
