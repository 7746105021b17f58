"""``trainer.swarm.Swarm`` over a running Node: peers from its membership view, calls over its RPC."""
from __future__ import annotations

import logging
import time

import torch
from hivemind.p2p import PeerID

from node.averaging import AveragingError
from node.membership import DEAD, Member
from node.rpc import CallContext, RemoteError, RpcError
from node.runner import EVENTS, HEARTBEATS, NODES, Node
from protocol.errors import ProtocolError
from protocol.keys import node_id_hex
from trainer.swarm import MethodHandler, Peer, SwarmCallError, Tensors

logger = logging.getLogger(__name__)

RESERVED_NAMES = frozenset({NODES, HEARTBEATS, EVENTS})
LIVE = ("JOINING", "ONLINE")


def _peer(member: Member) -> Peer:
    a = member.announcement
    metrics = dict(member.heartbeat.metrics) if member.heartbeat else {}
    return Peer(member.public_key, a.role.value, a.stage, a.expert, member.state, a.public_name, metrics)


class HivemindSwarm:
    """What trainer/ and ensemble/ see of the swarm; every failure is a SwarmCallError."""

    def __init__(self, node: Node):
        self.node = node

    @property
    def my_id(self) -> bytes:
        return self.node.public_key

    async def peers(
        self, *, role: str | None = None, stage: int | None = None, live_only: bool = True, fresh: bool = False
    ) -> list[Peer]:
        members = await self.node.refresh_membership() if fresh else self.node.view.members
        found = []
        for member in members.values():
            if live_only and member.state not in LIVE:
                continue
            if role is not None and member.announcement.role.value != role:
                continue
            if stage is not None and member.announcement.stage != stage:
                continue
            found.append(_peer(member))
        return sorted(found, key=lambda p: p.id)

    async def call(
        self, peer: bytes, method: str, args: dict | None = None, tensors: Tensors | None = None,
        *, even_if_dead: bool = False,
    ) -> tuple[dict, dict[str, torch.Tensor]]:
        if self.node.rpc is None:
            raise SwarmCallError("the node has not started its RPC endpoint yet")
        member = self.node.view.members.get(peer)
        if member is None:
            member = (await self.node.refresh_membership()).get(peer)
        if member is None or (member.state == DEAD and not even_if_dead):
            raise SwarmCallError(f"peer {node_id_hex(peer)[:16]} is not a live member of the run")
        try:
            peer_id = PeerID.from_base58(member.announcement.peer_id)
        except ValueError:
            raise SwarmCallError(f"peer {node_id_hex(peer)[:16]} announced a malformed peer id") from None
        view = self.node.view
        try:
            sender, result, out = await self.node.rpc.call(peer_id, method, args, tensors)
        except RemoteError as error:  # it answered: alive, but refused this call
            view.rpc_succeeded(peer)
            raise SwarmCallError(str(error)) from None
        except RpcError as error:
            view.rpc_failed(peer, time.time())
            raise SwarmCallError(str(error)) from None
        if sender != peer:
            view.rpc_failed(peer, time.time())
            raise SwarmCallError(f"{member.announcement.peer_id} answered with another node's key")
        view.rpc_succeeded(peer)
        return result, out

    def serve(self, method: str, handler: MethodHandler) -> None:
        async def adapted(context: CallContext, args: dict, tensors: dict) -> tuple[dict, Tensors]:
            return await handler(context.sender, args, tensors)

        self.node.register(method, adapted)

    async def publish(self, name: str, body: dict, ttl_s: float) -> bool:
        if name in RESERVED_NAMES:
            raise ValueError(f"record name {name!r} is reserved for the node itself")
        if name not in self.node.app_record_names:
            raise ValueError(f"record name {name!r} was not declared in the node's app_record_names, so peers "
                             "would not validate it; declare it when creating the Node")
        assert self.node.swarm is not None, "the node has not started"
        return await self.node.swarm.store(name, f"app/{name}"[:64], body, ttl_s)

    async def average(
        self, group: str, tensors: Tensors, weight: float = 1.0, *, group_size: int | None = None
    ) -> tuple[dict[str, torch.Tensor], int]:
        try:
            result = await self.node.averaging().average(group, tensors, weight, group_size)
        except AveragingError as error:
            raise SwarmCallError(str(error)) from None
        return result.tensors, result.group_size

    async def report_event(self, event: str, detail: str) -> None:
        await self.node.report_event(event, detail)

    async def read(self, name: str) -> dict[bytes, dict]:
        assert self.node.swarm is not None, "the node has not started"
        try:
            records = await self.node.swarm.read(name)
        except ProtocolError as error:
            raise ValueError(f"cannot read {name!r}: {error}") from None
        return {sender: record.msg for sender, record in records.items()}
