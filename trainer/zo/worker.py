"""A zo node over the swarm: probe, send bytes to the committer, apply its commits, stay identical.

One loop per node. Each step t: compute this node's probes on the committed weights w_t, send
the signed bytes to the committer, wait for commit t (pushed, or pulled after a timeout), apply
it. The committer is the signer of the last commit while it is live; when it is not, every node
picks the live node with the smallest id (deterministic failover). A new committer first adopts
the longest valid log among live peers, so a commit the old one sent to only some nodes reaches
the rest. Every ``hash_every`` steps nodes publish their weight hash; one that disagrees with the
majority fetches a snapshot and publishes a ``resync`` event. With a robust aggregation the
committer bans nodes whose scalars are outliers again and again (trainer/zo/bans.py): later
commits list them and leave their contributions out, and the committer publishes a ``banned`` event.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from protocol import wire
from protocol.errors import ProtocolError
from protocol.zo import GENESIS, HASH_BYTES, MAX_BANNED, Commit, CommitError, Contribution, open_contribution, \
    seal_commit, seal_contribution
from trainer.files import torch_save
from trainer.swarm import Peer, Swarm, SwarmCallError
from trainer.zo.aggregate import update_of
from trainer.zo.bans import newly_banned
from trainer.zo.log import CommitLog
from trainer.zo.replica import Replica, ReplicaError
from trainer.zo.seeds import probe_seed
from trainer.zo.spsa import Batch, ZOSettings, evaluate, quantized_probe

logger = logging.getLogger(__name__)

ROLE = "zo"
HASH_RECORD = "zo.hash"
RECORD_NAMES = (HASH_RECORD,)
LOG_PAGE = 256  # commits per zo.log reply, at most
LOG_PAGE_BYTES = 4 << 20
HASH_HISTORY = 8
STEP_METRIC = "zo_step"  # heartbeat metric: the node's head step
MAX_PENDING_STEPS = 4  # steps ahead of ours whose contributions a committer buffers
STALL_S = 1.5  # a committer whose wait loop stood still this much longer than it waits drops the step
NOT_COMMITTER = "this node is not the committer"  # a zo.contribute refusal: it holds none of the step's bytes


class ZOError(RuntimeError):
    """The worker cannot go on (e.g. its base weights differ from the run's and no peer has a snapshot)."""


@dataclass
class ZOReport:
    """What a worker measured; the node writes it out when it stops."""

    steps_applied: int = 0
    start_step: int = 0
    joined_by: str = "start"  # start, replay, snapshot, resume
    losses: list[tuple[int, float, float]] = field(default_factory=list)  # (step, unix time, val loss)
    hashes: list[tuple[int, str]] = field(default_factory=list)  # (step, weights hash hex) at every check
    resyncs: int = 0
    committed: int = 0  # steps this node committed as committer
    late: int = 0  # own contributions a committer refused as late
    seconds: float = 0.0
    banned: list[tuple[int, str]] = field(default_factory=list)  # (first step without it, node hex) per ban seen
    banned_at: int | None = None  # the step from which this node itself is banned


class ZOWorker:
    def __init__(
        self,
        swarm: Swarm,
        key,
        run_id: bytes,
        settings: ZOSettings,
        replica: Replica,
        data: Iterator[Batch],
        val: Sequence[Batch],
        *,
        base_hash: bytes,
        state_dir: Path | None = None,
        join: str = "auto",
        eval_every: int = 10,
        retry_s: float = 0.5,
        bandwidth_bytes_s: float = 50e6,
        tamper: Callable[[int, Sequence[float]], int] | None = None,
        corrupt_at: int | None = None,
        publish_event: Callable[[str, str], None] | None = None,
    ):
        """Fault hooks for tests: ``tamper(q, others)`` replaces every byte this node sends (a malicious
        node; ``others`` are the other nodes' scalars in the previous commit, trainer/zo/attacks.py);
        ``corrupt_at`` silently changes one committed weight at that step (a bad memory or GPU).
        ``publish_event(event, detail)`` reports resyncs and committer changes to the node."""
        if join not in ("auto", "replay", "snapshot"):
            raise ValueError(f"join must be auto, replay or snapshot, not {join!r}")
        self.swarm = swarm
        self.key = key
        self.me = swarm.my_id
        self.run_id = run_id
        self.settings = settings
        self.replica = replica
        self.data = data
        self.val = list(val)
        self.base_hash = base_hash
        self.state_dir = state_dir
        self.join_mode = join
        self.eval_every = eval_every
        self.retry_s = retry_s
        self.bandwidth = bandwidth_bytes_s
        self.tamper = tamper
        self.corrupt_at = corrupt_at
        self.publish_event = publish_event or (lambda event, detail: None)
        self.report = ZOReport()
        self.log = self._open_log()
        self._lock = asyncio.Lock()  # the committed weights: applying a commit vs. taking a snapshot
        self._inbox: dict[int, Commit] = {}
        self._arrived = asyncio.Event()
        self._pending: dict[int, dict[tuple[bytes, int], Contribution]] = {}
        self._own: dict[int, list[bytes]] = {}
        self._gave: dict[int, list[bytes]] = {}  # step -> the committers our contribution went to, in order
        self._refused_by: set[bytes] = set()  # peers whose next commit we refused at the last pull from them
        self._needs_sync = True  # a committer first adopts the longest log among live peers
        self._resync_from: bytes | None = None
        self._hash_task: asyncio.Task | None = None
        self.run_over = False  # the run finished without this node (see _lead)
        self._my_hashes: dict[int, bytes] = {}
        for method, handler in (("zo.contribute", self._on_contribute), ("zo.commit", self._on_commit),
                                ("zo.log", self._on_log), ("zo.status", self._on_status),
                                ("zo.snapshot", self._on_snapshot)):
            swarm.serve(method, handler)

    # ---- persistence -------------------------------------------------------------------------

    def _open_log(self) -> CommitLog:
        samples = self.settings.probes
        if self.state_dir is None:
            return CommitLog(self.run_id, max_samples=samples)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        path = self.state_dir / "commits.log"
        snapshot = self._read_snapshot()
        if path.exists():
            log = CommitLog.load(path, self.run_id, samples)
            start = snapshot[0] if snapshot is not None and log.start <= snapshot[0] <= log.head_step else None
            if start is None and log.start == 0 and self.replica.weights_hash() == self.base_hash:
                start = 0
            if start is not None:
                if snapshot is not None and start == snapshot[0]:
                    self.replica.load_state(snapshot[2])
                for step in range(start, log.head_step):
                    self._apply_now(log.get(step))
                logger.info("resumed from the local log at step %d (replayed from step %d)", log.head_step, start)
                self.report.joined_by = "resume"
                self.report.start_step = log.head_step
                return log
            logger.warning("the local log cannot be replayed on these weights; starting a new one")
        return CommitLog(self.run_id, path=path, max_samples=samples)

    def _read_snapshot(self) -> tuple[int, bytes, dict[str, torch.Tensor]] | None:
        path = self.state_dir / "snapshot.pt" if self.state_dir else None
        if path is None or not path.exists():
            return None
        try:
            saved = torch.load(path, weights_only=True)
            if saved["run"] != self.run_id:
                return None
            return int(saved["step"]), bytes(saved["head"]), saved["weights"]
        except Exception as error:  # noqa: BLE001 - a broken snapshot only costs a replay
            logger.warning("ignoring the unreadable snapshot %s: %s", path, error)
            return None

    def _write_snapshot(self) -> None:
        """The local snapshot only saves a replay on restart: one that cannot be written (a full
        disk) is skipped with a warning, and the one on disk stays whole."""
        if self.state_dir is None:
            return
        try:
            torch_save(self.state_dir / "snapshot.pt", {"run": self.run_id, "step": self.log.head_step,
                                                        "head": self.log.head_hash, "weights": self.replica.state()})
        except OSError as error:
            logger.warning("local snapshot at step %d not written: %s: %s", self.log.head_step, error.strerror,
                           error.filename)

    # ---- applying commits --------------------------------------------------------------------

    def _apply_now(self, commit: Commit) -> None:
        entries = [(c.sender, c.sample, c.q) for c in commit.contributions]
        seeds, coeffs = update_of(entries, self.run_id, commit.step, self.settings.lr, self.settings.quantizer,
                                  self.settings.aggregation)
        self.replica.apply(seeds, coeffs)

    async def _apply(self, commit: Commit, then_report: bool = True) -> None:
        """Check the commit continues our log, apply it, append it; raises CommitError otherwise."""
        self.log.check_next(commit)
        before = set(self.log.banned)
        async with self._lock:
            await asyncio.to_thread(self._apply_now, commit)
            self.log.append(commit)
        for node in sorted(set(commit.banned) - before):
            self.report.banned.append((commit.step, node.hex()))
            if node == self.me:
                self.report.banned_at = commit.step
                logger.error("this node is banned from the run's commits from step %d on (its scalars were "
                             "outliers again and again); it follows the commits but no longer contributes",
                             commit.step)
        self.report.steps_applied += 1
        self._own.pop(commit.step, None)
        if commit.committer != self.me:
            self._pending.clear()  # another leads: what we held for later steps is not ours to seal
        for step in [s for s in self._gave if s <= commit.step]:
            del self._gave[step]
        self._pending.pop(commit.step, None)
        for step in [s for s in self._inbox if s <= commit.step]:
            del self._inbox[step]
        if then_report:
            await self._after_apply()

    async def _after_apply(self) -> None:
        """Snapshots, evaluations and weight hashes that fall due at the new head step."""
        step = self.log.head_step
        if step == self.corrupt_at:
            logger.warning("fault injection: changing one committed weight at step %d", step)
            async with self._lock:
                self.replica.master[0] += 1e-3
                self.replica.restore()
        if step % self.settings.snapshot_every == 0:
            await asyncio.to_thread(self._write_snapshot)
        if step % self.eval_every == 0 or step == self.settings.steps:
            await self._evaluate()
        if step % self.settings.hash_every == 0 or step == self.settings.steps:
            await self._record_hash()

    async def _evaluate(self) -> None:
        if self.val:
            loss = await asyncio.to_thread(evaluate, self.replica.model, self.val)
            self.report.losses.append((self.log.head_step, time.time(), loss))

    # ---- the committer -----------------------------------------------------------------------

    def _last_committer(self) -> bytes | None:
        last = self.log.get(self.log.head_step - 1)
        return last.committer if last is not None else self.log.base_committer

    async def committer(self, fresh: bool = False) -> bytes:
        """The signer of our last commit while it is live, else the live node with the smallest id;
        never a banned node (a committer that bans itself hands over)."""
        banned = set(self.log.banned)
        if self.me not in banned and any(sender != self.me for sender, _ in self._pending.get(self.log.head_step, {})):
            # we took other nodes' contributions for this step: they stay with us (see _given_elsewhere)
            # until we seal the step or let them go, so we lead it even if the last signer came back
            return self.me
        live = ({p.id for p in await self._live_peers(fresh)} | {self.me}) - banned
        last = self._last_committer()
        if last is not None and last in live:
            return last
        return min(live) if live else min(banned)

    async def _live_peers(self, fresh: bool = False) -> list[Peer]:
        peers = await self.swarm.peers(role=ROLE, fresh=fresh)
        return [p for p in peers if p.state in ("ONLINE", "JOINING")]

    # ---- main loop ---------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> ZOReport:
        started = time.time()
        await self._wait_for_quorum(stop)
        if not stop.is_set():
            await self._join()
        if not self.report.losses or self.report.losses[-1][0] != self.log.head_step:
            await self._evaluate()
        last_committer: bytes | None = None
        while not stop.is_set() and self.log.head_step < self.settings.steps and not self.run_over:
            if self._resync_from is not None:
                await self._resync(self._resync_from)
                continue
            step = self.log.head_step
            committer = await self.committer()
            if committer != last_committer:
                if last_committer is not None:
                    self.publish_event("leader", f"zo committer is now {committer.hex()[:16]} at step {step}")
                logger.info("zo committer for step %d: %s%s", step, committer.hex()[:16],
                            " (this node)" if committer == self.me else "")
                last_committer = committer
                self._needs_sync = True
            try:
                if committer == self.me:
                    await self._lead(step, stop)
                else:
                    await self._follow(step, committer, stop)
            except CommitError as error:  # our log forked from the committer's: take its weights
                logger.warning("step %d: %s; resyncing from the committer", step, error)
                if committer != self.me:
                    self._resync_from = committer
        await self._finish(stop)
        self.report.seconds = time.time() - started
        return self.report

    async def _wait_for_quorum(self, stop: asyncio.Event) -> None:
        """Before the first step, wait until ``min_nodes`` are live, so that all agree on the committer."""
        if self.log.head_step > 0 or self.settings.min_nodes <= 1:
            return
        while not stop.is_set():
            live = {p.id for p in await self._live_peers(fresh=True)} | {self.me}
            if len(live) >= self.settings.min_nodes:
                return
            await _wait(stop, self.retry_s * 4)

    async def _contributions(self, step: int) -> list[bytes]:
        """This node's signed bytes for ``step`` (computed once, on the committed weights of ``step``)."""
        if step not in self._own:
            # A probe moves the replica's weights and puts them back: a commit applied meanwhile (one
            # sealed without us, say after a partition) would be applied to moved weights, and this
            # replica would part from the chain for good. So probes hold the weights' lock too.
            async with self._lock:
                if self.log.head_step != step:
                    return []  # committed meanwhile: nothing to contribute to it any more
                qs = await asyncio.to_thread(self._probe, step)
            self._own[step] = [seal_contribution(self.key, self.run_id, step, j, q) for j, q in enumerate(qs)]
        return self._own[step]

    def _probe(self, step: int) -> list[int]:
        qs = []
        previous = self.log.get(step - 1)
        others = [self.settings.quantizer.decode(c.q) for c in previous.contributions
                  if c.sender != self.me] if previous is not None and self.tamper is not None else []
        for sample in range(self.settings.probes):
            seed = probe_seed(self.run_id, step, self.me, sample)
            q = quantized_probe(self.replica, next(self.data), seed, self.settings)
            qs.append(self.tamper(q, others) if self.tamper is not None else q)
        return qs

    async def _given_elsewhere(self, step: int, committer: bytes) -> bytes | None:
        """A live node other than ``committer`` that already has our contribution for ``step``.

        Our committer is the signer of our last commit while it is live, so one that stood still
        past the heartbeat TTL (frozen) and comes back is our committer again; but we may have given
        this step's contribution to the node the swarm failed over to meanwhile. Giving it to both
        would let each seal the step with a quorum: two commits for one step, a fork. So a node
        moves its contribution for a step on to another committer only when the one it gave it to
        is no longer live, and never back."""
        gave = [c for c in self._gave.get(step, []) if c != committer]
        if not gave:
            return None
        live = {p.id for p in await self._live_peers()}
        return next((c for c in reversed(gave) if c in live), None)

    async def _follow(self, step: int, committer: bytes, stop: asyncio.Event) -> None:
        banned = self.me in self.log.banned
        contribs = [] if banned else await self._contributions(step)
        holder = await self._given_elsewhere(step, committer) if contribs else None
        target = holder or committer
        if contribs:
            gave = self._gave.setdefault(step, [])
            if holder is not None:
                logger.debug("step %d: our contribution went to %s, which is live: it stays there (not given to "
                             "%s too) unless that node lets it go", step, holder.hex()[:16], committer.hex()[:16])
            if not gave or gave[-1] != target:
                gave.append(target)
        if step not in self._inbox and not banned and contribs:
            try:
                result, _ = await self.swarm.call(target, "zo.contribute", {"contribs": contribs})
                self.report.late += int(result.get("late", 0)) if isinstance(result.get("late"), int) else 0
            except SwarmCallError as error:
                if holder is not None and NOT_COMMITTER in str(error):
                    # it does not lead this step (so it holds no one's contribution for it): ours is
                    # free to go to the committer
                    self._gave[step] = [c for c in self._gave[step] if c != holder]
                    return
                logger.info("step %d: contribution to the committer failed: %s", step, error)
                await self.swarm.peers(role=ROLE, fresh=True)
                await _wait(stop, self.retry_s)
                if not await self._pull_from(committer):
                    await self._pull_from_any()
                return
        deadline = asyncio.get_running_loop().time() + self.settings.step_timeout_s + self.retry_s
        while step not in self._inbox and not stop.is_set():
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), min(remaining, self.retry_s * 4))
            except TimeoutError:
                if self.log.head_step != step:
                    return
        if step in self._inbox:
            await self._apply(self._inbox[step])
            return
        if self.log.head_step == step and not await self._pull_from(holder or committer):
            await self.swarm.peers(role=ROLE, fresh=True)
            await self._pull_from_any()

    async def _lead(self, step: int, stop: asyncio.Event) -> None:
        # A node whose view was partial (just restarted, say) must not commit a fork of its own:
        # peers' heartbeats say how far they are.
        if any(p.metrics.get(STEP_METRIC, 0.0) > step for p in await self._live_peers()):
            self._needs_sync = True
        # Nodes that left cleanly were in step with the swarm to the end: past their last step the
        # chain is theirs, and a node that restarts after they went must not commit a fork of it alone.
        left = max((int(p.metrics.get(STEP_METRIC, 0.0)) for p in await self.swarm.peers(role=ROLE, live_only=False)
                    if p.state == "LEAVING"), default=0)
        if self._needs_sync or left > step:
            await self._adopt_longest_log()
            self._needs_sync = False
            if self.log.head_step != step or self._resync_from is not None:
                return  # caught up, or our log forked from a longer one: the main loop resyncs
        if left > step:
            if left >= self.settings.steps:
                logger.error("the run ended at step %d while this node was at step %d, and the nodes that hold "
                             "the rest have left: it cannot catch up", left, step)
                self.run_over = True
            else:
                logger.warning("step %d: nodes that left were at step %d and no live node has those commits; "
                               "not committing a fork", step, left)
                await _wait(stop, self.retry_s * 4)
            return
        bans = self._bans_for(step)
        banned = set(self.log.banned) | set(bans)
        pending = self._pending.setdefault(step, {})
        # a committer whose own scalars got it banned still commits this step (without them); the
        # next committer is another node
        for raw in await self._contributions(step) if self.me not in banned else []:
            c = open_contribution(raw, self.run_id)
            pending[(c.sender, c.sample)] = c
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.step_timeout_s
        required = self._quorum(step)
        if required == 1 and step > 0 and self._previous_contributors(step) >= 2 and await self._blind():
            # With two contributors to the last commit one may commit alone once the other is gone;
            # but when our view does not even show us, each of the two may see the other dead and
            # commit alone: a fork (in a chaos run both did, steps 65-66 and 65-100). Wait for two.
            logger.warning("step %d: this node's own heartbeat is not in its view of the swarm; a commit "
                           "needs two contributions until it is", step)
            required = 2
        tick = loop.time()
        while not stop.is_set():
            live = self._awaited({p.id for p in await self._live_peers()} | {self.me}) - banned
            if loop.time() - tick > self.retry_s * 4 + STALL_S:
                # This process stood still (frozen, or starved of CPU) for longer than its peers wait
                # for a heartbeat: they may have failed over to another committer meanwhile, with the
                # very contributions we hold. Sealing them now could fork the chain; drop them and
                # look at the swarm afresh.
                logger.warning("step %d: this node stood still for %.1f s while committing; dropping the "
                               "step's %d contribution(s) and looking at the swarm afresh", step,
                               loop.time() - tick, len(pending))
                self._pending.pop(step, None)
                await self.swarm.peers(role=ROLE, fresh=True)
                self._needs_sync = True
                return
            tick = loop.time()
            senders = {sender for sender, _ in pending if sender not in banned}
            if live <= senders and len(senders) >= required:
                break
            remaining = deadline - loop.time()
            if remaining <= 0:
                if len(senders) < required:
                    logger.warning("step %d: contributions from %d node(s), a commit needs %d; not committing, "
                                   "and letting them go", step, len(senders), required)
                    self._pending.pop(step, None)  # their senders may give them to another committer now
                    self._needs_sync = True  # perhaps the others follow another committer: look again
                    return
                logger.info("step %d closed without %d live node(s)", step, len(live - senders))
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), min(remaining, self.retry_s * 4))
            except TimeoutError:
                pass
        if stop.is_set() or self.log.head_step != step:
            return
        await self._seal(step, [pending[k] for k in sorted(pending) if k[0] not in banned], banned, bans)

    async def _seal(self, step: int, chosen: list[Contribution], banned: set[bytes], bans: dict[bytes, str]) -> None:
        commit = self.log.open(seal_commit(self.key, self.run_id, step, self.log.head_hash, chosen,
                                           tuple(sorted(banned))))
        await self._apply(commit, then_report=False)
        self.report.committed += 1
        for node, reason in bans.items():
            logger.warning("step %d: banning zo node %s: %s", step, node.hex()[:16], reason)
            self.publish_event("banned", f"zo node {node.hex()} banned from step {step} on: {reason}")
        await self._push(commit)
        await self._after_apply()

    def _bans_for(self, step: int) -> dict[bytes, str]:
        """Nodes the last commits ban from ``step`` on (trainer/zo/bans.py)."""
        window = [c for c in (self.log.get(s) for s in range(step - self.settings.bans.window, step)) if c is not None]
        return newly_banned(window, self.log.banned, self.settings.aggregation, self.settings.quantizer,
                            self.settings.bans)

    def _quorum(self, step: int) -> int:
        """Contributors a commit needs: a majority of the previous commit's (``min_nodes`` for the
        first). A committer with a partial view of the swarm then cannot run ahead alone on a fork;
        nodes dying one at a time still leave a majority of the last set."""
        if self.log.get(step - 1) is None and step == 0:
            return self.settings.min_nodes
        n = self._previous_contributors(step)
        return n // 2 + 1 if n >= 3 else 1

    def _previous_contributors(self, step: int) -> int:
        prev = self.log.get(step - 1)
        if prev is None:
            return self.log.base_contributors  # our log starts at a snapshot
        return len({c.sender for c in prev.contributions})

    async def _blind(self) -> bool:
        """Our own heartbeat is not in our view: the DHT stores are stalling (a frozen or black-holed
        peer on the way), so who looks dead may be alive."""
        return self.me not in {p.id for p in await self._live_peers()}

    def _awaited(self, live: set[bytes]) -> set[bytes]:
        """The nodes a step waits for: live ones that contributed to one of the last two commits (all
        live ones before the first). A node catching up, or one that stopped answering, is not waited
        for; its bytes are still taken when they arrive in time."""
        recent = [self.log.get(self.log.head_step - i) for i in (1, 2)]
        if recent[0] is None:
            return live - set(self.log.banned)
        active = {c.sender for commit in recent if commit is not None for c in commit.contributions}
        return ((live & active) | {self.me}) - set(self.log.banned)

    async def _push(self, commit: Commit) -> None:
        peers = [p.id for p in await self._live_peers() if p.id != self.me]

        async def push(peer: bytes) -> None:
            try:
                lengths, blobs = pack_blobs([commit.raw])
                await self.swarm.call(peer, "zo.commit", {"lengths": lengths}, blobs)
            except SwarmCallError as error:  # it will pull the commit when it notices
                logger.debug("pushing commit %d to %s failed: %s", commit.step, peer.hex()[:12], error)

        await asyncio.gather(*(push(p) for p in peers))

    # ---- catching up -------------------------------------------------------------------------

    async def _status_of(self, peer: bytes) -> dict | None:
        try:
            result, _ = await self.swarm.call(peer, "zo.status", {})
        except SwarmCallError:
            return None
        try:
            return {"step": wire.require_int(result.get("step"), "step", 0),
                    "start": wire.require_int(result.get("start"), "start", 0),
                    "head": wire.require_bytes(result.get("head"), "head", length=HASH_BYTES),
                    "base": wire.require_bytes(result.get("base"), "base", length=HASH_BYTES)}
        except ProtocolError as error:
            logger.info("ignored a malformed zo.status from %s: %s", peer.hex()[:12], error)
            return None

    async def _statuses(self, fresh: bool = False) -> dict[bytes, dict]:
        peers = [p.id for p in await self._live_peers(fresh) if p.id != self.me]
        found = await asyncio.gather(*(self._status_of(p) for p in peers))
        return {p: s for p, s in zip(peers, found) if s is not None}

    async def _adopt_longest_log(self) -> None:
        """Fetch every commit some live peer has beyond ours (the last committer may have reached
        only some nodes before it died)."""
        statuses = await self._statuses()
        ahead = sorted(((s["step"], p) for p, s in statuses.items() if s["step"] > self.log.head_step), reverse=True)
        for _, peer in ahead:
            if await self._pull_from(peer):
                return

    async def _join(self) -> None:
        """Catch up with the swarm: replay commits from our weights or fetch a snapshot, by cost."""
        statuses = await self._statuses(fresh=True)
        for _ in range(3):  # peers we see but that do not answer yet: ask again before going alone
            if statuses or not [p for p in await self._live_peers() if p.id != self.me]:
                break
            await asyncio.sleep(self.retry_s)
            statuses = await self._statuses(fresh=True)
        if not statuses:
            return
        target, best = max((s["step"], p) for p, s in statuses.items())
        if target <= self.log.head_step:
            return
        status = statuses[best]
        replayable = status["start"] <= self.log.head_step and (self.log.head_step > 0 or self.base_hash == status["base"])
        mode = self.join_mode
        if mode == "auto":
            mode = "replay" if replayable and self._replay_cost(target) <= self._snapshot_cost() else "snapshot"
        if mode == "replay" and not replayable:
            logger.warning("cannot replay (our base weights or log do not match the peers'); fetching a snapshot")
            mode = "snapshot"
        logger.info("joining at step %d of %d by %s", self.log.head_step, target, mode)
        if mode == "replay":
            await self._pull_from(best)
            self.report.joined_by = "replay"
        else:
            await self._resync(best, reason="join")
            self.report.joined_by = "snapshot"
        self.report.start_step = self.log.head_step

    def _replay_cost(self, target: int) -> float:
        """Seconds to replay: each contribution is one pass over the trained weights (about 1 ns per
        element per contribution on one core) plus about 200 bytes of log per contribution."""
        contributions = (target - self.log.head_step) * max(1, self.settings.min_nodes) * self.settings.probes
        return contributions * (self.replica.num_trained * 1e-9 + 200 / self.bandwidth)

    def _snapshot_cost(self) -> float:
        return sum(p.numel() * 4 for p in self.replica.params.values()) / self.bandwidth

    async def _pull_from(self, peer: bytes) -> bool:
        """Fetch and apply commits from ``peer`` until it has no more; True if any was applied. A
        commit for our next step that does not chain to our head means our logs forked: we take
        ``peer``'s weights next."""
        applied = False
        live = {p.id for p in await self._live_peers()}
        while True:
            try:
                result, tensors = await self.swarm.call(peer, "zo.log", {"from": self.log.head_step, "limit": LOG_PAGE})
                raws = unpack_blobs(result.get("lengths"), tensors, LOG_PAGE)
            except SwarmCallError as error:
                logger.info("could not fetch commits from %s: %s", peer.hex()[:12], error)
                return applied
            except ProtocolError as error:
                logger.warning("ignored a malformed commit list from %s: %s", peer.hex()[:12], error)
                return applied
            if not raws:
                return applied
            for raw in raws:
                try:
                    commit = self.log.open(raw)
                except ProtocolError as error:
                    logger.warning("refused a commit from %s: %s", peer.hex()[:12], error)
                    return applied
                if commit.step != self.log.head_step:
                    return applied
                if commit.prev != self.log.head_hash and len({c.sender for c in commit.contributions}) \
                        >= self._quorum(commit.step):
                    # A longer chain than ours that ours is not a prefix of: we (or the committer we
                    # followed) committed a fork, say after standing still past the heartbeat TTL
                    # while the others failed over. The signer rule below does not apply across a
                    # fork: our last committer may be live, and be the one that forked.
                    logger.warning("our log forked from %s's at step %d", peer.hex()[:12], commit.step)
                    self._resync_from = peer
                    return applied
                if commit.prev != self.log.head_hash:
                    logger.warning("refused a commit from %s: a fork without a quorum of contributions", peer.hex()[:12])
                    self._refused_by.add(peer)
                    return applied
                try:
                    self._check_pulled_signer(commit, live)
                except ProtocolError as error:
                    logger.warning("refused a commit from %s: %s", peer.hex()[:12], error)
                    self._refused_by.add(peer)
                    return applied
                await self._apply(commit)
                applied = True

    async def _pull_from_any(self) -> bool:
        """Catch up from the peers ahead of us, the furthest first. When none of them offers a chain
        we take (signed by another than our committer without a quorum, or a log that begins after
        our head) and they are most of the live nodes, the swarm moved on without our chain (a fork
        that we alone still follow, while the signer we know has taken theirs): we take a snapshot
        from the furthest."""
        statuses = await self._statuses()
        ahead = sorted(((s["step"], p) for p, s in statuses.items() if s["step"] > self.log.head_step), reverse=True)
        refused = []
        for _, peer in ahead:
            if statuses[peer]["start"] > self.log.head_step:
                refused.append(peer)  # its log begins after our head (it took a snapshot): nothing to pull
                continue
            self._refused_by.discard(peer)
            if await self._pull_from(peer):
                return True
            if peer in self._refused_by:
                refused.append(peer)
        if refused and len(refused) == len(ahead) and 2 * len(refused) > len(statuses):
            logger.warning("step %d: the nodes ahead of us (%d of %d) hold a chain that does not continue "
                           "ours; taking a snapshot from %s", self.log.head_step, len(refused), len(statuses),
                           refused[0].hex()[:12])
            self._resync_from = refused[0]
        return False

    def _quorum_backed(self, commit: Commit) -> bool:
        """A commit for our next step that carries the signed contributions of a quorum (and of two
        nodes at least): its contributors chose its signer as their committer, so the swarm failed
        over to it, even if the committer we know is live (say it was cut off from the others, or
        is this node). A bystander cannot forge that: the contributions are the contributors' own
        signatures for this step."""
        return commit.step == self.log.head_step and \
            len({c.sender for c in commit.contributions}) >= max(2, self._quorum(commit.step))

    def _check_pulled_signer(self, commit: Commit, live: set[bytes]) -> None:
        """A pulled commit is signed by the previous commit's signer, unless that signer has left
        the live set (a failover) or a quorum's contributions back it; a bystander cannot slip in a
        commit of its own."""
        last = self._last_committer()
        if last is None or commit.committer == last or self._quorum_backed(commit):
            return
        if last in live and last not in self.log.banned:
            raise CommitError(f"commit {commit.step} is signed by {commit.committer.hex()[:12]}, but the "
                              f"committer {last.hex()[:12]} is still live")

    async def _resync(self, peer: bytes, reason: str = "hash mismatch") -> None:
        """Take ``peer``'s committed weights and log head."""
        self._resync_from = None
        try:
            result, tensors = await self.swarm.call(peer, "zo.snapshot", {})
            step = wire.require_int(result.get("step"), "step", 0)
            head = wire.require_bytes(result.get("head"), "head", length=HASH_BYTES)
            claimed = wire.require_bytes(result.get("hash"), "hash", length=HASH_BYTES)
            committer = result.get("committer")
            committer = wire.require_bytes(committer, "committer", length=32) if committer is not None else None
            contributors = wire.require_int(result.get("contributors", 0), "contributors", 0, 1 << 20)
            banned = wire.require_type(result.get("banned", []), list, "banned")
            banned = tuple(wire.require_bytes(b, "banned node", length=32) for b in banned[:MAX_BANNED])
        except (SwarmCallError, ProtocolError) as error:
            logger.warning("snapshot from %s failed: %s", peer.hex()[:12], error)
            return
        async with self._lock:
            before = self.replica.state()
            try:
                self.replica.load_state(dict(tensors))
            except ReplicaError as error:
                logger.warning("snapshot from %s does not fit: %s", peer.hex()[:12], error)
                return
            if self.replica.weights_hash() != claimed:
                self.replica.load_state(before)
                logger.warning("snapshot from %s does not match the hash it claims; ignored", peer.hex()[:12])
                return
            self.log.restart_at(step, head, committer, contributors, banned)
            self._inbox.clear()
            self._own.clear()
            await asyncio.to_thread(self._write_snapshot)
        await self._record_hash()
        if reason != "join":
            self.report.resyncs += 1
            self.publish_event("resync", f"zo weights replaced by {peer.hex()[:16]}'s at step {step} ({reason})")
        logger.info("weights taken from %s at step %d (%s)", peer.hex()[:12], step, reason)

    # ---- weight hashes -----------------------------------------------------------------------

    async def _record_hash(self) -> None:
        step, digest = self.log.head_step, self.replica.weights_hash()
        self._my_hashes[step] = digest
        self.report.hashes.append((step, digest.hex()))
        logger.info("zo step %d weights %s", step, digest.hex()[:16])
        for old in sorted(self._my_hashes)[:-HASH_HISTORY]:
            del self._my_hashes[old]
        if self._hash_task is None or self._hash_task.done():
            self._hash_task = asyncio.create_task(self._publish_and_check())

    async def _publish_and_check(self) -> None:
        body = {"hashes": [[s, h] for s, h in sorted(self._my_hashes.items())]}
        try:
            await self.swarm.publish(HASH_RECORD, body, ttl_s=max(60.0, 4 * self.settings.step_timeout_s))
            records = await self.swarm.read(HASH_RECORD)
        except (SwarmCallError, ValueError) as error:
            logger.info("weight hash check skipped: %s", error)
            return
        mismatch = majority_mismatch(self.me, self._my_hashes, records)
        if mismatch is not None:
            step, peer = mismatch
            logger.warning("weights at step %d differ from the majority's; resyncing from %s", step, peer.hex()[:12])
            self._resync_from = peer

    # ---- finishing ---------------------------------------------------------------------------

    async def _finish(self, stop: asyncio.Event) -> None:
        """Serve the last commits to peers still catching up, for at most a few step timeouts."""
        if self._hash_task is not None:
            await asyncio.gather(self._hash_task, return_exceptions=True)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 3 * self.settings.step_timeout_s
        while not stop.is_set() and loop.time() < deadline:
            statuses = await self._statuses()
            if all(s["step"] >= self.log.head_step for s in statuses.values()):
                return
            await _wait(stop, self.retry_s * 2)

    # ---- RPC handlers ------------------------------------------------------------------------

    async def _on_contribute(self, sender: bytes, args: dict, tensors: dict) -> tuple[dict, dict]:
        raws = args.get("contribs")
        if not isinstance(raws, list) or not 0 < len(raws) <= self.settings.probes:
            raise ProtocolError(f"contribs must be a list of 1..{self.settings.probes} contributions")
        live = {p.id for p in await self._live_peers()}
        if sender not in live:
            raise ProtocolError("only live zo members of the run may contribute")
        if await self.committer() != self.me:
            raise ProtocolError(NOT_COMMITTER)
        if sender in self.log.banned:
            raise ProtocolError("this node is banned from the run's commits (its scalars were outliers again and "
                                "again); its contributions are not taken")
        accepted = late = 0
        for raw in raws:
            c = open_contribution(raw, self.run_id)  # raises on a bad signature, field or kind
            if c.sender != sender:
                raise ProtocolError("a contribution must be sent by the node that signed it")
            if c.sample >= self.settings.probes:
                raise ProtocolError(f"sample {c.sample} is outside the run's {self.settings.probes} probes")
            if c.step < self.log.head_step:
                late += 1
                continue
            if c.step > self.log.head_step + MAX_PENDING_STEPS:
                raise ProtocolError(f"contribution for step {c.step}; the committer is at step {self.log.head_step}")
            pending = self._pending.setdefault(c.step, {})
            if (c.sender, c.sample) in pending:
                raise ProtocolError(f"duplicate contribution for step {c.step} sample {c.sample}")
            pending[(c.sender, c.sample)] = c
            accepted += 1
        self._arrived.set()
        return {"accepted": accepted, "late": late, "step": self.log.head_step}, {}

    async def _on_commit(self, sender: bytes, args: dict, tensors: dict) -> tuple[dict, dict]:
        raws = unpack_blobs(args.get("lengths"), tensors, 1)
        if len(raws) != 1:
            raise ProtocolError("zo.commit carries exactly one commit")
        commit = self.log.open(raws[0])
        if commit.committer != sender:
            raise ProtocolError("a commit must be pushed by the node that signed it")
        expected = await self.committer()
        if commit.committer != expected and not self._quorum_backed(commit):
            raise ProtocolError(f"commit from {sender.hex()[:12]}, but the committer is {expected.hex()[:12]}")
        if commit.step < self.log.head_step:
            ours = self.log.get(commit.step)
            if ours is not None and ours.hash != commit.hash:
                self._resync_from = expected  # the committer's log wins
            return {"step": self.log.head_step}, {}
        if commit.step > self.log.head_step + LOG_PAGE:
            raise ProtocolError(f"commit of step {commit.step}; this node is at step {self.log.head_step}")
        self._inbox[commit.step] = commit
        self._arrived.set()
        return {"step": self.log.head_step}, {}

    async def _on_log(self, sender: bytes, args: dict, tensors: dict) -> tuple[dict, dict]:
        start = args.get("from")
        limit = args.get("limit", LOG_PAGE)
        if type(start) is not int or start < 0 or type(limit) is not int or not 0 < limit <= LOG_PAGE:
            raise ProtocolError(f"zo.log takes from >= 0 and 1 <= limit <= {LOG_PAGE}")
        raws, size = [], 0
        for raw in self.log.since(start, limit):
            if raws and size + len(raw) > LOG_PAGE_BYTES:
                break
            raws.append(raw)
            size += len(raw)
        lengths, blobs = pack_blobs(raws)
        return {"lengths": lengths, "step": self.log.head_step}, blobs

    async def _on_status(self, sender: bytes, args: dict, tensors: dict) -> tuple[dict, dict]:
        return {"step": self.log.head_step, "start": self.log.start, "head": self.log.head_hash,
                "base": self.base_hash}, {}

    async def _on_snapshot(self, sender: bytes, args: dict, tensors: dict) -> tuple[dict, dict]:
        async with self._lock:
            state = self.replica.state()
            last = self.log.get(self.log.head_step - 1)
            info = {"step": self.log.head_step, "head": self.log.head_hash, "hash": self.replica.weights_hash(),
                    "committer": self._last_committer(),
                    "contributors": len({c.sender for c in last.contributions}) if last else self.log.base_contributors,
                    "banned": list(self.log.banned)}
        return info, state


def majority_mismatch(me: bytes, mine: dict[int, bytes], records: dict[bytes, dict]) -> tuple[int, bytes] | None:
    """(step, a peer holding the majority's weights) for the latest step at which our hash is in a
    strict minority of the nodes reporting that step; None when we agree (or nobody else reported)."""
    reports: dict[int, dict[bytes, bytes]] = {}
    for node, body in records.items():
        items = body.get("hashes") if isinstance(body, dict) else None
        if node == me or not isinstance(items, list):
            continue
        for item in items[:HASH_HISTORY]:
            if (isinstance(item, list) and len(item) == 2 and type(item[0]) is int and isinstance(item[1], bytes)
                    and len(item[1]) == HASH_BYTES):
                reports.setdefault(item[0], {})[node] = item[1]
    for step in sorted(mine, reverse=True):
        others = reports.get(step)
        if not others:
            continue
        votes: dict[bytes, list[bytes]] = {}
        for node, digest in others.items():
            votes.setdefault(digest, []).append(node)
        votes.setdefault(mine[step], []).append(me)
        total = len(others) + 1
        winner, holders = max(votes.items(), key=lambda item: (len(item[1]), item[0]))
        if winner != mine[step] and 2 * len(holders) > total:
            return step, min(holders)
        return None
    return None


def pack_blobs(blobs: Sequence[bytes]) -> tuple[list[int], dict[str, torch.Tensor]]:
    """Commits travel as one uint8 tensor (bulk bytes, outside the RPC's 64 KiB header) plus lengths."""
    data = b"".join(blobs)
    return [len(b) for b in blobs], {"blobs": torch.frombuffer(bytearray(data), dtype=torch.uint8)
                                     if data else torch.zeros(0, dtype=torch.uint8)}


def unpack_blobs(lengths: object, tensors: dict, limit: int) -> list[bytes]:
    """Inverse of pack_blobs; raises ProtocolError on anything malformed."""
    blob = tensors.get("blobs")
    if (not isinstance(lengths, list) or len(lengths) > limit or any(type(n) is not int or n < 0 for n in lengths)
            or not isinstance(blob, torch.Tensor) or blob.dtype != torch.uint8 or blob.dim() != 1
            or sum(lengths) != blob.numel()):
        raise ProtocolError("malformed commit list: lengths must add up to a 1-D uint8 tensor 'blobs'")
    data = blob.numpy().tobytes()
    out, pos = [], 0
    for n in lengths:
        out.append(data[pos : pos + n])
        pos += n
    return out


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    """Wait ``seconds`` or until ``stop``, whichever is first (a retry back-off, not a sync point)."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass
