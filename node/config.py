"""Node configuration: one typed object, filled from flags > env SWARMTRAIN_* > TOML > defaults."""
from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

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
    leave_grace_s: float = 5.0  # time to publish LEAVING and shut down on SIGTERM

    def transfer_s(self, nbytes: int) -> float:
        return self.rpc_s + nbytes / self.min_transfer_bytes_s


@dataclass(frozen=True)
class NodeConfig:
    run: str = ""  # path of the signed run spec (TOML)
    data_dir: str = "./swarmtrain-data"
    initial_peers: tuple[str, ...] = ()
    host_maddrs: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/0",)
    announce_maddrs: tuple[str, ...] = ()
    port: int | None = None  # shorthand for host_maddrs /ip4/0.0.0.0/tcp/PORT
    public_name: str = ""
    role: str = "auto"
    stage: int | None = None
    device: str = "auto"
    client_mode: bool = False
    token: str = ""  # join token text for a private run
    log_format: str = "plain"
    log_level: str = "INFO"
    timeouts: Timeouts = field(default_factory=Timeouts)

    def resolved_host_maddrs(self) -> tuple[str, ...]:
        if self.port is not None:
            return (f"/ip4/0.0.0.0/tcp/{self.port}",)
        return self.host_maddrs


def _coerce(name: str, raw: Any, like: Any) -> Any:
    """Turn a TOML/env/flag value into the type of the default ``like``."""
    try:
        if isinstance(like, bool):
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if isinstance(like, tuple):
            if isinstance(raw, str):
                return tuple(part for part in (p.strip() for p in raw.split(",")) if part)
            if isinstance(raw, (list, tuple)) and all(isinstance(p, str) for p in raw):
                return tuple(raw)
            raise ValueError(raw)
        if isinstance(like, float):
            return float(raw)
        if isinstance(like, int) or (like is None and name in ("port", "stage")):
            if isinstance(raw, bool):
                raise ValueError(raw)
            return int(raw)
        if isinstance(like, str):
            if not isinstance(raw, (str, int, float)):
                raise ValueError(raw)
            return str(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"config value {name}={raw!r} is not a valid {type(like).__name__}") from None
    return raw


def _apply(base: Any, values: Mapping[str, Any], source: str) -> Any:
    known = {f.name: f for f in fields(base)}
    updates: dict[str, Any] = {}
    for key, raw in values.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ConfigError(f"unknown setting {key!r} in {source}")
        current = getattr(base, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(raw, Mapping):
                raise ConfigError(f"setting {key!r} in {source} must be a table")
            updates[name] = _apply(current, raw, f"{source} [{key}]")
        else:
            updates[name] = _coerce(name, raw, current)
    return dataclasses.replace(base, **updates)


def load_node_config(
    flags: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    config_path: str | None = None,
) -> NodeConfig:
    """Merge the sources; ``flags`` holds only the flags the user actually gave."""
    config = NodeConfig()
    if config_path:
        path = Path(config_path)
        if not path.is_file():
            raise ConfigError(f"config file {config_path} does not exist")
        try:
            table = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(f"config file {config_path} is not valid TOML: {error}") from None
        config = _apply(config, table.get("node", table), f"config file {config_path}")
    env = os.environ if env is None else env
    env_values: dict[str, Any] = {}
    for f in fields(NodeConfig):
        if f.name == "timeouts":
            for t in fields(Timeouts):
                key = f"{ENV_PREFIX}TIMEOUT_{t.name.upper()}"
                if key in env:
                    env_values.setdefault("timeouts", {})[t.name] = env[key]
            continue
        key = ENV_PREFIX + f.name.upper()
        if key in env:
            env_values[f.name] = env[key]
    config = _apply(config, env_values, "environment")
    config = _apply(config, {k: v for k, v in flags.items() if v is not None}, "command line")
    validate(config)
    return config


def validate(config: NodeConfig) -> None:
    if config.port is not None and not 0 <= config.port <= 65535:
        raise ConfigError(f"--port {config.port} is outside 0..65535")
    if config.log_format not in ("plain", "json"):
        raise ConfigError(f"--log-format must be plain or json, not {config.log_format!r}")
    if len(config.public_name) > 64:
        raise ConfigError("--public-name is longer than 64 characters")
    for name in ("heartbeat_interval_s", "heartbeat_ttl_s", "rpc_s", "dht_s", "startup_s"):
        if getattr(config.timeouts, name) <= 0:
            raise ConfigError(f"timeout {name} must be positive")
    if config.timeouts.heartbeat_ttl_s <= config.timeouts.heartbeat_interval_s:
        raise ConfigError("heartbeat_ttl_s must be larger than heartbeat_interval_s")
