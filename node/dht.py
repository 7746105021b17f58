"""hivemind DHT wiring: start the DHT process with our record validator, store and read signed records.

hivemind runs the DHT (and its p2pd) in a forked child. If our process dies by SIGKILL, nothing
tells that child, so we install a reaper inside it: PR_SET_PDEATHSIG delivers SIGTERM when we die,
and its SIGTERM handler kills p2pd before exiting. No orphaned daemons, whatever kills the node.
"""
from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import functools
import logging
import math
import os
import signal
from dataclasses import dataclass
from typing import Iterable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind.dht import DHT
from hivemind.p2p import P2P, PeerID
from hivemind.utils import get_dht_time
from hivemind.utils.multiaddr import Multiaddr

from node.clock import ClockWatch
from node.config import Timeouts
from protocol.access import AccessPolicy
from protocol.envelope import Envelope, Limits, Sequencer
from protocol.errors import Expired, ProtocolError
from protocol.keys import public_key_bytes
from protocol.records import MAX_RECORD_TTL_S, RECORD_NAMES, RUNS_DIRECTORY_KEY, SwarmRecordValidator, dht_key, open_record, seal_record

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
P2P_KEY_FILENAME = "p2p.key"  # a persistent libp2p identity (the peer id in our multiaddrs)
RUNS_DIRECTORY = RUNS_DIRECTORY_KEY  # one global key listing the runs in this swarm


class SwarmStartError(RuntimeError):
    """The DHT could not start or reach its initial peers."""


class DHTReadError(RuntimeError):
    """A DHT read did not complete in time."""


@dataclass(frozen=True)
class Record:
    sender: bytes
    envelope: Envelope
    msg: dict
    expiration_time: float


def die_with_parent(signum: int) -> None:
    """Linux: have the kernel send ``signum`` to this process when the thread that forked it dies."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)


async def _install_reaper(parent_pid: int, _dht: DHT, node) -> int:
    """Runs inside the DHT child: die with the parent and take p2pd along."""
    p2pd = getattr(node.p2p, "_child", None)

    def terminate(_signum=None, _frame=None) -> None:
        if p2pd is not None and p2pd.returncode is None:
            try:
                os.kill(p2pd.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        os._exit(0)

    signal.signal(signal.SIGTERM, terminate)
    # Ctrl-C reaches the whole process group; the parent decides how to shut down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(signal.SIGTERM)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        terminate()
    return p2pd.pid if p2pd is not None else -1


async def _ping_missing(peers: list[tuple[str, list[str]]], _dht: DHT, node) -> tuple[int, int]:
    """Runs inside the DHT child: ping each of ``peers`` (peer id, multiaddrs without /p2p/) that is
    not in the routing table; one that answers goes back in it (and adds us to its own). Returns
    (peers in the table before, peers that came back)."""
    table = node.protocol.routing_table
    before = len(table.uid_to_peer_id)

    async def ping(peer_text: str, maddrs: list[str]) -> bool:
        peer = PeerID.from_base58(peer_text)
        if peer == node.peer_id or table.get(peer_id=peer) is not None:
            return False
        try:  # p2pd may have dropped its connection and the addresses with it
            await node.p2p._client.connect(peer, [Multiaddr(m) for m in maddrs])
        except Exception:  # noqa: BLE001 - unreachable for now: the ping below fails too
            pass
        return await node.protocol.call_ping(peer) is not None

    answered = await asyncio.gather(*(ping(peer, maddrs) for peer, maddrs in peers), return_exceptions=True)
    return before, sum(1 for ok in answered if ok is True)


def peers_of_maddrs(maddrs: Iterable[str]) -> list[tuple[str, list[str]]]:
    """(peer id, addresses) from full multiaddrs (".../p2p/<peer id>"), as ``SwarmDHT.rejoin`` takes them."""
    out: dict[str, list[str]] = {}
    for text in maddrs:
        try:
            address = Multiaddr(text)
            peer = address["p2p"]
            out.setdefault(peer, []).append(str(address.decapsulate(Multiaddr(f"/p2p/{peer}"))))
        except Exception:  # noqa: BLE001 - not a multiaddr with a peer id: nothing to ping
            continue
    return list(out.items())


class SwarmDHT:
    """A started hivemind DHT plus the record conventions of one run."""

    def __init__(
        self,
        private_key: Ed25519PrivateKey,
        run_id: bytes,
        access: AccessPolicy | None,
        timeouts: Timeouts,
        *,
        initial_peers: Iterable[str] = (),
        host_maddrs: Iterable[str] = ("/ip4/0.0.0.0/tcp/0",),
        announce_maddrs: Iterable[str] = (),
        client_mode: bool = False,
        token: bytes | None = None,
        record_limits: Limits = Limits(max_bytes=64 << 10, max_age_s=MAX_RECORD_TTL_S),
        app_record_names: Iterable[str] = (),
        identity_path: str | None = None,
    ):
        """``identity_path``: keep the libp2p key in this file (created on first start), so that
        the peer id, and with it our multiaddrs, survive restarts."""
        self._key = private_key
        self.public_key = public_key_bytes(private_key)
        self.access = access
        self.run_id = run_id
        self.timeouts = timeouts
        self.token = token
        self.record_limits = record_limits
        self._seq = Sequencer()
        # every record read tells the time its signer's clock showed: a clock of ours that is off shows
        self.clock = ClockWatch(timeouts.heartbeat_ttl_s, Limits().max_future_s, Limits().max_age_s)
        # A run's node fully validates the run's record families (its own, the trainer's declared
        # ``app_record_names`` and the runs directory) on every store. Other keys only get their
        # lifetime bounded: the same DHT carries hivemind's averager matchmaking records.
        self.app_record_names = tuple(app_record_names)
        validator = SwarmRecordValidator(
            run_id or None, access, record_limits, managed_names=(*RECORD_NAMES, *self.app_record_names)
        )
        try:
            self.dht = DHT(
                initial_peers=list(initial_peers) or None,
                start=True,
                host_maddrs=list(host_maddrs),
                announce_maddrs=list(announce_maddrs) or None,
                client_mode=client_mode,
                record_validators=[validator],
                startup_timeout=timeouts.startup_s,
                wait_timeout=timeouts.dht_request_s,
                **({"identity_path": identity_path} if identity_path else {}),
            )
        except Exception as error:  # hivemind raises bare P2PDaemonError/RuntimeError/ValueError here
            raise SwarmStartError(_explain_start_error(error)) from None
        self.p2pd_pid = self.dht.run_coroutine(functools.partial(_install_reaper, os.getpid()))
        self._p2p: P2P | None = None

    @property
    def peer_id(self):
        return self.dht.peer_id

    def visible_maddrs(self) -> list[str]:
        return [str(addr) for addr in self.dht.get_visible_maddrs()]

    async def p2p(self) -> P2P:
        if self._p2p is None:
            self._p2p = await self.dht.replicate_p2p()
        return self._p2p

    async def store(
        self, name: str, kind: str, body: dict, ttl_s: float, *, run_id: bytes | None = None, timeout: float | None = None
    ) -> bool:
        """Sign ``body`` and store it under our own subkey of ``name``; True if any peer took it."""
        run_id = self.run_id if run_id is None else run_id
        key = RUNS_DIRECTORY if name == RUNS_DIRECTORY else dht_key(run_id, name)
        now = get_dht_time()
        value = seal_record(self._key, run_id=run_id, key=key, kind=kind, body=body, seq=self._seq.next(),
                            token=self.token, timestamp=now, expires_at=now + ttl_s)
        future = self.dht.store(key, value, now + ttl_s, subkey=self.public_key, return_future=True)
        timeout = self.timeouts.dht_s if timeout is None else timeout
        try:
            return bool(await asyncio.wait_for(future, timeout))
        except TimeoutError:
            logger.warning("storing %s timed out after %.0f s", name, timeout)
            return False

    async def read(
        self, name: str, *, run_id: bytes | None = None, access: AccessPolicy | None = None
    ) -> dict[bytes, Record]:
        """All valid records under ``name``, by signer. Invalid ones are dropped with a log line.

        ``access`` (default: this node's own policy for its own run) judges private-run tokens, so a
        record that an observer peer stored without checking them is not believed here either."""
        directory = name == RUNS_DIRECTORY
        run_id = self.run_id if run_id is None else run_id
        if access is None and run_id == self.run_id:
            access = self.access
        key = RUNS_DIRECTORY if directory else dht_key(run_id, name)
        future = self.dht.get(key, latest=True, return_future=True)
        try:
            found = await asyncio.wait_for(future, self.timeouts.dht_s)
        except TimeoutError:
            # not the same as "no records": callers keep what they knew instead of seeing an empty swarm
            raise DHTReadError(f"reading {name} timed out after {self.timeouts.dht_s:.0f} s") from None
        if found is None or not isinstance(found.value, dict):
            return {}
        records: dict[bytes, Record] = {}
        now = get_dht_time()
        for subkey, item in found.value.items():
            try:
                envelope, record_key, msg = open_record(
                    item.value, run_id=None if directory else run_id, limits=self.record_limits, now=now
                )
            except ProtocolError as error:
                if isinstance(error, Expired):
                    self._observe_clock_of(item.value, None if directory else run_id, now)
                logger.debug("dropped a record under %s: %s: %s", name, type(error).__name__, error)
                continue
            if envelope.sender != self.public_key:
                self.clock.observe(envelope.sender, envelope.timestamp, now)
            if record_key != key or subkey != envelope.sender:
                continue
            if access is not None and not directory:
                try:
                    access.check(envelope.sender, envelope.body.get("token"), get_dht_time())
                except ProtocolError as error:
                    logger.debug("dropped a record under %s: %s", name, error)
                    continue
            records[envelope.sender] = Record(envelope.sender, envelope, msg, item.expiration_time)
        warning = self.clock.warning(now)
        if warning is not None:
            logger.warning(warning)
        return records

    def _observe_clock_of(self, value: bytes, run_id: bytes | None, now: float) -> None:
        """A record refused for its time still tells, once its signature checks, the signer's clock."""
        relaxed = dataclasses.replace(self.record_limits, max_age_s=math.inf, max_future_s=math.inf)
        try:
            envelope, _, _ = open_record(value, run_id=run_id, limits=relaxed, now=now)
        except ProtocolError:
            return
        if envelope.sender != self.public_key:
            self.clock.observe(envelope.sender, envelope.timestamp, now)

    async def rejoin(self, peers: list[tuple[str, list[str]]]) -> tuple[int, int]:
        """Ping those of ``peers`` (peer id, multiaddrs) missing from the DHT's routing table, so that
        the ones alive go back in it; returns (peers in the table before, peers back).

        hivemind drops a peer from its routing table on every request the peer does not answer,
        and bootstraps only at start. A node frozen longer than a request's timeout (SIGSTOP in
        the chaos runs, a laptop that slept) finds every request of the freeze timed out when it
        wakes: its table is empty, and its peers, whose requests to it timed out too, dropped it
        from theirs. Without this it stayed cut off for good, reading and storing only its own
        records, seeing a swarm of itself."""
        future = self.dht.run_coroutine(functools.partial(_ping_missing, peers), return_future=True)
        try:
            return await asyncio.wait_for(future, self.timeouts.dht_s)
        except TimeoutError:
            return -1, 0

    async def close_p2p(self) -> None:
        """Close this process's connection to p2pd (call it on the loop that used ``p2p()``)."""
        if self._p2p is not None:
            await self._p2p.shutdown()
            self._p2p = None

    def shutdown(self) -> None:
        if self.dht.is_alive():
            self.dht.shutdown()



def _explain_start_error(error: Exception) -> str:
    text = str(error)
    lowered = text.lower()
    if "local time must be within" in lowered:  # hivemind's ping compares the peers' clocks at bootstrap
        return (f"this node's clock differs from its peers' by more than hivemind allows ({text.splitlines()[0]}); "
                "set the clock right (NTP) and start again")
    if "address already in use" in lowered:
        return f"the port is already in use ({text.splitlines()[0] if text else 'bind failed'}); pick another with --port"
    if "bootstrap" in lowered or "failed to connect" in lowered or "dial" in lowered:
        return f"cannot reach any initial peer ({text.splitlines()[0]}); check --initial-peers and that they are running"
    return f"the swarm could not start: {type(error).__name__}: {text.splitlines()[0] if text else ''}"
