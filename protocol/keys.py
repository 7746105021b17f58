"""Ed25519 identities: generate, serialize, sign and verify with a domain-separation prefix."""
from __future__ import annotations

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.errors import BadKeyFile, BadSignature

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64


def generate_private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_key_bytes(private_key: Ed25519PrivateKey) -> bytes:
    """The raw 32-byte public key: a node's application-level id."""
    return private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_key_to_pem(private_key: Ed25519PrivateKey) -> bytes:
    return private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def private_key_from_pem(data: bytes) -> Ed25519PrivateKey:
    """Load an unencrypted PKCS8 PEM key; anything else raises BadKeyFile."""
    if not isinstance(data, (bytes, bytearray)):
        raise BadKeyFile(f"key data must be bytes, got {type(data).__name__}")
    try:
        key = serialization.load_pem_private_key(bytes(data), password=None)
    except TypeError:
        raise BadKeyFile("the private key is encrypted; swarmtrain expects an unencrypted PKCS8 PEM key") from None
    except (ValueError, UnsupportedAlgorithm) as error:
        raise BadKeyFile(f"not a PEM private key ({error})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BadKeyFile(f"expected an Ed25519 private key, got {type(key).__name__}")
    return key


def sign(private_key: Ed25519PrivateKey, domain: bytes, payload: bytes) -> bytes:
    """Sign ``domain + payload``; the domain keeps a signature for one purpose from being valid for another."""
    return private_key.sign(bytes(domain) + bytes(payload))


def verify(public: bytes, domain: bytes, payload: bytes, signature: bytes) -> None:
    """Raise BadSignature unless ``signature`` is ``public``'s signature of ``domain + payload``."""
    if not isinstance(public, (bytes, bytearray)) or len(public) != PUBLIC_KEY_BYTES:
        raise BadSignature(f"public key must be {PUBLIC_KEY_BYTES} raw bytes")
    if not isinstance(signature, (bytes, bytearray)) or len(signature) != SIGNATURE_BYTES:
        raise BadSignature(f"signature must be {SIGNATURE_BYTES} bytes")
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes(public))
    except ValueError:
        raise BadSignature("malformed Ed25519 public key") from None
    try:
        key.verify(bytes(signature), bytes(domain) + bytes(payload))
    except InvalidSignature:
        raise BadSignature("signature does not match the signed data and public key") from None


def node_id_hex(public: bytes) -> str:
    return bytes(public).hex()
