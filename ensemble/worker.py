"""A node's expert loop: claim a job, resume it from its latest checkpoint, train it in rounds, publish
checkpoints; keep copies of others' checkpoints; serve checkpoints by digest.

Rounds: a job's steps go in rounds of ``checkpoint_every``. At the end of a round the node checkpoints
(its store, then the ``ex.ckpt`` record). When several nodes hold the same job (more nodes than
jobs), each trains on its share of the batch (batch_size / holders) and, at the round's end, waits
for the others to reach it and averages weights and optimizer moments with them, weighted by the
sequences each trained on; the checkpoint is then the group's state.

A job is open when nobody live holds an unexpired lease on it. A free node takes the open job with
the most compute left, else joins the group of the running job with the most compute left per
holder. It starts from the job's most advanced checkpoint: its own copy, or fetched from a live peer
that keeps it, verified against its digest (a rejected copy is reported and the next peer asked).
Each checkpoint is also kept by ``replicas`` other nodes (rendezvous hashing), so it outlives the
node that made it.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ensemble.board import (CKPT_RECORD, LEASE_RECORD, Board, Checkpoint, Held, build_board, choose_job, ckpt_body,
                            lease_body, mirrors, round_peers, should_yield)
from ensemble.checkpoint import CheckpointError, CheckpointRejected, CheckpointStore, fetch_checkpoint, recall
from ensemble.data import batch_seed, init_seed, job_batches
from ensemble.jobs import ExpertJob
from ensemble.train import CheckpointMismatch, ExpertTrainer, checkpoint_meta
from protocol.errors import ProtocolError
from trainer.swarm import Swarm, SwarmCallError

logger = logging.getLogger(__name__)

CKPT_METHOD = "ex.ckpt"
RECORD_TTL_S = 3600.0  # checkpoint records outlive their node for an hour: its jobs' progress stays known
CLAIM_ROUNDS = 3


class ExpertRequestError(ProtocolError):
    """A checkpoint request this node refuses: malformed, or for a digest it does not keep."""


@dataclass(frozen=True)
class WorkerSettings:
    batch_size: int
    seq_len: int
    checkpoint_every: int
    lease_s: float
    replicas: int
    interval_s: float  # records are refreshed and re-read this often (the heartbeat interval)
    barrier_s: float  # how long a group member waits for the others at the end of a round
    run_seed: int
    device: str = "cpu"
    tamper: bool = False  # fault injection (tests): serve forged checkpoints


@dataclass
class WorkerReport:
    jobs: list[dict] = field(default_factory=list)  # each stint on a job: where it began and ended
    mirrored: list[dict] = field(default_factory=list)  # checkpoints of others this node keeps a copy of
    rejected: list[dict] = field(default_factory=list)  # fetched checkpoints that failed verification
    averaged: int = 0  # rounds averaged with a group
    averaging_failed: int = 0
    all_done: bool = False


Status = Callable[[str | None, int, int, float], None]  # job name (None: idle), step, steps, loss


class ExpertWorker:
    def __init__(self, swarm: Swarm, jobs: Sequence[ExpertJob], settings: WorkerSettings, store: CheckpointStore,
                 train_data: Callable[[ExpertJob], list[torch.Tensor]], status: Status | None = None,
                 publish_event: Callable[[str, str], None] | None = None):
        self.swarm = swarm
        self.jobs = list(jobs)
        self.settings = settings
        self.store = store
        self.train_data = train_data
        self.status = status or (lambda *_: None)
        self.publish_event = publish_event or (lambda *_: None)
        self.me = swarm.my_id
        self.report = WorkerReport()
        self.lease: tuple[int, int] | None = None  # (job, step) this node holds
        self.sync = -1  # the round end at which this node waits to average (-1: not waiting)
        self.own: dict[int, Checkpoint] = {}  # the latest checkpoint this node made of each job
        self.mirror_of: dict[int, Held] = {}  # job -> the copy of its checkpoint this node keeps for others
        self._retired: dict[int, bytes] = {}  # job -> this node's checkpoint before its latest one
        self._refused: set[tuple[bytes, bytes]] = set()  # (digest, peer) pairs that served a forgery
        self.board: Board | None = None
        self._steps = [j.steps for j in self.jobs]
        self._compute = [j.compute for j in self.jobs]
        self._min_group_steps = 2 * settings.checkpoint_every

    # ---- the loop ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> WorkerReport:
        await asyncio.to_thread(self.recall)
        self.swarm.serve(CKPT_METHOD, self._on_ckpt)
        background = [asyncio.create_task(self._every(self.publish, stop)),
                      asyncio.create_task(self._every(self.mirror_once, stop))]
        try:
            while not stop.is_set():
                board = await self.read_board()
                if board is None:
                    await self._wait(stop)
                    continue
                if board.all_done():
                    if not self.report.all_done:
                        logger.info("every expert job of the run is done; serving checkpoints")
                    self.report.all_done = True
                    self.status(None, 0, 0, float("nan"))
                    await self._wait(stop)
                    continue
                job = choose_job(board, self.me, self._steps, self._compute, self._min_group_steps)
                if job is None:
                    await self._wait(stop)
                    continue
                job = await self._claim(job, stop)
                if job is not None:
                    await self._train(self.jobs[job], stop)
        finally:
            for task in background:
                task.cancel()
        return self.report

    def recall(self) -> None:
        """A node restarted on its data dir names again what its store holds from earlier lives
        (before its first record goes out); older checkpoints there are removed."""
        self.own, self.mirror_of, stale = recall(self.store.catalog(), self.jobs, self.me)
        for c in stale:
            self.store.delete(c.digest)
        for job, c in [*self.own.items(), *self.mirror_of.items()]:
            logger.info("found in the store: %s at step %d (%s, %s)", self.jobs[job].name, c.step, c.digest.hex()[:16],
                        "made here" if job in self.own and self.own[job].digest == c.digest else "a copy")

    async def _wait(self, stop: asyncio.Event, seconds: float | None = None) -> None:
        try:
            await asyncio.wait_for(stop.wait(), self.settings.interval_s if seconds is None else seconds)
        except TimeoutError:
            pass

    async def _every(self, action, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await action()
            except (SwarmCallError, ValueError, CheckpointError, OSError) as error:  # OSError: a full disk
                logger.info("%s: %s", action.__name__, error)
            await self._wait(stop)

    # ---- the board -----------------------------------------------------------------------------

    async def _live(self) -> set[bytes]:
        return {p.id for p in await self.swarm.peers(role="expert")} | {self.me}

    async def read_board(self) -> Board | None:
        try:
            leases, ckpts = await asyncio.gather(self.swarm.read(LEASE_RECORD), self.swarm.read(CKPT_RECORD))
            live = await self._live()
        except (SwarmCallError, ValueError) as error:
            logger.info("could not read the job board: %s", error)
            return None
        # what this node knows about itself is newer than what the DHT has of it
        leases[self.me] = lease_body(*self._lease_fields())
        ckpts[self.me] = ckpt_body(list(self.own.values()), self._have())
        self.board = build_board(len(self.jobs), leases, ckpts, live, time.time())
        return self.board

    def _lease_fields(self) -> tuple[int, float, int, int]:
        if self.lease is None:
            return -1, 0.0, 0, -1
        return self.lease[0], time.time() + self.settings.lease_s, self.lease[1], self.sync

    def _have(self) -> list[Held]:
        own = [Held(c.job, c.step, c.digest, c.done) for c in self.own.values()]
        return own + [h for h in self.mirror_of.values() if h.digest not in {o.digest for o in own}]

    def _kept(self) -> set[bytes]:
        return {h.digest for h in self._have()}

    async def publish(self) -> None:
        await self.swarm.publish(LEASE_RECORD, lease_body(*self._lease_fields()), self.settings.lease_s)
        await self.swarm.publish(CKPT_RECORD, ckpt_body(list(self.own.values()), self._have()), RECORD_TTL_S)

    async def _claim(self, job: int, stop: asyncio.Event) -> int | None:
        """Publish a lease on ``job``; after the others had time to claim too, keep it or move."""
        for _ in range(CLAIM_ROUNDS):
            self.lease = (job, 0)
            await self.publish()
            await self._wait(stop)
            board = await self.read_board()
            if board is None or stop.is_set():
                break
            if board.jobs[job].done:
                self.lease = None
                return None
            other = should_yield(board, self.me, job, self._steps, self._compute, self._min_group_steps)
            if other is None:
                return job
            logger.info("job %s was claimed at the same moment by a smaller id; taking %s instead",
                        self.jobs[job].name, self.jobs[other].name)
            job = other
        return job if not stop.is_set() else None

    # ---- training ------------------------------------------------------------------------------

    async def _train(self, job: ExpertJob, stop: asyncio.Event) -> None:
        s = self.settings
        # off the event loop: the model is built and the first optimizer imports torch._dynamo
        trainer = await asyncio.to_thread(ExpertTrainer, job, seed=init_seed(s.run_seed, job.data_key), device=s.device)
        stint = {"job": job.index, "name": job.name, "start_step": 0, "resumed_from": None, "started_at": time.time()}
        # the board as it is now: building the trainer took a while, and a peer may have checkpointed
        # the job further meanwhile (starting from the board read before would lose those steps)
        board = await self.read_board() or self.board
        view = board.jobs[job.index] if board is not None else None
        latest = view.latest if view is not None else None
        start = view.available if view is not None else None
        self.lease = (job.index, start.step if start is not None else 0)
        if start is not None:
            found = await self.obtain(start, job)
            if found is not None:
                state, source = found
                try:
                    trainer.load(state)
                    stint["start_step"] = trainer.step
                    stint["resumed_from"] = {"step": start.step, "digest": start.digest.hex(), "source": source}
                    logger.info("resumed job %s at step %d from checkpoint %s (%s)", job.name, trainer.step,
                                start.digest.hex()[:16], source)
                    if latest is not None and latest.step > start.step:
                        logger.warning("job %s: its checkpoint at step %d is kept by no live node; resumed from %d",
                                       job.name, latest.step, start.step)
                except CheckpointMismatch as error:
                    logger.warning("checkpoint %s does not fit job %s (%s); starting it afresh",
                                   start.digest.hex()[:16], job.name, error)
        if trainer.step == 0 and latest is not None:
            if [h for h in view.holders if h != self.me]:
                # its group is under way: joining from scratch would only drag it back
                logger.info("cannot fetch a checkpoint of job %s yet; not joining its group now", job.name)
                self.lease = None
                await self.publish()
                await self._wait(stop)
                return
            logger.warning("no live peer keeps a checkpoint of job %s (last at step %d); starting it afresh",
                           job.name, latest.step)
        self.report.jobs.append(stint)
        logger.info("training job %s (%s parameters, steps %d..%d)", job.name, f"{job.params:,}", trainer.step,
                    job.steps)
        train = await asyncio.to_thread(self.train_data, job)
        while not trainer.done and not stop.is_set():
            if board is not None and board.jobs[job.index].done:
                logger.info("job %s is done elsewhere; leaving it", job.name)
                break
            round_start = trainer.step
            round_end = min(job.steps, (round_start // s.checkpoint_every + 1) * s.checkpoint_every)
            holders = board.jobs[job.index].holders if board is not None else []
            group = max(1, len(set(holders) | {self.me}))
            batches = job_batches(train, max(1, s.batch_size // group), s.seq_len,
                                  batch_seed(s.run_seed, job.data_key, self.me, round_start))
            self.lease = (job.index, round_start)
            self.status(job.name, trainer.step, job.steps, trainer.last_loss)
            before = trainer.samples
            loss = await asyncio.to_thread(trainer.train_steps, round_end - round_start, batches)
            self.lease = (job.index, trainer.step)
            self.status(job.name, trainer.step, job.steps, loss)
            board = await self.read_board() or board
            if [h for h in board.jobs[job.index].holders if h != self.me] if board is not None else []:
                await self._average(job, trainer, round_start, trainer.samples - before, stop)
            await self._checkpoint(job, trainer)
            board = await self.read_board() or board
            moved = should_yield(board, self.me, job.index, self._steps, self._compute, self._min_group_steps) \
                if board is not None and not trainer.done else None
            if moved is not None:
                # two nodes claimed it at one moment and neither saw the other in time (a slow DHT):
                # the smaller id trains on, from this round's checkpoint too; this node takes the open job
                logger.info("job %s is also held by a smaller id while %s is open; leaving it at step %d",
                            job.name, self.jobs[moved].name, trainer.step)
                break
        def saved() -> bool:
            return job.index in self.own and self.own[job.index].step == trainer.step

        while trainer.done and not saved() and not stop.is_set():
            # resumed from a finished checkpoint whose maker's record is gone, or the last one did not
            # fit on the disk: the job is done once this node's record says so
            await self._checkpoint(job, trainer)
            if not saved():
                await self._wait(stop)
        stint["end_step"] = trainer.step
        stint["done"] = trainer.done and saved()
        self.lease = None
        if stint["done"]:
            digest = self.own[job.index].digest.hex()
            logger.info("job %s done at step %d: checkpoint %s", job.name, trainer.step, digest[:16])
            self.publish_event("expert_done", f"{job.name} done at step {trainer.step}, checkpoint {digest[:16]}")
        await self.publish()

    async def _average(self, job: ExpertJob, trainer: ExpertTrainer, round_start: int, samples: int,
                       stop: asyncio.Event) -> None:
        """Wait (up to barrier_s) for the job's holders still inside this round, then average with
        those that reached its end too."""
        self.sync = trainer.step
        try:
            await self.publish()
            deadline = time.monotonic() + self.settings.barrier_s
            ready: list[bytes] = []
            while not stop.is_set():
                board = await self.read_board()
                if board is None:
                    return
                ready, behind = round_peers(board, self.me, job.index, round_start, trainer.step)
                if not behind or time.monotonic() > deadline:
                    break
                await self._wait(stop, min(0.5, self.settings.interval_s))
            if not ready or samples <= 0:
                return
            try:
                averaged, size = await self.swarm.average(f"ex-{job.index}", trainer.averaged_tensors(),
                                                          float(samples))
            except SwarmCallError as error:
                self.report.averaging_failed += 1
                logger.info("job %s: no averaging group at step %d (%s); going on alone", job.name, trainer.step,
                            error)
                return
        finally:
            self.sync = -1
        total = trainer.samples - samples + samples * size
        trainer.load_averaged(averaged)
        trainer.samples = total
        self.report.averaged += 1
        logger.info("job %s: averaged with a group of %d at step %d", job.name, size, trainer.step)

    async def _checkpoint(self, job: ExpertJob, trainer: ExpertTrainer) -> None:
        state = trainer.state()
        try:
            digest = await asyncio.to_thread(self.store.put, state, self.me, float(trainer.last_loss))
        except OSError as error:  # a full disk: the job trains on, and the next round's checkpoint may fit
            logger.warning("checkpoint of %s at step %d skipped: %s", job.name, trainer.step, error)
            return
        previous = self.own.get(job.index)
        self.own[job.index] = Checkpoint(job.index, trainer.step, digest, trainer.done, float(trainer.last_loss),
                                         trainer.samples, self.me)
        if previous is not None and previous.digest != digest:
            # the one before is still served for a while: peers may have read the record that named it
            retired, self._retired[job.index] = self._retired.get(job.index), previous.digest
            if retired is not None and retired not in self._kept():
                self.store.delete(retired)
        logger.info("checkpoint of %s at step %d: %s", job.name, trainer.step, digest.hex()[:16])
        await self.publish()

    # ---- checkpoints between nodes -------------------------------------------------------------

    async def obtain(self, held: Held, job: ExpertJob) -> tuple[dict, str] | None:
        """The checkpoint's tensors and where they came from: this node's store, else a live peer."""
        if self.store.has(held.digest):
            try:
                return await asyncio.to_thread(self.store.get, held.digest), "own store"
            except CheckpointError as error:
                logger.warning("%s", error)
                self.store.delete(held.digest)
        state, source = await self.fetch(held, job)
        return (state, f"fetched from {source.hex()[:16]}") if state is not None else None

    async def fetch(self, held: Held, job: ExpertJob, prefer: bytes | None = None) -> tuple[dict | None, bytes]:
        """Fetch ``held`` from a live node that keeps it (``prefer`` first), verified; (None, b"") if none can."""
        board = self.board
        holders = set(board.where.get(held.digest, ())) if board is not None else set()
        holders.discard(self.me)
        for peer in sorted(holders, key=lambda n: (n != prefer, n)):
            if (held.digest, peer) in self._refused:
                continue

            async def call(args: dict, peer: bytes = peer) -> tuple[dict, dict]:
                return await self.swarm.call(peer, CKPT_METHOD, args)

            try:
                state = await fetch_checkpoint(call, held.digest, job.name)
                step = checkpoint_meta(state)[1]
                if step != held.step:
                    raise CheckpointRejected(f"checkpoint {held.digest.hex()[:16]} is at step {step}, "
                                             f"its record says {held.step}")
            except CheckpointRejected as error:
                self._refused.add((held.digest, peer))
                self.report.rejected.append({"job": job.name, "step": held.step, "digest": held.digest.hex(),
                                             "source": peer.hex(), "reason": str(error)})
                logger.warning("rejected a checkpoint of %s from %s: %s", job.name, peer.hex()[:16], error)
                continue
            except SwarmCallError as error:
                logger.info("could not fetch checkpoint %s from %s: %s", held.digest.hex()[:16], peer.hex()[:16],
                            error)
                continue
            await asyncio.to_thread(self.store.put, state)
            return state, peer
        return None, b""

    async def mirror_once(self) -> None:
        """Keep a copy of each job's latest checkpoint this node is one of the ``replicas`` keepers of."""
        board = self.board
        if board is None or self.settings.replicas == 0:
            return
        live = await self._live()
        for job, view in zip(self.jobs, board.jobs):
            latest = view.latest
            if latest is None or latest.node == self.me:
                continue
            held = Held(latest.job, latest.step, latest.digest, latest.done)
            kept = self.mirror_of.get(job.index)
            if kept is not None and (kept.done, kept.step) >= (held.done, held.step):
                continue
            if self.me not in mirrors(latest.digest, live - {latest.node}, self.settings.replicas):
                continue
            if not self.store.has(latest.digest):
                state, source = await self.fetch(held, job, prefer=latest.node)
                if state is None:
                    continue
                self.report.mirrored.append({"job": job.name, "step": latest.step, "digest": latest.digest.hex(),
                                             "source": source.hex()})
                logger.info("keeping a copy of %s's checkpoint at step %d (%s, from %s)", job.name, latest.step,
                            latest.digest.hex()[:16], source.hex()[:16])
            self.mirror_of[job.index] = held
            if kept is not None and kept.digest not in {c.digest for c in self.own.values()}:
                self.store.delete(kept.digest)

    async def _on_ckpt(self, sender: bytes, args: dict, tensors: dict) -> tuple[dict, dict]:
        digest, part = args.get("hash"), args.get("part", 0)
        if not isinstance(digest, bytes) or len(digest) != 32 or type(part) is not int or tensors:
            raise ExpertRequestError("ex.ckpt takes a 32-byte hash and an integer part, and no tensors")
        if digest not in self._kept() | set(self._retired.values()) or not self.store.has(digest):
            raise ExpertRequestError(f"this node keeps no checkpoint {digest.hex()[:16]}")
        try:
            return await asyncio.to_thread(self.store.answer, digest, part, self.settings.tamper)
        except CheckpointError as error:
            raise ExpertRequestError(str(error)) from None
