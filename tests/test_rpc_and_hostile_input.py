"""A real node process in a private run: bit-exact tensor RPC, and hostile input refused with its own error."""
from __future__ import annotations

import asyncio
import hashlib
import time

import pytest
import torch
from hivemind.dht import DHT
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time

from node.config import Timeouts
from node.dht import SwarmDHT
from node.rpc import PROTOCOL_NAME, REPLY_KIND, REQUEST_KIND, RemoteError, RpcEndpoint
from node.runner import HEARTBEATS, NODES
from protocol.access import AccessPolicy, issue_token, token_to_text
from protocol.envelope import Limits, open_envelope, seal
from protocol.keys import generate_private_key, public_key_bytes
from protocol.messages import Heartbeat, NodeAnnouncement, NodeState, Role
from protocol.records import dht_key, seal_record
from protocol.runspec import dumps_spec, make_spec, run_id
from tests.harness import Cluster

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def private_swarm(tmp_path_factory):
    """bootstrap + one node of a private run; an in-process client holding a valid token."""
    workdir = tmp_path_factory.mktemp("private")
    owner = generate_private_key()
    spec = make_spec("pipeline", "tiny", owner, access="private", name="hostile-test")
    (workdir / "run.toml").write_text(dumps_spec(spec))
    rid = run_id(spec)
    server_key = generate_private_key()
    (workdir / "server").mkdir()
    from node.identity import write_private_key

    write_private_key(workdir / "server" / "node.key", server_key)
    server_token = issue_token(owner, rid, public_key_bytes(server_key), time.time() + 3600)
    cluster = Cluster(workdir)
    try:
        _, bootstrap = cluster.bootstrap()
        server = cluster.start("server", "node", "--run", "run.toml", "--initial-peers", bootstrap, "--data-dir", "server",
                               "--public-name", "server", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--device", "cpu",
                               "--token", token_to_text(server_token))
        out = server.wait_for_output("is ONLINE", 60)
        peer_line = next(line for line in out.splitlines() if "/p2p/" in line)
        server_peer = PeerID.from_base58(peer_line.strip().rsplit("/p2p/", 1)[1])
        client_key = generate_private_key()
        client_token = issue_token(owner, rid, public_key_bytes(client_key), time.time() + 3600)
        access = AccessPolicy(private=True, owner_public=public_key_bytes(owner), run_id=rid)
        timeouts = Timeouts(rpc_s=30.0)
        client = SwarmDHT(client_key, rid, access, timeouts, initial_peers=[bootstrap],
                          host_maddrs=["/ip4/127.0.0.1/tcp/0"], token=client_token)
        loop = asyncio.new_event_loop()
        try:
            yield dict(run=loop.run_until_complete, cluster=cluster, server=server, server_peer=server_peer, server_key=server_key, rid=rid,
                       owner=owner, client=client, client_key=client_key, client_token=client_token, access=access,
                       timeouts=timeouts, bootstrap=bootstrap)
        finally:
            loop.run_until_complete(client.close_p2p())
            loop.close()
            client.shutdown()
    finally:
        assert cluster.close() == []


def _endpoint(env, key=None, token=None, run=None) -> RpcEndpoint:
    async def make():
        p2p = await env["client"].p2p()
        return RpcEndpoint(p2p, key or env["client_key"], run or env["rid"], env["access"], env["timeouts"],
                           token=token, clock=time.time)

    return make()


def test_exchange_64mib_fp32_and_bf16_bit_exact(private_swarm):
    env = private_swarm
    generator = torch.Generator().manual_seed(0)
    big = torch.randn(16 << 20, generator=generator)  # 64 MiB of fp32
    half = torch.randn(333, 257, generator=generator).to(torch.bfloat16)

    async def go():
        endpoint = await _endpoint(env, token=env["client_token"])
        return await endpoint.call(env["server_peer"], "echo", {}, {"big": big, "half": half})

    sender, result, tensors = env["run"](go())
    assert sender == public_key_bytes(env["server_key"])
    assert result["received"] == {"big": big.numel(), "half": half.numel()}
    assert tensors["big"].dtype == torch.float32 and tensors["half"].dtype == torch.bfloat16
    assert torch.equal(tensors["big"].view(torch.int32), big.view(torch.int32))
    assert torch.equal(tensors["half"].view(torch.int16), half.view(torch.int16))


def test_link_emulation_delays_calls_on_the_real_transport(private_swarm):
    """The caller's shaper holds each request as the emulated link would: a 256 KiB echo to a
    node 'in Australia' from one 'in Belgium' takes that link's latency and transfer time longer."""
    from node.linkemu import LinkShaper, emulation_from_dict

    env = private_swarm
    emulation = emulation_from_dict({"scenario": "skippipe_gcp20", "time_scale": 1.0, "bytes_scale": 1.0,
                                     "locations": {"client": "Belgium", "server": "Australia"}})
    payload = torch.zeros(64 << 10)  # 256 KiB
    link = emulation.link("Belgium", "Australia")
    expected = link.seconds(payload.numel() * 4)  # ~0.5 s of latency and overhead, ~25 ms on the wire

    async def timed(shaped: bool) -> float:
        endpoint = await _endpoint(env, token=env["client_token"])
        if shaped:
            server = str(env["server_peer"])
            endpoint.shaper = LinkShaper(emulation, "client", {server: "server"}.get)
        began = time.perf_counter()
        await endpoint.call(env["server_peer"], "echo", {}, {"p": payload})
        return time.perf_counter() - began

    plain = min(env["run"](timed(False)) for _ in range(2))
    shaped = env["run"](timed(True))
    assert expected > 0.4
    assert shaped - plain > 0.9 * expected, (plain, shaped, expected)
    assert shaped < plain + expected + 1.0, (plain, shaped, expected)


async def _raw_call(env, frame: bytes, tail: bytes = b"") -> str:
    """Send raw bytes on an RPC stream and return the error kind of the reply ('' when it succeeded)."""
    p2p = await env["client"].p2p()
    _, reader, writer = await p2p.call_binary_stream_handler(env["server_peer"], PROTOCOL_NAME)
    try:
        writer.write(frame + tail)
        await writer.drain()
        length = int.from_bytes(await asyncio.wait_for(reader.readexactly(4), 30), "big")
        reply = open_envelope(await reader.readexactly(length), REPLY_KIND, Limits(), run_id=env["rid"])
    finally:
        writer.close()
    return "" if reply.body["ok"] else reply.body["error"].split(":", 1)[0]


def _frame(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def _request(env, key=None, *, body=None, run=None, timestamp=None) -> bytes:
    body = body if body is not None else {"method": "ping", "args": {}, "tensors": [], "token": env["client_token"],
                                          "to": str(env["server_peer"])}
    return seal(key or env["client_key"], kind=REQUEST_KIND, run_id=run or env["rid"], body=body,
                seq=time.time_ns(), timestamp=timestamp)


def test_hostile_rpc_input_is_refused_with_its_own_error(private_swarm):
    env = private_swarm
    digest = hashlib.sha256(b"\0" * 12).digest()
    bad_tensor = {"method": "echo", "args": {}, "token": env["client_token"], "to": str(env["server_peer"]),
                  "tensors": [{"name": "x", "dtype": "float32", "shape": [4], "nbytes": 12, "digest": digest}]}
    replayed = _request(env)
    stranger = generate_private_key()
    cases = [
        ("MalformedMessage", _frame(b"\x93\xc1garbage-not-msgpack"), b""),
        ("MessageTooLarge", (1 << 30).to_bytes(4, "big"), b""),
        ("WrongRun", _frame(_request(env, run=b"\x01" * 16)), b""),
        ("Expired", _frame(_request(env, timestamp=time.time() - 3600)), b""),
        ("", _frame(replayed), b""),
        ("Replayed", _frame(replayed), b""),
        ("TensorShapeMismatch", _frame(_request(env, body=bad_tensor)), b"\0" * 12),
        ("Unauthorized", _frame(_request(env, stranger, body={"method": "ping", "args": {}, "tensors": [], "token": None})), b""),
        ("BadSignature", _frame(_request(env)[:-3] + b"xyz"), b""),
        # a request signed for another node, relayed here
        ("WrongRecipient", _frame(_request(env, body={"method": "ping", "args": {}, "tensors": [],
                                                      "token": env["client_token"], "to": "12D3KooWother"})), b""),
    ]

    async def go():
        return [await _raw_call(env, frame, tail) for _, frame, tail in cases]

    got = env["run"](go())
    assert got == [expected for expected, _, _ in cases]
    log = env["server"].output()
    for expected, _, _ in cases:
        if expected:
            assert f"refused rpc from" in log and expected in log


def test_hostile_records_are_rejected_and_the_node_keeps_running(private_swarm):
    env = private_swarm
    rid, server_public = env["rid"], public_key_bytes(env["server_key"])
    intruder = generate_private_key()
    intruder_token = issue_token(env["owner"], rid, public_key_bytes(intruder), time.time() + 3600)
    fake = NodeAnnouncement(peer_id="12D3KooWfake", public_name="impostor", role=Role.DATA, stage=0, expert=None,
                            device="cpu", throughput=0.0, version="0", state=NodeState.ONLINE, maddrs=[])
    key = dht_key(rid, NODES)
    now = get_dht_time()
    # signed by the intruder (who even holds a token) but stored under the server's subkey
    other_subkey = seal_record(intruder, run_id=rid, key=key, kind=NodeAnnouncement.KIND, body=fake.to_body(),
                               seq=1, token=intruder_token, timestamp=now)
    # correctly signed and under its own subkey, but from a node with no token for this private run
    tokenless = seal_record(intruder, run_id=rid, key=key, kind=NodeAnnouncement.KIND, body=fake.to_body(),
                            seq=2, token=None, timestamp=now)
    raw = DHT(initial_peers=[env["bootstrap"]], start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])  # no validator
    try:
        raw.store(key, other_subkey, now + 60, subkey=server_public)
        raw.store(key, tokenless, now + 60, subkey=public_key_bytes(intruder))
    finally:
        raw.shutdown()
    hostile_done = time.time()

    async def read():
        return await env["client"].read(NODES)

    records = env["run"](read())
    assert public_key_bytes(intruder) not in records
    assert NodeAnnouncement.from_body(records[server_public].msg).public_name == "server"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        log = env["server"].output()
        if "WrongSubkey" in log and "Unauthorized" in log:
            break
        time.sleep(0.5)
    assert "WrongSubkey" in log and "Unauthorized" in log, log[-3000:]

    # a later heartbeat proves the node is still alive and working
    async def later_heartbeat():
        while True:
            beats = await env["client"].read(HEARTBEATS)
            beat = beats.get(server_public)
            if beat is not None and beat.envelope.timestamp > hostile_done:
                return Heartbeat.from_body(beat.msg)
            await asyncio.sleep(0.5)

    beat = env["run"](asyncio.wait_for(later_heartbeat(), 30))
    assert beat.state == NodeState.ONLINE
    assert env["server"].popen.poll() is None


def test_rpc_call_to_unknown_method_and_without_token(private_swarm):
    env = private_swarm

    async def go():
        with_token = await _endpoint(env, token=env["client_token"])
        with pytest.raises(RemoteError) as unknown:
            await with_token.call(env["server_peer"], "no-such-method")
        without = await _endpoint(env, key=generate_private_key(), token=None)
        with pytest.raises(RemoteError) as refused:
            await without.call(env["server_peer"], "ping")
        _, pong, _ = await with_token.call(env["server_peer"], "ping")
        return unknown.value.kind, refused.value.kind, pong

    unknown, refused, pong = env["run"](go())
    assert unknown == "UnknownMethod"
    assert refused == "Unauthorized"
    assert pong["state"] == "ONLINE"


def test_a_refusal_before_the_tensors_are_read_reaches_a_caller_that_sends_tensors(private_swarm):
    """A node refuses a call on its header (a method it does not serve yet, a rate limit) before it
    reads the tensors: the caller, still sending them, gets the refusal, not a broken stream. A
    broken stream counts as a failed call, and three made a restoring replica dead to its stage
    mate, which then trained apart from it (pp.reduce, with a stage's gradients, in a chaos run)."""
    env = private_swarm
    gradients = {"w": torch.randn(4 << 20, generator=torch.Generator().manual_seed(1))}  # 16 MiB

    async def go():
        endpoint = await _endpoint(env, token=env["client_token"])
        kinds = []
        for _ in range(3):
            with pytest.raises(RemoteError) as unknown:
                await endpoint.call(env["server_peer"], "pp.not-served-yet", {"iteration": 3}, gradients)
            kinds.append(unknown.value.kind)
        _, echoed, tensors = await endpoint.call(env["server_peer"], "echo", {}, gradients)
        return kinds, echoed, tensors

    kinds, echoed, tensors = env["run"](go())
    assert kinds == ["UnknownMethod"] * 3
    assert echoed["received"] == {"w": 4 << 20} and torch.equal(tensors["w"], gradients["w"])
