"""The skip pipeline on live nodes: microbatches along paths, gradients averaged per stage, one step.

Every node holds one stage (stage 0, with the embedding, head and loss, is the data node's).
Iteration k:

1. Each data node plans its microbatches' paths over the live replicas (trainer/pipeline/plan.py)
   and drives them, at most ``memory`` at a time: stage 0's start, then ``pp.forward`` to the first
   hop, which computes and hands its output on to the next hop itself; the last hop delivers to
   the data node (``pp.arrive``), which takes the loss and sends ``pp.backward`` back along the
   path the same way. A hand-over that fails goes to another live replica of that stage, or
   skips the stage when none is left. Then it tells every stage node ``pp.done``.
2. A stage node serves hops (each holds one of its ``memory`` activation slots from forward to
   backward) until every live data node said done.
3. The replicas of each stage reduce their summed gradients at the stage's reducer (the smallest id
   among its live replicas and those that took part in the last reduce) in a fixed order,
   weighted by microbatches processed; all apply the same averaged gradient and step. The reducer also compares weight hashes and sends its weights to a replica
   that differs, so the replicas of a stage hold identical weights after every iteration.
4. Every tensor a peer hands a node is checked first (trainer/pipeline/guard.py): a bad one is
   refused, or left out of the reduce, and its sender banned: the node publishes a ``banned``
   event and its bans in record ``pp.bans``; every node adopts the bans of the others, leaves
   banned nodes out of paths, schedules and reduces, and a node that finds itself banned stops.

(hivemind's averager is not used for this step: it applies the average as a delta to each local
tensor, so replicas end within rounding of each other instead of identical.)
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import signal
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from protocol.errors import ProtocolError
from trainer.pipeline.guard import GRADIENT_SLACK, Guard, GuardSettings
from trainer.pipeline.leader import SCHEDULE_RECORD, paths_from_schedule
from trainer.pipeline.plan import Hop, plan_paths
from trainer.pipeline.state import (STATE_PART_BYTES, VERSION_GONE, encode_part, fetch_state,  # noqa: F401 (re-exported)
                                    split_parts, state_digest)
from trainer.pipeline.snapshots import save_snapshot
from trainer.recovery.checkpoint import load_checkpoint, save_checkpoint
from trainer.swarm import Swarm, SwarmCallError

logger = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]
Tamper = Callable[[str, int, torch.Tensor], torch.Tensor]  # (what, iteration, tensor) -> what is sent
BANS_RECORD = "pp.bans"
MAX_BANS = 128  # entries of one node's pp.bans record (a record holds 64 KiB)


class PipelineError(ProtocolError):
    """A request that does not fit this node's stage or iteration (the caller gets the reason)."""


@dataclass(frozen=True)
class PipelineSettings:
    num_stages: int
    path_length: int
    swap: str
    microbatches: int
    memory: int
    iterations: int
    lr: float
    done_timeout_s: float = 120.0
    reduce_timeout_s: float = 60.0
    retry_s: float = 0.5
    hop_attempts: int = 4
    slot_wait_s: float = 2.0  # a forward waits this long for a free memory slot, then is refused
    arrival_timeout_s: float = 60.0  # a data node waits this long for a microbatch to come back from its path
    microbatch_attempts: int = 2  # sends of a microbatch whose path never delivered it back
    use_leader: bool = True  # follow the leader's published schedule when it fits the live swarm
    activation_dtype: torch.dtype = torch.float32  # activations and their gradients on the wire
    microbatch_size: int | None = None  # samples per microbatch; a forward with more is refused
    heartbeat_s: float = 1.0  # how often nodes publish their iteration: how stale a peer's may be


@dataclass
class PipelineReport:
    iterations: int = 0
    losses: list[tuple[int, float, float]] = field(default_factory=list)  # (iteration, unix time, mean loss)
    hashes: list[tuple[int, str]] = field(default_factory=list)  # weights hash after each step
    planned: list[list] = field(default_factory=list)  # data nodes: [iteration, mb, [[stage, node hex]...]]
    executed: list[list] = field(default_factory=list)
    served: list[list] = field(default_factory=list)  # stage nodes: [iteration, data node hex, mb]
    plans: list[list] = field(default_factory=list)  # data nodes: [iteration, "leader" or "local", version]
    rerouted: int = 0
    skipped: int = 0
    resyncs: int = 0
    seconds: float = 0.0
    compute_s: float = 0.0  # forward and backward time of this node's stage
    microbatches: int = 0  # microbatches whose forward ran here
    tokens: int = 0  # data nodes: tokens trained on
    # per iteration: (iteration, unix start, seconds of microbatches (data nodes) or of waiting for
    # them (stage nodes), seconds of the reduce and step)
    phases: list[tuple[int, float, float, float]] = field(default_factory=list)
    grad_norms: list[tuple[int, float]] = field(default_factory=list)  # norm of the averaged gradient, per step
    first_iteration: int = 0  # a node that joined a running run starts here
    recoveries: list[dict] = field(default_factory=list)  # how this node took its stage's state (recovery)
    moved_to: int | None = None  # the run's leader asked this node to serve another stage
    moved_lost_at: float | None = None  # when that stage was lost, by the leader's job board
    rollbacks: list[list] = field(default_factory=list)  # checkpoint baseline: [epoch, to iteration, unix time]
    bans: list[list] = field(default_factory=list)  # [iteration, node hex, reason, "seen" or "adopted"]
    excluded: list[list] = field(default_factory=list)  # reducers: [iteration, node hex, reason] left out
    refused: int = 0  # tensors refused by the guard
    banned: str | None = None  # why this node was banned, when it was


MAX_PATH = 256  # hops of one path
MAX_DATA_NODES = 1024  # data nodes whose progress a stage node tracks; past this the oldest entry goes
REDUCE_AHEAD = 2  # a pp.reduce for an iteration further ahead than this cannot come from a replica in step
STATE_SNAPSHOTS = 4  # pp.state snapshots held (weights only, or with the optimizer): the newest, and those fetches begun before a step read


@dataclass
class _StateSnapshot:
    """What pp.state serves of one moment: the state, its parts and digest, and the iteration, lr
    and gradient norm that belong with it."""

    state: dict[str, torch.Tensor]
    parts: list[list[str]]
    digest: bytes
    iteration: int
    lr: float
    grad_norm: float | None


def state_hash(state: dict[str, torch.Tensor]) -> bytes:
    """BLAKE2b of a state dict's names and bytes, in name order (a module's, or one read from a file)."""
    h = hashlib.blake2b(digest_size=32, person=b"swarmtrain/pp-w")
    for name, p in sorted(state.items()):
        h.update(name.encode())
        h.update(p.detach().to("cpu").contiguous().numpy().tobytes())
    return h.digest()


def weights_hash(module: torch.nn.Module) -> bytes:
    return state_hash(module.state_dict())


class PipelineWorker:
    def __init__(self, swarm: Swarm, stage: int, module: torch.nn.Module, settings: PipelineSettings,
                 data: Iterator[Batch] | None = None, die_after_forwards: int | None = None,
                 guard: GuardSettings | None = None, tamper: Tamper | None = None):
        """Test hooks: ``die_after_forwards``: the process SIGKILLs itself when the next forward
        arrives after that many, i.e. in the middle of an iteration with activations held;
        ``tamper(what, iteration, t)`` replaces what this node sends: its outputs ("x"), the
        gradients it passes back ("grad") and its parameter gradients at the reduce ("param")."""
        self.swarm = swarm
        self.me = swarm.my_id
        self.stage = stage
        self.module = module
        self.settings = settings
        self.data = data
        self.die_after_forwards = die_after_forwards
        self.guard = Guard(guard or GuardSettings())
        self.tamper = tamper
        self._announced: list[bytes] = []  # bans this node decided, in order
        self._bans_read_at = -math.inf
        self._stage_of: dict[bytes, int] = {}
        self.device = next(module.parameters()).device
        self.optimizer = torch.optim.AdamW(module.parameters(), lr=settings.lr, weight_decay=0.0)
        self.report = PipelineReport()
        self.iteration = 0
        self._iteration_changed = asyncio.Condition()
        self._slots = asyncio.Semaphore(settings.memory)
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # key -> (input, output)
        self._count = 0  # microbatches whose backward reached this stage this iteration
        self._done_upto: dict[bytes, int] = {}  # data node -> the last iteration it finished
        self._done_event = asyncio.Event()
        self._reduce_inbox: dict[tuple[int, bytes], tuple[dict, int, bytes]] = {}
        self._reduce_event = asyncio.Event()
        self._reduce_result: dict[int, asyncio.Future] = {}
        self._reduce_calls = 0  # pp.reduce calls being answered right now
        # The stage's other replicas as of the last reduce. A replica whose heartbeat is late drops
        # out of the fresh view for a moment; without this memory two replicas could each take
        # themselves for the reducer, step alone and part ways for an iteration.
        self._mates: set[bytes] = set()
        self._version = 0  # changes whenever the weights or optimizer state do
        # The iteration the weights are at the start of. It moves on with the step (or the skip) of
        # a reduce, while ``iteration`` moves on only once the loop has written the iteration's hash
        # and snapshot, which awaits: a pp.state answered in between paired the stepped weights with
        # the old iteration, and the node that copied them did that iteration again, a step ahead of
        # the stage for good.
        self._state_at = 0
        self.grad_norm = 0.0  # of the last averaged gradient; 0 before the first step
        self._served: set[tuple[int, bytes]] | None = None  # (stage, node) of the live replicas at the last look
        self.move_to: int | None = None  # set from outside: leave after this iteration for that stage
        # the checkpoint-and-restart baseline (pipeline.recovery = "checkpoint"), set from outside
        self.checkpoint_root: Path | None = None
        self.checkpoint_every = 1
        self.restart_delay_s = 0.0
        self.rollback: tuple[int, int] | None = None  # (epoch, iteration) the run's leader ordered
        self.rolled_back_epoch = 0
        self.skip_rollback_to: int | None = None  # restored from that checkpoint already
        self.snapshot_root: Path | None = None  # evaluation afterwards: weights every snapshot_every iterations
        self.snapshot_every = 5
        # snapshots pp.state serves, by (version, weights_only): the newest and the one a fetch that
        # began before the last step still reads (a big stage over a slow link takes longer than an
        # iteration to move; its parts must all come from one moment)
        self._state_snapshots: OrderedDict[tuple[int, bool], _StateSnapshot] = OrderedDict()
        self.state_part_bytes = STATE_PART_BYTES
        self._arrivals: dict[tuple, asyncio.Future] = {}  # data nodes: (k, mb, attempt, kind) -> what arrives
        self._tasks: set[asyncio.Task] = set()  # hand-overs running after their handler answered
        for method, handler in (("pp.forward", self._on_forward), ("pp.backward", self._on_backward),
                                ("pp.arrive", self._on_arrive), ("pp.done", self._on_done), ("pp.reduce", self._on_reduce),
                                ("pp.state", self._on_state)):
            swarm.serve(method, handler)

    # ---- membership --------------------------------------------------------------------------

    async def _replicas(self, fresh: bool = False) -> dict[int, list[bytes]]:
        """Live replicas by stage; banned nodes are no replicas."""
        by_stage: dict[int, list[bytes]] = {}
        for p in await self.swarm.peers(fresh=fresh):
            if p.stage is not None and p.role in ("data", "stage"):
                self._stage_of[p.id] = p.stage
                if p.id not in self.guard.bans:
                    by_stage.setdefault(p.stage, []).append(p.id)
        by_stage.setdefault(self.stage, [])
        if self.me not in by_stage[self.stage]:
            by_stage[self.stage].append(self.me)
        # a stage served again (rebuilt or re-initialised weights) or a node new in a stage moves
        # the scales along the paths; a node sees it as a replica it did not see at its last look
        # (a spare that rebuilt a stage is one, also when this node missed the moment it was lost)
        served = {(s, n) for s, ids in by_stage.items() for n in ids}
        if self._served is not None and (new := served - self._served):
            logger.info("new replicas (%s): the guard's scales start afresh",
                        ", ".join(f"stage {s}: {n.hex()[:12]}" for s, n in sorted(new)))
            self.guard.forget_scales()
        self._served = served
        return {s: sorted(ids) for s, ids in by_stage.items()}

    # ---- the guard: bad tensors and bans ------------------------------------------------------

    def _screen(self, sender: bytes, kind: str, t: torch.Tensor, k: int, path: tuple[int, ...] | None = None,
                ident: tuple | None = None, visited: list[Hop] | None = None,
                planned: set[bytes] | None = None) -> None:
        """Raise PipelineError when ``t`` from ``sender`` (iteration ``k``, through the stages ``path``
        when known; ``ident``: which microbatch's, so that a retried delivery is one offence;
        ``visited``: the hops activations came through, by the sender's word) fails the guard (which
        may ban it). Blame goes up the route only to nodes this data node ``planned`` for it."""
        if sender == self.me:
            return
        upstream = tuple(n for _, n in visited or () if n not in (sender, self.me))
        if planned is not None:
            upstream = tuple(n for n in upstream if n in planned)
        reason = self.guard.check(sender, self._stage_of.get(sender, -1), kind, t, k, path, ident, upstream,
                                  blame_upstream=planned is not None)
        self._announce_bans()
        if reason is not None:
            self.report.refused += 1
            raise PipelineError(f"refused: {reason}")

    def _announce_bans(self) -> None:
        """Bans this node decided itself: a ``banned`` event each, and all of them in ``pp.bans``."""
        new = [n for n in self.guard.bans if n not in self._announced and not self.guard.adopted(n)]
        if not new:
            return
        self._announced.extend(new)
        for node in new:
            reason = self.guard.bans[node]
            self.report.bans.append([self.iteration, node.hex(), reason, "seen"])
            logger.warning("banned %s: %s", node.hex()[:16], reason)
        mine = [[n, self.guard.bans[n][:160]] for n in self._announced][:MAX_BANS]

        async def publish() -> None:
            try:
                for node in new:
                    await self.swarm.report_event("banned", f"node {node.hex()} banned: {self.guard.bans[node]}")
                await self.swarm.publish(BANS_RECORD, {"bans": mine}, ttl_s=max(120.0, self.settings.done_timeout_s))
            except (SwarmCallError, ValueError, OSError) as error:
                logger.warning("could not publish bans: %s", error)

        self._background(publish())

    async def _refresh_bans(self, force: bool = False) -> None:
        """Adopt the bans other members published (read at most every ``retry_s``): the first of
        each accuser's list, in the order it made them, unless the accuser is banned here. So f
        malicious members can have at most f others excluded, each by an accusation on record."""
        loop = asyncio.get_running_loop()
        if not self.guard.settings.enabled or (not force and loop.time() - self._bans_read_at < self.settings.retry_s):
            return
        self._bans_read_at = loop.time()
        try:
            records = await self.swarm.read(BANS_RECORD)
        except (SwarmCallError, ValueError) as error:
            logger.info("could not read bans: %s", error)
            return
        believed = []  # decided on the bans as they were before this read: the order of records does not matter
        for signer in sorted(records):
            body = records[signer]
            items = body.get("bans") if isinstance(body, dict) else None
            if signer == self.me or signer in self.guard.bans or not isinstance(items, list):
                continue
            item = items[0] if items else None
            if (isinstance(item, list) and len(item) == 2 and isinstance(item[0], bytes) and len(item[0]) == 32
                    and isinstance(item[1], str)):
                believed.append((item[0], f"reported by {signer.hex()[:16]}: {item[1][:160]}"))
        for node, reason in believed:
            if self.guard.ban(node, reason, adopted=True):
                self.report.bans.append([self.iteration, node.hex(), reason, "adopted"])
                logger.warning("banned %s (%s)", node.hex()[:16], reason)
                self._mates.discard(node)

    def _sent(self, what: str, k: int, t: torch.Tensor) -> torch.Tensor:
        return self.tamper(what, k, t) if self.tamper is not None else t

    # ---- main loop ---------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> PipelineReport:
        started = time.time()
        while not stop.is_set() and self.iteration < self.settings.iterations:
            await self._refresh_bans()
            if self.me in self.guard.bans:
                self.report.banned = self.guard.bans[self.me]
                logger.error("this node was banned from the run (%s); it stops serving", self.report.banned)
                break
            if self.move_to is not None and self.move_to != self.stage:
                self.report.moved_to = self.move_to
                logger.info("leaving stage %d for stage %d after iteration %d", self.stage, self.move_to,
                            self.iteration - 1)
                break
            if self._rollback_pending():
                await self._roll_back()
                continue
            k = self.iteration
            if self.checkpoint_root is not None and k % self.checkpoint_every == 0:
                await asyncio.to_thread(save_checkpoint, self.checkpoint_root, self.stage, k, self.full_state(),
                                        self.optimizer.param_groups[0]["lr"])
            began = time.time()
            if self.stage == 0:
                await self._drive(k)
            else:
                await self._wait_done(k, stop)
            if self._rollback_pending() or self.me in self.guard.bans:  # the iteration is abandoned
                continue
            reducing = time.time()
            await self._reduce_and_step(k)
            # the weights are those after iteration `done`: k, or a later one when this node took
            # the state of a replica that was ahead (the hash is compared with the replica's)
            done = max(k, self._state_at - 1)
            self.report.phases.append((k, began, reducing - began, time.time() - reducing))
            self.report.hashes.append((done, weights_hash(self.module).hex()))
            if self.snapshot_root is not None and ((done + 1) % self.snapshot_every == 0
                                                   or done + 1 == self.settings.iterations):
                await asyncio.to_thread(save_snapshot, self.snapshot_root, self.stage, done,
                                        dict(self.module.state_dict()), time.time())
            logger.info("pipeline iteration %d done, weights %s", done, self.report.hashes[-1][1][:16])
            for key in [key for key in self._cache if key[0] <= done]:  # forwards that came during its reduce
                del self._cache[key]
                self._slots.release()
            async with self._iteration_changed:
                self.iteration = self.report.iterations = max(k + 1, self._state_at)
                self._iteration_changed.notify_all()
        await self._linger()
        self.report.seconds = time.time() - started
        return self.report

    def _rollback_pending(self) -> bool:
        return self.rollback is not None and self.rollback[0] > self.rolled_back_epoch

    async def _roll_back(self) -> None:
        """The checkpoint baseline: back to the run's last complete checkpoint, after a restart's delay."""
        assert self.rollback is not None and self.checkpoint_root is not None
        epoch, to = self.rollback
        self.rolled_back_epoch = epoch
        if self.skip_rollback_to == to:  # this node joined from that very checkpoint
            self.skip_rollback_to = None
            return
        state, lr = await asyncio.to_thread(load_checkpoint, self.checkpoint_root, self.stage, to)
        self.load_full_state(state, lr)
        self.optimizer.zero_grad(set_to_none=True)  # what the abandoned iteration accumulated
        self._count = 0
        for key in list(self._cache):
            del self._cache[key]
            self._slots.release()
        self._done_upto.clear()
        self._reduce_inbox.clear()
        for future in self._reduce_result.values():
            future.cancel()
        self._reduce_result.clear()
        self.report.rollbacks.append([epoch, to, time.time()])
        logger.warning("rollback %d: back to the checkpoint of iteration %d (from %d); restarting takes %.1f s",
                       epoch, to, self.iteration, self.restart_delay_s)
        await asyncio.sleep(self.restart_delay_s)
        await self.begin_at(to, first=False)

    async def _linger(self) -> None:
        """After the last iteration a reducer stays until its replicas have their answers (and a
        moment longer for one that missed it and asks for the state instead)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.reduce_timeout_s
        while self._reduce_calls and loop.time() < deadline:
            await asyncio.sleep(self.settings.retry_s / 5)
        await asyncio.sleep(self.settings.retry_s * 4)

    # ---- data node ---------------------------------------------------------------------------

    async def _leader_paths(self, replicas: dict[int, list[bytes]]) -> tuple[list[list[Hop]], int] | None:
        """The current leader's published paths for us and their version, if they still fit the swarm."""
        live = [n for ids in replicas.values() for n in ids]
        leader = min(live)
        try:
            records = await self.swarm.read(SCHEDULE_RECORD)
        except (SwarmCallError, ValueError) as error:
            logger.info("could not read the schedule: %s", error)
            return None
        body = records.get(leader)
        paths = paths_from_schedule(body, self.me, replicas, self.settings.microbatches)
        if paths is None:
            return None
        version = body.get("version") if isinstance(body, dict) else None
        return paths, version if type(version) is int else 0

    async def _drive(self, k: int) -> None:
        replicas = await self._replicas()
        from_leader = await self._leader_paths(replicas) if self.settings.use_leader else None
        if from_leader is not None:
            paths, version = from_leader
            self.report.plans.append([k, "leader", version])
        else:
            paths = plan_paths(k, self.me, self.settings.microbatches, self.settings.num_stages,
                               self.settings.path_length, self.settings.swap, replicas)
            self.report.plans.append([k, "local", 0])
        for m, path in enumerate(paths):
            self.report.planned.append([k, m, [[s, n.hex()] for s, n in path]])
        losses = await asyncio.gather(*(self._microbatch(k, m, path) for m, path in enumerate(paths)))
        done = [loss for loss in losses if loss is not None]
        if done:
            self.report.losses.append((k, time.time(), sum(done) / len(done)))
            logger.info("iteration %d: mean loss %.4f over %d microbatches", k, self.report.losses[-1][2], len(done))
        stage_nodes = {n for s, ids in (await self._replicas(fresh=True)).items() if s != 0 for n in ids}
        await asyncio.gather(*(self._call_quietly(n, "pp.done", {"iteration": k}) for n in stage_nodes))

    async def _call_quietly(self, node: bytes, method: str, args: dict) -> None:
        try:
            await self.swarm.call(node, method, args)
        except SwarmCallError as error:
            logger.info("%s to %s failed: %s", method, node.hex()[:12], error)

    async def _microbatch(self, k: int, m: int, path: list[Hop]) -> float | None:
        async with self._slots:
            tokens, targets = next(self.data)
            tokens, targets = tokens.to(self.device), targets.to(self.device)
            began = time.perf_counter()
            x0 = self.module.start(tokens)
            self.report.compute_s += time.perf_counter() - began
            self.report.microbatches += 1
            for attempt in range(self.settings.microbatch_attempts):
                if attempt:
                    path = await self._live_path(path)
                arrived = await self._travel(k, m, attempt, "x", path, self._wire(x0),
                                             lambda route, t: self._pass_on(k, self.me, m, attempt, route, t, [], 0, 0))
                if arrived is not None:
                    break
                logger.warning("microbatch %d (attempt %d) did not come back from its path; sending it again",
                               m, attempt)
            else:
                logger.warning("microbatch %d of iteration %d is dropped: no attempt came back", m, k)
                self.report.executed.append([k, m, []])
                return None
            trip, x = arrived
            done = list(trip["visited"])
            self.report.skipped += trip["skipped"]
            self.report.rerouted += trip["rerouted"]
            self.report.executed.append([k, m, [[s, n.hex()] for s, n in done]])
            began = time.perf_counter()
            x_last = self._receive(x).requires_grad_(True)
            _, loss = self.module.finish(x_last, targets)
            loss.backward()
            grad = self._wire(x_last.grad)
            self.report.compute_s += time.perf_counter() - began
            back = list(reversed(done))
            arrived = await self._travel(k, m, attempt, "grad", back, grad,
                                         lambda route, t: self._pass_back(k, self.me, m, attempt, route, t))
            if arrived is not None and not arrived[0].get("lost"):
                began = time.perf_counter()
                x0.backward(self._receive(arrived[1]))
                self.report.compute_s += time.perf_counter() - began
                self._count += 1
            else:
                logger.warning("the gradient of microbatch %d did not come back; stages before the break get none", m)
            self.report.tokens += tokens.numel()
            return float(loss)

    async def _live_path(self, path: list[Hop]) -> list[Hop]:
        """``path`` with each hop whose node left the view moved to a live replica of its stage,
        or dropped (the stage skipped) when none is left."""
        replicas = await self._replicas(fresh=True)
        out = []
        for stage, node in path:
            live = replicas.get(stage, [])
            if node in live:
                out.append((stage, node))
            elif live:
                out.append((stage, live[0]))
        return out

    async def _travel(self, k: int, m: int, attempt: int, kind: str, route: list[Hop], t: torch.Tensor,
                      send) -> tuple[dict, torch.Tensor] | None:
        """Send ``t`` along ``route`` (with ``send``) and wait for what the route's end delivers
        back here (``pp.arrive``); None when nothing came within the timeout."""
        if not route:
            return {"visited": [], "skipped": 0, "rerouted": 0}, t
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        future.expected_shape = tuple(t.shape)  # what comes back has the shape of what went out
        future.stages = tuple(stage for stage, _ in route)  # a gradient's: the stages its microbatch visited
        future.nodes = {node for _, node in route}  # a refusal of what one of them delivers ends the wait
        self._arrivals[(k, m, attempt, kind)] = future
        deadline = loop.time() + self.settings.arrival_timeout_s
        try:
            await send(route, t)
            while loop.time() < deadline:
                try:
                    return await asyncio.wait_for(asyncio.shield(future), min(self.settings.retry_s * 4,
                                                                             max(0.0, deadline - loop.time())))
                except TimeoutError:
                    # a node of the route that died (or was banned) holding the microbatch would
                    # never pass it on: give up on this attempt as soon as the view says so
                    await self._refresh_bans()
                    live = {n for ids in (await self._replicas()).values() for n in ids}
                    gone = [n for _, n in route if n not in live]
                    if gone:
                        logger.info("microbatch %d (%s): %s left the swarm or was banned; not waiting for it", m,
                                    kind, gone[0].hex()[:12])
                        return None
            return None
        finally:
            self._arrivals.pop((k, m, attempt, kind), None)
            if not future.done():
                future.cancel()

    async def _pass_on(self, k: int, origin: bytes, m: int, attempt: int, route: list[Hop], x: torch.Tensor,
                       visited: list[Hop], skipped: int, rerouted: int) -> None:
        """Hand the activations to the next stage of the route that takes them: the planned node, or
        another live replica of its stage after a back-off, or the stage after it when none is left;
        past the route's end, back to the data node it started from."""
        while route:
            (stage, node), rest = route[0], route[1:]
            args = {"iteration": k, "mb": m, "attempt": attempt, "origin": origin,
                    "route": [[s, n] for s, n in rest], "visited": [[s, n] for s, n in visited],
                    "skipped": skipped, "rerouted": rerouted}
            taker = await self._hand_over(stage, node, "pp.forward", args, {"x": x})
            if taker is not None:
                return
            logger.warning("microbatch %d: no replica of stage %d took it; skipping that stage", m, stage)
            skipped += 1
            route = rest
        args = {"iteration": k, "mb": m, "attempt": attempt, "kind": "x", "visited": [[s, n] for s, n in visited],
                "skipped": skipped, "rerouted": rerouted}
        await self._deliver(origin, args, {"t": x})

    async def _hand_over(self, stage: int, node: bytes, method: str, args: dict, tensors: dict) -> bytes | None:
        """Call ``method`` on ``node``, or on another live replica of its stage when it fails, with
        back-off between rounds; the node that took the call, or None."""
        candidates = [node] if node not in self.guard.bans else (await self._replicas()).get(stage, [])
        for attempt in range(self.settings.hop_attempts):
            for candidate in candidates:
                try:
                    if candidate != node:  # only forwards go elsewhere; the data node learns how often
                        await self.swarm.call(candidate, method, {**args, "rerouted": args["rerouted"] + 1}, tensors)
                    else:
                        await self.swarm.call(candidate, method, args, tensors)
                    return candidate
                except SwarmCallError as error:
                    logger.warning("%s of microbatch %d to stage %d on %s failed (%s)", method, args["mb"], stage,
                                   candidate.hex()[:12], error)
            live = (await self._replicas(fresh=True)).get(stage, [])
            if not live or method != "pp.forward":
                break  # a backward needs the node that holds the forward's activations
            # the planned node first if it is still live, then the others
            candidates = sorted(live, key=lambda n: (n != node, n))
            await asyncio.sleep(self.settings.retry_s * (attempt + 1))
        return None

    async def _pass_back(self, k: int, origin: bytes, m: int, attempt: int, route: list[Hop],
                         grad: torch.Tensor) -> None:
        """Hand the gradient to the previous stage of the path (it holds the activations), or past
        the path's start to the data node. A node that cannot reach its predecessor tells the data
        node that the gradient is lost."""
        if not route:
            await self._deliver(origin, {"iteration": k, "mb": m, "attempt": attempt, "kind": "grad"}, {"t": grad})
            return
        (stage, node), rest = route[0], route[1:]
        args = {"iteration": k, "mb": m, "attempt": attempt, "origin": origin, "route": [[s, n] for s, n in rest]}
        if await self._hand_over(stage, node, "pp.backward", args, {"grad": grad}) is None:
            await self._deliver(origin, {"iteration": k, "mb": m, "attempt": attempt, "kind": "grad", "lost": True}, {})

    async def _deliver(self, origin: bytes, args: dict, tensors: dict) -> None:
        """``pp.arrive`` at the data node (or straight into its future when that is this node)."""
        if origin == self.me:
            try:
                await self._on_arrive(self.me, args, tensors)
            except PipelineError as error:  # late or twice (an attempt given up on): nothing waits for it
                logger.info("microbatch %d: %s", args["mb"], error)
            return
        for attempt in range(self.settings.hop_attempts):
            try:
                await self.swarm.call(origin, "pp.arrive", args, tensors)
                return
            except SwarmCallError as error:
                logger.warning("delivery of microbatch %d to %s failed (%s)", args["mb"], origin.hex()[:12], error)
                await asyncio.sleep(self.settings.retry_s * (attempt + 1))

    def _background(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _wire(self, t: torch.Tensor) -> torch.Tensor:
        """What goes on the wire: the activation dtype, on the CPU (the RPC sends host bytes)."""
        return t.detach().to(device="cpu", dtype=self.settings.activation_dtype)

    def _receive(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor off the wire, as this stage computes with it: float32 on the stage's device."""
        return t.detach().to(device=self.device, dtype=torch.float32)

    # ---- stage node --------------------------------------------------------------------------

    async def _wait_done(self, k: int, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.done_timeout_s
        while not stop.is_set() and loop.time() < deadline and not self._rollback_pending():
            await self._refresh_bans()
            if self.me in self.guard.bans:
                return
            data_nodes = set((await self._replicas()).get(0, []))
            self._free_slots_of_gone(data_nodes)
            if data_nodes and all(self._done_upto.get(d, -1) >= k for d in data_nodes):
                return
            if not data_nodes and any(done >= k for done in self._done_upto.values()):
                # every data node is gone, and one finished k before it went (the run's end: they
                # left after their last iteration while this node was behind): no one will send more
                # for k, so waiting out the timeout would only keep the run from ending
                return
            self._done_event.clear()
            try:
                await asyncio.wait_for(self._done_event.wait(), self.settings.retry_s * 4)
            except TimeoutError:
                # a pp.done can miss us (we joined after it was sent): a data node whose heartbeat
                # says it is past iteration k has finished it, also one that has left since, and
                # every iteration before the one it is in: a node behind goes through those at
                # once, not one wait each (a stage node back from a partition 140 iterations
                # behind caught up at 2 a second while the data nodes did 5: it never served again)
                for p in await self.swarm.peers(live_only=False):
                    if p.stage == 0 and p.state != "DEAD" and p.metrics.get("iteration", 0) > k:
                        self._mark_done(p.id, int(p.metrics["iteration"]) - 1)
        if not self._rollback_pending() and self.me not in self.guard.bans:
            logger.warning("iteration %d: not every data node said done in time; reducing anyway", k)

    def _free_slots_of_gone(self, data_nodes: set[bytes]) -> None:
        """Microbatches of a data node that is gone will see no backward: their memory slots would
        refuse the other data nodes' forwards until the iteration ends (which waits for those), and a
        data node restarted under the same id would find its first forwards "taken already". A node
        that was never seen as a data node (one joining now) keeps its microbatches."""
        gone = [key for key in self._cache if key[1] not in data_nodes and self._stage_of.get(key[1]) == 0]
        for key in gone:
            del self._cache[key]
            self._slots.release()
        if gone:
            logger.info("freed %d memory slot(s) of microbatches whose data node is gone", len(gone))

    def _mark_done(self, data_node: bytes, k: int) -> None:
        if k > self._done_upto.get(data_node, -1):
            if data_node not in self._done_upto and len(self._done_upto) >= MAX_DATA_NODES:
                del self._done_upto[next(iter(self._done_upto))]  # bounded whatever origins peers name
            self._done_upto[data_node] = k
            self._done_event.set()

    async def _at_iteration(self, sender: bytes, k: int) -> None:
        """Requests for a later iteration wait until this node has stepped into it. A data node
        that sends iteration k has finished k - 1 (its pp.done may have missed us)."""
        self._mark_done(sender, k - 1)
        try:
            async with self._iteration_changed:
                await asyncio.wait_for(self._iteration_changed.wait_for(lambda: self.iteration >= k),
                                       self.settings.done_timeout_s)
        except TimeoutError:
            raise PipelineError(f"this node is still at iteration {self.iteration}") from None
        if k != self.iteration:
            raise PipelineError(f"iteration {k} is over here (this node is at {self.iteration})")

    def _key(self, args: dict) -> tuple:
        k, m, attempt, origin = args.get("iteration"), args.get("mb"), args.get("attempt"), args.get("origin")
        if type(k) is not int or type(m) is not int or not 0 <= m < 1 << 20:
            raise PipelineError("iteration and mb must be integers")
        if type(attempt) is not int or not 0 <= attempt < 16 or not isinstance(origin, bytes) or len(origin) != 32:
            raise PipelineError("attempt must be a small integer and origin a node id")
        return (k, origin, m, attempt)

    @staticmethod
    def _hops(raw: object, what: str) -> list[Hop]:
        if not isinstance(raw, list) or len(raw) > MAX_PATH or not all(
                isinstance(h, list) and len(h) == 2 and type(h[0]) is int and isinstance(h[1], bytes)
                and len(h[1]) == 32 for h in raw):
            raise PipelineError(f"{what} must be a list of at most {MAX_PATH} [stage, node id] pairs")
        return [(h[0], h[1]) for h in raw]

    async def _on_forward(self, sender: bytes, args: dict, tensors: dict) -> tuple[dict, dict]:
        """Run this stage's forward for a microbatch, then pass the output on along its route (after
        answering: the caller does not wait for the rest of the path)."""
        if self.stage == 0:
            raise PipelineError("stage 0 does not serve hops")
        key = self._key(args)
        route, visited = self._hops(args.get("route"), "route"), self._hops(args.get("visited"), "visited")
        skipped, rerouted = args.get("skipped"), args.get("rerouted")
        if type(skipped) is not int or type(rerouted) is not int or not 0 <= skipped <= MAX_PATH or rerouted < 0:
            raise PipelineError("skipped and rerouted must be small counts")
        x = tensors.get("x")
        wire = self.settings.activation_dtype
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.dtype != wire:
            raise PipelineError(f"x must be a {wire} (batch, time, d_model) tensor")
        self._check_activation_shape(x)
        k, origin, m, attempt = key
        await self._at_iteration(origin, k)
        if key in self._cache:  # a retry after a lost answer: it was taken already
            return {}, {}
        self._screen(sender, "x", x, k, ident=key, visited=visited)
        if self.die_after_forwards is not None and len(self.report.served) >= self.die_after_forwards:
            logger.warning("fault injection: SIGKILL in the middle of iteration %d", k)
            os.kill(os.getpid(), signal.SIGKILL)
        try:  # released by backward (or at the end of the iteration)
            await asyncio.wait_for(self._slots.acquire(), self.settings.slot_wait_s)
        except TimeoutError:
            # Waiting longer could deadlock: paths in swapped order can each hold the slot the other
            # needs. The caller retries, then goes to another replica or skips the stage.
            raise PipelineError(f"memory full: {self.settings.memory} microbatches held here") from None
        x_in = self._receive(x).requires_grad_(True)
        began = time.perf_counter()
        try:
            y = self.module(x_in)
        except Exception as error:
            self._slots.release()
            raise PipelineError(f"forward failed: {error}") from None
        self.report.compute_s += time.perf_counter() - began
        self.report.microbatches += 1
        self._cache[key] = (x_in, y)
        self.report.served.append([k, origin.hex(), m])
        self._background(self._pass_on(k, origin, m, attempt, route, self._sent("x", k, self._wire(y)),
                                       visited + [(self.stage, self.me)], skipped, rerouted))
        return {}, {}

    def _check_activation_shape(self, x: torch.Tensor) -> None:
        """Attention costs time**2: a forward longer or wider than the model's (or a bigger batch than
        the run's) would stall this node's event loop or exhaust its memory."""
        cfg = getattr(self.module, "cfg", None)
        batch, length, width = x.shape
        if cfg is not None and (width != cfg.d_model or not 0 < length <= cfg.max_seq_len):
            raise PipelineError(f"x must be (batch, 1..{cfg.max_seq_len}, {cfg.d_model}), not {tuple(x.shape)}")
        if self.settings.microbatch_size is not None and not 0 < batch <= self.settings.microbatch_size:
            raise PipelineError(f"x holds {batch} samples; this run's microbatches hold {self.settings.microbatch_size}")

    async def _on_backward(self, sender: bytes, args: dict, tensors: dict) -> tuple[dict, dict]:
        key = self._key(args)
        route = self._hops(args.get("route"), "route")
        grad = tensors.get("grad")
        entry = self._cache.get(key)
        if entry is None:
            raise PipelineError("no forward of this microbatch is waiting here")
        x_in, y = entry
        if not isinstance(grad, torch.Tensor) or grad.shape != y.shape or grad.dtype != self.settings.activation_dtype:
            raise PipelineError("grad must match the forward output's shape and the run's activation dtype")
        self._screen(sender, "grad", grad, key[0], ident=key)
        del self._cache[key]
        self._slots.release()
        began = time.perf_counter()
        y.backward(self._receive(grad))
        self.report.compute_s += time.perf_counter() - began
        self._count += 1
        k, origin, m, attempt = key
        self._background(self._pass_back(k, origin, m, attempt, route, self._sent("grad", k, self._wire(x_in.grad))))
        return {}, {}

    async def _on_arrive(self, sender: bytes, args: dict, tensors: dict) -> tuple[dict, dict]:
        """A data node receives what the end of a path delivers: the activations after the last hop,
        or the gradient after the first (or word that the gradient is lost)."""
        k, m, attempt, kind = args.get("iteration"), args.get("mb"), args.get("attempt"), args.get("kind")
        future = self._arrivals.get((k, m, attempt, kind)) if type(k) is int and type(m) is int else None
        if future is None or future.done():
            raise PipelineError("no microbatch here waits for this")
        t = tensors.get("t")
        if kind == "x":
            visited = self._hops(args.get("visited"), "visited")
            skipped, rerouted = args.get("skipped"), args.get("rerouted")
            if type(skipped) is not int or type(rerouted) is not int:
                raise PipelineError("skipped and rerouted must be counts")
            result = {"visited": visited, "skipped": skipped, "rerouted": rerouted}
        else:
            result = {"lost": bool(args.get("lost"))}
        if not result.get("lost") and (not isinstance(t, torch.Tensor) or t.dtype != self.settings.activation_dtype
                                       or tuple(t.shape) != future.expected_shape):
            raise PipelineError(f"t must be a {self.settings.activation_dtype} tensor of shape {future.expected_shape}")
        if not result.get("lost"):
            try:
                self._screen(sender, "x" if kind == "x" else "grad", t, k, future.stages if kind != "x" else None,
                             ident=("arrive", k, m, attempt), visited=result.get("visited"),
                             planned=getattr(future, "nodes", None))
            except PipelineError:
                # a node of the route delivered what the guard refused: nothing good comes for this
                # attempt, so stop waiting now (the activations go again, the gradient is lost)
                # rather than for arrival_timeout_s; a stranger's refused delivery changes nothing
                if sender in future.nodes and not future.done():
                    future.set_result(None)
                raise
        future.set_result((result, t))
        return {}, {}

    async def _on_done(self, sender: bytes, args: dict, tensors: dict) -> tuple[dict, dict]:
        k = args.get("iteration")
        if type(k) is not int:
            raise PipelineError("iteration must be an integer")
        self._mark_done(sender, k)
        return {}, {}

    # ---- reducing ----------------------------------------------------------------------------

    def _grads(self) -> dict[str, torch.Tensor]:
        return {name: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().to("cpu")
                for name, p in self.module.named_parameters()}

    def _step(self, averaged: dict[str, torch.Tensor]) -> None:
        for name, p in self.module.named_parameters():
            p.grad = averaged[name].to(p.device, copy=True)
        # the stage's last gradient norm: what CheckFree weighs neighbours by (trainer/recovery)
        self.grad_norm = float(torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in self.module.parameters()])))
        self.report.grad_norms.append((self.iteration, self.grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._count = 0
        self._version += 1
        self._state_at = self.iteration + 1

    async def _reduce_and_step(self, k: int) -> None:
        # the answers of earlier reduces (an averaged gradient each) are no longer asked for: a
        # reducer that kept them grew by one stage's gradients per iteration (2-4 GB/h in a soak)
        for old in [it for it in self._reduce_result if it < k]:
            del self._reduce_result[old]
        # leftover slots of microbatches whose backward never came are freed before the reduce
        for key in [key for key in self._cache if key[0] <= k]:
            del self._cache[key]
            self._slots.release()
        await self._refresh_bans(force=True)
        while True:
            live = (await self._replicas(fresh=True)).get(self.stage, [self.me])
            members = sorted((set(live) | self._mates | {self.me}) - (set(self.guard.bans) - {self.me}))
            reducer = members[0]
            if reducer == self.me:
                await self._reduce_as_reducer(k, members)
                return
            own = self._grads()
            try:
                result, out = await self.swarm.call(reducer, "pp.reduce",
                                                    {"iteration": k, "count": self._count,
                                                     "hash": weights_hash(self.module)},
                                                    {n: self._sent("param", k, g) for n, g in own.items()},
                                                    even_if_dead=reducer not in live)
            except SwarmCallError as error:
                if "already reduced" in str(error):  # we came too late: take the stage's weights instead
                    self.optimizer.zero_grad(set_to_none=True)
                    self._count = 0
                    await self._resync(reducer)
                    self._state_at = k + 1
                    self._mates = set(members) - {self.me}
                    return
                if reducer not in live:  # gone for good, it seems: the next replica reduces
                    logger.info("stage mate %s did not answer and is not in the view: leaving it out",
                                reducer.hex()[:12])
                    self._mates.discard(reducer)
                    continue
                logger.warning("reduce at %s failed: %s; trying again", reducer.hex()[:12], error)
                await asyncio.sleep(self.settings.retry_s)
                continue
            if not result.get("skip") and not self._reply_ok(reducer, out, own):
                continue  # the reducer is banned now: the next replica reduces
            if result.get("skip"):
                self.optimizer.zero_grad(set_to_none=True)
                self._count = 0
                self._state_at = k + 1
            else:
                self._step(out)
            if result.get("resync"):
                await self._resync(reducer)
            self._mates = set(members) - {self.me}
            return

    def _reply_ok(self, reducer: bytes, out: dict, own: dict[str, torch.Tensor]) -> bool:
        """Whether the reducer's averaged gradient passes the guard (compared with our own); a
        reducer whose does not is banned at once: its average would be every replica's step."""
        names = {name for name, _ in self.module.named_parameters()}
        if set(out) != names:
            reason = "a reply to pp.reduce without this stage's gradients"
        else:
            reason = self.guard.check_gradients(self.stage, {reducer: (out, 1), self.me: (own, self._count)},
                                                trusted=self.me, slack=GRADIENT_SLACK).get(reducer)
        if reason is None:
            return True
        self.guard.ban(reducer, f"its averaged gradient: {reason}")
        self._announce_bans()
        self.report.refused += 1
        self._mates.discard(reducer)
        return False

    async def _reduce_as_reducer(self, k: int, members: list[bytes]) -> None:
        """Wait for the replicas in ``members`` (those in the view plus the ones known from the
        last reduce); after a short grace, only for those still in a fresh view."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.reduce_timeout_s
        mine = ({n: self._sent("param", k, g) for n, g in self._grads().items()}, self._count,
                weights_hash(self.module))
        ahead: dict[bytes, int] = {}
        while loop.time() < deadline:
            have = {sender for (it, sender) in self._reduce_inbox if it == k}
            if set(members) - {self.me} - set(ahead) <= have:
                break
            self._reduce_event.clear()
            try:
                await asyncio.wait_for(self._reduce_event.wait(), self.settings.retry_s * 4)
            except TimeoutError:
                members = (await self._replicas(fresh=True)).get(self.stage, [self.me])
                ahead = await self._past(k, set(members) - have - {self.me})
        contributions = {self.me: mine}
        contributions.update({s: v for (it, s), v in self._reduce_inbox.items() if it == k})
        if len(contributions) == 1 and ahead:
            # The stage's other replicas finished k without us (we came back, restored, and are the
            # reducer by id, while they had reduced k among themselves): stepping alone would part us
            # from them for good. Take the state of the furthest instead.
            furthest = max(ahead, key=lambda n: (ahead[n], n))
            logger.warning("iteration %d: the other replicas of stage %d are past it (%s at iteration %d); "
                           "taking its state instead of stepping alone", k, self.stage, furthest.hex()[:12],
                           ahead[furthest])
            future = self._reduce_result.setdefault(k, loop.create_future())
            if not future.done():
                future.set_result((None, mine[2], {}))
            self.optimizer.zero_grad(set_to_none=True)
            self._count = 0
            jumped = await self._resync(furthest)  # and go on in the iteration it is in
            self._state_at = jumped if jumped is not None else k + 1
            for key in [key for key in self._reduce_inbox if key[0] <= k]:
                del self._reduce_inbox[key]
            return
        self._mates = (set(contributions) | set(members)) - {self.me}
        excluded = self.guard.check_gradients(self.stage, {s: (g, c) for s, (g, c, _) in contributions.items()},
                                              trusted=self.me)
        self._announce_bans()
        for node, reason in sorted(excluded.items()):
            logger.warning("iteration %d: the gradients of %s are left out of the average: %s", k, node.hex()[:16],
                           reason)
            self.report.excluded.append([k, node.hex(), reason])
            del contributions[node]
        self._mates -= set(self.guard.bans)
        total = sum(count for _, count, _ in contributions.values())
        if total == 0:
            averaged = None
        else:
            averaged = {}
            for name in mine[0]:
                acc = torch.zeros_like(mine[0][name])
                for sender in sorted(contributions):  # a fixed order: the same sum on every run
                    acc += contributions[sender][0][name]
                averaged[name] = acc / total
        future = self._reduce_result.setdefault(k, loop.create_future())
        if not future.done():
            future.set_result((averaged, mine[2], excluded))
        if averaged is None:
            self.optimizer.zero_grad(set_to_none=True)
            self._count = 0
            self._state_at = k + 1
        else:
            self._step(averaged)
        for key in [key for key in self._reduce_inbox if key[0] <= k]:
            del self._reduce_inbox[key]

    async def _past(self, k: int, nodes: set[bytes]) -> dict[bytes, int]:
        """Those of ``nodes`` past iteration ``k`` (their heartbeat says they are in a later one, or
        they asked this node to reduce a later one), with that iteration."""
        if not nodes:
            return {}
        out = {p.id: int(p.metrics.get("iteration", 0)) for p in await self.swarm.peers()
               if p.id in nodes and p.metrics.get("iteration", 0) > k}
        for it, sender in self._reduce_inbox:
            if sender in nodes and it > k:
                out[sender] = max(out.get(sender, 0), it)
        return out

    async def _on_reduce(self, sender: bytes, args: dict, tensors: dict) -> tuple[dict, dict]:
        k, count, digest = args.get("iteration"), args.get("count"), args.get("hash")
        if type(k) is not int or type(count) is not int or count < 0 or not isinstance(digest, bytes):
            raise PipelineError("pp.reduce takes iteration, count and hash")
        names = {name for name, _ in self.module.named_parameters()}
        if set(tensors) != names or any(tensors[n].shape != p.shape for n, p in self.module.named_parameters()):
            raise PipelineError("gradients do not match this stage's parameters")
        if k < self.iteration:
            raise PipelineError(f"iteration {k} is already reduced here")
        if k > self.iteration + REDUCE_AHEAD:
            raise PipelineError(f"iteration {k} is too far ahead of this node's {self.iteration}")
        if sender not in self._mates and sender not in (await self._replicas()).get(self.stage, []):
            raise PipelineError(f"only replicas of stage {self.stage} reduce here")
        if sender in self.guard.bans:
            raise PipelineError(f"{sender.hex()[:16]} is banned: {self.guard.bans[sender]}")
        self._reduce_inbox[(k, sender)] = (tensors, count, digest)
        self._reduce_event.set()
        loop = asyncio.get_running_loop()
        future = self._reduce_result.setdefault(k, loop.create_future())
        self._reduce_calls += 1
        try:
            averaged, reducer_hash, excluded = await asyncio.wait_for(asyncio.shield(future),
                                                                      self.settings.reduce_timeout_s * 2)
        finally:
            self._reduce_calls -= 1
        if sender in excluded:
            raise PipelineError(f"these gradients were left out of the stage's average: {excluded[sender]}")
        resync = digest != reducer_hash
        if averaged is None:
            return {"skip": True, "resync": resync}, {}
        return {"skip": False, "resync": resync}, averaged

    def full_state(self, weights_only: bool = False) -> dict[str, torch.Tensor]:
        """Weights and optimizer state as named tensors: what makes two replicas identical."""
        out = {f"w/{name}": t.detach().to("cpu", copy=True) for name, t in self.module.state_dict().items()}
        if weights_only:
            return out
        index = {id(p): name for name, p in self.module.named_parameters()}
        for p, state in self.optimizer.state.items():
            for key, value in state.items():
                out[f"o/{index[id(p)]}/{key}"] = torch.as_tensor(value).detach().to("cpu", copy=True)
        return out

    def load_full_state(self, state: dict[str, torch.Tensor], lr: float | None = None) -> None:
        """A replica's weights and optimizer state (and its learning rate, when given)."""
        weights = {name[2:]: t for name, t in state.items() if name.startswith("w/")}
        self.module.load_state_dict(weights)  # strict: names and shapes must match
        params = dict(self.module.named_parameters())
        self.optimizer.state.clear()
        for name, t in state.items():
            if name.startswith("o/"):
                param, _, key = name[2:].rpartition("/")
                if param not in params:
                    raise RuntimeError(f"optimizer state for unknown parameter {param}")
                # AdamW keeps its step count on the CPU and its moments beside the parameter
                self.optimizer.state[params[param]][key] = t.clone() if key == "step" else t.to(params[param].device)
        if lr is not None:
            self.set_lr(lr)
        self._version += 1

    async def begin_at(self, k: int, first: bool = True) -> None:
        """Go on at iteration ``k``: a node joining a run under way (``first``), once it holds the
        stage's state, or a rollback."""
        async with self._iteration_changed:
            self.iteration = self.report.iterations = self._state_at = k
            if first:
                self.report.first_iteration = k
            self._iteration_changed.notify_all()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def load_rebuilt(self, weights: dict[str, torch.Tensor], lr: float) -> None:
        """Weights rebuilt for a lost stage, with a fresh optimizer at ``lr``."""
        self.module.load_state_dict(weights)
        self.optimizer.state.clear()
        self.set_lr(lr)
        self._version += 1

    async def _on_state(self, sender: bytes, args: dict, tensors: dict) -> tuple[dict, dict]:
        """One part of the state (``part``, default 0; ``weights_only`` leaves the optimizer out) as
        safetensors; see trainer/pipeline/state.py."""
        part, weights_only, version = args.get("part", 0), args.get("weights_only", False), args.get("version")
        if type(part) is not int or not isinstance(weights_only, bool) or not (version is None or type(version) is int):
            raise PipelineError("pp.state takes an integer part, a boolean weights_only and an integer version")
        key = (self._version if version is None else version, weights_only)
        snapshot = self._state_snapshots.get(key)
        if snapshot is None:
            if key[0] != self._version:
                raise PipelineError(f"state version {key[0]} {VERSION_GONE} (now {self._version})")
            state = self.full_state(weights_only)
            snapshot = _StateSnapshot(state, split_parts(state, self.state_part_bytes), state_digest(state),
                                      max(self.iteration, self._state_at), float(self.optimizer.param_groups[0]["lr"]),
                                      self.grad_norm)
            self._state_snapshots[key] = snapshot
            while len(self._state_snapshots) > STATE_SNAPSHOTS:
                self._state_snapshots.popitem(last=False)
        self._state_snapshots.move_to_end(key)
        if not 0 <= part < len(snapshot.parts):
            raise PipelineError(f"part must be in 0..{len(snapshot.parts) - 1}")
        sha, blob = encode_part(snapshot.state, snapshot.parts[part])
        return ({"iteration": snapshot.iteration, "version": key[0], "part": part, "parts": len(snapshot.parts),
                 "digest": snapshot.digest, "sha256": sha, "lr": snapshot.lr, "grad_norm": snapshot.grad_norm},
                {"safetensors": blob})

    async def _resync(self, peer: bytes) -> int | None:
        """Take ``peer``'s weights and optimizer state (after it stepped): ours had drifted from the
        stage's. Returns the iteration ``peer`` was in (None if the state could not be taken)."""
        async def call(args: dict) -> tuple[dict, dict]:
            return await self.swarm.call(peer, "pp.state", args)

        try:
            remote = await fetch_state(call)
            self.load_full_state(remote.state, remote.lr)
        except (SwarmCallError, RuntimeError, ValueError, PipelineError) as error:
            logger.warning("could not take the state of %s: %s", peer.hex()[:12], error)
            return None
        self.report.resyncs += 1
        logger.warning("weights and optimizer state replaced by %s's (they differed)", peer.hex()[:12])
        return remote.iteration
