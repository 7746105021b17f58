"""Join tokens and the access policy of private runs."""
from __future__ import annotations

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol import access
from protocol.access import AccessPolicy, JoinToken, issue_token, token_from_text, token_to_text, verify_token
from protocol.errors import MalformedMessage, Unauthorized
from protocol.keys import public_key_bytes

OWNER = Ed25519PrivateKey.from_private_bytes(b"\x07" * 32)
OWNER_PUB = public_key_bytes(OWNER)
NODE = public_key_bytes(Ed25519PrivateKey.from_private_bytes(b"\x08" * 32))
OTHER_NODE = public_key_bytes(Ed25519PrivateKey.from_private_bytes(b"\x09" * 32))
RUN = bytes(range(16))
NOW = 1_700_000_000.0


def token(**kwargs) -> bytes:
    args = {"run_id": RUN, "node_public": NODE, "expires_at": NOW + 3600}
    args.update(kwargs)
    return issue_token(kwargs.pop("owner", OWNER), args["run_id"], args["node_public"], args["expires_at"])


def check(tok: bytes, **kwargs) -> JoinToken:
    args = {"owner_public": OWNER_PUB, "run_id": RUN, "node_public": NODE, "now": NOW}
    args.update(kwargs)
    return verify_token(tok, **args)


def test_valid_token_and_text_round_trip():
    tok = token()
    text = token_to_text(tok)
    assert "=" not in text and "+" not in text and "/" not in text
    assert token_from_text(f"  {text}\n") == tok
    assert check(token_from_text(text)) == JoinToken(RUN, NODE, NOW + 3600)


@pytest.mark.parametrize(
    "kwargs,reason",
    [
        ({"owner_public": public_key_bytes(Ed25519PrivateKey.from_private_bytes(b"\x0a" * 32))}, "not signed"),
        ({"run_id": bytes(16)}, "for run"),
        ({"node_public": OTHER_NODE}, "issued to node"),
        ({"now": NOW + 3600}, "expired"),
    ],
)
def test_rejections(kwargs, reason):
    with pytest.raises(Unauthorized, match=reason):
        check(token(), **kwargs)


def test_token_signed_by_someone_else_is_refused():
    forged = issue_token(Ed25519PrivateKey.from_private_bytes(b"\x0b" * 32), RUN, NODE, NOW + 3600)
    with pytest.raises(Unauthorized, match="not signed"):
        check(forged)


def test_token_signature_does_not_verify_as_other_domain():
    payload, signature = msgpack.unpackb(token())
    assert access.TOKEN_DOMAIN.startswith(b"swarmtrain/join-token")
    fields = msgpack.unpackb(payload)
    fields[3] = NOW + 10**6  # extend the expiry without re-signing
    with pytest.raises(Unauthorized):
        check(msgpack.packb([msgpack.packb(fields, use_bin_type=True), signature], use_bin_type=True))


@pytest.mark.parametrize("data", [b"", b"\x00", msgpack.packb([1, 2]), b"\x92" + b"\xc4\x01x" * 2, bytes(300)])
def test_malformed_tokens(data):
    with pytest.raises(MalformedMessage):
        check(data)


@pytest.mark.parametrize("text", ["not base64!", "é", "A" * 600, "abcde"])
def test_malformed_text(text):
    with pytest.raises(MalformedMessage):
        token_from_text(text)


def test_public_run_needs_no_token():
    AccessPolicy(False, OWNER_PUB, RUN).check(OTHER_NODE, None, NOW)


def test_private_run_policy():
    policy = AccessPolicy(True, OWNER_PUB, RUN)
    policy.check(OWNER_PUB, None, NOW)  # the owner needs no token
    with pytest.raises(Unauthorized, match="private"):
        policy.check(NODE, None, NOW)
    policy.check(NODE, token(), NOW)
    with pytest.raises(Unauthorized, match="issued to node"):
        policy.check(OTHER_NODE, token(), NOW)  # a stolen token does not work for another key
    with pytest.raises(Unauthorized, match="expired"):
        policy.check(NODE, token(), NOW + 4000)  # the cache honours expiry


def test_policy_cache_is_bounded_and_skips_reverification(monkeypatch):
    policy = AccessPolicy(True, OWNER_PUB, RUN, max_cached=3)
    tokens = [token(expires_at=NOW + 100 + i) for i in range(5)]
    for tok in tokens:
        policy.check(NODE, tok, NOW)
    assert len(policy._cache) == 3
    calls = []
    monkeypatch.setattr(access, "verify_token", lambda *a, **k: calls.append(1) or JoinToken(RUN, NODE, NOW + 200))
    policy.check(NODE, tokens[-1], NOW)
    assert calls == []  # cached
    policy.check(NODE, tokens[0], NOW)
    assert calls == [1]  # evicted, verified again
