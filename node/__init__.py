"""The running swarmtrain process: identity, DHT + P2P wiring, membership, RPC, CLI."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("swarmtrain")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
