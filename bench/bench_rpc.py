"""RPC throughput for 64 MiB tensors between two processes on loopback, against a plain TCP copy.

The node process serves ``echo``; this process sends a 64 MiB fp32 tensor and gets it back (signed
header, streamed bytes, SHA-256 digest on both sides). The baseline echoes the same bytes through a
plain TCP socket between two processes, in the same run.
"""
from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from hivemind.p2p import PeerID  # noqa: E402

from bench.common import record  # noqa: E402
from node.config import Timeouts  # noqa: E402
from node.dht import SwarmDHT  # noqa: E402
from node.rpc import RpcEndpoint  # noqa: E402
from protocol.access import AccessPolicy  # noqa: E402
from protocol.keys import generate_private_key, public_key_bytes  # noqa: E402
from protocol.runspec import dumps_spec, make_spec, run_id  # noqa: E402
from tests.harness import Cluster  # noqa: E402

TCP_ECHO = """
import socket, sys
server = socket.socket(); server.bind(("127.0.0.1", 0)); server.listen(1)
print(server.getsockname()[1], flush=True)
while True:
    conn, _ = server.accept()
    size = int.from_bytes(conn.recv(8, socket.MSG_WAITALL), "big")
    buf = bytearray(size); view = memoryview(buf); got = 0
    while got < size:
        got += conn.recv_into(view[got:], size - got)
    conn.sendall(buf); conn.close()
"""


def tcp_round_trip(port: int, payload: bytes) -> float:
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(len(payload).to_bytes(8, "big") + payload)
        buf = bytearray(len(payload))
        view, got = memoryview(buf), 0
        while got < len(payload):
            got += conn.recv_into(view[got:], len(payload) - got)
    elapsed = time.perf_counter() - start
    assert buf == payload
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=64, help="tensor size in MiB")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    numel = args.mib * (1 << 20) // 4
    tensor = torch.randn(numel, generator=torch.Generator().manual_seed(0))
    payload = tensor.numpy().tobytes()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        owner = generate_private_key()
        spec = make_spec("pipeline", "tiny", owner, name="bench-rpc")
        (workdir / "run.toml").write_text(dumps_spec(spec))
        rid = run_id(spec)
        cluster = Cluster(workdir)
        echo = subprocess.Popen([sys.executable, "-c", TCP_ECHO], stdout=subprocess.PIPE, text=True)
        client = None
        try:
            port = int(echo.stdout.readline())
            _, bootstrap = cluster.bootstrap()
            server = cluster.start("server", "node", "--run", "run.toml", "--initial-peers", bootstrap, "--data-dir",
                                   "server", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--device", "cpu")
            out = server.wait_for_output("is ONLINE", 60)
            peer = PeerID.from_base58(next(l for l in out.splitlines() if "/p2p/" in l).strip().rsplit("/p2p/", 1)[1])
            key = generate_private_key()
            access = AccessPolicy(private=False, owner_public=public_key_bytes(owner), run_id=rid)
            client = SwarmDHT(key, rid, access, Timeouts(), initial_peers=[bootstrap], host_maddrs=["/ip4/127.0.0.1/tcp/0"])

            async def rpc_times() -> list[float]:
                endpoint = RpcEndpoint(await client.p2p(), key, rid, access, Timeouts(), clock=time.time)
                times = []
                for _ in range(args.repeats + 1):
                    start = time.perf_counter()
                    _, _, back = await endpoint.call(peer, "echo", {}, {"x": tensor})
                    times.append(time.perf_counter() - start)
                    assert torch.equal(back["x"], tensor)
                return times[1:]  # the first call opens the connection

            rpc = asyncio.run(rpc_times())
            tcp_round_trip(port, payload)
            tcp = [tcp_round_trip(port, payload) for _ in range(args.repeats)]
        finally:
            echo.kill()
            if client is not None:
                client.shutdown()
            cluster.close()

    moved = 2 * len(payload) / 1e6  # there and back
    best_rpc, best_tcp = min(rpc), min(tcp)
    median_rpc, median_tcp = sorted(rpc)[len(rpc) // 2], sorted(tcp)[len(tcp) // 2]
    record(
        f"RPC throughput, {args.mib} MiB fp32 tensor echoed between two processes",
        [
            f"swarmtrain RPC (p2pd stream, signed header, SHA-256 digests): median {moved / median_rpc:.0f} MB/s, "
            f"best {moved / best_rpc:.0f} MB/s ({args.repeats} round trips)",
            f"plain TCP socket, same bytes, same run: median {moved / median_tcp:.0f} MB/s, best {moved / best_tcp:.0f} MB/s",
            f"RPC / TCP (median): {median_tcp / median_rpc:.2f}",
        ],
    )


if __name__ == "__main__":
    main()
