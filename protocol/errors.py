"""Exceptions raised by the protocol layer; each failure has its own type so callers can count and react."""
from __future__ import annotations


class ProtocolError(Exception):
    """Base of every error raised while encoding, decoding or checking what crosses the wire."""


class MalformedMessage(ProtocolError):
    """The bytes or fields do not have the expected structure, types or ranges."""


class TensorShapeMismatch(MalformedMessage):
    """A tensor's data length does not match its dtype and shape."""


class MessageTooLarge(ProtocolError):
    """A message, field or tensor exceeds a configured size limit."""


class BadSignature(ProtocolError):
    """A signature does not verify, or the public key is malformed."""


class BadKeyFile(ProtocolError):
    """A key file is not an unencrypted PKCS8 PEM Ed25519 private key."""


class WrongRun(ProtocolError):
    """A message belongs to another run."""


class WrongKind(ProtocolError):
    """A message has a kind the receiver did not expect."""


class Expired(ProtocolError):
    """A message is too old, too far in the future, or claims a lifetime beyond the allowed one."""


class Replayed(ProtocolError):
    """A message was already seen (same sender and nonce), or is older than the replay guard can judge."""


class Unauthorized(ProtocolError):
    """The sender may not do this: private run without a valid join token, or writing another signer's record."""


class WrongKey(ProtocolError):
    """A DHT record is stored under a key other than the one its signed envelope names."""


class WrongSubkey(ProtocolError):
    """A DHT record's subkey is not its signer's public key (only the signer may write its subkey)."""


class InvalidSpec(ProtocolError):
    """A run spec is unreadable, has unknown keys, wrong types or out-of-range values."""
