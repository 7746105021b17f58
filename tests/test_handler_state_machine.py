"""A hypothesis state machine over one node's message handlers: the real RpcEndpoint in front of
the real zo and pipeline handlers, fed valid, replayed, mutated, oversized, malformed and
unauthorized calls in any order.

After every call: no exception escaped, the call ended within its bound, the reply was a signed
reply or a refusal of a known kind (never InternalError), and nothing grew past its bound. The
transport itself is tests/test_access_control.py's business; here streams come from memory.
"""
from __future__ import annotations

import asyncio
import time

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from node.config import RateLimits, Timeouts
from node.pipeline_node import stage_module
from node.rpc import REQUEST_KIND, RpcLimits, _describe
from protocol.access import AccessPolicy, issue_token
from protocol.envelope import seal
from protocol.keys import public_key_bytes
from protocol.runspec import make_spec, run_id
from protocol.zo import GENESIS, open_contribution, seal_commit, seal_contribution
from tests.rpc_memory import frame, memory_endpoint, peer_id, serve_bytes
from trainer.model import LM, ModelConfig
from trainer.pipeline.runtime import MAX_DATA_NODES, REDUCE_AHEAD, PipelineSettings, PipelineWorker
from trainer.swarm import Peer, SwarmCallError
from trainer.zo.replica import Replica
from trainer.zo.spsa import ZOSettings
from trainer.zo.worker import LOG_PAGE, MAX_PENDING_STEPS, ZOWorker, pack_blobs

CALL_BOUND_S = 5.0
# Refusals a caller may get; InternalError (a handler raised something unexpected) is a bug.
REFUSALS = {"MalformedMessage", "TensorShapeMismatch", "MessageTooLarge", "BadSignature", "WrongRun", "WrongKind",
            "Expired", "Replayed", "Unauthorized", "WrongRecipient", "UnknownMethod", "RateLimited", "Busy",
            "HandlerError", "Timeout", "ProtocolError", "PipelineError", "CommitError", ""}


def _key(seed: int) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32)


# The node must be the zo committer (the smallest live id), so its key sorts first.
SERVER, ZO_MEMBER, MATE, STRANGER = _key(0x41), _key(0x42), _key(0x43), _key(0x44)
OWNER = _key(0x45)
PUB = {name: public_key_bytes(k) for name, k in
       {"server": SERVER, "zo": ZO_MEMBER, "mate": MATE, "stranger": STRANGER}.items()}
SPEC = make_spec("pipeline", "tiny", OWNER, access="private", stages=2, blocks_per_stage=[3, 1], path_length=2,
                 swap="none", seq_len=16, microbatch_size=2)
RUN = run_id(SPEC)
TOKENS = {name: issue_token(OWNER, RUN, PUB[name], time.time() + 3600) for name in ("zo", "mate")}
KEYS = {"zo": ZO_MEMBER, "mate": MATE, "stranger": STRANGER}
PP_METHODS = ("pp.forward", "pp.backward", "pp.arrive", "pp.done", "pp.reduce", "pp.state")
ZO_METHODS = ("zo.contribute", "zo.commit", "zo.log", "zo.status", "zo.snapshot")
METHODS = ("ping", "echo", *PP_METHODS, *ZO_METHODS, "no.such.method")


class InProcessSwarm:
    """The trainer's Swarm over the endpoint under test: a fixed view, no outgoing call succeeds."""

    def __init__(self, endpoint, me: bytes, peers: list[Peer]):
        self.endpoint, self.my_id, self._peers = endpoint, me, peers

    def serve(self, method, handler):
        async def adapted(context, args, tensors):
            return await handler(context.sender, args, tensors)

        self.endpoint.register(method, adapted)

    async def peers(self, *, role=None, stage=None, live_only=True, fresh=False):
        return [p for p in self._peers if (role is None or p.role == role) and (stage is None or p.stage == stage)]

    async def call(self, peer, method, args=None, tensors=None, *, even_if_dead=False):
        raise SwarmCallError("this node reaches nobody here")

    async def publish(self, name, body, ttl_s):
        return True

    async def read(self, name):
        return {}

    async def report_event(self, event, detail):
        return None


ids = st.sampled_from([PUB["server"], PUB["zo"], PUB["mate"], PUB["stranger"]]) | st.binary(min_size=32, max_size=32)
hops = st.lists(st.lists(st.integers(0, 3) | ids, min_size=2, max_size=2) | st.integers(-1, 2**63), max_size=3)
native = st.recursive(st.none() | st.booleans() | st.integers(-2, 2**64 - 1) | st.floats() | st.text(max_size=8)
                      | st.binary(max_size=40), lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=10)
shapes = st.sampled_from([(2, 8, 64), (1, 16, 64), (2, 8, 63), (3, 8, 64), (2, 300, 64), (0, 8, 64), (8, 64), (2, 8, 64, 1)])
tensors = st.fixed_dictionaries({}, optional={
    "x": st.tuples(shapes, st.sampled_from([torch.float32, torch.bfloat16])),
    "grad": st.tuples(shapes, st.sampled_from([torch.float32])),
    "t": st.tuples(shapes, st.sampled_from([torch.float32])),
})
pp_args = st.fixed_dictionaries({
    "iteration": st.sampled_from([0, 1, 2, 5, 2**40, -1]), "mb": st.integers(0, 3), "attempt": st.integers(0, 2),
    "origin": ids, "route": hops, "visited": hops, "skipped": st.integers(0, 2), "rerouted": st.integers(0, 2),
}, optional={"kind": st.sampled_from(["x", "grad"]), "count": st.integers(-1, 3), "hash": st.binary(max_size=32),
             "part": st.integers(-1, 3), "weights_only": st.booleans(), "lost": st.booleans()})


def _tensor(spec) -> torch.Tensor:
    shape, dtype = spec
    return torch.randn(shape, generator=torch.Generator().manual_seed(len(shape))).to(dtype)


class NodeHandlers(RuleBasedStateMachine):
    @initialize()
    def start_node(self):
        torch.manual_seed(0)
        self.loop = asyncio.new_event_loop()
        access = AccessPolicy(True, public_key_bytes(OWNER), RUN)
        self.endpoint = memory_endpoint(
            SERVER, RUN, access, Timeouts(rpc_s=0.5, min_transfer_bytes_s=1e8),
            limits=RpcLimits(max_tensor_bytes=4 << 20, max_inflight_bytes=8 << 20),
            rate_limits=RateLimits(calls_per_s=2.0, burst=40.0, max_tracked=64))
        self.me = str(self.endpoint.p2p.peer_id)
        peers = [Peer(PUB["zo"], "zo", None, None, "ONLINE"), Peer(PUB["server"], "zo", None, None, "ONLINE"),
                 Peer(PUB["mate"], "stage", 1, None, "ONLINE"), Peer(PUB["server"], "stage", 1, None, "ONLINE")]
        swarm = InProcessSwarm(self.endpoint, PUB["server"], peers)

        async def ping(context, args, tensors):
            return {"state": "ONLINE"}, {}

        async def echo(context, args, tensors):
            return {"received": {n: t.numel() for n, t in tensors.items()}}, tensors

        self.endpoint.register("ping", ping)
        self.endpoint.register("echo", echo)
        model = LM(ModelConfig.from_preset("tiny"), seed=0)
        self.replica = Replica(model, ("tok_emb.weight",))
        self.base = self.replica.weights_hash()
        self.zo = ZOWorker(swarm, SERVER, RUN, ZOSettings(probes=2, min_nodes=3, params=("tok_emb.weight",)),
                           self.replica, iter(()), [], base_hash=self.base)
        self.pp = PipelineWorker(swarm, 1, stage_module(SPEC, 1), PipelineSettings(
            num_stages=2, path_length=2, swap="none", microbatches=2, memory=2, iterations=10, lr=1e-2,
            done_timeout_s=0.05, reduce_timeout_s=0.05, retry_s=0.001, hop_attempts=1, slot_wait_s=0.02,
            microbatch_size=2))
        self.sent: list[tuple[bytes, str]] = []  # frames and the kind of their first answer
        self.contribs = [seal_contribution(ZO_MEMBER, RUN, step, sample, 7) for step in range(7) for sample in range(3)]

    def teardown(self):
        if hasattr(self, "loop"):
            for task in asyncio.all_tasks(self.loop):
                task.cancel()
            self.loop.run_until_complete(asyncio.sleep(0))
            self.loop.close()

    # ---- calling the node ----------------------------------------------------------------------

    def request(self, who: str, method: str, args: dict, tensors: dict | None = None, *, to: str | None = None,
                timestamp: float | None = None) -> bytes:
        headers, payloads = _describe(tensors or {})
        body = {"method": method, "args": args, "tensors": headers, "token": TOKENS.get(who), "to": to or self.me}
        data = seal(KEYS[who], kind=REQUEST_KIND, run_id=RUN, body=body, seq=time.time_ns(), timestamp=timestamp)
        return frame(data) + b"".join(bytes(p) for p in payloads)

    def send(self, data: bytes, caller: int = 1, *, eof: bool = True):
        began = time.monotonic()
        reply = self.loop.run_until_complete(asyncio.wait_for(serve_bytes(self.endpoint, peer_id(caller), data, eof=eof),
                                                              CALL_BOUND_S))
        assert time.monotonic() - began < CALL_BOUND_S
        assert reply.kind in REFUSALS, (reply.kind, reply.raw[:300])
        self.loop.run_until_complete(asyncio.sleep(0.002))  # let hand-overs the handlers started run (and fail)
        return reply

    def call(self, who: str, method: str, args, tensors=None):
        data = self.request(who, method, args, tensors)
        reply = self.send(data)
        self.sent.append((data, reply.kind if not reply.ok else "ok"))
        return reply

    # ---- rules ---------------------------------------------------------------------------------

    @rule(method=st.sampled_from(PP_METHODS), args=pp_args, ts=tensors, who=st.sampled_from(["mate", "zo"]))
    def pipeline_call(self, method, args, ts, who):
        self.call(who, method, args, {name: _tensor(spec) for name, spec in ts.items()})

    @rule(picks=st.lists(st.integers(0, 20), min_size=0, max_size=3), extra=st.sampled_from([None, "other", "junk"]))
    def zo_contribute(self, picks, extra):
        raws = [self.contribs[i] for i in picks]
        if extra == "other":
            raws.append(seal_contribution(STRANGER, RUN, 0, 0, 1))
        elif extra == "junk":
            raws.append(b"\x00" * 40)
        self.call("zo", "zo.contribute", {"contribs": raws})

    @rule(step=st.integers(0, 300), who=st.sampled_from(["zo", "mate"]), damaged=st.booleans())
    def zo_commit(self, step, who, damaged):
        contribution = open_contribution(self.contribs[0], RUN)
        raw = seal_commit(KEYS[who], RUN, step, GENESIS, [contribution] if step == 0 else [])
        lengths, blobs = pack_blobs([raw[:-1] if damaged else raw])
        self.call(who, "zo.commit", {"lengths": lengths}, blobs)

    @rule(method=st.sampled_from(METHODS), args=st.dictionaries(st.text(min_size=1, max_size=10), native, max_size=4))
    def garbage_args(self, method, args):
        self.call("zo", method, args)

    @rule(start=st.integers(-1, 5), limit=st.integers(-1, LOG_PAGE + 1), method=st.sampled_from(ZO_METHODS[2:]))
    def zo_reads(self, start, limit, method):
        self.call("zo", method, {"from": start, "limit": limit})

    @precondition(lambda self: self.sent)
    @rule(index=st.integers(0, 10**6))
    def replay(self, index):
        data, first = self.sent[index % len(self.sent)]
        reply = self.send(data)
        assert not reply.ok, "a replayed request was served"
        if first == "ok":
            assert reply.kind == "Replayed", reply.kind

    @precondition(lambda self: self.sent)
    @rule(index=st.integers(0, 10**6), positions=st.lists(st.integers(0, 10**6), min_size=1, max_size=3),
          flip=st.integers(1, 255))
    def mutated(self, index, positions, flip):
        data = bytearray(self.sent[index % len(self.sent)][0])
        for position in positions:
            data[position % len(data)] ^= flip
        assert not self.send(bytes(data)).ok, "a request altered after signing was served"

    @rule(data=st.binary(max_size=200) | st.builds(lambda b: frame(b), st.binary(max_size=200)))
    def malformed(self, data):
        assert not self.send(data).ok

    @rule(length=st.sampled_from([64 << 10 + 1, 1 << 30, 2**32 - 1]))
    def oversized_frame(self, length):
        reply = self.send(length.to_bytes(4, "big") + b"\x00" * 16)
        assert reply.kind == "MessageTooLarge"

    @rule(nbytes=st.sampled_from([(4 << 20) + 1, 1 << 40]))
    def oversized_tensors(self, nbytes):
        header = {"name": "x", "dtype": "uint8", "shape": [nbytes], "nbytes": nbytes, "digest": bytes(32)}
        body = {"method": "echo", "args": {}, "tensors": [header], "token": TOKENS["zo"], "to": self.me}
        reply = self.send(frame(seal(ZO_MEMBER, kind=REQUEST_KIND, run_id=RUN, body=body, seq=time.time_ns())))
        assert reply.kind == "MessageTooLarge"

    @rule(method=st.sampled_from(METHODS))
    def stranger(self, method):
        before = self.zo_state()
        assert self.send(self.request("stranger", method, {"contribs": [self.contribs[0]]})).kind == "Unauthorized"
        assert self.zo_state() == before

    @rule(method=st.sampled_from(METHODS), case=st.sampled_from(["to", "old", "future"]))
    def misaddressed_or_stale(self, method, case):
        if case == "to":
            data, expected = self.request("zo", method, {}, to="12D3KooWsomebodyElse"), "WrongRecipient"
        else:
            data = self.request("zo", method, {}, timestamp=time.time() + (-3600 if case == "old" else 3600))
            expected = "Expired"
        assert self.send(data).kind == expected

    @rule(cut=st.integers(0, 400))
    def truncated(self, cut):
        data = self.request("zo", "echo", {}, {"t": torch.zeros(100)})
        assert not self.send(data[: min(cut, len(data) - 1)]).ok

    @rule()
    def flood(self):
        kinds = [self.send(self.request("zo", "ping", {})).kind for _ in range(45)]
        assert "RateLimited" in kinds  # a burst of 40, refilled at 2/s
        assert self.send(self.request("mate", "ping", {})).ok  # another peer is not held back

    @rule()
    def next_iteration(self):
        self.loop.run_until_complete(self.pp.begin_at(self.pp.iteration + 1, first=False))

    # ---- invariants ----------------------------------------------------------------------------

    def zo_state(self) -> tuple:
        return (self.zo.log.head_step, sum(map(len, self.zo._pending.values())), len(self.zo._inbox))

    @invariant()
    def bounded(self):
        if not hasattr(self, "endpoint"):
            return
        e = self.endpoint
        assert e._inflight_bytes == 0 and e._total_active == 0 and not e._active
        assert len(e._replay) <= e._replay.max_entries and len(e._rate) <= e._rate.limits.max_tracked
        pp = self.pp
        assert len(pp._cache) <= pp.settings.memory
        assert len(pp._reduce_inbox) <= (REDUCE_AHEAD + 1) * 2
        assert len(pp._reduce_result) <= pp.iteration + REDUCE_AHEAD + 1
        assert len(pp._done_upto) <= MAX_DATA_NODES
        zo = self.zo
        assert sum(map(len, zo._pending.values())) <= (MAX_PENDING_STEPS + 1) * 2 * zo.settings.probes
        assert len(zo._inbox) <= LOG_PAGE + 1
        # the node commits only with three live members, which it never has here: nothing is applied
        assert zo.log.head_step == 0 and self.replica.weights_hash() == self.base


TestNodeHandlers = NodeHandlers.TestCase
TestNodeHandlers.settings = settings(max_examples=15, stateful_step_count=25, deadline=None, derandomize=True,
                                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
