"""The trainer-facing swarm interface over real hivemind DHTs and p2pd daemons (two nodes + a bootstrap)."""
from __future__ import annotations

import asyncio

import pytest
import torch

from node.config import NodeConfig
from node.runner import Node
from node.swarm_adapter import HivemindSwarm
from protocol.keys import generate_private_key
from protocol.runspec import make_spec
from tests.harness import Cluster
from trainer.swarm import SwarmCallError

pytestmark = pytest.mark.slow


def test_peers_call_serve_publish_read(tmp_path):
    cluster = Cluster(tmp_path)
    nodes: list[Node] = []
    try:
        _, bootstrap = cluster.bootstrap()
        spec = make_spec("pipeline", "tiny", generate_private_key(), name="adapter-test")
        for name in ("alpha", "beta"):
            config = NodeConfig(initial_peers=(bootstrap,), host_maddrs=("/ip4/127.0.0.1/tcp/0",), device="cpu",
                                public_name=name, data_dir=str(tmp_path / name))
            node = Node(config, spec, generate_private_key())
            node.start()
            nodes.append(node)
        alpha, beta = nodes

        async def scenario():
            a, b = HivemindSwarm(alpha), HivemindSwarm(beta)
            seen_callers = []

            async def double(caller: bytes, args: dict, tensors: dict):
                seen_callers.append(caller)
                return {"k": args["k"] * 2}, {"y": tensors["x"] * 2}

            a.serve("double", double)
            stop = asyncio.Event()
            tasks = [asyncio.create_task(alpha.run(stop)), asyncio.create_task(beta.run(stop))]
            try:
                await asyncio.wait_for(asyncio.gather(alpha.online.wait(), beta.online.wait()), 60)

                async def sees_alpha():
                    while True:
                        peers = await b.peers(fresh=True)
                        if any(p.id == a.my_id for p in peers):
                            return peers
                        await asyncio.sleep(0.5)

                peers = await asyncio.wait_for(sees_alpha(), 30)
                alpha_peer = next(p for p in peers if p.id == a.my_id)
                assert alpha_peer.public_name == "alpha" and alpha_peer.state == "ONLINE"
                assert alpha_peer.role in ("data", "stage") and alpha_peer.stage is not None
                assert [p.id for p in await b.peers(stage=alpha_peer.stage, fresh=True)].count(a.my_id) == 1

                x = torch.arange(10, dtype=torch.float32)
                result, out = await b.call(a.my_id, "double", {"k": 21}, {"x": x})
                assert result == {"k": 42}
                assert torch.equal(out["y"], x * 2)
                assert seen_callers == [b.my_id]  # the handler knows who called

                with pytest.raises(SwarmCallError):
                    await b.call(a.my_id, "no-such-method")
                with pytest.raises(SwarmCallError):
                    await b.call(generate_private_key().public_key().public_bytes_raw(), "double", {"k": 1})

                assert await a.publish("x-test", {"value": 7}, 30)
                records = await b.read("x-test")
                assert records[a.my_id] == {"value": 7}
                with pytest.raises(ValueError):
                    await a.publish("heartbeats", {"forged": True}, 30)
            finally:
                stop.set()
                await asyncio.wait_for(asyncio.gather(*tasks), 30)

        asyncio.run(scenario())
    finally:
        for node in nodes:
            node.shutdown()
        assert cluster.close() == []
