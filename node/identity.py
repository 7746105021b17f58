"""The node's Ed25519 identity: created on first start in the data dir (mode 0600), loaded after."""
from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol.errors import ProtocolError
from protocol.keys import generate_private_key, private_key_from_pem, private_key_to_pem

logger = logging.getLogger(__name__)

KEY_FILENAME = "node.key"


class IdentityError(RuntimeError):
    """The key file cannot be read, written or trusted."""


def write_private_key(path: Path, key: Ed25519PrivateKey, *, overwrite: bool = False) -> None:
    """Write atomically with mode 0600 so a crash never leaves a half-written or readable key."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise IdentityError(f"{path} already exists; refusing to overwrite a key (remove it first)")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(private_key_to_pem(key))
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
    except FileExistsError:
        _remove(tmp)
        raise IdentityError(f"{path} already exists; refusing to overwrite a key (remove it first)") from None
    except OSError as error:
        _remove(tmp)
        raise IdentityError(f"cannot write key file {path}: {error.strerror}") from None


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:  # e.g. a parent that is not a directory: nothing was created
        pass


def _link_new(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path`` unless ``path`` exists: two nodes started on one data dir keep one key."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # a filesystem without hard links: fall back to the checked rename
        os.replace(tmp, path)
    else:
        tmp.unlink()


def read_private_key(path: Path) -> Ed25519PrivateKey:
    path = Path(path)
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except FileNotFoundError:
        raise IdentityError(f"key file {path} does not exist (create one with: swarmtrain keygen --out {path})") from None
    except OSError as error:
        raise IdentityError(f"cannot read key file {path}: {error.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("key file %s is readable by others; run: chmod 600 %s", path, path)
    try:
        return private_key_from_pem(data)
    except ProtocolError as error:
        raise IdentityError(f"{path} is not an Ed25519 private key: {error}") from None


def load_or_create_identity(data_dir: Path) -> Ed25519PrivateKey:
    data_dir = Path(data_dir)
    path = data_dir / KEY_FILENAME
    if path.exists():
        return read_private_key(path)
    key = generate_private_key()
    write_private_key(path, key)
    logger.info("created a new node identity in %s", path)
    return key
