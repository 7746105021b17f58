"""Run specs: TOML <-> typed dataclasses, canonical bytes, run id, owner signature."""
from __future__ import annotations

import dataclasses
import hashlib
import math
import tomllib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import tomli_w
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol import wire
from protocol.errors import BadSignature, InvalidSpec
from protocol.keys import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, public_key_bytes, sign, verify

SPEC_DOMAIN = b"swarmtrain/runspec/v1\x00"
RUN_ID_BYTES = 16
MODES = ("pipeline", "zo", "experts")
SCHEDULES = ("skip", "full", "random_skip")
ACTIVATION_DTYPES = ("float32", "bfloat16", "float16")
RECOVERIES = ("checkfree", "random", "checkpoint")
ACCESS = ("public", "private")
SWAPS = ("none", "checkfree_plus")
GUARDS = ("ban", "off")
MAX_STAGES = 1024
MAX_DOMAINS = 64
MAX_SPEC_CHARS = 1 << 16
# The domains every Python install ships; equal to trainer.data.EMBEDDED_DOMAINS (a test checks),
# repeated here because the protocol layer must not import the trainer.
EMBEDDED_DOMAINS = ("python", "prose", "arithmetic")
# Heartbeat records stay in the DHT for HEARTBEAT_RETENTION x heartbeat_ttl_s, and no record may
# live longer than records.MAX_RECORD_TTL_S (3600 s), so the ttl is at most 3600 / 15 s.
HEARTBEAT_RETENTION = 15
MAX_HEARTBEAT_TTL_S = 240.0


@dataclass(frozen=True)
class RunSection:
    name: str = "swarmtrain-run"
    mode: str = "pipeline"
    access: str = "public"
    created: str = ""  # ISO 8601; make_spec fills in the current UTC time


@dataclass(frozen=True)
class ModelSection:
    preset: str = "tiny"
    seq_len: int = 128


@dataclass(frozen=True)
class DataSection:
    domains: list[str] = field(default_factory=lambda: list(EMBEDDED_DOMAINS))  # embedded domain names or paths
    val_fraction: float = 0.1


@dataclass(frozen=True)
class TrainSection:
    lr: float = 3e-4
    batch_size: int = 8
    steps: int = 1000
    seed: int = 0


@dataclass(frozen=True)
class PipelineSection:
    stages: int = 4
    blocks_per_stage: list[int] | None = None  # None: split the model's blocks evenly
    path_length: int = 3
    swap: str = "checkfree_plus"
    microbatches: int = 8
    microbatch_size: int = 4
    memory: int = 4  # microbatches whose activations a node holds at once (forward to backward)
    min_nodes: int = 1  # the first iteration waits until this many nodes are live (and every stage has one)
    planner: str = "leader"  # leader: measured, scheduled paths; local: each data node round-robins, network-blind
    schedule: str = "skip"  # what the leader plans: skip (the scheduler), or the baselines full and random_skip
    activation_dtype: str = "float32"  # activations and their gradients between stages: float32, bfloat16, float16
    # a lost stage (no live replica) is rebuilt by: checkfree (from its neighbours; with swap
    # checkfree_plus the edge stages copy their swap partners) or random (re-initialised: the baseline)
    recovery: str = "checkfree"
    move_after_s: float = 30.0  # a lost stage without a live claimant this long takes a node from the most replicated stage
    # recovery = "checkpoint" (the baseline): every node saves its stage every checkpoint_every
    # iterations to storage they share (swarmtrain node --checkpoint-dir); on a lost stage everyone
    # rolls back to the last complete checkpoint and waits restart_delay_s, as a restart would
    checkpoint_every: int = 10
    restart_delay_s: float = 10.0
    # guard = "ban": every node checks the tensors peers hand it (non-finite values; RMS or norm
    # outside outlier_factor x the running scale), refuses bad ones and bans their senders
    # (trainer/pipeline/guard.py); "off" takes everything as sent (the baseline for comparisons)
    guard: str = "ban"
    outlier_factor: float = 8.0


@dataclass(frozen=True)
class SwarmSection:
    heartbeat_interval_s: float = 2.0
    heartbeat_ttl_s: float = 8.0


@dataclass(frozen=True)
class ZoSection:
    """Mode zo (shared-randomness SPSA); docs/zo.md explains each value."""

    eps: float = 1e-3  # perturbation size: probes evaluate w + eps z and w - eps z
    probes: int = 1  # samples (seeds) per node per step; each sends one byte
    params: list[str] = field(default_factory=list)  # fnmatch patterns of trained parameter names; [] = all
    quantizer: str = "log"  # log or linear
    g_max: float = 64.0  # largest |projected gradient| a byte carries; larger values are clipped
    g_min: float = 1e-3  # smallest non-zero level of the log scale
    aggregation: str = "mean"  # mean, trimmed or clip (robust options against malicious scalars)
    trim_fraction: float = 0.25  # trimmed: drop this fraction of the smallest and of the largest scalars
    clip_factor: float = 3.0  # clip radius (and outlier threshold) = clip_factor x the median |scalar|
    # with trimmed or clip, a node with ban_after outlier scalars in the last ban_window commits is
    # banned: left out of every later commit (0 = never ban)
    ban_window: int = 10
    ban_after: int = 6
    min_nodes: int = 1  # the first step waits until this many nodes are live
    step_timeout_s: float = 10.0  # the committer closes a step this long after opening it
    hash_every: int = 10  # steps between published weight hashes
    snapshot_every: int = 100  # steps between local snapshots (restart and join points)
    base_hash: str = ""  # hex blake2b-256 of the base weights; "" = initialise from train.seed


@dataclass(frozen=True)
class ExpertSpec:
    """One expert job of mode experts: its data, model shape and training length."""

    domain: str = ""  # a data.domains entry; "*" (the dense model) trains on all of them
    preset: str = "tiny"  # the base shape; d_model and n_layers override its width and depth
    d_model: int = 0  # 0: the preset's (heads keep the preset's head size, the MLP its ratio)
    n_layers: int = 0  # 0: the preset's
    steps: int = 100
    lr: float = 3e-3


@dataclass(frozen=True)
class ExpertsSection:
    """Mode experts (HDEE); docs/experts.md explains each value. `swarmtrain ensemble plan` fills it in."""

    heterogeneous: list[ExpertSpec] = field(default_factory=list)  # one per domain, in data.domains order
    homogeneous: list[ExpertSpec] = field(default_factory=list)  # the baseline of the same total compute
    dense: list[ExpertSpec] = field(default_factory=list)  # [] or one model on all domains, same total compute
    budget: int = 0  # total compute of each ensemble: the sum of parameters x steps of its experts
    heterogeneity: str = "both"  # what the allocation varied by difficulty: sizes, steps or both
    difficulty: list[float] = field(default_factory=list)  # per domain: what judged it (see difficulty_source)
    difficulty_source: str = ""  # "seed": the seed model's loss; "zlib": compressed bits per byte
    seed_steps: int = 0  # steps of the shared seed model trained (on all domains) before the plan; 0 = none
    checkpoint_every: int = 20  # steps per round: a checkpoint, and the group's average when several train it
    lease_s: float = 30.0  # a job claim expires this long after its last renewal
    replicas: int = 2  # nodes besides its trainer that keep a copy of each job's latest checkpoint
    prior_fraction: float = 0.05  # chunks held out (from training) to estimate the ensemble's prior


@dataclass(frozen=True)
class OwnerSection:
    public_key: str = ""  # hex of the owner's raw Ed25519 public key
    signature: str = ""  # hex of the owner's signature over canonical_bytes(spec)


@dataclass(frozen=True)
class RunSpec:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    pipeline: PipelineSection = field(default_factory=PipelineSection)
    swarm: SwarmSection = field(default_factory=SwarmSection)
    zo: ZoSection = field(default_factory=ZoSection)
    experts: ExpertsSection = field(default_factory=ExpertsSection)
    owner: OwnerSection = field(default_factory=OwnerSection)


SECTIONS: dict[str, type] = {
    "run": RunSection,
    "model": ModelSection,
    "data": DataSection,
    "train": TrainSection,
    "pipeline": PipelineSection,
    "swarm": SwarmSection,
    "zo": ZoSection,
    "experts": ExpertsSection,
    "owner": OwnerSection,
}
# tables that may appear as arrays of tables ([[experts.heterogeneous]])
TABLE_TYPES: dict[str, type] = {"ExpertSpec": ExpertSpec}


def _type_name(value: Any) -> str:
    return "table" if isinstance(value, dict) else type(value).__name__


def _coerce(path: str, annotation: str, value: Any) -> Any:
    """Check one TOML value against its field annotation; ints widen to float."""
    if annotation == "str" and type(value) is str:
        return value
    if annotation == "int" and type(value) is int:
        return value
    if annotation == "float" and type(value) in (int, float):
        try:
            value = float(value)
        except OverflowError:
            raise InvalidSpec(f"{path}: number too large") from None
        if not math.isfinite(value):
            raise InvalidSpec(f"{path}: must be finite, got {value}")
        return value
    if annotation.startswith("list[") and type(value) is list:
        inner = annotation[5:annotation.index("]")]
        if inner in TABLE_TYPES:
            return [_section(f"{path}[{i}]", TABLE_TYPES[inner], item) for i, item in enumerate(value)]
        return [_coerce(f"{path}[{i}]", inner, item) for i, item in enumerate(value)]
    expected = annotation.replace(" | None", "")
    raise InvalidSpec(f"{path}: expected {expected}, got {_type_name(value)} {value!r:.40}")


def _section(name: str, cls: type, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise InvalidSpec(f"{name}: expected a table, got {_type_name(raw)}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise InvalidSpec(f"{name}.{unknown[0]}: unknown key (allowed: {', '.join(known)})")
    values = {key: _coerce(f"{name}.{key}", known[key].type, value) for key, value in raw.items()}
    return cls(**values)


def spec_from_dict(raw: Any) -> RunSpec:
    """Build and check a RunSpec from nested dicts (parsed TOML); missing keys take defaults."""
    if not isinstance(raw, dict):
        raise InvalidSpec(f"run spec must be a table, got {_type_name(raw)}")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise InvalidSpec(f"{unknown[0]}: unknown section (allowed: {', '.join(SECTIONS)})")
    spec = RunSpec(**{name: _section(name, SECTIONS[name], raw[name]) for name in raw})
    check_spec(spec)
    return spec


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidSpec(message)


def _is_hex(text: str, nbytes: int) -> bool:
    try:
        return len(text) == 2 * nbytes and len(bytes.fromhex(text)) == nbytes
    except ValueError:
        return False


def check_spec(spec: RunSpec) -> None:
    """Range and consistency checks; raises InvalidSpec naming the key."""
    run, model, data, train, pipe, swarm, zo, experts, owner = (getattr(spec, name) for name in SECTIONS)
    _require(0 < len(run.name) <= 64 and run.name.isprintable(), "run.name: 1..64 printable characters")
    _require(run.mode in MODES, f"run.mode: {run.mode!r} is not one of {', '.join(MODES)}")
    _require(run.access in ACCESS, f"run.access: {run.access!r} is not one of {', '.join(ACCESS)}")
    try:
        datetime.fromisoformat(run.created)
    except ValueError:
        raise InvalidSpec(f"run.created: {run.created!r:.40} is not an ISO 8601 date-time") from None
    _require(0 < len(model.preset) <= 64, "model.preset: 1..64 characters")
    _require(0 < model.seq_len <= 1 << 20, "model.seq_len: must be in 1..1048576")
    _require(0 < len(data.domains) <= MAX_DOMAINS, f"data.domains: 1..{MAX_DOMAINS} entries")
    _require(all(0 < len(d) <= 256 for d in data.domains), "data.domains: each entry 1..256 characters")
    _require(len(set(data.domains)) == len(data.domains), "data.domains: entries must be distinct")
    _require(0.0 < data.val_fraction < 1.0, "data.val_fraction: must be in (0, 1)")
    _require(0.0 < train.lr < 1e3, "train.lr: must be > 0")
    _require(train.batch_size > 0, "train.batch_size: must be > 0")
    _require(train.steps > 0, "train.steps: must be > 0")
    _require(0 <= train.seed < 1 << 63, "train.seed: must be in 0..2**63-1")
    _require(0 < pipe.stages <= MAX_STAGES, f"pipeline.stages: must be in 1..{MAX_STAGES}")
    _require(run.mode != "pipeline" or pipe.stages >= 2, "pipeline.stages: pipeline mode needs at least 2 stages")
    if pipe.blocks_per_stage is not None:
        blocks = pipe.blocks_per_stage
        _require(len(blocks) == pipe.stages, f"pipeline.blocks_per_stage: needs {pipe.stages} entries, got {len(blocks)}")
        ok = all(count >= (0 if stage == 0 else 1) for stage, count in enumerate(blocks))
        _require(ok, "pipeline.blocks_per_stage: stage 0 needs >= 0 blocks, the others >= 1")
    _require(1 <= pipe.path_length <= pipe.stages, "pipeline.path_length: must be in 1..pipeline.stages")
    _require(pipe.swap in SWAPS, f"pipeline.swap: {pipe.swap!r} is not one of {', '.join(SWAPS)}")
    _require(pipe.swap != "checkfree_plus" or pipe.stages >= 3, "pipeline.swap: checkfree_plus needs at least 3 stages")
    _require(pipe.microbatches > 0, "pipeline.microbatches: must be > 0")
    _require(pipe.microbatch_size > 0, "pipeline.microbatch_size: must be > 0")
    _require(1 <= pipe.memory <= 4096, "pipeline.memory: must be in 1..4096")
    _require(1 <= pipe.min_nodes <= 4096, "pipeline.min_nodes: must be in 1..4096")
    _require(pipe.planner in ("leader", "local"), f"pipeline.planner: {pipe.planner!r} is not one of leader, local")
    _require(pipe.schedule in SCHEDULES, f"pipeline.schedule: {pipe.schedule!r} is not one of {', '.join(SCHEDULES)}")
    _require(pipe.activation_dtype in ACTIVATION_DTYPES,
             f"pipeline.activation_dtype: {pipe.activation_dtype!r} is not one of {', '.join(ACTIVATION_DTYPES)}")
    _require(pipe.recovery in RECOVERIES, f"pipeline.recovery: {pipe.recovery!r} is not one of {', '.join(RECOVERIES)}")
    _require(0 <= pipe.move_after_s <= 86400, "pipeline.move_after_s: must be in 0..86400")
    _require(1 <= pipe.checkpoint_every <= 10**6, "pipeline.checkpoint_every: must be in 1..1000000")
    _require(0 <= pipe.restart_delay_s <= 3600, "pipeline.restart_delay_s: must be in 0..3600")
    _require(pipe.guard in GUARDS, f"pipeline.guard: {pipe.guard!r} is not one of {', '.join(GUARDS)}")
    _require(1.0 < pipe.outlier_factor <= 1e6, "pipeline.outlier_factor: must be in (1, 1000000]")
    _require(swarm.heartbeat_interval_s > 0, "swarm.heartbeat_interval_s: must be > 0")
    _require(swarm.heartbeat_ttl_s > swarm.heartbeat_interval_s, "swarm.heartbeat_ttl_s: must exceed heartbeat_interval_s")
    _require(
        swarm.heartbeat_ttl_s <= MAX_HEARTBEAT_TTL_S,
        f"swarm.heartbeat_ttl_s: at most {MAX_HEARTBEAT_TTL_S:.0f} (heartbeats are kept {HEARTBEAT_RETENTION} x ttl, "
        "records live at most 3600 s)",
    )
    _check_zo(zo)
    _check_experts(experts, data)
    _require(owner.public_key == "" or _is_hex(owner.public_key, PUBLIC_KEY_BYTES), "owner.public_key: 64 hex digits")
    _require(owner.signature == "" or _is_hex(owner.signature, SIGNATURE_BYTES), "owner.signature: 128 hex digits")


ZO_QUANTIZERS = ("log", "linear")
ZO_AGGREGATIONS = ("mean", "trimmed", "clip")
MAX_ZO_PROBES = 64
MAX_ZO_PARAM_PATTERNS = 64


def _check_zo(zo: ZoSection) -> None:
    _require(0.0 < zo.eps <= 1.0, "zo.eps: must be in (0, 1]")
    _require(1 <= zo.probes <= MAX_ZO_PROBES, f"zo.probes: must be in 1..{MAX_ZO_PROBES}")
    _require(len(zo.params) <= MAX_ZO_PARAM_PATTERNS, f"zo.params: at most {MAX_ZO_PARAM_PATTERNS} patterns")
    _require(all(0 < len(p) <= 256 for p in zo.params), "zo.params: each pattern 1..256 characters")
    _require(zo.quantizer in ZO_QUANTIZERS, f"zo.quantizer: {zo.quantizer!r} is not one of {', '.join(ZO_QUANTIZERS)}")
    _require(0.0 < zo.g_max < 1e30, "zo.g_max: must be > 0")
    _require(zo.quantizer != "log" or 0.0 < zo.g_min < zo.g_max, "zo.g_min: must be in (0, zo.g_max)")
    _require(zo.aggregation in ZO_AGGREGATIONS,
             f"zo.aggregation: {zo.aggregation!r} is not one of {', '.join(ZO_AGGREGATIONS)}")
    _require(0.0 <= zo.trim_fraction < 0.5, "zo.trim_fraction: must be in [0, 0.5)")
    _require(zo.clip_factor > 0.0, "zo.clip_factor: must be > 0")
    _require(1 <= zo.ban_window <= 10_000, "zo.ban_window: must be in 1..10000")
    _require(0 <= zo.ban_after <= zo.ban_window * zo.probes,
             "zo.ban_after: must be in 0..zo.ban_window x zo.probes (0 = never ban)")
    _require(1 <= zo.min_nodes <= 4096, "zo.min_nodes: must be in 1..4096")
    _require(0.0 < zo.step_timeout_s <= 3600.0, "zo.step_timeout_s: must be in (0, 3600]")
    _require(zo.hash_every >= 1, "zo.hash_every: must be >= 1")
    _require(zo.snapshot_every >= 1, "zo.snapshot_every: must be >= 1")
    _require(zo.base_hash == "" or _is_hex(zo.base_hash, 32), "zo.base_hash: 64 hex digits or empty")


HETEROGENEITY = ("sizes", "steps", "both")
DIFFICULTY_SOURCES = ("", "seed", "zlib")
DENSE_DOMAIN = "*"


def _check_expert(path: str, expert: ExpertSpec) -> None:
    _require(0 < len(expert.preset) <= 64, f"{path}.preset: 1..64 characters")
    _require(0 <= expert.d_model <= 1 << 16, f"{path}.d_model: must be in 0..65536 (0: the preset's)")
    _require(0 <= expert.n_layers <= 1024, f"{path}.n_layers: must be in 0..1024 (0: the preset's)")
    _require(1 <= expert.steps <= 10**9, f"{path}.steps: must be in 1..1000000000")
    _require(0.0 < expert.lr < 1e3, f"{path}.lr: must be > 0")


def _check_experts(experts: ExpertsSection, data: DataSection) -> None:
    for name in ("heterogeneous", "homogeneous"):
        entries = getattr(experts, name)
        _require(not entries or [e.domain for e in entries] == data.domains,
                 f"experts.{name}: needs one entry per data.domains entry, in the same order")
        for i, expert in enumerate(entries):
            _check_expert(f"experts.{name}[{i}]", expert)
    _require(len(experts.dense) <= 1, "experts.dense: at most one entry")
    for expert in experts.dense:
        _require(expert.domain == DENSE_DOMAIN, f'experts.dense[0].domain: must be "{DENSE_DOMAIN}" (all domains)')
        _check_expert("experts.dense[0]", expert)
    _require(0 <= experts.budget < 1 << 62, "experts.budget: must be in 0..2**62")
    _require(experts.heterogeneity in HETEROGENEITY,
             f"experts.heterogeneity: {experts.heterogeneity!r} is not one of {', '.join(HETEROGENEITY)}")
    _require(not experts.difficulty or len(experts.difficulty) == len(data.domains),
             "experts.difficulty: one value per data.domains entry (or none)")
    _require(all(0.0 <= d < 1e6 for d in experts.difficulty), "experts.difficulty: values must be >= 0")
    _require(experts.difficulty_source in DIFFICULTY_SOURCES,
             f"experts.difficulty_source: {experts.difficulty_source!r} is not one of seed, zlib or empty")
    _require(0 <= experts.seed_steps <= 10**9, "experts.seed_steps: must be in 0..1000000000")
    _require(1 <= experts.checkpoint_every <= 10**6, "experts.checkpoint_every: must be in 1..1000000")
    _require(0.0 < experts.lease_s <= 3600.0, "experts.lease_s: must be in (0, 3600]")
    _require(0 <= experts.replicas <= 16, "experts.replicas: must be in 0..16")
    _require(0.0 < experts.prior_fraction < 0.5, "experts.prior_fraction: must be in (0, 0.5)")
    _require(data.val_fraction + experts.prior_fraction < 0.9,
             "experts.prior_fraction: with data.val_fraction it must leave at least 10% of the data for training")


def spec_to_dict(spec: RunSpec, *, sort: bool = False) -> dict:
    """Nested dicts (keys sorted if ``sort``); None values are left out because TOML has no null."""

    def clean(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {key: clean(obj[key]) for key in (sorted(obj) if sort else obj) if obj[key] is not None}
        if isinstance(obj, list):
            return [clean(item) for item in obj]
        return obj

    return clean(dataclasses.asdict(spec))


def canonical_bytes(spec: RunSpec) -> bytes:
    """Deterministic bytes of everything but the signature: what the owner signs."""
    raw = spec_to_dict(spec, sort=True)
    raw["owner"].pop("signature")
    return wire.pack(raw)


def _owner_public(spec: RunSpec) -> bytes:
    if not spec.owner.public_key:
        raise InvalidSpec("run spec is not signed (no owner.public_key); sign it with the owner key")
    return bytes.fromhex(spec.owner.public_key)


def run_id(spec: RunSpec) -> bytes:
    """16-byte run id: blake2b of the canonical spec and the owner's public key."""
    return hashlib.blake2b(canonical_bytes(spec) + _owner_public(spec), digest_size=RUN_ID_BYTES).digest()


def sign_spec(spec: RunSpec, private_key: Ed25519PrivateKey) -> RunSpec:
    """A copy of ``spec`` owned and signed by ``private_key`` (changing the owner changes the run id)."""
    owned = dataclasses.replace(spec, owner=OwnerSection(public_key=public_key_bytes(private_key).hex()))
    signature = sign(private_key, SPEC_DOMAIN, canonical_bytes(owned))
    return dataclasses.replace(owned, owner=OwnerSection(owned.owner.public_key, signature.hex()))


def verify_spec(spec: RunSpec) -> None:
    """Raise InvalidSpec if unsigned, BadSignature if the signature does not match the spec."""
    public = _owner_public(spec)
    if not spec.owner.signature:
        raise InvalidSpec("run spec is not signed (no owner.signature); sign it with the owner key")
    try:
        verify(public, SPEC_DOMAIN, canonical_bytes(spec), bytes.fromhex(spec.owner.signature))
    except BadSignature:
        raise BadSignature("run spec signature does not verify: the spec was changed after signing") from None


def _mode_defaults(mode: str) -> dict[str, Any]:
    if mode == "pipeline":
        return {}
    single = {"stages": 1, "path_length": 1, "swap": "none"}
    if mode == "zo":
        # SPSA fine-tuning takes far smaller steps than backprop from scratch; the embedded arithmetic
        # domain is the one the demo fine-tunes a prose-pretrained model on.
        return {**single, "lr": 3e-3, "domains": ["arithmetic"], "params": ["tok_emb.weight"]}
    return single


def make_spec(
    mode: str, preset: str, owner_private_key: Ed25519PrivateKey, access: str = "public", **overrides: Any
) -> RunSpec:
    """A signed spec from defaults; overrides are field names (``lr=1e-3``) or whole sections (``train={...}``)."""
    raw: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS if name != "owner"}
    created = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
    raw["run"].update(mode=mode, access=access, created=created)
    raw["model"]["preset"] = preset
    owners: dict[str, str] = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            # a name in several sections (min_nodes) belongs to the section of the run's mode
            if f.name not in owners or section == mode:
                owners[f.name] = section
    for key, value in {**_mode_defaults(mode), **overrides}.items():
        if key in raw and isinstance(value, dict):
            raw[key].update(value)
        elif key in owners and owners[key] != "owner":
            raw[owners[key]][key] = value
        else:
            raise InvalidSpec(f"{key}: unknown run spec field")
    return sign_spec(spec_from_dict(raw), owner_private_key)


def dumps_spec(spec: RunSpec) -> str:
    return tomli_w.dumps(spec_to_dict(spec))


def loads_spec(text: str) -> RunSpec:
    if not isinstance(text, str):
        raise InvalidSpec(f"run spec must be text, got {type(text).__name__}")
    if len(text) > MAX_SPEC_CHARS:
        raise InvalidSpec(f"run spec is longer than {MAX_SPEC_CHARS} characters")
    try:
        raw = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError) as error:
        raise InvalidSpec(f"run spec is not valid TOML: {error}") from None
    return spec_from_dict(raw)


def load_spec(path: str | Path) -> RunSpec:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidSpec(f"run spec file {path} does not exist (create one with: swarmtrain run init)") from None
    except UnicodeDecodeError:
        raise InvalidSpec(f"run spec file {path} is not UTF-8 text") from None
    except OSError as error:
        raise InvalidSpec(f"cannot read run spec file {path}: {error.strerror}") from None
    try:
        return loads_spec(text)
    except InvalidSpec as error:
        raise InvalidSpec(f"{path}: {error}") from None
