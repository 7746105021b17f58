"""Real network partitions for a local swarm: one network namespace per node, each joined by a veth
pair to a bridge in the root namespace (where the bootstrap peer listens on the bridge's address).

A partition moves the host ends of some nodes' veths to a bridge of their own: the nodes of a
group still reach each other, nothing crosses between groups, the DHT included. Healing moves them
back. Needs root and ``ip netns`` (iproute2); ``available()`` says whether this runner has them.
"""
from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from dataclasses import dataclass, field


class NetnsError(RuntimeError):
    """An ``ip`` command failed; the message has its stderr."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done


def available() -> bool:
    """Root, iproute2, and a namespace can really be made here (containers may forbid it)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    probe = f"stprobe{os.getpid() % 100000}"
    if _ip("netns", "add", probe, check=False).returncode != 0:
        return False
    _ip("netns", "del", probe, check=False)
    return True


def free_subnet() -> str:
    """A 10.231.X.0/24 that no address of this machine is in."""
    shown = _ip("-4", "-o", "addr", "show").stdout
    used = [ipaddress.ip_interface(word) for word in shown.split() if word.count(".") == 3 and "/" in word]
    for x in range(256):
        net = ipaddress.ip_network(f"10.231.{x}.0/24")
        if not any(address.network.overlaps(net) for address in used):
            return str(net)
    raise NetnsError("every 10.231.X.0/24 is in use here")


@dataclass
class Netns:
    """Namespaces, veths and bridges named after ``tag`` (unique per harness), removed by ``close``."""

    tag: str = field(default_factory=lambda: f"st{os.getpid() % 10000}")
    subnet: str = ""  # "" = the first 10.231.X.0/24 no interface here is on (a harness that was killed
    # may have left its bridge behind; two on one subnet break each other's routes)
    members: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # node -> (namespace, veth, address)
    bridges: list[str] = field(default_factory=list)
    partitioned: bool = False

    def __post_init__(self) -> None:
        self.subnet = self.subnet or free_subnet()
        net = ipaddress.ip_network(self.subnet)
        self._hosts = iter(net.hosts())
        self.prefix = net.prefixlen
        self.host_address = str(next(self._hosts))  # the root namespace's side: the main bridge
        self._bridge(0)
        _ip("addr", "add", f"{self.host_address}/{self.prefix}", "dev", self.bridges[0])

    def _bridge(self, index: int) -> str:
        while len(self.bridges) <= index:
            name = f"{self.tag}b{len(self.bridges)}"
            _ip("link", "add", name, "type", "bridge")
            _ip("link", "set", name, "up")
            self.bridges.append(name)
        return self.bridges[index]

    def add(self, node: str) -> str:
        """A namespace for ``node`` on the main bridge; returns the address it listens on."""
        if node in self.members:
            return self.members[node][2]
        i = len(self.members)
        ns, veth, address = f"{self.tag}n{i}", f"{self.tag}v{i}", str(next(self._hosts))
        _ip("netns", "add", ns)
        self.members[node] = (ns, veth, address)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("link", "set", veth, "master", self.bridges[0], "up")
        _ip("-n", ns, "addr", "add", f"{address}/{self.prefix}", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        return address

    def wrap(self, node: str, command: list[str]) -> list[str]:
        """``command`` run inside ``node``'s namespace (``ip netns exec`` execs it: same pid)."""
        return ["ip", "netns", "exec", self.members[node][0], *command]

    def partition(self, groups: list[list[str]]) -> None:
        """Cut the listed groups off: group k > 0 of ``groups`` moves to bridge k; the nodes listed
        in no group (and the root namespace) stay on the main bridge with group 0."""
        self.heal()
        for k, group in enumerate(groups[1:], start=1):
            bridge = self._bridge(k)
            for node in group:
                _ip("link", "set", self.members[node][1], "master", bridge)
        self.partitioned = True

    def isolate(self, nodes: list[str]) -> None:
        """Cut ``nodes`` off from everyone else (they still reach each other)."""
        self.partition([[], list(nodes)])

    def heal(self) -> None:
        if not self.partitioned:
            return
        for _, veth, _ in self.members.values():
            _ip("link", "set", veth, "master", self.bridges[0])
        self.partitioned = False

    def close(self) -> None:
        """Remove everything (deleting a namespace deletes its veth pair); never raises."""
        for ns, veth, _ in self.members.values():
            _ip("link", "del", veth, check=False)
            _ip("netns", "del", ns, check=False)
        for bridge in self.bridges:
            _ip("link", "del", bridge, check=False)
        self.members.clear()
        self.bridges.clear()
