"""Node configuration: one typed object, filled from flags > env SWARMTRAIN_* > TOML > defaults."""
from __future__ import annotations

import dataclasses
import math
import os
import re
import time
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

ENV_PREFIX = "SWARMTRAIN_"


class ConfigError(ValueError):
    """A configuration value is missing or malformed; the message names it."""


@dataclass(frozen=True)
class Timeouts:
    """Every network wait of a node takes its limit from here, never from a literal at the call site."""

    rpc_s: float = 30.0  # one RPC round trip, excluding bulk bytes
    min_transfer_bytes_s: float = 5e6  # bulk tensor bytes get extra time at this rate
    dht_s: float = 20.0  # one DHT store or get, all hops included
    dht_request_s: float = 5.0  # one kademlia request to one peer
    startup_s: float = 60.0  # DHT + p2pd start and bootstrap
    heartbeat_interval_s: float = 2.0
    heartbeat_ttl_s: float = 8.0  # a node whose heartbeat is older than this is DEAD
    announce_ttl_s: float = 60.0  # announcements are refreshed at a third of this
    rpc_failures_for_dead: int = 3  # consecutive failed RPCs that declare a peer dead
    averaging_matchmaking_s: float = 3.0  # how long peers gather into an averaging group
    averaging_s: float = 60.0  # one all-reduce once the group formed
    leave_grace_s: float = 5.0  # time to publish LEAVING and shut down on SIGTERM
    mqtt_s: float = 10.0  # one MQTT connect, publish or subscribe round trip

    def transfer_s(self, nbytes: int) -> float:
        return self.rpc_s + nbytes / self.min_transfer_bytes_s


@dataclass(frozen=True)
class RateLimits:
    """How often each peer may call each RPC method of this node: one token bucket per (peer, method),
    refilled at ``calls_per_s`` up to ``burst`` calls. ``methods`` overrides both for single methods,
    as "METHOD=CALLS_PER_S:BURST" items (a comma-separated list in SWARMTRAIN_RATE_LIMITS_METHODS)."""

    calls_per_s: float = 50.0
    burst: float = 200.0
    # Handlers that copy a whole model's state per call get a tighter default.
    methods: tuple[str, ...] = ("zo.snapshot=0.5:4", "pp.state=8:64")
    max_tracked: int = 4096  # (peer, method) buckets kept; the least recently used goes past this

    def for_method(self, method: str) -> tuple[float, float]:
        """(calls per second, burst) of ``method``."""
        for item in self.methods:
            name, per_s, burst = parse_method_limit(item)
            if name == method:
                return per_s, burst
        return self.calls_per_s, self.burst


def parse_method_limit(item: str) -> tuple[str, float, float]:
    """"METHOD=CALLS_PER_S:BURST" as (method, calls per second, burst); ValueError when malformed."""
    name, eq, rate = item.partition("=")
    per_s, colon, burst = rate.partition(":")
    values = (float(per_s), float(burst)) if eq and colon else (0.0, 0.0)
    if not name.strip() or not all(map(math.isfinite, values)) or not values[0] > 0 or values[1] < 1:
        raise ValueError(item)
    return name.strip(), values[0], values[1]


def _check_rate_limits(limits: RateLimits) -> None:
    if not limits.calls_per_s > 0 or not limits.burst >= 1 or limits.max_tracked < 1:
        raise ConfigError("rate_limits: calls_per_s must be positive, burst at least 1 and max_tracked at least 1")
    for item in limits.methods:
        try:
            parse_method_limit(item)
        except ValueError:
            raise ConfigError(f"rate_limits.methods item {item!r} must read METHOD=CALLS_PER_S:BURST "
                              "(a positive rate, a burst of at least 1), e.g. pp.state=8:64") from None


@dataclass(frozen=True)
class NodeConfig:
    run: str = ""  # path of the signed run spec (TOML)
    data_dir: str = "./swarmtrain-data"
    initial_peers: tuple[str, ...] = ()
    initial_peers_file: str = ""  # more initial peers: a file of multiaddrs, one a line (e.g. DATA_DIR/maddrs.txt)
    host_maddrs: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/0",)
    announce_maddrs: tuple[str, ...] = ()
    port: int | None = None  # shorthand for host_maddrs /ip4/0.0.0.0/tcp/PORT
    public_name: str = ""
    role: str = "auto"
    stage: int | None = None
    device: str = "auto"
    client_mode: bool = False
    token: str = ""  # join token text for a private run
    base_weights: str = ""  # zo mode: file of the run's base weights (torch.save state dict); "" = from the seed
    zo_join: str = "auto"  # zo mode: catch up by replaying the commit log, by a snapshot, or whichever is cheaper
    emulate_links: str = ""  # link emulation file for one-machine runs (node/linkemu.py); "" = none
    max_memory: str = ""  # e.g. 4GiB: bound on the training state and activations (node/memory_budget.py); "" = none
    status_port: int | None = None  # serve the status page on this TCP port (node/status_server.py)
    status_host: str = "127.0.0.1"  # the address it listens on; 0.0.0.0 for every interface
    mqtt: str = ""  # MQTT broker URL (mqtt://host:port) for telemetry (node/mqtt.py); "" = none
    link_faults: str = ""  # injected link faults, re-read when it changes (node/linkemu.py); "" = none
    log_format: str = "plain"
    log_level: str = ""  # empty: the command's own default (INFO for node, WARNING for status)
    timeouts: Timeouts = field(default_factory=Timeouts)
    rate_limits: RateLimits = field(default_factory=RateLimits)

    def resolved_host_maddrs(self) -> tuple[str, ...]:
        if self.port is not None:
            return (f"/ip4/0.0.0.0/tcp/{self.port}",)
        return self.host_maddrs


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*")


def parse_size(text: str, what: str = "--max-memory") -> int:
    """A byte size: ``2GiB``, ``512m``, ``1.5G``, ``800MB``, ``1000000``: k/m/g/t and KiB.. are powers of 1024
    (as in ``docker run --memory``), KB/MB/GB/TB powers of 1000."""
    match = _SIZE.fullmatch(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ConfigError(f"{what} {text!r} is not a size such as 4GiB, 512m or 800MB")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ConfigError(f"{what} {text!r} must be positive")
    return size


def format_size(nbytes: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} B"


def _kind(annotation: str) -> str:
    """The value kind of a field from its annotation (a string: this module uses postponed annotations)."""
    for kind in ("bool", "tuple", "float", "int", "str"):
        if annotation.startswith(kind):
            return kind
    raise TypeError(f"no coercion for a field annotated {annotation!r}")


_KIND_NAMES = {"bool": "boolean (true/false)", "tuple": "list of strings", "float": "finite number",
               "int": "integer", "str": "string"}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _coerce(kind: str, raw: Any) -> Any:
    """Turn a TOML/env/flag value into ``kind``; strings come from the environment, typed values from TOML."""
    if isinstance(raw, str):
        text = raw.strip()
        if kind == "bool" and text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        if kind == "tuple":
            return tuple(part for part in (p.strip() for p in text.split(",")) if part)
        if kind == "int":
            return int(text)
        if kind == "float":
            value = float(text)
        elif kind == "str":
            return raw
        else:
            raise ValueError(raw)
    elif isinstance(raw, bool):
        if kind != "bool":
            raise ValueError(raw)
        return raw
    elif kind == "int" and isinstance(raw, int):
        return raw
    elif kind == "float" and isinstance(raw, (int, float)):
        value = float(raw)
    elif kind == "tuple" and isinstance(raw, (list, tuple)) and all(isinstance(p, str) for p in raw):
        return tuple(raw)
    else:
        raise ValueError(raw)
    if not math.isfinite(value):
        raise ValueError(raw)
    return value


def _apply(base: Any, values: Mapping[str, Any], source: str, label: Callable[[tuple[str, ...]], str],
           path: tuple[str, ...] = ()) -> Any:
    known = {f.name: f for f in fields(base)}
    updates: dict[str, Any] = {}
    for key, raw in values.items():
        name = key.replace("-", "_")
        where = label((*path, key))
        if name not in known:
            raise ConfigError(f"unknown setting {where!r} in {source} (known: {', '.join(known)})")
        current = getattr(base, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(raw, Mapping):
                raise ConfigError(f"setting {where!r} in {source} must be a table")
            updates[name] = _apply(current, raw, source, label, (*path, key))
            continue
        kind = _kind(known[name].type)
        try:
            updates[name] = _coerce(kind, raw)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{where}={raw!r} in {source} is not a valid {_KIND_NAMES[kind]}") from None
    return dataclasses.replace(base, **updates)


_TABLES = ("timeouts", "rate_limits")  # NodeConfig fields that are tables of their own


def _env_name(path: tuple[str, ...]) -> str:
    if len(path) == 2 and path[0] == "timeouts":
        return f"{ENV_PREFIX}TIMEOUT_{path[1].upper()}"
    return ENV_PREFIX + "_".join(path).upper()


def load_node_config(
    flags: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    config_path: str | None = None,
) -> NodeConfig:
    """Merge the sources; ``flags`` holds only the flags the user actually gave."""
    config = NodeConfig()
    table: Mapping[str, Any] = {}
    if config_path:
        path = Path(config_path)
        if not path.is_file():
            raise ConfigError(f"config file {config_path} does not exist")
        try:
            table = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(f"config file {config_path} is not valid TOML: {error}") from None
        except OSError as error:
            raise ConfigError(f"cannot read config file {config_path}: {error.strerror}") from None
        table = table.get("node", table)
        config = _apply(config, table, f"config file {config_path}", ".".join)
    env = os.environ if env is None else env
    env_values: dict[str, Any] = {}
    for f in fields(NodeConfig):
        if f.name in _TABLES:
            for t in fields(getattr(config, f.name)):
                key = _env_name((f.name, t.name))
                if key in env:
                    env_values.setdefault(f.name, {})[t.name] = env[key]
            continue
        key = _env_name((f.name,))
        if key in env:
            env_values[f.name] = env[key]
    config = _apply(config, env_values, "the environment", _env_name)
    flag_values = {k: v for k, v in flags.items() if v is not None}
    config = _apply(config, flag_values, "the command line", lambda path: "--" + path[-1].replace("_", "-"))
    # --port is shorthand for --host-maddrs; whichever came from the stronger source wins (the
    # image sets SWARMTRAIN_PORT, and a --host-maddrs flag must still beat it).
    def rank(name: str) -> int:
        return 3 if name in flag_values else 2 if name in env_values else 1 if name in table else 0

    if config.port is not None and rank("host_maddrs") > rank("port"):
        config = dataclasses.replace(config, port=None)
    validate(config)
    return config


MAX_PEERS_FILE_BYTES = 64 << 10


def resolve_initial_peers(config: NodeConfig, poll_s: float = 0.2) -> NodeConfig:
    """Add the multiaddrs of ``initial_peers_file`` to ``initial_peers``. A file that does not exist
    yet is waited for, up to ``timeouts.startup_s``: compose starts a bootstrap and its nodes together,
    and the bootstrap writes its addresses once it listens."""
    if not config.initial_peers_file:
        return config
    path = Path(config.initial_peers_file)
    deadline = time.monotonic() + config.timeouts.startup_s
    while not path.is_file():
        if time.monotonic() > deadline:
            raise ConfigError(f"--initial-peers-file {path} did not appear within {config.timeouts.startup_s:.0f} s; "
                              "is the bootstrap writing it (its data dir's maddrs.txt)?")
        time.sleep(poll_s)  # a file that appears has no event to wait on without inotify
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_PEERS_FILE_BYTES + 1)
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read --initial-peers-file {path}: {getattr(error, 'strerror', None) or error}") from None
    if len(raw) > MAX_PEERS_FILE_BYTES:
        raise ConfigError(f"--initial-peers-file {path} is larger than {MAX_PEERS_FILE_BYTES} bytes")
    found = tuple(line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))
    bad = [line for line in found if not line.startswith("/") or "/p2p/" not in line]
    if bad:
        raise ConfigError(f"--initial-peers-file {path}: {bad[0]!r} is not a multiaddr with a /p2p/ peer id")
    if not found:
        raise ConfigError(f"--initial-peers-file {path} lists no multiaddrs")
    return dataclasses.replace(config, initial_peers=tuple(dict.fromkeys((*config.initial_peers, *found))))


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
ROLES = ("auto", "data", "stage", "spare")


def validate(config: NodeConfig) -> None:
    if config.port is not None and not 0 <= config.port <= 65535:
        raise ConfigError(f"--port {config.port} is outside 0..65535")
    if config.status_port is not None and not 0 <= config.status_port <= 65535:
        raise ConfigError(f"--status-port {config.status_port} is outside 0..65535")
    if not config.status_host.strip():
        raise ConfigError("--status-host is empty; give an address such as 127.0.0.1 or 0.0.0.0")
    if config.mqtt:
        from node.mqtt_messages import MqttUrlError, parse_mqtt_url

        try:
            parse_mqtt_url(config.mqtt)
        except MqttUrlError as error:
            raise ConfigError(str(error)) from None
    if config.stage is not None and config.stage < 0:
        raise ConfigError(f"--stage {config.stage} is negative; stages are numbered from 0")
    if config.role not in ROLES:
        raise ConfigError(f"--role must be one of {', '.join(ROLES)}, not {config.role!r}")
    if config.log_format not in ("plain", "json"):
        raise ConfigError(f"--log-format must be plain or json, not {config.log_format!r}")
    if config.log_level and config.log_level.upper() not in LOG_LEVELS:
        raise ConfigError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, not {config.log_level!r}")
    if len(config.public_name) > 64:
        raise ConfigError("--public-name is longer than 64 characters")
    if not config.public_name.isprintable():
        raise ConfigError("--public-name must be printable text (no control characters or line breaks)")
    if config.max_memory:
        parse_size(config.max_memory)
    for f in fields(Timeouts):
        if getattr(config.timeouts, f.name) <= 0:
            raise ConfigError(f"timeout {f.name} must be positive, not {getattr(config.timeouts, f.name)}")
    if config.timeouts.heartbeat_ttl_s <= config.timeouts.heartbeat_interval_s:
        raise ConfigError("heartbeat_ttl_s must be larger than heartbeat_interval_s")
    _check_rate_limits(config.rate_limits)
