"""A real zo node refuses hostile contributions and commits, each with its own reason, and goes on."""
from __future__ import annotations

import asyncio
import time

import pytest
import torch
from hivemind.p2p import PeerID

from node import __version__
from node.config import Timeouts
from node.dht import SwarmDHT
from node.rpc import RemoteError, RpcEndpoint
from node.runner import HEARTBEATS, NODES
from protocol.access import AccessPolicy
from protocol.envelope import seal
from protocol.keys import generate_private_key, public_key_bytes
from protocol.messages import Heartbeat, NodeAnnouncement, NodeState, Role
from protocol.runspec import dumps_spec, make_spec, run_id
from protocol.zo import CONTRIB_KIND, GENESIS, open_contribution, seal_commit, seal_contribution
from tests.harness import Cluster, wait_until
from trainer.zo.worker import pack_blobs

pytestmark = pytest.mark.slow


def test_zo_node_refuses_hostile_input(tmp_path):
    owner = generate_private_key()
    # three nodes must be live before step 0: the server stays at step 0 while we probe it
    spec = make_spec("zo", "tiny", owner, name="zo-hostile", min_nodes=3, heartbeat_interval_s=1.0,
                     heartbeat_ttl_s=6.0)
    (tmp_path / "run.toml").write_text(dumps_spec(spec))
    rid = run_id(spec)
    cluster = Cluster(tmp_path)
    loop = asyncio.new_event_loop()
    client = None
    try:
        _, bootstrap = cluster.bootstrap()
        server = cluster.start("server", "node", "--run", "run.toml", "--initial-peers", bootstrap, "--data-dir",
                               "server", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--device", "cpu")
        out = server.wait_for_output("is ONLINE", 60)
        peer_id = PeerID.from_base58(next(l for l in out.splitlines() if "/p2p/" in l).strip().rsplit("/p2p/", 1)[1])
        server_public = bytes.fromhex(out.split("node id ")[1].split()[0])
        key = generate_private_key()
        while public_key_bytes(key) < server_public:  # the server (smallest id) must be the committer
            key = generate_private_key()
        me = public_key_bytes(key)
        timeouts = Timeouts(rpc_s=20.0)
        access = AccessPolicy(private=False, owner_public=public_key_bytes(owner), run_id=rid)
        client = SwarmDHT(key, rid, access, timeouts, initial_peers=[bootstrap], host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        run = loop.run_until_complete

        async def setup():
            p2p = await client.p2p()
            endpoint = RpcEndpoint(p2p, key, rid, access, timeouts, clock=time.time)
            announcement = NodeAnnouncement(peer_id=str(p2p.peer_id), public_name="prober", role=Role.ZO, stage=None,
                                            expert=None, device="cpu", throughput=0.0, version=__version__,
                                            state=NodeState.ONLINE, maddrs=[])
            await client.store(NODES, NodeAnnouncement.KIND, announcement.to_body(), 120)
            return endpoint

        endpoint = run(setup())

        async def beat():
            await client.store(HEARTBEATS, Heartbeat.KIND, Heartbeat(NodeState.ONLINE, 0).to_body(), 60)

        def call(method, args, tensors=None):
            return run(endpoint.call(peer_id, method, args, tensors))

        def refused(method, args, tensors=None) -> str:
            with pytest.raises(RemoteError) as info:
                call(method, args, tensors)
            return str(info.value)

        def contribute(raws):
            return call("zo.contribute", {"contribs": raws})

        # the server counts us as a live member once it has read our heartbeat
        def admitted():
            run(beat())
            try:
                return contribute([seal_contribution(key, rid, 0, 0, 5)])[1]["accepted"] == 1
            except RemoteError as error:
                assert "live zo members" in str(error), error
                return False

        wait_until(admitted, 60, interval=1.0, what="the server to see the prober as a member")

        # a duplicate of what was just accepted
        assert "duplicate" in refused("zo.contribute", {"contribs": [seal_contribution(key, rid, 0, 0, 5)]})
        # a bad signature
        good = bytearray(seal_contribution(key, rid, 0, 0, 9))
        good[-70] ^= 0x01
        reason = refused("zo.contribute", {"contribs": [bytes(good)]})
        assert "BadSignature" in reason or "Malformed" in reason, reason
        # a step far ahead of the committer
        assert "step" in refused("zo.contribute", {"contribs": [seal_contribution(key, rid, 10_000, 0, 5)]})
        # out-of-range and non-finite scalars, and a sample beyond the run's probes
        for body in ({"step": 0, "sample": 0, "q": 256}, {"step": 0, "sample": 0, "q": float("nan")},
                     {"step": 0, "sample": 0, "q": float("inf")}, {"step": 0, "sample": 3, "q": 1}):
            raw = seal(key, kind=CONTRIB_KIND, run_id=rid, body=body, seq=int(time.time_ns() // 1000), limits=None)
            assert refused("zo.contribute", {"contribs": [raw]})
        # somebody else's contribution relayed by us
        stranger = generate_private_key()
        assert "signed it" in refused("zo.contribute", {"contribs": [seal_contribution(stranger, rid, 0, 0, 5)]})
        # another run's
        assert "WrongRun" in refused("zo.contribute", {"contribs": [seal_contribution(key, bytes(16), 0, 0, 5)]})
        # a commit from a node that is not the committer
        contribs = [open_contribution(seal_contribution(key, rid, 0, 0, 5), rid)]
        lengths, blobs = pack_blobs([seal_commit(key, rid, 0, GENESIS, contribs)])
        assert "committer" in refused("zo.commit", {"lengths": lengths}, blobs)
        # malformed commit lists
        assert refused("zo.commit", {"lengths": [5]}, {"blobs": torch.zeros(3, dtype=torch.uint8)})
        assert refused("zo.commit", {"lengths": "x"}, {})
        assert refused("zo.log", {"from": -1})
        # it is still there and still at step 0: nothing was applied
        status = call("zo.status", {})[1]
        assert status["step"] == 0 and status["head"] == GENESIS
        assert server.popen.poll() is None
    finally:
        if client is not None:
            loop.run_until_complete(client.close_p2p())
            client.shutdown()
        loop.close()
        assert cluster.close() == []
