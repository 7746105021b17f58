"""Ed25519 identities: PEM round trip, clear errors for bad key files, domain-separated signatures."""
from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from protocol.errors import BadKeyFile, BadSignature
from protocol.keys import (
    generate_private_key,
    node_id_hex,
    private_key_from_pem,
    private_key_to_pem,
    public_key_bytes,
    sign,
    verify,
)


def test_pem_round_trip_keeps_identity():
    key = generate_private_key()
    pem = private_key_to_pem(key)
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public_key_bytes(private_key_from_pem(pem)) == public_key_bytes(key)
    assert len(public_key_bytes(key)) == 32 and node_id_hex(public_key_bytes(key)) == public_key_bytes(key).hex()


def test_bad_key_files():
    with pytest.raises(BadKeyFile, match="not a PEM"):
        private_key_from_pem(b"garbage")
    encrypted = generate_private_key().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")
    )
    with pytest.raises(BadKeyFile, match="encrypted"):
        private_key_from_pem(encrypted)
    other = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(BadKeyFile, match="Ed25519"):
        private_key_from_pem(other)


def test_signatures_are_domain_separated():
    key = generate_private_key()
    public = public_key_bytes(key)
    signature = sign(key, b"a/", b"payload")
    verify(public, b"a/", b"payload", signature)
    with pytest.raises(BadSignature):
        verify(public, b"b/", b"payload", signature)
    with pytest.raises(BadSignature):
        verify(public, b"a/", b"payloaD", signature)
    with pytest.raises(BadSignature):
        verify(public_key_bytes(generate_private_key()), b"a/", b"payload", signature)


@pytest.mark.parametrize("public", [b"", b"\x00" * 31, b"\xff" * 32, "not bytes"])
def test_malformed_public_key_is_bad_signature(public):
    with pytest.raises(BadSignature):
        verify(public, b"d", b"p", b"\x00" * 64)
