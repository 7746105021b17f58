"""Access control of a private run against real node processes: each case is its own test.

One swarm for the module: a bootstrap peer and a private zo node (kept at step 0: its run needs
three nodes) started with a 3 s RPC read deadline and a rate limit of one ping per 5 s (bursts of 3).
tests/test_rpc_and_hostile_input.py covers malformed, replayed, expired and misaddressed requests
and records under another signer's subkey; here: every handler without a valid token, expired and
stolen tokens, contributions, stage assignment, record pinning by replay, slow and oversized
streams, and rate limits.
"""
from __future__ import annotations

import asyncio
import json
import time

import pytest
from hivemind.dht import DHT
from hivemind.p2p import PeerID

from node import __version__
from node.config import Timeouts
from node.dht import SwarmDHT
from node.identity import write_private_key
from node.rpc import PROTOCOL_NAME, REPLY_KIND, REQUEST_KIND, RemoteError, RpcEndpoint, RpcError
from node.runner import HEARTBEATS, NODES
from protocol.access import AccessPolicy, issue_token, token_to_text
from protocol.envelope import Limits, open_envelope, seal
from protocol.keys import generate_private_key, public_key_bytes
from protocol.messages import Heartbeat, NodeAnnouncement, NodeState, Role
from protocol.records import dht_key
from protocol.runspec import dumps_spec, make_spec, run_id
from protocol.zo import seal_contribution
from tests.harness import Cluster, child_env, wait_until

pytestmark = pytest.mark.slow

RPC_S = 3.0
ZO_METHODS = ("ping", "echo", "zo.contribute", "zo.commit", "zo.log", "zo.status", "zo.snapshot")


def _peer_id(output: str) -> PeerID:
    line = next(line for line in output.splitlines() if "/p2p/" in line)
    return PeerID.from_base58(line.strip().rsplit("/p2p/", 1)[1])


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("access")
    owner = generate_private_key()
    spec = make_spec("zo", "tiny", owner, access="private", name="access-zo", min_nodes=3,
                     heartbeat_interval_s=1.0, heartbeat_ttl_s=6.0)
    (workdir / "zo.toml").write_text(dumps_spec(spec))
    rid = run_id(spec)
    server_key = generate_private_key()
    (workdir / "server").mkdir()
    write_private_key(workdir / "server" / "node.key", server_key)
    token = issue_token(owner, rid, public_key_bytes(server_key), time.time() + 3600)
    cluster = Cluster(workdir)
    loop = asyncio.new_event_loop()
    clients: list[SwarmDHT] = []
    try:
        bootstrap_proc, bootstrap = cluster.bootstrap()
        env = child_env(SWARMTRAIN_TIMEOUT_RPC_S=str(RPC_S), SWARMTRAIN_RATE_LIMITS_METHODS="ping=0.2:3")
        server = cluster.start("server", "node", "--run", "zo.toml", "--initial-peers", bootstrap, "--data-dir", "server",
                               "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--device", "cpu", "--token",
                               token_to_text(token), env=env)
        out = server.wait_for_output("is ONLINE", 90)
        access = AccessPolicy(private=True, owner_public=public_key_bytes(owner), run_id=rid)

        def member(key, token=None) -> tuple[SwarmDHT, RpcEndpoint]:
            """A DHT node of its own (to publish records as ``key``) and an endpoint on it."""
            dht = SwarmDHT(key, rid, access, Timeouts(rpc_s=20.0), initial_peers=[bootstrap],
                           host_maddrs=["/ip4/127.0.0.1/tcp/0"], token=token)
            clients.append(dht)
            p2p = loop.run_until_complete(dht.p2p())
            return dht, RpcEndpoint(p2p, key, rid, access, Timeouts(rpc_s=20.0), token=token, clock=time.time)

        shared, _ = member(generate_private_key())

        def client(key=None, token=None) -> RpcEndpoint:
            """An endpoint signing as ``key``. Calls only, so they share one DHT node: the server
            tells callers apart by the key that signs each request."""
            p2p = loop.run_until_complete(shared.p2p())
            return RpcEndpoint(p2p, key or generate_private_key(), rid, access, Timeouts(rpc_s=20.0), token=token,
                               clock=time.time)

        def token_for(key, valid_s=3600.0) -> bytes:
            return issue_token(owner, rid, public_key_bytes(key), time.time() + valid_s)

        yield dict(run=loop.run_until_complete, cluster=cluster, server=server, peer=_peer_id(out), rid=rid,
                   owner=owner, server_public=public_key_bytes(server_key), bootstrap=bootstrap, client=client,
                   member=member, reader=shared, token_for=token_for, access=access, workdir=workdir,
                   bootstrap_proc=bootstrap_proc)
    finally:
        for dht in clients:
            loop.run_until_complete(dht.close_p2p())
            dht.shutdown()
        loop.close()
        assert cluster.close() == []


def _refusal(env, endpoint: RpcEndpoint, method: str, args: dict | None = None) -> str:
    """The server's refusal of one call. A call whose stream broke off before any reply (the server's
    3 s read deadline runs out when the 2-core machine stalls it; seen once in CI) is sent again, at
    most twice: what is asserted is the refusal, and a broken stream is not one."""
    for attempt in range(3):
        try:
            env["run"](endpoint.call(env["peer"], method, args or {}))
        except RemoteError as error:
            return str(error)
        except RpcError:
            if attempt == 2:
                raise
        else:
            pytest.fail(f"{method} was served, not refused")


def test_no_handler_serves_a_node_without_a_valid_token(swarm):
    env = swarm
    stranger = generate_private_key()
    tokenless = env["client"](stranger)
    thief = env["client"](token=env["token_for"](stranger))  # somebody else's token
    expired_key = generate_private_key()
    expired = env["client"](expired_key, token=env["token_for"](expired_key, valid_s=-1.0))
    for method in ZO_METHODS:
        assert _refusal(env, tokenless, method).startswith("Unauthorized: this run is private"), method
        assert "was issued to node" in _refusal(env, thief, method), method
        assert "expired" in _refusal(env, expired, method), method
    member_key = generate_private_key()
    member = env["client"](member_key, token=env["token_for"](member_key))
    _, status, _ = env["run"](member.call(env["peer"], "zo.status", {}))  # the same call with a token is served
    assert status["step"] == 0


def _announce(env, dht: SwarmDHT, role: Role, stage: int | None, peer_id: str) -> None:
    announcement = NodeAnnouncement(peer_id=peer_id, public_name="prober", role=role, stage=stage, expert=None,
                                    device="cpu", throughput=0.0, version=__version__, state=NodeState.ONLINE,
                                    maddrs=[])
    env["run"](dht.store(NODES, NodeAnnouncement.KIND, announcement.to_body(), 120))
    env["run"](dht.store(HEARTBEATS, Heartbeat.KIND, Heartbeat(NodeState.ONLINE, 0).to_body(), 60))


def test_a_contribution_counts_only_from_a_token_holder(swarm):
    env = swarm
    member_key, outsider_key = generate_private_key(), generate_private_key()
    while public_key_bytes(member_key) < env["server_public"]:  # the server (smallest id) must be the committer
        member_key = generate_private_key()
    member_dht, member = env["member"](member_key, token=env["token_for"](member_key))
    outsider_dht, outsider = env["member"](outsider_key)
    for dht, endpoint in ((member_dht, member), (outsider_dht, outsider)):
        _announce(env, dht, Role.ZO, None, str(endpoint.p2p.peer_id))

    def accepted() -> bool:  # the server counts the member once it has read its heartbeat
        _announce(env, member_dht, Role.ZO, None, str(member.p2p.peer_id))
        try:
            result = env["run"](member.call(env["peer"], "zo.contribute",
                                            {"contribs": [seal_contribution(member_key, env["rid"], 0, 0, 5)]}))
        except RemoteError as error:
            assert "live zo members" in str(error) or "committer" in str(error), error
            return False
        return result[1]["accepted"] == 1

    wait_until(accepted, 60, interval=1.0, what="the server to take the member's contribution")
    raw = seal_contribution(outsider_key, env["rid"], 0, 0, 9)
    assert _refusal(env, outsider, "zo.contribute", {"contribs": [raw]}).startswith("Unauthorized")
    # relayed by a token holder, it is still the outsider's and is refused
    assert "signed it" in _refusal(env, member, "zo.contribute", {"contribs": [raw]})
    _, status, _ = env["run"](member.call(env["peer"], "zo.status", {}))
    assert status["step"] == 0


def _server_heartbeat(env):
    """The server's heartbeat as a validating reader of the run reads it: (signed bytes, DHT expiration, signed at)."""
    found = env["reader"].dht.get(dht_key(env["rid"], HEARTBEATS), latest=True)
    item = found.value[env["server_public"]]
    signed_at = open_envelope(item.value, Heartbeat.KIND, Limits(max_age_s=3600), run_id=env["rid"]).timestamp
    return item.value, item.expiration_time, signed_at


def test_a_replayed_record_cannot_pin_a_nodes_old_heartbeat(swarm):
    """The DHT keeps per subkey the value that expires last. A node's own heartbeat, stored again by
    somebody else with an expiration far beyond the one its signer chose, would hide every later
    heartbeat of that node (it would look dead within seconds); the signed expiration refuses it."""
    env = swarm
    old, expiration, signed_at = _server_heartbeat(env)
    assert expiration < signed_at + 100
    attacker = DHT(initial_peers=[env["bootstrap"]], start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:  # no validator on the attacker's side: it stores what it likes where it can
        attacker.store(dht_key(env["rid"], HEARTBEATS), old, signed_at + 3500, subkey=env["server_public"])
    finally:
        attacker.shutdown()  # and takes its own unvalidated copy along

    def refused() -> bool:
        return "stored to expire" in env["server"].output() + env["bootstrap_proc"].output()

    wait_until(refused, 30, what="the server or the bootstrap peer to refuse the replay")
    # the server's later heartbeats are still stored and read: it stays alive for everyone
    wait_until(lambda: _server_heartbeat(env)[2] > signed_at + 3, 30, interval=1.0,
               what="a newer heartbeat of the server to be read")


def _stream(env, endpoint: RpcEndpoint):
    return env["run"](endpoint.p2p.call_binary_stream_handler(env["peer"], PROTOCOL_NAME))


def _closed_after(env, reader, writer, trickle: bytes) -> float:
    """Send ``trickle`` one byte a second; the seconds until the server closed the stream."""
    async def go() -> float:
        began = time.monotonic()

        async def dribble():
            for byte in trickle:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(1.0)

        sender = asyncio.create_task(dribble())
        try:
            # EOF, or a broken pipe when a byte went out after the server closed its end
            await asyncio.wait_for(reader.read(), 30)
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            sender.cancel()
            writer.close()
        return time.monotonic() - began

    return env["run"](go())


def test_a_slowloris_stream_is_cut_at_the_read_deadline(swarm):
    env = swarm
    key = generate_private_key()
    endpoint = env["client"](key, token=env["token_for"](key))
    reader, writer = _stream(env, endpoint)[1:]
    request = seal(key, kind=REQUEST_KIND, run_id=env["rid"], seq=1, body={
        "method": "echo", "args": {}, "tensors": [], "token": env["token_for"](key), "to": str(env["peer"])})
    frame = len(request).to_bytes(4, "big") + request  # hundreds of bytes: minutes at a byte a second
    seconds = _closed_after(env, reader, writer, frame)
    assert RPC_S - 0.5 < seconds < RPC_S + 6, seconds
    # the node served others meanwhile and is still there
    assert env["run"](endpoint.call(env["peer"], "zo.status", {}))[1]["step"] == 0
    assert "broke off: TimeoutError" in env["server"].output()


def test_slow_tensor_bytes_are_cut_and_oversized_ones_refused_unread(swarm):
    env = swarm
    key = generate_private_key()
    token = env["token_for"](key)
    endpoint = env["client"](key, token=token)

    def request(nbytes: int) -> bytes:
        header = {"name": "t", "dtype": "uint8", "shape": [nbytes], "nbytes": nbytes, "digest": bytes(32)}
        data = seal(key, kind=REQUEST_KIND, run_id=env["rid"], seq=time.time_ns(), body={
            "method": "echo", "args": {}, "tensors": [header], "token": token, "to": str(env["peer"])})
        return len(data).to_bytes(4, "big") + data

    # 1 MiB announced, then a byte a second: cut once the deadline for 1 MiB (rpc_s + 0.2 s) has passed
    _, reader, writer = _stream(env, endpoint)
    writer.write(request(1 << 20))
    seconds = _closed_after(env, reader, writer, bytes(64))
    assert RPC_S - 0.5 < seconds < RPC_S + 6, seconds

    async def oversized() -> str:  # 4 GiB announced: refused at once, before any of it is read
        _, reader, writer = await endpoint.p2p.call_binary_stream_handler(env["peer"], PROTOCOL_NAME)
        try:
            writer.write(request(4 << 30))
            await writer.drain()
            length = int.from_bytes(await asyncio.wait_for(reader.readexactly(4), 10), "big")
            reply = open_envelope(await reader.readexactly(length), REPLY_KIND, Limits(), run_id=env["rid"])
        finally:
            writer.close()
        return reply.body["error"]

    began = time.monotonic()
    assert env["run"](oversized()).startswith("MessageTooLarge")
    assert time.monotonic() - began < RPC_S


def test_rate_limits_are_per_peer_and_per_method(swarm):
    env = swarm
    keys = [generate_private_key() for _ in range(2)]
    first, second = (env["client"](k, token=env["token_for"](k)) for k in keys)

    def ping(endpoint) -> str:
        try:
            env["run"](endpoint.call(env["peer"], "ping", {}))
            return "ok"
        except RemoteError as error:
            return str(error)

    began = time.monotonic()
    answers = [ping(first) for _ in range(5)]
    assert time.monotonic() - began < 4.5  # else the bucket refilled meanwhile and this proves nothing
    assert answers[:3] == ["ok"] * 3, answers  # the burst
    for answer in answers[3:]:
        assert answer.startswith("RateLimited: too many 'ping' calls from this peer: at most 0.2/s (bursts of 3)"), answers
    assert ping(second) == "ok"  # another peer has its own bucket
    assert env["run"](first.call(env["peer"], "zo.status", {}))[1]["step"] == 0  # and so has another method
    time.sleep(max(0.0, began + 5.5 - time.monotonic()))
    assert ping(first) == "ok"  # refilled at 0.2/s


def test_a_node_without_a_token_gets_no_pipeline_stage(swarm, tmp_path):
    """A tokenless node announces itself as the only replica of stage 1 (its records reach the
    bootstrap peer, which cannot judge tokens). The data node does not count it: it waits, and once
    a stage node with a token joins, every hop of every path goes there and none to the intruder."""
    env = swarm
    owner, cluster = env["owner"], env["cluster"]
    # path_length counts stage 0: every microbatch visits stage 1. A long heartbeat ttl: on a loaded
    # machine a short one makes s1 look dead for a moment, and the data node then skips its stage.
    spec = make_spec("pipeline", "tiny", owner, access="private", name="access-pp", stages=2, path_length=2,
                     microbatches=2, microbatch_size=2, seq_len=32, memory=2, steps=2, min_nodes=2,
                     domains=["arithmetic"], swap="none", heartbeat_interval_s=1.0, heartbeat_ttl_s=20.0)
    path = tmp_path / "pp.toml"
    path.write_text(dumps_spec(spec))
    rid = run_id(spec)
    keys = {name: generate_private_key() for name in ("d0", "s1")}
    for name, key in keys.items():
        (tmp_path / name).mkdir()
        write_private_key(tmp_path / name / "node.key", key)
    token = {name: token_to_text(issue_token(owner, rid, public_key_bytes(k), time.time() + 3600))
             for name, k in keys.items()}
    access = AccessPolicy(private=True, owner_public=public_key_bytes(owner), run_id=rid)
    intruder_key = generate_private_key()
    intruder = SwarmDHT(intruder_key, rid, access, Timeouts(), initial_peers=[env["bootstrap"]],
                        host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    loop = asyncio.new_event_loop()
    calls: list[str] = []
    try:
        p2p = loop.run_until_complete(intruder.p2p())
        endpoint = RpcEndpoint(p2p, intruder_key, rid, AccessPolicy(False, public_key_bytes(owner), rid), Timeouts(),
                               clock=time.time)

        async def record_call(context, args, tensors):
            calls.append(context.envelope.body["method"])
            return {}, {}

        for method in ("pp.forward", "pp.backward", "pp.done", "pp.reduce", "pp.state", "pp.probe", "ping", "echo"):
            endpoint.register(method, record_call)
        loop.run_until_complete(endpoint.start())
        announcement = NodeAnnouncement(peer_id=str(p2p.peer_id), public_name="intruder", role=Role.STAGE, stage=1,
                                        expert=None, device="cpu", throughput=1e9, version=__version__,
                                        state=NodeState.ONLINE, maddrs=[])

        async def pose(seconds: float) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                await intruder.store(NODES, NodeAnnouncement.KIND, announcement.to_body(), 30)
                await intruder.store(HEARTBEATS, Heartbeat.KIND, Heartbeat(NodeState.ONLINE, 0).to_body(), 10)
                await asyncio.sleep(1.0)

        def node(name: str, *args: str):
            return cluster.start(f"pp-{name}", "node", "--run", str(path), "--data-dir", str(tmp_path / name),
                                 "--initial-peers", env["bootstrap"], "--host-maddrs", "/ip4/127.0.0.1/tcp/0",
                                 "--device", "cpu", "--token", token[name], "--report", str(tmp_path / f"{name}.json"),
                                 "--public-name", name, *args)

        data = node("d0", "--role", "data")
        data.wait_for_output("is ONLINE", 90)
        loop.run_until_complete(pose(8.0))  # the data node would start now if it counted the intruder
        assert "pipeline iteration 0 done" not in data.output()
        stage = node("s1", "--stage", "1")

        async def keep_posing() -> None:
            while data.popen.poll() is None:
                await pose(1.0)

        loop.run_until_complete(asyncio.wait_for(keep_posing(), 240))
        assert stage.popen.poll() is None or stage.popen.returncode == 0
        report = json.loads((tmp_path / "d0.json").read_text())
    finally:
        loop.run_until_complete(intruder.close_p2p())
        loop.close()
        intruder.shutdown()
    assert report["iterations"] == 2
    hops = [node for _, _, path_ in report["executed"] for _, node in path_]
    assert hops and set(hops) == {public_key_bytes(keys["s1"]).hex()}
    assert calls == []  # nobody routed to it, probed it, or asked it for state
