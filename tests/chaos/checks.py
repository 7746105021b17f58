"""What "nothing lost" means after a chaos run, as checks a test asserts and a soak reports.

- Files (every mode): every JSON file parses, every safetensors and torch file loads, every zo
  commit log reads to its end (no torn record), every node log line is a whole record, and the
  only temporary files left are those of processes killed in the middle of a write.
- ZO: every node did every step and ends with the same weights and log head; the weight hashes
  agree at every step any node life logged; every commit log on disk is a contiguous chain that
  agrees with the others (no committed step missing or different on any node); every local
  snapshot is a point of that chain with the weights the nodes agreed on there.
- Pipeline: every stage is served at the end; no stage ever started over from its initial
  weights; a stage whose replica lived was restored by copying it (exactly: the copy's hash is one
  its replica logged), one without a live replica but with a live neighbour by CheckFree or a
  swap copy; the replicas of each stage agree at the end; every weight snapshot is weights some
  node of its stage logged at that iteration.
- Experts: every job is done at its full steps and every node saw it; no stint on a job started
  behind the most advanced checkpoint of it that a live node kept (its maker or a node keeping a
  copy, its own store included after a restart: a data dir outlives its process); every
  checkpoint file on every node's disk hashes to its name; each job's final checkpoint is on disk.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.chaos.disk import FILLER
from tests.chaos.modes import EX_CHECKPOINT, PP_ITERATION, PP_ROLE, ZO_STEP
from tests.chaos.procs import LogTail, NodeProc
from tests.chaos.swarm import ChaosResult
from trainer.files import temporary_owner
from trainer.pipeline.runtime import state_hash

_IDENTITY_TMP = re.compile(r"\..+\.tmp(\d+)")  # node/identity.py's temporary key file
_RESTORING = re.compile(r"restoring stage (\d+): (.*)")
_RESTORED = re.compile(r"stage (\d+) restored by ([\w-]+) at iteration (\d+) in [\d.]+ s \(weights ([0-9a-f]+), "
                       r"from ([0-9a-f,]+|nobody)\)")


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


def failures(checks: list[Check]) -> list[Check]:
    return [c for c in checks if not c.ok]


def describe(checks: list[Check]) -> str:
    return "\n".join(f"{'ok  ' if c.ok else 'FAIL'} {c.name}" + (f": {c.detail}" if c.detail else "") for c in checks)


def _check(name: str, problems: list[str], ok_detail: str = "") -> Check:
    return Check(name, not problems, "; ".join(problems[:6]) + (f" (+{len(problems) - 6} more)" if len(problems) > 6
                                                                 else "") if problems else ok_detail)


# ---- files -----------------------------------------------------------------------------------


def _log_problems(path: Path) -> list[str]:
    tail = LogTail(path)
    tail.read()
    problems = [f"{path.name}: line {i + 1} is not a whole record: {line.message[:80]!r}"
                for i, line in enumerate(tail.lines) if not line.whole and line.message.strip()]
    if tail.torn_tail():
        problems.append(f"{path.name}: ends in the middle of a line")
    return problems


def files_whole(result: ChaosResult) -> Check:
    """Every file a node or the harness left is whole (see the module docstring)."""
    from protocol.runspec import load_spec, run_id
    from trainer.zo.log import CommitLog

    killed = result.killed_pids()
    problems: list[str] = []
    seen: Counter[str] = Counter()
    rid = run_id(load_spec(result.workdir / "run.toml"))
    folders = [result.home(name) for name in result.specs] + [result.workdir / "logs"]
    for folder in folders:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            name = path.name
            owner = temporary_owner(name)
            if owner is None and (match := _IDENTITY_TMP.fullmatch(name)):
                owner = int(match[1])
            try:
                if name == FILLER:
                    continue
                if owner is not None:
                    seen["temporary (of a killed process)"] += 1
                    if owner not in killed:
                        problems.append(f"{path}: a temporary file left by pid {owner}, which was not killed")
                elif name.endswith(".json"):
                    json.loads(path.read_text())
                    seen["json"] += 1
                elif name.endswith(".safetensors"):
                    load_file(str(path))
                    seen["safetensors"] += 1
                elif name.endswith(".pt"):
                    torch.load(path, weights_only=True)
                    seen["torch"] += 1
                elif name == "commits.log":
                    _, torn = CommitLog.read(path, rid)
                    seen["commit log"] += 1
                    if torn:
                        problems.append(f"{path}: {torn} bytes of a torn record at the end")
                elif name.endswith(".log"):
                    problems += _log_problems(path)
                    seen["node log"] += 1
                elif name == "node.key":
                    from node.identity import read_private_key

                    read_private_key(path)
                    seen["key"] += 1
            except Exception as error:  # noqa: BLE001 - any failure to read is the finding
                problems.append(f"{path}: {type(error).__name__}: {str(error)[:120]}")
    summary = ", ".join(f"{n} {kind}" for kind, n in sorted(seen.items()))
    return _check("files on disk are whole", problems, summary)


# ---- zo --------------------------------------------------------------------------------------


IN_FLIGHT = 3  # steps or iterations nodes stopped together (a soak's end) may be apart


def zo_nothing_lost(result: ChaosResult, steps: int | None) -> list[Check]:
    """``steps``: the run's steps, or None when the harness stopped the nodes (a soak)."""
    from node.zo_node import build_replica
    from protocol.runspec import load_spec, run_id
    from trainer.zo.log import CommitLog

    spec = load_spec(result.workdir / "run.toml")
    rid = run_id(spec)
    names = sorted(result.specs)
    reports, missing = {}, []
    for name in names:
        path = result.home(name) / "report.json"
        if path.exists():
            reports[name] = json.loads(path.read_text())
        else:
            missing.append(f"{name} wrote no report (last life: {result.final(name).state}, "
                           f"code {result.final(name).popen.returncode})")
    heads = [r["steps"] for r in reports.values()]
    if steps is not None:
        behind = [f"{n} stopped at step {r['steps']}" for n, r in reports.items() if r["steps"] != steps]
    else:
        behind = [f"{n} stopped at step {r['steps']}, others at {max(heads)}" for n, r in reports.items()
                  if r["steps"] < max(heads) - IN_FLIGHT]
    checks = [_check("every node did every step" if steps is not None else "every node was at the run's head",
                     missing + behind, f"{len(reports)} nodes at step(s) {sorted(set(heads))}")]
    finals: dict[int, set] = {}
    for r in reports.values():
        finals.setdefault(r["steps"], set()).add((r["weights_hash"], r["head"]))
    checks.append(_check("same weights and log head on every node at the same step",
                         [f"step {k}: {len(v)} different (weights, head) pairs" for k, v in finals.items() if len(v) > 1]))

    agreed: dict[int, set[str]] = {}  # step -> 16-hex weight hashes that any node life logged there
    for proc in result.procs:
        for step, digest in ZO_STEP.findall(proc.text()):
            agreed.setdefault(int(step), set()).add(digest)
    for report in reports.values():
        for step, digest in report["hashes"]:
            agreed.setdefault(step, set()).add(digest[:16])
    split = [f"step {s}: {sorted(d)}" for s, d in sorted(agreed.items()) if len(d) > 1]
    checks.append(_check("weight hashes agree at every step any node logged", split, f"{len(agreed)} steps"))

    logs, problems = {}, []
    for name in names:
        path = result.home(name) / "data" / "zo" / rid.hex() / "commits.log"
        try:
            logs[name], torn = CommitLog.read(path, rid)
        except (OSError, ValueError) as error:
            problems.append(f"{name}: {error}")
            continue
        if torn:
            problems.append(f"{name}: a torn record of {torn} bytes")
    if logs:
        reference = min(logs.values(), key=lambda log: (log.start, -log.head_step))
        longest = max(log.head_step for log in logs.values())
        for name, log in logs.items():
            if name in reports and (log.head_step != reports[name]["steps"] or log.head_hash.hex() != reports[name]["head"]):
                problems.append(f"{name}: log at step {log.head_step}, its report says {reports[name]['steps']}")
            if log.start > reference.start and log.base_prev != reference.hash_at(log.start):
                problems.append(f"{name}: its log starts at step {log.start} from another chain")
            for step in range(max(log.start, reference.start), min(log.head_step, reference.head_step)):
                if log.get(step).hash != reference.get(step).hash:
                    problems.append(f"{name}: step {step} differs from the other nodes'")
                    break
            if log.head_step > reference.head_step:
                problems.append(f"{name}: has steps the reference log lacks")
        starts = sorted({log.start for log in logs.values()})
        detail = f"{len(logs)} logs, chains from step(s) {starts} to {longest}"
    else:
        detail = ""
    checks.append(_check("no committed step missing or different in any node's commit log", problems, detail))

    problems, seen = [], 0
    replica = None
    for name in names:
        path = result.home(name) / "data" / "zo" / rid.hex() / "snapshot.pt"
        if not path.exists() or not logs:
            continue
        saved = torch.load(path, weights_only=True)
        seen += 1
        step = int(saved["step"])
        if reference.hash_at(step) is not None and bytes(saved["head"]) != reference.hash_at(step):
            problems.append(f"{name}: snapshot of step {step} is not on the chain")
        if step in agreed:
            if replica is None:
                replica = build_replica(spec, "")[0]
            replica.load_state(saved["weights"])
            if replica.weights_hash().hex()[:16] not in agreed[step]:
                problems.append(f"{name}: snapshot weights at step {step} differ from what the nodes logged")
    checks.append(_check("local snapshots are points of the chain", problems, f"{seen} snapshots"))
    checks.append(files_whole(result))
    return checks


# ---- pipeline --------------------------------------------------------------------------------


@dataclass
class Restore:
    node: str
    life: int
    stage: int
    planned_at: float
    reason: str
    method: str | None = None
    iteration: int | None = None
    weights: str | None = None
    sources: list[str] = field(default_factory=list)  # node ids (16 hex) it took state from


def pipeline_restores(procs: list[NodeProc]) -> list[Restore]:
    out = []
    for proc in procs:
        current: Restore | None = None
        for line in proc.messages():
            if match := _RESTORING.fullmatch(line.message):
                current = Restore(proc.name, proc.life, int(match[1]), line.at, match[2])
                out.append(current)
            elif (match := _RESTORED.fullmatch(line.message)) and current is not None:
                current.method, current.iteration, current.weights = match[2], int(match[3]), match[4]
                current.sources = [] if match[5] == "nobody" else match[5].split(",")
    return out


@dataclass
class _Life:
    proc: NodeProc
    roles: list[tuple[float, int | None]]  # (when, stage) of each role line
    iterations: list[tuple[float, int, str]]  # (when, k, hash)
    frozen: list[tuple[float, float]]  # (from, to)
    end: float

    def serving(self, stage: int, t: float, settle_s: float) -> bool:
        """It held trained weights of ``stage`` at ``t`` and had been reachable for ``settle_s``
        before (peers' views lag by up to a heartbeat TTL)."""
        if not self.proc.started_at <= t - settle_s or t >= self.end:
            return False
        if any(lo - settle_s < t and hi + settle_s > t for lo, hi in self.frozen):
            return False
        roles = [(at, s) for at, s in self.roles if at <= t - settle_s]
        if not roles or roles[-1][1] != stage:
            return False
        return any(roles[-1][0] <= at <= t for at, _, _ in self.iterations)


def _lives(result: ChaosResult) -> list[_Life]:
    out = []
    for proc in result.procs:
        roles, iterations = [], []
        for line in proc.messages():
            if match := PP_ROLE.search(line.message):
                roles.append((line.at, int(match[2]) if match[2] else None))
            elif match := PP_ITERATION.fullmatch(line.message):
                iterations.append((line.at, int(match[1]), match[2]))
        end = proc.ended_at if proc.state == "killed" and proc.ended_at else float("inf")
        frozen, since = [], None
        for event in result.events:
            if event.node != proc.name or not proc.started_at <= event.at <= end:
                continue
            if event.kind in ("freeze", "partition"):
                since = event.at
            elif event.kind in ("end-freeze", "end-partition") and since is not None:
                frozen.append((since, event.at))
                since = None
        if since is not None:
            frozen.append((since, float("inf")))
        out.append(_Life(proc, roles, iterations, frozen, end))
    return out


def pipeline_nothing_lost(result: ChaosResult, stages: int, iterations: int | None, ttl_s: float) -> list[Check]:
    """``iterations``: the run's, or None when the harness stopped the nodes (a soak)."""
    lives = _lives(result)
    reports = {}
    for name in result.specs:
        path = result.home(name) / "report.json"
        if path.exists():
            reports[name] = json.loads(path.read_text())
    if iterations is None:
        last = max((r.get("iterations", 0) for r in reports.values()), default=0)
        done = lambda r: r.get("iterations", 0) >= last - IN_FLIGHT  # noqa: E731
    else:
        done = lambda r: r.get("iterations") == iterations  # noqa: E731
    finished = {s: [n for n, r in reports.items() if r.get("stage") == s and done(r)] for s in range(stages)}
    checks = [_check("every stage is served at the end", [f"stage {s}: no node finished the run serving it"
                                                         for s, names in finished.items() if not names],
                     ", ".join(f"stage {s}: {len(n)}" for s, n in finished.items()))]

    # a node that comes into the run under way serves only after restoring its stage's state
    opened = min((e.at for e in result.events if e.kind == "chaos"), default=float("inf"))
    restarts = []
    for life in lives:
        if life.proc.started_at <= opened or not life.iterations:
            continue
        first = min(at for at, _, _ in life.iterations)
        if not any(line.at <= first and _RESTORED.fullmatch(line.message) for line in life.proc.messages()):
            restarts.append(f"{life.proc.name} life {life.proc.life} trained from iteration "
                            f"{min(k for _, k, _ in life.iterations)} without restoring its stage")
    restores = pipeline_restores(result.procs)
    restarts += [f"{r.node}: stage {r.stage} re-initialised" for r in restores if r.method == "random"]
    checks.append(_check("no stage started over from its initial weights", restarts))

    problems, methods = [], Counter()
    # weights some node held: after an iteration, or just restored (a node rebuilt by CheckFree serves
    # its stage before its first iteration there, and a replica copy may be taken from it then)
    logged = {h for life in lives for _, _, h in life.iterations} | {r.weights for r in restores if r.weights}
    for r in restores:
        if r.method is None:
            continue  # the node died in the middle of it
        methods[r.method] += 1
        others = [life for life in lives if life.proc is not _proc(result, r)]
        replica = [life.proc.name for life in others if life.serving(r.stage, r.planned_at, ttl_s)]
        after, before = (r.stage + 1) % stages, r.stage - 1
        neighbours = [life.proc.name for life in others for s in {after, before} if s >= 0
                      and life.serving(s, r.planned_at, ttl_s)]
        what = f"{r.node} life {r.life}: stage {r.stage} by {r.method}"
        if replica and r.method != "replica":
            problems.append(f"{what}, but {replica[0]} served it")
        elif not replica and neighbours and r.method not in ("replica", "checkfree", "swap-copy"):
            problems.append(f"{what}, though neighbour {neighbours[0]} lived")
        if r.method == "replica" and r.weights not in logged:
            problems.append(f"{what}: the copied weights {r.weights} are no replica's")
        run_at = max((k + 1 for life in lives for at, k, _ in life.iterations
                      if at <= r.planned_at and any(s == 0 for _, s in life.roles)), default=0)
        if r.iteration is not None and r.iteration < run_at - IN_FLIGHT:
            problems.append(f"{what}: took a state of iteration {r.iteration} while the run was at {run_at} "
                            "(from a node that had not restored yet)")
    checks.append(_check("each restore used what lived (a replica's exact weights, else a neighbour's)", problems,
                         ", ".join(f"{n} {m}" for m, n in sorted(methods.items())) or "no restores"))

    split = []
    for s, names in finished.items():
        hashes = [dict((k, h) for k, h in reports[n]["hashes"]) for n in names]
        common = sorted(set.intersection(*(set(h) for h in hashes))) if hashes else []
        # a finished run: at its last iteration. Stopped nodes (a soak) may be cut off in the middle of
        # their last reduce (one replica stepped, the other not), so there: at one of the last few
        ends = common[-1:] if iterations is not None else common[-(IN_FLIGHT + 1):]
        if ends and not any(len({h[k] for h in hashes}) == 1 for k in ends):
            split.append(f"stage {s}: its {len(names)} replicas hold {len({h[ends[-1]] for h in hashes})} different "
                         f"weights after iteration {ends[-1]}" + (f" (and after {ends[0]}..{ends[-2]})" if len(ends) > 1
                                                                 else ""))
    checks.append(_check("the replicas of every stage agree at the end", split))

    problems, seen = [], 0
    by_iteration: dict[int, set[str]] = {}
    for life in lives:
        for _, k, h in life.iterations:
            by_iteration.setdefault(k, set()).add(h)
    for name in result.specs:
        for path in sorted((result.home(name) / "snapshots").glob("stage*/it*.safetensors")):
            k = int(path.name[2:10])
            seen += 1
            if state_hash(load_file(str(path))).hex()[:16] not in by_iteration.get(k, set()):
                problems.append(f"{path.relative_to(result.home(name))}: weights no node logged at iteration {k}")
    checks.append(_check("every weight snapshot holds weights its stage logged", problems, f"{seen} snapshots"))
    checks.append(files_whole(result))
    return checks


def _proc(result: ChaosResult, r: Restore) -> NodeProc:
    return next(p for p in result.procs if p.name == r.node and p.life == r.life)


# ---- experts ---------------------------------------------------------------------------------


_EX_STINT = re.compile(r"training job (\S+) \([\d,]+ parameters, steps (\d+)\.\.(\d+)\)")
_EX_RESUMED = re.compile(r"resumed job (\S+) at step (\d+) from checkpoint ([0-9a-f]{16}) \((.*)\)")
_EX_AFRESH = re.compile(r"no live peer keeps a checkpoint of job (\S+) \(last at step (\d+)\); starting it afresh")
_EX_COPIED = re.compile(r"keeping a copy of (\S+)'s checkpoint at step (\d+) \(([0-9a-f]{16}), from")
_EX_RECALLED = re.compile(r"found in the store: (\S+) at step (\d+) \(([0-9a-f]{16})")
_EX_DONE = re.compile(r"job (\S+) done at step (\d+): checkpoint ([0-9a-f]{16})")


@dataclass
class Stint:
    node: str
    life: int
    job: str
    at: float  # when the node decided where to start (its resume or afresh line, else its training line)
    start_step: int
    source: str | None = None  # "own store", "fetched from <id>", or None (from step 0)
    afresh: bool = False  # it said no live peer kept a checkpoint


def experts_stints(procs: list[NodeProc]) -> list[Stint]:
    """Every stint any node life began on a job, from the logs (ensemble/worker.py)."""
    out = []
    for proc in procs:
        decided: dict[str, tuple[float, str | None, bool]] = {}
        for line in proc.messages():
            if match := _EX_RESUMED.fullmatch(line.message):
                decided[match[1]] = (line.at, match[4], False)
            elif match := _EX_AFRESH.fullmatch(line.message):
                decided[match[1]] = (line.at, None, True)
            elif match := _EX_STINT.fullmatch(line.message):
                at, source, afresh = decided.pop(match[1], (line.at, None, False))
                out.append(Stint(proc.name, proc.life, match[1], at, int(match[2]), source, afresh))
    return out


def _kept_steps(procs: list[NodeProc]) -> dict[str, list[tuple[float, str, int, int]]]:
    """Node name -> (when, job, step, life) of every checkpoint it made, copied, or found in its
    store (a node keeps the latest of each job on its disk, across its lives; a restarted life says
    what it found there before it names it to its peers)."""
    out: dict[str, list[tuple[float, str, int, int]]] = {}
    for proc in procs:
        for line in proc.messages():
            match = EX_CHECKPOINT.fullmatch(line.message) or _EX_COPIED.fullmatch(line.message) \
                or _EX_RECALLED.fullmatch(line.message)
            if match:
                out.setdefault(proc.name, []).append((line.at, match[1], int(match[2]), proc.life))
    return out


def _live_at(result: ChaosResult, name: str, t: float, settle_s: float) -> int | None:
    """The life of ``name`` that ran all through [t - settle_s, t], neither frozen nor cut off then
    (None if none did)."""
    for proc in result.lives(name):
        end = proc.ended_at if proc.ended_at is not None else float("inf")
        if not proc.started_at <= t - settle_s or end <= t:
            continue
        since = None
        for event in result.events:
            if event.node != name:
                continue
            if event.kind in ("freeze", "partition"):
                since = event.at
            elif event.kind in ("end-freeze", "end-partition") and since is not None:
                if since < t and event.at > t - settle_s:
                    return None
                since = None
        return None if since is not None and since < t else proc.life
    return None


def experts_nothing_lost(result: ChaosResult, steps: dict[str, int] | None, ttl_s: float) -> list[Check]:
    """``steps``: each job's steps (None when the harness stopped the nodes: a soak);
    ``ttl_s``: the heartbeat TTL (how long peers' views of who lives may lag)."""
    from ensemble.checkpoint import CheckpointError, CheckpointStore
    from node.experts_node import store_dir
    from protocol.runspec import load_spec, run_id

    rid = run_id(load_spec(result.workdir / "run.toml"))
    names = sorted(result.specs)
    reports, problems = {}, []
    for name in names:
        path = result.home(name) / "report.json"
        if path.exists():
            reports[name] = json.loads(path.read_text())
        else:
            problems.append(f"{name} wrote no report")
    done: dict[str, set[tuple[int, str]]] = {}  # job -> (step, digest prefix) of each "done" line
    made: dict[str, int] = {}
    for proc in result.procs:
        for line in proc.messages():
            if match := _EX_DONE.fullmatch(line.message):
                done.setdefault(match[1], set()).add((int(match[2]), match[3]))
            elif match := EX_CHECKPOINT.fullmatch(line.message):
                made[match[1]] = max(made.get(match[1], 0), int(match[2]))
    if steps is not None:
        for job, total in steps.items():
            finished = {step for step, _ in done.get(job, ())}
            if total not in finished:
                problems.append(f"{job}: never done at step {total} (checkpointed up to {made.get(job, 0)})")
            if made.get(job, 0) > total or any(step != total for step in finished):
                problems.append(f"{job}: checkpointed or done past its {total} steps")
        problems += [f"{n}: its report does not say every job is done" for n, r in reports.items()
                     if not r.get("all_done")]
        detail = ", ".join(f"{job} at {total}" for job, total in sorted(steps.items()))
    else:
        detail = ", ".join(f"{job} at {made.get(job, 0)}" for job in sorted(made))
    checks = [_check("every job done with its full steps" if steps is not None else "jobs checkpointed",
                     problems, detail)]

    kept = _kept_steps(result.procs)
    problems, resumed = [], Counter()
    stints = experts_stints(result.procs)
    for stint in stints:
        live_best = 0
        for name, items in kept.items():
            # its own disk counts across its lives; another node's, from when its life then said it
            # holds it (a restarted node's peers learn its store only once it says so)
            life = None if name == stint.node else _live_at(result, name, stint.at, ttl_s)
            steps_kept = [step for at, job, step, of in items
                          if job == stint.job and at <= stint.at - ttl_s and (name == stint.node or of == life)]
            if steps_kept and (name == stint.node or life is not None):
                live_best = max(live_best, max(steps_kept))
        resumed["from step 0" if stint.start_step == 0 else stint.source.split(" ")[0] if stint.source else "?"] += 1
        if stint.start_step < live_best:
            problems.append(f"{stint.node} life {stint.life} took up {stint.job} at step {stint.start_step}"
                            f"{' (afresh)' if stint.afresh else ''} though a live node kept its checkpoint at step "
                            f"{live_best}")
    checks.append(_check("no stint started behind a checkpoint a live node kept", problems,
                         f"{len(stints)} stints: " + ", ".join(f"{k} {v}" for k, v in sorted(resumed.items()))))

    problems, seen, on_disk = [], 0, set()
    for name in names:
        root = store_dir(str(result.home(name) / "data"), rid)
        if not root.is_dir():
            continue
        store = CheckpointStore(root)
        for digest in store.digests():
            try:
                store.get(digest)
                seen += 1
                on_disk.add(digest.hex()[:16])
            except CheckpointError as error:
                problems.append(f"{name}: {error}")
        for path in root.iterdir():
            if path.suffix == ".safetensors" and not re.fullmatch(r"[0-9a-f]{64}", path.stem):
                problems.append(f"{name}: {path.name} is not named by a digest")
    checks.append(_check("every checkpoint file hashes to its name", problems, f"{seen} files"))
    lost = [f"{job}: its final checkpoint {digest} is on no node's disk" for job, items in sorted(done.items())
            for _, digest in sorted(items) if digest not in on_disk]
    checks.append(_check("each job's final checkpoint is on disk", lost, f"{len(done)} jobs"))
    checks.append(files_whole(result))
    return checks
