"""Run specs: TOML round trip, stable run id, tamper detection, precise errors."""
from __future__ import annotations

import dataclasses

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol.errors import BadSignature, InvalidSpec
from protocol.keys import public_key_bytes
from protocol.runspec import (
    EMBEDDED_DOMAINS,
    HEARTBEAT_RETENTION,
    MAX_HEARTBEAT_TTL_S,
    RunSpec,
    canonical_bytes,
    dumps_spec,
    load_spec,
    loads_spec,
    make_spec,
    run_id,
    sign_spec,
    verify_spec,
)

OWNER = Ed25519PrivateKey.from_private_bytes(b"\x05" * 32)
OTHER = Ed25519PrivateKey.from_private_bytes(b"\x06" * 32)


def spec(**overrides) -> RunSpec:
    return make_spec("pipeline", "tiny", OWNER, created="2025-01-02T03:04:05+00:00", **overrides)


def test_make_spec_is_signed_and_applies_overrides():
    s = spec(name="demo", lr=1e-3, stages=6, blocks_per_stage=[1, 2, 2, 2, 2, 1], train={"steps": 50})
    verify_spec(s)
    assert s.owner.public_key == public_key_bytes(OWNER).hex()
    assert (s.run.name, s.train.lr, s.train.steps, s.pipeline.stages) == ("demo", 1e-3, 50, 6)


def test_modes_get_consistent_defaults():
    assert make_spec("zo", "tiny", OWNER).pipeline.stages == 1
    assert make_spec("experts", "tiny", OWNER, domains=["code", "prose"]).data.domains == ["code", "prose"]


def test_toml_round_trip_keeps_run_id_and_signature():
    s = spec(name="round-trip", blocks_per_stage=[0, 3, 3, 2], val_fraction=0.05, seed=2**62)
    text = dumps_spec(s)
    back = loads_spec(text)
    assert back == s
    assert run_id(back) == run_id(s) and len(run_id(s)) == 16
    verify_spec(back)
    assert dumps_spec(back) == text


def test_run_id_is_stable_and_depends_on_content_and_owner():
    assert run_id(spec()) == run_id(spec())
    assert canonical_bytes(spec()) == canonical_bytes(spec())
    assert run_id(spec(lr=1e-3)) != run_id(spec())
    assert run_id(sign_spec(spec(), OTHER)) != run_id(spec())


def test_signature_not_part_of_canonical_bytes():
    s = spec()
    unsigned = dataclasses.replace(s, owner=dataclasses.replace(s.owner, signature=""))
    assert canonical_bytes(unsigned) == canonical_bytes(s)


def test_tampered_spec_fails_verification():
    text = dumps_spec(spec()).replace("steps = 1000", "steps = 999")
    with pytest.raises(BadSignature, match="changed after signing"):
        verify_spec(loads_spec(text))


def test_owner_swap_fails_verification():
    s = spec()
    forged = dataclasses.replace(s, owner=dataclasses.replace(s.owner, public_key=public_key_bytes(OTHER).hex()))
    with pytest.raises(BadSignature):
        verify_spec(forged)


def test_unsigned_spec():
    with pytest.raises(InvalidSpec, match="not signed"):
        verify_spec(RunSpec())
    with pytest.raises(InvalidSpec, match="not signed"):
        run_id(RunSpec())
    s = spec()
    with pytest.raises(InvalidSpec, match="not signed"):
        verify_spec(dataclasses.replace(s, owner=dataclasses.replace(s.owner, signature="")))


@pytest.mark.parametrize(
    "text,where",
    [
        ("[run\nname = 1", "not valid TOML"),
        ("[run]\nname = 'x'\nname = 'y'", "not valid TOML"),
        ("[run]\ncolour = 'red'", "run.colour: unknown key"),
        ("[extras]\na = 1", "extras: unknown section"),
        ("top = 1", "top: unknown section"),
        ("run = 1", "run: expected a table"),
        ("[train]\nlr = 'fast'", "train.lr: expected float, got str"),
        ("[train]\nsteps = 1.5", "train.steps: expected int, got float"),
        ("[train]\nsteps = true", "train.steps: expected int, got bool"),
        ("[data]\ndomains = 'code'", "data.domains: expected list"),
        ("[data]\ndomains = ['code', 3]", r"data.domains\[1\]: expected str"),
        ("[run]\ncreated = 2024-01-01T00:00:00Z", "run.created: expected str"),
        ("[run]\nmode = 'ring'", "run.mode"),
        ("[run]\naccess = 'secret'", "run.access"),
        ("[run]\ncreated = 'yesterday'", "run.created"),
        ("[pipeline]\nswap = 'random'", "pipeline.swap"),
        ("[pipeline]\nstages = 4\nblocks_per_stage = [1, 2]", "pipeline.blocks_per_stage"),
        ("[pipeline]\npath_length = 9", "pipeline.path_length"),
        ("[train]\nlr = -1.0", "train.lr"),
        ("[train]\nlr = inf", "train.lr: must be finite"),
        ("[swarm]\nheartbeat_ttl_s = 1.0", "swarm.heartbeat_ttl_s"),
        ("[swarm]\nheartbeat_ttl_s = 241.0", "swarm.heartbeat_ttl_s: at most 240"),
        ("[data]\nval_fraction = 0.0", r"data.val_fraction: must be in \(0, 1\)"),
        ("[data]\nval_fraction = 1.0", r"data.val_fraction: must be in \(0, 1\)"),
        ("[owner]\npublic_key = 'zz'", "owner.public_key"),
        ("[train]\nlr = 1" + "0" * 400, "train.lr: number too large"),
        ("[train]\nseed = 1" + "0" * 40, "train.seed"),
    ],
)
def test_bad_specs_name_the_problem(text, where):
    if text.startswith("[") and not text.startswith("[run"):
        text = "[run]\ncreated = '2025-01-01T00:00:00'\n" + text  # so only the line under test is wrong
    with pytest.raises(InvalidSpec, match=where):
        loads_spec(text)


def test_minimal_hand_written_spec_takes_defaults():
    loaded = loads_spec("[run]\nname = 'hand'\ncreated = '2025-01-01T00:00:00'\n")
    assert loaded.run.name == "hand" and loaded.pipeline.stages == 4 and loaded.owner.signature == ""


def test_default_domains_are_the_embedded_ones():
    from trainer.data import EMBEDDED_DOMAINS as TRAINER_DOMAINS

    assert EMBEDDED_DOMAINS == TRAINER_DOMAINS
    assert spec().data.domains == list(EMBEDDED_DOMAINS)


def test_heartbeat_ttl_fits_the_record_lifetime():
    from protocol.records import MAX_RECORD_TTL_S

    assert MAX_HEARTBEAT_TTL_S * HEARTBEAT_RETENTION <= MAX_RECORD_TTL_S
    assert spec(heartbeat_ttl_s=MAX_HEARTBEAT_TTL_S).swarm.heartbeat_ttl_s == MAX_HEARTBEAT_TTL_S


def test_unknown_override():
    with pytest.raises(InvalidSpec, match="colour"):
        spec(colour="red")


def test_load_spec_file_errors(tmp_path):
    with pytest.raises(InvalidSpec, match="does not exist"):
        load_spec(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"\xff\xfe[run]")
    with pytest.raises(InvalidSpec, match="not UTF-8"):
        load_spec(bad)
    bad.write_text("[run]\nname = ")
    with pytest.raises(InvalidSpec, match="bad.toml: run spec is not valid TOML"):
        load_spec(bad)
    good = tmp_path / "run.toml"
    good.write_text(dumps_spec(spec()))
    assert run_id(load_spec(good)) == run_id(spec())
