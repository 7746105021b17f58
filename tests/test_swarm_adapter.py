"""The trainer-facing swarm interface over real hivemind DHTs and p2pd daemons (two nodes + a bootstrap)."""
from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import torch
from hivemind.dht import DHT
from hivemind.utils import get_dht_time

from node.config import NodeConfig
from node.runner import Node
from node.swarm_adapter import HivemindSwarm
from protocol.keys import generate_private_key
from protocol.records import dht_key
from protocol.runspec import make_spec
from tests.harness import Cluster, wait_until
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
            node = Node(config, spec, generate_private_key(), app_record_names=("x-test",))
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
                with pytest.raises(ValueError):
                    await a.publish("undeclared", {"value": 1}, 30)

                # a peer without our validator cannot wipe a declared record family with a plain value
                raw = DHT(initial_peers=[bootstrap], start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
                try:
                    key = dht_key(alpha.run_id, "x-test")
                    raw.store(key, b"garbage", get_dht_time() + 10**6)
                finally:
                    raw.shutdown()
                assert (await b.read("x-test")).get(a.my_id) == {"value": 7}
                assert await a.publish("x-test", {"value": 8}, 30)
                assert (await b.read("x-test")).get(a.my_id) == {"value": 8}

                # weighted group averaging through hivemind's averager: sum(w * x) / sum(w), same on both
                g = torch.Generator().manual_seed(1)
                xa = {"w": torch.randn(4096, generator=g), "b": torch.randn(3, 5, generator=g)}
                xb = {"w": torch.randn(4096, generator=g), "b": torch.randn(3, 5, generator=g)}
                (ra, na), (rb, nb) = await asyncio.gather(
                    a.average("stage-1", xa, weight=1.0), b.average("stage-1", xb, weight=3.0)
                )
                assert na == nb == 2
                for name in xa:
                    expected = (xa[name] + 3 * xb[name]) / 4
                    assert torch.allclose(ra[name], expected, atol=1e-6)
                    assert torch.allclose(ra[name], rb[name], rtol=0, atol=1e-6)  # equal up to rounding
                    assert not torch.allclose(ra[name], xa[name], atol=1e-2)  # really moved
            finally:
                stop.set()
                await asyncio.wait_for(asyncio.gather(*tasks), 30)

        asyncio.run(scenario())
    finally:
        for node in nodes:
            node.shutdown()
        assert cluster.close() == []
    # the DHT and averager children of both in-process nodes are gone
    wait_until(lambda: not _live_children(), 15, 0.2, "the nodes' child processes to exit")



def _live_children() -> list[int]:
    """Our live child processes, except torch's shared-memory manager (torch's own, process-wide)."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == os.getpid() and fields[0] != "Z":
                if not Path(f"/proc/{entry}/cmdline").read_bytes().startswith(b"torch_shm_manager"):
                    children.append(int(entry))
    return children
